"""Requests on the vault, with the caller's rights.

Reading needs "r" in the caller's view; changing anything needs the operator,
or the owner of the domain the path lies in with "w" in its view. A path
outside the view is ENOENT (and a `denied` event), a visible one used beyond
the caller's rights EACCES (and a `denied` event). Each change is a `vault`
event: who, operation, path.

This is the vault's side of the pyfuse3 adapter: the store below raises
OSError, and what leaves here is `FUSEError` (or a refusal of `access`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from typing import TypeVar

import pyfuse3

from . import events
from .access import Access
from .config import Config
from .dispatcher import Dispatcher
from .errors import OutheisError
from .names import OPERATOR
from .offloop import OffLoop
from .operators import is_stranger
from .vault import NAME_MAX, Inode, Listing, Store, VaultFile, domain_of, names_in

RENAME_NOREPLACE = 1
T = TypeVar("T")
# Files the server makes belong to its user (root): never setuid, setgid or
# sticky, never writable by group or others (who could then bypass the server).
SAFE_MODE = 0o755
# The mode bits of a file its caller holds open but no longer sees: no write bits.
HELD_MASK = 0o7555


def where(path: str) -> str:
    return f"/vault/{path}" if path else "/vault"


def attrs(inode: int, st: os.stat_result, mask: int = 0o7777) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = inode
    a.generation = 0
    a.entry_timeout = 0  # the view differs per caller
    a.attr_timeout = 0
    a.st_mode = (st.st_mode & ~0o7777) | (st.st_mode & mask)
    a.st_nlink = st.st_nlink
    a.st_uid = st.st_uid
    a.st_gid = st.st_gid
    a.st_rdev = 0
    a.st_size = st.st_size
    a.st_blksize = 4096
    a.st_blocks = st.st_blocks
    a.st_atime_ns = st.st_atime_ns
    a.st_mtime_ns = st.st_mtime_ns
    a.st_ctime_ns = st.st_ctime_ns
    return a


class VaultOps:
    def __init__(
        self,
        d: Dispatcher,
        config: Config,
        access: Access,
        store: Store,
        fhs: Iterator[int],
        offloop: OffLoop | None = None,
    ) -> None:
        self.d = d
        self.offloop = offloop or OffLoop()  # listings, in turns shared with open files
        self.rights = access
        self.store = store
        self.owners = config.vault
        self.fhs = fhs  # file handle numbers, shared with the agent files
        self.listings: dict[int, Listing] = {}  # open folders of the vault, by fh

    def path(self, inode: int) -> str:
        return _do(lambda: self.store.path(inode))

    # -- rights ------------------------------------------------------------------------

    def perms(self, who: str, path: str) -> str | None:
        return self.rights.perms(who, where(path))

    def see(self, who: str, path: str, op: str) -> str:
        return self.rights.visible(who, where(path), op)

    def may_change(self, who: str, path: str, perms: str) -> bool:
        if who == OPERATOR:
            return True
        return "w" in perms and self.owners.get(domain_of(path) or "") == who

    def change(self, who: str, path: str, op: str, new: bool = False) -> None:
        """Refuse unless `who` may change `path`; the caller then does it. A `new`
        name in a folder the caller sees is EACCES, never ENOENT or EEXIST: whether
        a hidden name exists does not leak."""
        if new:
            self.see(who, path.rpartition("/")[0], op)
            perms = self.perms(who, path) or ""
        else:
            perms = self.see(who, path, op)
        if not self.may_change(who, path, perms):
            domain = domain_of(path)
            owner = self.owners.get(domain or "")
            why = (
                f"{where(path)} belongs to {owner}" if owner else f"{where(path)} is the operator's"
            )
            raise self.rights.refuse(who, where(path), op, why)

    def _narrowed_below(self, who: str, path: str) -> bool:
        """Whether the caller has a grant strictly below `path` (rights there
        differ from the folder's, and a rename would carry or drop them)."""
        return self.rights.granted_below(who, where(path))

    def record(self, who: str, op: str, path: str, **more: str) -> None:
        """A change in the vault as a `vault` event, unless `vault_events = "off"`
        (refusals are `denied` events whatever it says)."""
        if self.d.config.vault_events == "all":
            self.d.note(events.vault(who, op, where(path), **more))

    def mask(self, who: str, path: str, st: os.stat_result) -> int:
        """The mode bits shown to `who`: what it may do. A folder it sees can be
        listed and walked through; a file shows read bits only if it may read it,
        write bits only if it may change it."""
        perms = self.perms(who, path) or ""
        mask = 0o7111
        if "r" in perms or stat.S_ISDIR(st.st_mode):
            mask |= 0o444
        if self.may_change(who, path, perms):
            mask |= 0o222
        return mask

    def entry(self, who: str, ino: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        self.rights.dentries.shown(where(ino.path))  # the kernel may now hold the name
        if who == OPERATOR:  # the operator's view needs no path: the common case, kept cheap
            return attrs(ino.number, st)
        return attrs(ino.number, st, self.mask(who, ino.path, st))

    def _child(self, parent: int, name: bytes) -> tuple[Inode, str, str]:
        """(parent inode, name, path of the name) of a request about a name."""
        pino = self._inode(parent)
        text = os.fsdecode(name)
        return pino, text, _do(lambda: self.store.join(pino.path, text))

    def _inode(self, number: int) -> Inode:
        return _do(lambda: self.store.inode(number))

    def _found(self, who: str, parent: Inode, name: str) -> pyfuse3.EntryAttributes:
        """The reply to a request that makes the kernel know a name: counted."""
        ino, st = _do(lambda: self.store.entry(parent, name))
        a = self.entry(who, ino, st)
        self.store.looked_up(ino)
        return a

    # -- names -------------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes, who: str) -> pyfuse3.EntryAttributes:
        pino = self._inode(parent)
        text = _do(lambda: self.store.check_name(os.fsdecode(name)))
        if is_stranger(who):  # refused before the name is looked at: nothing leaks
            self.see(who, self.store.join(pino.path, text), "lookup")
        ino, st = _do(lambda: self.store.entry(pino, text))
        if who != OPERATOR:
            try:
                self.see(who, ino.path, "lookup")
            except OutheisError:
                self.store.forget(ino.number, 0)
                raise
        a = self.entry(who, ino, st)
        self.store.looked_up(ino)
        return a

    def forget(self, number: int, n: int) -> None:
        self.store.forget(number, n)

    async def getattr(self, inode: int, who: str) -> pyfuse3.EntryAttributes:
        ino = self._inode(inode)
        st = _do(lambda: self.store.lstat(ino))
        if who != OPERATOR and self.perms(who, ino.path) is None:
            if self._held_open(who, inode):
                # Out of its view since it opened it (a revoke, a narrowing): the open
                # file keeps working, and the kernel asks for its attributes to read.
                return attrs(ino.number, st, HELD_MASK)
            self.see(who, ino.path, "stat")  # refused: ENOENT and a `denied` event
        return self.entry(who, ino, st)

    def _held_open(self, who: str, inode: int) -> bool:
        return any(f.who == who and f.ino.number == inode for f in self.store.files.values())

    async def access(self, inode: int, mode: int, who: str) -> bool:
        """Exactly what open (and opendir, chdir, exec) would allow this caller."""
        ino = self._inode(inode)
        path = ino.path
        self.see(who, path, "access")
        st = _do(lambda: self.store.lstat(ino))
        rights = self.mask(who, path, st)  # the view's part; the backing file's below
        if mode & os.R_OK and not rights & 0o444:
            return False
        if mode & os.W_OK and not rights & 0o222:
            return False
        if mode & os.X_OK and not (stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111):
            return False
        return _do(lambda: self.store.access(ino, mode))

    def opendir(self, fh: int, inode: int, who: str) -> None:
        ino = self._inode(inode) if inode != self.store.root_inode else self.store.top
        self.see(who, ino.path, "readdir")
        self.listings[fh] = Listing(ino)

    async def readdir(self, fh: int, start: int, who: str, token: pyfuse3.ReaddirToken) -> None:
        """Entries from the names the folder had when the listing began (or was
        rewound): offsets stay valid while the folder changes, so an entry neither
        removed nor added meanwhile is returned exactly once. Names removed since
        are left out; names added since are not listed. Reading and sifting the
        names costs in proportion to the folder, which its owner controls: that is
        done on a worker thread, one listing at a time per caller (`offloop`)."""
        ls = self.listings[fh]
        if start == 0:
            base = ls.ino.path
            ls.uniform = self._uniform(who, base)
            perms = None if ls.uniform is not None else self.rights.perms_now(who)
            async with self.offloop.turn(who):
                fd = _do(lambda: self.store.open_folder(ls.ino))  # the thread closes it
                try:
                    ls.names = await self.offloop.run(lambda: _sifted(fd, base, perms))
                except OSError as e:
                    raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        for i in range(start, len(ls.names)):
            name = ls.names[i]
            try:
                ino, st = self.store.stat_in(ls.ino, name)
            except OSError:
                continue  # gone since the listing began
            if ls.uniform is None:
                a = self.entry(who, ino, st)
            else:
                a = attrs(ino.number, st, ls.uniform | (0o444 if stat.S_ISDIR(st.st_mode) else 0))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), a, i + 1):
                self.store.forget(ino.number, 0)
                return
            self.store.looked_up(ino)

    def _uniform(self, who: str, base: str) -> int | None:
        """The mode mask every entry of folder `base` shows to `who`, when all of
        them have the same rights: the folder lies in a domain (or is the operator's
        anything) and no grant of the caller lies below it. None: ask per entry."""
        if who == OPERATOR:
            return 0o7777
        if not base or self._narrowed_below(who, base):
            return None
        perms = self.perms(who, base)
        if not perms:  # hidden, or a folder only walked through: entries differ
            return None
        mask = 0o7111 | (0o444 if "r" in perms else 0)
        if self.may_change(who, base + "/x", perms):
            mask |= 0o222
        return mask

    def releasedir(self, fh: int) -> None:
        self.listings.pop(fh, None)

    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, who: str,
    ) -> pyfuse3.EntryAttributes:  # fmt: skip
        ino = self._inode(inode)
        path = ino.path
        self.change(who, path, "setattr")
        f = self.store.files.get(fh) if fh is not None else None
        if fields.update_uid or fields.update_gid:
            st = _do(lambda: self.store.lstat(ino))
            uid = attr.st_uid if fields.update_uid else st.st_uid
            gid = attr.st_gid if fields.update_gid else st.st_gid
            _do(lambda: self.store.chown(ino, uid, gid))
        if fields.update_size:
            if f is not None:
                _do(lambda: os.ftruncate(f.fd, attr.st_size))
            else:
                _do(lambda: self.store.truncate(ino, attr.st_size))
            self.record(who, "truncate", path)
        if fields.update_mode:
            _do(lambda: self.store.chmod(ino, attr.st_mode & SAFE_MODE))
            self.record(who, "chmod", path)
        if fields.update_atime or fields.update_mtime:
            _do(
                lambda: self.store.utime(
                    ino,
                    attr.st_atime_ns if fields.update_atime else None,
                    attr.st_mtime_ns if fields.update_mtime else None,
                )
            )
            self.record(who, "utime", path)
        return self.entry(who, ino, _do(lambda: self.store.lstat(ino)))

    async def mkdir(self, parent: int, name: bytes, mode: int, who: str) -> pyfuse3.EntryAttributes:
        pino, text, path = self._child(parent, name)
        self.change(who, path, "mkdir", new=True)
        _do(lambda: self.store.mkdir(pino, text, mode & SAFE_MODE))
        self.record(who, "mkdir", path)
        return self._found(who, pino, text)

    async def mknod(self, parent: int, name: bytes, mode: int, who: str) -> pyfuse3.EntryAttributes:
        """Regular files only: the kernel opens FIFOs and devices without asking
        the server, so no view would apply to them."""
        pino, text, path = self._child(parent, name)
        if not stat.S_ISREG(mode):
            raise fail(errno.EPERM)
        self.change(who, path, "mknod", new=True)
        _do(lambda: self.store.mknod(pino, text, mode & (SAFE_MODE | stat.S_IFREG)))
        self.record(who, "mknod", path)
        return self._found(who, pino, text)

    def _exists(self, pino: Inode, text: str) -> os.stat_result:
        return _do(lambda: os.stat(text, dir_fd=self.store.fd(pino), follow_symlinks=False))

    def _existing(self, who: str, pino: Inode, text: str) -> None:
        """ENOENT for a missing name before EACCES for an agent; the operator may do
        anything, so the backing call answers for it."""
        if who != OPERATOR:
            self._exists(pino, text)

    async def rmdir(self, parent: int, name: bytes, who: str) -> None:
        pino, text, path = self._child(parent, name)
        self._existing(who, pino, text)
        self.change(who, path, "rmdir")
        _do(lambda: self.store.rmdir(pino, text))
        self.record(who, "rmdir", path)

    async def unlink(self, parent: int, name: bytes, who: str) -> None:
        pino, text, path = self._child(parent, name)
        self._existing(who, pino, text)
        self.change(who, path, "unlink")
        _do(lambda: self.store.unlink(pino, text))
        self.record(who, "unlink", path)

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int,
        who: str,
    ) -> None:  # fmt: skip
        opino, otext, old = self._child(old_parent, old_name)
        npino, ntext, new = self._child(new_parent, new_name)
        if flags & ~RENAME_NOREPLACE:
            raise fail(errno.EINVAL)  # RENAME_EXCHANGE, RENAME_WHITEOUT
        st = self._exists(opino, otext)
        self.change(who, old, "rename")
        self.change(who, new, "rename", new=True)
        if self._narrowed_below(who, old) or self._narrowed_below(who, new):
            why = "a path below it is granted differently: moving it would change that view"
            raise self.rights.refuse(who, where(old), "rename", why)
        if flags & RENAME_NOREPLACE:
            try:
                os.stat(ntext, dir_fd=self.store.fd(npino), follow_symlinks=False)
                raise fail(errno.EEXIST)
            except FileNotFoundError:
                pass
        _do(lambda: self.store.rename(opino, otext, npino, ntext))
        self.store.moved(st, npino, ntext)
        self.record(who, "rename", old, to=where(new))

    async def symlink(
        self, parent: int, name: bytes, target: bytes, who: str
    ) -> pyfuse3.EntryAttributes:
        pino, text, path = self._child(parent, name)
        self.change(who, path, "symlink", new=True)
        _do(lambda: self.store.symlink(pino, text, os.fsdecode(target)))
        self.record(who, "symlink", path)
        return self._found(who, pino, text)

    async def readlink(self, inode: int, who: str) -> bytes:
        ino = self._inode(inode)
        path = ino.path
        if "r" not in self.see(who, path, "readlink"):
            raise self.rights.refuse(who, where(path), "readlink", f"{who} may not read this")
        return os.fsencode(_do(lambda: self.store.readlink(ino)))

    async def link(
        self, inode: int, new_parent: int, new_name: bytes, who: str
    ) -> pyfuse3.EntryAttributes:
        ino = self._inode(inode)
        old = ino.path
        npino, ntext, new = self._child(new_parent, new_name)
        self.change(who, old, "link")
        self.change(who, new, "link", new=True)
        _do(lambda: self.store.link(ino, npino, ntext))
        self.record(who, "link", new, target=where(old))
        return self._found(who, npino, ntext)

    # -- files -------------------------------------------------------------------------

    def _new_fh(self, fd: int, ino: Inode, who: str) -> int:
        fh = next(self.fhs)
        self.store.files[fh] = VaultFile(fd, ino, who)
        return fh

    async def open(self, inode: int, flags: int, who: str) -> pyfuse3.FileInfo:
        ino = self._inode(inode)
        path = ino.path
        acc = flags & os.O_ACCMODE
        read = acc in (os.O_RDONLY, os.O_RDWR)
        write = acc in (os.O_WRONLY, os.O_RDWR) or bool(flags & os.O_TRUNC)
        perms = self.see(who, path, "open")
        if read and "r" not in perms:
            raise self.rights.refuse(who, where(path), "open", f"{who} may not read this")
        if write:
            self.change(who, path, "open")
        fd = _do(lambda: self.store.open(ino, flags))
        if flags & os.O_TRUNC:
            self.record(who, "truncate", path)
        return pyfuse3.FileInfo(fh=self._new_fh(fd, ino, who), keep_cache=False)

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, who: str
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        pino, text, path = self._child(parent, name)
        self.change(who, path, "create", new=True)
        fd, ino = _do(lambda: self.store.create(pino, text, flags, mode & SAFE_MODE))
        self.record(who, "create", path)
        info = pyfuse3.FileInfo(fh=self._new_fh(fd, ino, who), keep_cache=False)
        a = self.entry(who, ino, os.fstat(fd))
        self.store.looked_up(ino)
        return info, a

    def read(self, f: VaultFile, off: int, size: int) -> bytes:
        return _do(lambda: os.pread(f.fd, size, off))

    def write(self, f: VaultFile, off: int, buf: bytes) -> int:
        n = _do(lambda: os.pwrite(f.fd, buf, off))
        if not f.written:
            f.written = True
            self.record(f.who, "write", f.path)
        return n

    def release(self, fh: int) -> None:
        f = self.store.files.pop(fh, None)
        if f is not None:
            self.store.closed(f)

    def fsync(self, f: VaultFile) -> None:
        _do(lambda: os.fsync(f.fd))

    def statfs(self) -> pyfuse3.StatvfsData:
        """The backing filesystem's figures, for the whole mount."""
        v = _do(self.store.statvfs)
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize = v.f_bsize, v.f_frsize
        s.f_blocks, s.f_bfree, s.f_bavail = v.f_blocks, v.f_bfree, v.f_bavail
        s.f_files, s.f_ffree, s.f_favail = v.f_files, v.f_ffree, v.f_favail
        s.f_namemax = min(v.f_namemax, NAME_MAX)
        return s


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def _sifted(fd: int, base: str, perms: Callable[[str], str | None] | None) -> list[str]:
    """The names of the folder open as `fd` that can be listed: UTF-8 (else no
    event could name them), and, unless every entry shows the same (`perms` is
    None), seen by the caller. Runs off the event loop."""
    out = []
    for name in names_in(fd):
        if not name.isascii():
            try:
                name.encode()
            except UnicodeEncodeError:
                continue
        if perms is None or perms(where(f"{base}/{name}" if base else name)) is not None:
            out.append(name)
    return out


def _do(fn: Callable[[], T]) -> T:
    """Run a backing call: its OSError becomes the same errno for the kernel."""
    try:
        return fn()
    except OSError as e:
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
