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
from .vault import Store, VaultFile, domain_of

RENAME_NOREPLACE = 1
T = TypeVar("T")
# Files the server makes belong to its user (root): never setuid, setgid or
# sticky, never writable by group or others (who could then bypass the server).
SAFE_MODE = 0o755


def where(path: str) -> str:
    return f"/vault/{path}" if path else "/vault"


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


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
        self, d: Dispatcher, config: Config, access: Access, store: Store, fhs: Iterator[int]
    ) -> None:
        self.d = d
        self.access = access
        self.store = store
        self.owners = config.vault
        self.fhs = fhs  # file handle numbers, shared with the agent files

    # -- the store's names, with its errors as FUSE's ---------------------------------

    def path(self, inode: int) -> str:
        return self._do(lambda: self.store.path(inode))

    def _join(self, parent: int, name: bytes) -> str:
        return self._do(lambda: self.store.join(self.path(parent), os.fsdecode(name)))

    # -- rights ------------------------------------------------------------------------

    def perms(self, who: str, path: str) -> str | None:
        return self.access.perms(who, where(path))

    def see(self, who: str, path: str, op: str) -> str:
        return self.access.visible(who, where(path), op)

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
            raise self.access.refuse(who, where(path), op, why)

    def _narrowed_below(self, who: str, path: str) -> bool:
        """Whether the caller has a grant strictly below `path` (rights there
        differ from the folder's, and a rename would carry or drop them)."""
        return self.access.granted_below(who, where(path))

    def record(self, who: str, op: str, path: str, **more: str) -> None:
        self.d.note(events.vault(who, op, where(path), **more))

    def entry(self, who: str, path: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        perms = self.perms(who, path) or ""
        mask = 0o7111 | (0o444 if "r" in perms else 0)
        if self.may_change(who, path, perms):
            mask |= 0o222
        self.access.dentries.shown(where(path))  # the kernel may now hold the name
        return attrs(self.store.number(path, st), st, mask)

    def _lstat(self, path: str) -> os.stat_result:
        try:
            return self.store.lstat(path)
        except OSError as e:
            raise fail(e.errno or errno.EIO) from None

    # -- names -------------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes, who: str) -> pyfuse3.EntryAttributes:
        path = self._join(parent, name)
        st = self._lstat(path)
        self.see(who, path, "lookup")
        return self.entry(who, path, st)

    async def getattr(self, inode: int, who: str) -> pyfuse3.EntryAttributes:
        path = self.path(inode)
        st = self._lstat(path)
        self.see(who, path, "stat")
        return self.entry(who, path, st)

    def listing(self, inode: int, who: str) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        path = self.path(inode)
        out = []
        for name, st in self.store.listdir(path):
            try:
                child = self.store.join(path, name)
            except OSError as e:
                raise fail(e.errno or errno.EIO) from None
            if self.perms(who, child) is not None:
                out.append((os.fsencode(name), self.entry(who, child, st)))
        return out

    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, who: str,
    ) -> pyfuse3.EntryAttributes:  # fmt: skip
        path = self.path(inode)
        if fields.update_uid or fields.update_gid:
            raise fail(errno.EPERM)
        self.change(who, path, "setattr")
        try:
            if fields.update_size:
                f = self.store.files.get(fh) if fh is not None else None
                if f is not None:
                    os.ftruncate(f.fd, attr.st_size)
                else:
                    self.store.truncate(path, attr.st_size)
                self.record(who, "truncate", path)
            if fields.update_mode:
                self.store.chmod(path, attr.st_mode & SAFE_MODE)
                self.record(who, "chmod", path)
            if fields.update_atime or fields.update_mtime:
                self.store.utime(
                    path,
                    attr.st_atime_ns if fields.update_atime else None,
                    attr.st_mtime_ns if fields.update_mtime else None,
                )
                self.record(who, "utime", path)
        except OSError as e:
            raise fail(e.errno or errno.EIO) from None
        return self.entry(who, path, self._lstat(path))

    async def mkdir(self, parent: int, name: bytes, mode: int, who: str) -> pyfuse3.EntryAttributes:
        path = self._join(parent, name)
        self.change(who, path, "mkdir", new=True)
        self._do(lambda: self.store.mkdir(path, mode & SAFE_MODE))
        self.record(who, "mkdir", path)
        return self.entry(who, path, self._lstat(path))

    async def mknod(self, parent: int, name: bytes, mode: int, who: str) -> pyfuse3.EntryAttributes:
        """Regular files only: the kernel opens FIFOs and devices without asking
        the server, so no view would apply to them."""
        path = self._join(parent, name)
        if not stat.S_ISREG(mode):
            raise fail(errno.EPERM)
        self.change(who, path, "mknod", new=True)
        self._do(lambda: self.store.mknod(path, mode & (SAFE_MODE | stat.S_IFREG)))
        self.record(who, "mknod", path)
        return self.entry(who, path, self._lstat(path))

    async def rmdir(self, parent: int, name: bytes, who: str) -> None:
        path = self._join(parent, name)
        self._lstat(path)
        self.change(who, path, "rmdir")
        self._do(lambda: self.store.rmdir(path))
        self.store.forget(path)
        self.record(who, "rmdir", path)

    async def unlink(self, parent: int, name: bytes, who: str) -> None:
        path = self._join(parent, name)
        self._lstat(path)
        self.change(who, path, "unlink")
        self._do(lambda: self.store.unlink(path))
        self.store.forget(path)
        self.record(who, "unlink", path)

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int,
        who: str,
    ) -> None:  # fmt: skip
        old = self._join(old_parent, old_name)
        new = self._join(new_parent, new_name)
        if flags & ~RENAME_NOREPLACE:
            raise fail(errno.EINVAL)  # RENAME_EXCHANGE, RENAME_WHITEOUT
        self._lstat(old)
        self.change(who, old, "rename")
        self.change(who, new, "rename", new=True)
        if self._narrowed_below(who, old) or self._narrowed_below(who, new):
            why = "a path below it is granted differently: moving it would change that view"
            raise self.access.refuse(who, where(old), "rename", why)
        if flags & RENAME_NOREPLACE:
            try:
                self.store.lstat(new)
                raise fail(errno.EEXIST)
            except FileNotFoundError:
                pass
        self._do(lambda: self.store.rename(old, new))
        self.store.forget(new)
        self.store.moved(old, new)
        self.record(who, "rename", old, to=where(new))

    async def symlink(
        self, parent: int, name: bytes, target: bytes, who: str
    ) -> pyfuse3.EntryAttributes:
        path = self._join(parent, name)
        self.change(who, path, "symlink", new=True)
        self._do(lambda: self.store.symlink(os.fsdecode(target), path))
        self.record(who, "symlink", path)
        return self.entry(who, path, self._lstat(path))

    async def readlink(self, inode: int, who: str) -> bytes:
        path = self.path(inode)
        if "r" not in self.see(who, path, "readlink"):
            raise self.access.refuse(who, where(path), "readlink", f"{who} may not read this")
        try:
            return os.fsencode(self.store.readlink(path))
        except OSError as e:
            raise fail(e.errno or errno.EIO) from None

    async def link(
        self, inode: int, new_parent: int, new_name: bytes, who: str
    ) -> pyfuse3.EntryAttributes:
        old = self.path(inode)
        new = self._join(new_parent, new_name)
        self.change(who, old, "link")
        self.change(who, new, "link", new=True)
        self._do(lambda: self.store.link(old, new))
        self.record(who, "link", new, target=where(old))
        return self.entry(who, new, self._lstat(new))

    # -- files -------------------------------------------------------------------------

    def _new_fh(self, fd: int, path: str, who: str) -> int:
        fh = next(self.fhs)
        self.store.files[fh] = VaultFile(fd, path, who)
        return fh

    async def open(self, inode: int, flags: int, who: str) -> pyfuse3.FileInfo:
        path = self.path(inode)
        acc = flags & os.O_ACCMODE
        read = acc in (os.O_RDONLY, os.O_RDWR)
        write = acc in (os.O_WRONLY, os.O_RDWR) or bool(flags & os.O_TRUNC)
        perms = self.see(who, path, "open")
        if read and "r" not in perms:
            raise self.access.refuse(who, where(path), "open", f"{who} may not read this")
        if write:
            self.change(who, path, "open")
        fd = self._do(lambda: self.store.open(path, flags & ~(os.O_CREAT | os.O_EXCL)))
        if flags & os.O_TRUNC:
            self.record(who, "truncate", path)
        return pyfuse3.FileInfo(fh=self._new_fh(fd, path, who), keep_cache=False)

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, who: str
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._join(parent, name)
        self.change(who, path, "create", new=True)
        fd = self._do(lambda: self.store.open(path, flags | os.O_CREAT, mode & SAFE_MODE))
        self.record(who, "create", path)
        info = pyfuse3.FileInfo(fh=self._new_fh(fd, path, who), keep_cache=False)
        return info, self.entry(who, path, os.fstat(fd))

    def read(self, f: VaultFile, off: int, size: int) -> bytes:
        return self._do(lambda: os.pread(f.fd, size, off))

    def write(self, f: VaultFile, off: int, buf: bytes) -> int:
        n = self._do(lambda: os.pwrite(f.fd, buf, off))
        if not f.written:
            f.written = True
            self.record(f.who, "write", f.path)
        return n

    def release(self, fh: int) -> None:
        f = self.store.files.pop(fh, None)
        if f is not None:
            os.close(f.fd)

    def fsync(self, f: VaultFile) -> None:
        self._do(lambda: os.fsync(f.fd))

    @staticmethod
    def _do(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except OutheisError:
            raise
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise fail(e.errno or errno.EIO) from None
