"""The vault: a shared knowledge base of ordinary files, one owner per domain.

`vault/` shows a real folder in the state folder (STATE/vault). Each top-level
folder named in the config's [vault] table is a domain with one owner agent:
only that agent (and the operator) may change anything inside; others read what
they were granted with `unveil`. Everything else in the vault is the operator's.
Every change is a `vault` event: who, which operation, which path; never contents.

An inode the kernel knows is a backing file, not a path: each holds an O_PATH
descriptor of its file, taken when the kernel looks the name up, and kept until
the kernel forgets the number and the last open file of it is closed. So a file
stays usable through its open descriptors after it is unlinked or replaced by a
rename (as on any local filesystem), and an open of a name that another process
renames over at that moment opens the file the name led to at lookup.

The backing folder is reached only through those descriptors, one name at a time
with O_NOFOLLOW, so a symlink inside the vault (or a folder renamed under a
request) never leads the server outside it; symlinks are followed by the kernel,
in the caller's own right, as on any filesystem. Each inode also remembers the
name it was last seen by (its parent inode and name): views and events speak of
paths.

This module raises OSError; `vaultops` turns it into errno replies.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

VAULT_BASE = 1 << 40  # far above the tree's inode numbers
NAME_MAX = 255  # the longest name accepted, and what statvfs reports
# A request's cost grows with its path's depth (views are decided on the path): a
# tree of a few thousand levels would let one agent slow every caller. Deeper
# paths are ENAMETOOLONG, whether made through the mount or found on the backing disk.
MAX_DEPTH = 256  # names below vault/, the domain's included
# Flags the backing open never takes: creation is done by `create`, a symlink is
# never followed by the server, and O_DIRECT would ask the backing file for
# aligned buffers that FUSE does not give (the kernel does direct I/O itself).
NOT_PASSED = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_DIRECT | os.O_NOCTTY


def fail(code: int, why: str = "") -> OSError:
    return OSError(code, why or os.strerror(code))


@dataclass(eq=False)
class Inode:
    """A backing file the kernel knows by `number`."""

    number: int
    key: tuple[int, int]  # backing (st_dev, st_ino)
    parent: Inode | None  # the name it was last seen by: parent folder and name
    name: str
    fd: int = -1  # O_PATH descriptor; -1 until needed (a listing hands out numbers)
    lookups: int = 0  # the kernel's references [FUSE forget]
    opens: int = 0  # open files of it
    kids: int = 0  # known inodes that name it as their parent

    @property
    def path(self) -> str:
        """Relative to the vault root ("" for the root)."""
        parts = []
        node: Inode | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))

    def proc(self) -> str:
        """A path that reaches this very file through its descriptor."""
        return f"/proc/self/fd/{self.fd}"


@dataclass(eq=False)
class VaultFile:
    fd: int
    ino: Inode
    who: str
    written: bool = False  # a `vault` write event was logged for this open file

    @property
    def path(self) -> str:
        return self.ino.path


@dataclass(eq=False)
class Listing:
    """An open folder: its names as of the start of the listing. Offsets are
    positions in this list, so they stay valid while the folder changes."""

    ino: Inode
    names: list[str] = field(default_factory=list)
    uniform: int | None = None  # the mode mask of every entry, when all show the same


class Store:
    """The backing folder, its inodes and the open files."""

    def __init__(self, root: Path, root_inode: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.root_inode = root_inode
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self.top = Inode(root_inode, (st.st_dev, st.st_ino), None, "", fd, lookups=1)
        self._inodes: dict[int, Inode] = {root_inode: self.top}
        self._keys: dict[tuple[int, int], Inode] = {self.top.key: self.top}
        self._next = VAULT_BASE
        self.files: dict[int, VaultFile] = {}

    def close(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()
        for ino in self._inodes.values():
            if ino.fd >= 0:
                os.close(ino.fd)
                ino.fd = -1
        self._inodes.clear()
        self._keys.clear()

    def holds(self, inode: int) -> bool:
        return inode >= VAULT_BASE

    def known(self) -> int:
        """Inodes held (the root included): for tests and statistics."""
        return len(self._inodes)

    # -- inodes ------------------------------------------------------------------------

    def inode(self, number: int) -> Inode:
        ino = self._inodes.get(number)
        if ino is None:
            raise fail(errno.ENOENT, "inode not known")
        return ino

    def path(self, number: int) -> str:
        return self.inode(number).path

    @staticmethod
    def check_name(name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise fail(errno.EINVAL)
        try:
            raw = name.encode()
        except UnicodeEncodeError:  # a name that is not UTF-8 could not be logged
            raise fail(errno.EINVAL, "name is not UTF-8") from None
        if len(raw) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        return name

    @staticmethod
    def join(parent: str, name: str) -> str:
        name = Store.check_name(name)
        path = f"{parent}/{name}" if parent else name
        if path.count("/") >= MAX_DEPTH:
            raise fail(errno.ENAMETOOLONG, f"vault paths are limited to {MAX_DEPTH} levels")
        return path

    def fd(self, ino: Inode) -> int:
        """The inode's O_PATH descriptor, opened by its name if not held yet; a
        name that now leads to another file is ENOENT for this inode."""
        if ino.fd >= 0:
            return ino.fd
        if ino.parent is None:
            raise fail(errno.ENOENT)
        fd = os.open(ino.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd(ino.parent))
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ino.key:
            os.close(fd)
            raise fail(errno.ENOENT, "name now leads to another file")
        ino.fd = fd
        return fd

    def _adopt(self, parent: Inode, name: str, st: os.stat_result) -> Inode:
        """The inode of the file `name` in `parent` (stat'ed as `st`), made known
        if new; a known one now goes by this name."""
        key = (st.st_dev, st.st_ino)
        ino = self._keys.get(key)
        if ino is None:
            ino = Inode(self._next, key, parent, name)
            self._next += 1
            self._inodes[ino.number] = ino
            self._keys[key] = ino
            parent.kids += 1
        elif ino.parent is not None and (ino.parent is not parent or ino.name != name):
            self._reparent(ino, parent, name)
        return ino

    def _reparent(self, ino: Inode, parent: Inode, name: str) -> None:
        old = ino.parent
        ino.parent, ino.name = parent, name
        if old is not parent:
            parent.kids += 1
            if old is not None:
                old.kids -= 1
                self._maybe_drop(old)

    def entry(self, parent: Inode, name: str) -> tuple[Inode, os.stat_result]:
        """Look `name` up in `parent`: its inode, with a descriptor held, and its
        attributes. The caller counts the kernel's reference (`looked_up`)."""
        self.join(parent.path, name)  # too deep or too long: ENAMETOOLONG
        st = os.stat(name, dir_fd=self.fd(parent), follow_symlinks=False)
        ino = self._adopt(parent, name, st)
        if ino.fd < 0:
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd(parent))
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                return ino, st  # out of descriptors: reached by its name, as a listing's are
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ino.key:  # replaced between the two calls
                os.close(fd)
                raise fail(errno.ENOENT, "replaced during lookup")
            ino.fd = fd
        return ino, st

    def stat_in(self, parent: Inode, name: str) -> tuple[Inode, os.stat_result]:
        """Like `entry`, without taking a descriptor (for listings)."""
        st = os.stat(name, dir_fd=self.fd(parent), follow_symlinks=False)
        return self._adopt(parent, name, st), st

    def looked_up(self, ino: Inode) -> None:
        if ino is not self.top:
            ino.lookups += 1

    def forget(self, number: int, n: int) -> None:
        ino = self._inodes.get(number)
        if ino is None or ino is self.top:
            return
        ino.lookups = max(0, ino.lookups - n)
        self._maybe_drop(ino)

    def _maybe_drop(self, ino: Inode) -> None:
        while ino is not self.top and ino.lookups == 0 and ino.opens == 0 and ino.kids == 0:
            if self._inodes.pop(ino.number, None) is None:
                return
            if self._keys.get(ino.key) is ino:
                del self._keys[ino.key]
            if ino.fd >= 0:
                os.close(ino.fd)
                ino.fd = -1
            parent = ino.parent
            if parent is None:
                return
            parent.kids -= 1
            ino = parent

    def moved(self, st: os.stat_result, new_parent: Inode, new_name: str) -> None:
        """After a rename through the mount of the file `st`: it goes by its new name."""
        ino = self._keys.get((st.st_dev, st.st_ino))
        if ino is not None and ino.parent is not None:
            self._reparent(ino, new_parent, new_name)

    # -- the backing files -------------------------------------------------------------

    def lstat(self, ino: Inode) -> os.stat_result:
        return os.stat(self.fd(ino))

    def open(self, ino: Inode, flags: int) -> int:
        """Regular files only: the kernel opens FIFOs and devices without asking
        the server, so no view would apply to them."""
        fd = self.fd(ino)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise fail(errno.EPERM, "not a regular file")
        out = os.open(ino.proc(), (flags & ~NOT_PASSED) | os.O_CLOEXEC)
        ino.opens += 1
        return out

    def create(self, parent: Inode, name: str, flags: int, mode: int) -> tuple[int, Inode]:
        # O_NONBLOCK: a FIFO put there from outside must not hang the server.
        flags = (flags & ~NOT_PASSED) | (flags & os.O_EXCL) | os.O_CREAT | os.O_NOFOLLOW
        fd = os.open(name, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=self.fd(parent))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise fail(errno.EPERM, "not a regular file")
            ino = self._adopt(parent, name, st)
            if ino.fd < 0:  # the very file just opened, whatever the name means by now
                ino.fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        ino.opens += 1
        return fd, ino

    def closed(self, f: VaultFile) -> None:
        os.close(f.fd)
        f.ino.opens -= 1
        self._maybe_drop(f.ino)

    def listdir(self, ino: Inode) -> list[str]:
        return names_in(self.open_folder(ino))

    def open_folder(self, ino: Inode) -> int:
        """A descriptor to list the folder with (`names_in` reads and closes it)."""
        self.fd(ino)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        return os.open(ino.proc(), flags) if ino.parent else os.dup(ino.fd)

    def mkdir(self, parent: Inode, name: str, mode: int) -> None:
        os.mkdir(name, mode, dir_fd=self.fd(parent))

    def mknod(self, parent: Inode, name: str, mode: int) -> None:
        os.mknod(name, mode, dir_fd=self.fd(parent))

    def rmdir(self, parent: Inode, name: str) -> None:
        os.rmdir(name, dir_fd=self.fd(parent))

    def unlink(self, parent: Inode, name: str) -> None:
        os.unlink(name, dir_fd=self.fd(parent))

    def rename(self, parent: Inode, name: str, new_parent: Inode, new_name: str) -> None:
        os.rename(name, new_name, src_dir_fd=self.fd(parent), dst_dir_fd=self.fd(new_parent))

    def symlink(self, parent: Inode, name: str, target: str) -> None:
        os.symlink(target, name, dir_fd=self.fd(parent))

    def readlink(self, ino: Inode) -> str:
        return os.readlink("", dir_fd=self.fd(ino))

    def link(self, ino: Inode, new_parent: Inode, new_name: str) -> None:
        self.fd(ino)
        os.link(ino.proc(), new_name, dst_dir_fd=self.fd(new_parent), follow_symlinks=True)

    def truncate(self, ino: Inode, size: int) -> None:
        fd = self.open(ino, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
            ino.opens -= 1
            self._maybe_drop(ino)

    def chmod(self, ino: Inode, mode: int) -> None:
        if stat.S_ISLNK(self.lstat(ino).st_mode):
            raise fail(errno.EOPNOTSUPP)
        os.chmod(ino.proc(), mode)

    def chown(self, ino: Inode, uid: int, gid: int) -> None:
        """Only to what it is already (so `cp -a` and `tar -x` work); it still
        marks the change time, as chown does."""
        st = self.lstat(ino)
        if (uid, gid) != (st.st_uid, st.st_gid):
            raise fail(errno.EPERM, "the vault's files keep their owner")
        if ino.parent is None:
            os.chown(ino.fd, uid, gid)
        else:
            os.chown(ino.name, uid, gid, dir_fd=self.fd(ino.parent), follow_symlinks=False)

    def utime(self, ino: Inode, atime_ns: int | None, mtime_ns: int | None) -> None:
        st = self.lstat(ino)
        ns = (atime_ns if atime_ns is not None else st.st_atime_ns,
              mtime_ns if mtime_ns is not None else st.st_mtime_ns)  # fmt: skip
        if stat.S_ISLNK(st.st_mode) and ino.parent is not None:
            os.utime(ino.name, ns=ns, dir_fd=self.fd(ino.parent), follow_symlinks=False)
        else:
            os.utime(ino.proc(), ns=ns)

    def access(self, ino: Inode, mode: int) -> bool:
        """Whether the server itself may: the backing file's answer for its uid."""
        self.fd(ino)
        return os.access(ino.proc(), mode, effective_ids=True)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.top.fd)


def domain_of(path: str) -> str | None:
    """The top-level folder a vault path lies in; None for the vault root itself."""
    return path.split("/", 1)[0] if path else None


def names_in(fd: int) -> list[str]:
    """The sorted names of the folder open as `fd`, which is closed. Its cost grows
    with the folder, which its owner controls: call it off the event loop."""
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)
