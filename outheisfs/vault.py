"""The vault: a shared knowledge base of ordinary files, one owner per domain.

`vault/` shows a real folder in the state folder (STATE/vault). Each top-level
folder named in the config's [vault] table is a domain with one owner agent:
only that agent (and the operator) may change anything inside; others read what
they were granted with `unveil`. Everything else in the vault is the operator's.
Every change is a `vault` event: who, which operation, which path; never contents.

The backing folder is reached only through file descriptors, one path component
at a time with O_NOFOLLOW, so a symlink inside the vault (or a folder renamed
under a request) never leads the server outside it; symlinks are followed by
the kernel, in the caller's own right, as on any filesystem.

Inode numbers: the kernel knows vault entries by numbers from VAULT_BASE up,
handed out per backing (device, inode) and kept for the mount's life.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

VAULT_BASE = 1 << 40  # far above the tree's inode numbers


def fail(code: int) -> OSError:
    """The error the store raises: an OSError with its errno (ops maps it)."""
    return OSError(code, os.strerror(code))


@dataclass(eq=False)
class VaultFile:
    fd: int
    path: str  # relative to the vault root
    who: str
    written: bool = False  # a `vault` write event was logged for this open file


class Store:
    """The backing folder, its inode numbers and the open files."""

    def __init__(self, root: Path, root_inode: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.root_inode = root_inode
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self._paths: dict[int, str] = {root_inode: ""}
        self._numbers: dict[tuple[int, int], int] = {}
        self._next = VAULT_BASE
        self.files: dict[int, VaultFile] = {}

    def close(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()
        os.close(self._root_fd)

    def holds(self, inode: int) -> bool:
        return inode >= VAULT_BASE

    # -- paths and numbers -------------------------------------------------------------

    def path(self, inode: int) -> str:
        path = self._paths.get(inode)
        if path is None:
            raise fail(errno.ENOENT)
        return path

    @staticmethod
    def join(parent: str, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise fail(errno.EINVAL)
        try:
            name.encode()
        except UnicodeEncodeError:  # a name that is not UTF-8 could not be logged
            raise fail(errno.EINVAL) from None
        return f"{parent}/{name}" if parent else name

    def number(self, path: str, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        inode = self._numbers.get(key)
        if inode is None:
            inode = self._next
            self._next += 1
            self._numbers[key] = inode
        self._paths[inode] = path
        return inode

    def forget(self, path: str) -> None:
        """The name is gone: numbers that knew the entry by it (or below it) drop it,
        so a request by number never reaches whatever takes the name next."""
        for inode, p in list(self._paths.items()):
            if (p == path or p.startswith(path + "/")) and inode != self.root_inode:
                del self._paths[inode]

    def moved(self, old: str, new: str) -> None:
        """After a rename: every known path at or below `old` is now below `new`."""
        for inode, path in list(self._paths.items()):
            if path == old:
                self._paths[inode] = new
            elif path.startswith(old + "/"):
                self._paths[inode] = new + path[len(old) :]

    # -- reaching the backing folder ---------------------------------------------------

    @contextmanager
    def parent_fd(self, path: str) -> Iterator[tuple[int, str]]:
        """(descriptor of the folder holding `path`, last name), walked one
        component at a time without following symlinks."""
        parts = path.split("/") if path else []
        if not parts:
            raise fail(errno.EINVAL)
        fd = os.dup(self._root_fd)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def lstat(self, path: str) -> os.stat_result:
        if not path:
            return os.stat(self._root_fd)
        with self.parent_fd(path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def listdir(self, path: str) -> list[tuple[str, os.stat_result]]:
        if path:
            with self.parent_fd(path) as (pfd, name):
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
        else:
            fd = os.dup(self._root_fd)
        try:
            out = []
            for name in sorted(os.listdir(fd)):
                try:
                    out.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False)))
                except FileNotFoundError:
                    continue
            return out
        finally:
            os.close(fd)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """Regular files only, opened without blocking (a FIFO put in the backing
        folder from outside would otherwise hang the server)."""
        with self.parent_fd(path) as (pfd, name):
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode, dir_fd=pfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise fail(errno.EPERM)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def mkdir(self, path: str, mode: int) -> None:
        with self.parent_fd(path) as (fd, name):
            os.mkdir(name, mode, dir_fd=fd)

    def mknod(self, path: str, mode: int) -> None:
        with self.parent_fd(path) as (fd, name):
            os.mknod(name, mode, dir_fd=fd)

    def rmdir(self, path: str) -> None:
        with self.parent_fd(path) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def unlink(self, path: str) -> None:
        with self.parent_fd(path) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def rename(self, old: str, new: str) -> None:
        with self.parent_fd(old) as (ofd, oname), self.parent_fd(new) as (nfd, nname):
            os.rename(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd)

    def symlink(self, target: str, path: str) -> None:
        with self.parent_fd(path) as (fd, name):
            os.symlink(target, name, dir_fd=fd)

    def readlink(self, path: str) -> str:
        with self.parent_fd(path) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def link(self, old: str, new: str) -> None:
        with self.parent_fd(old) as (ofd, oname), self.parent_fd(new) as (nfd, nname):
            os.link(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd, follow_symlinks=False)

    def truncate(self, path: str, size: int) -> None:
        fd = self.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def chmod(self, path: str, mode: int) -> None:
        st = self.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise fail(errno.EOPNOTSUPP)
        if not path:
            os.chmod(self._root_fd, mode)
            return
        with self.parent_fd(path) as (fd, name):
            os.chmod(name, mode, dir_fd=fd)

    def utime(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        st = self.lstat(path)
        ns = (atime_ns if atime_ns is not None else st.st_atime_ns,
              mtime_ns if mtime_ns is not None else st.st_mtime_ns)  # fmt: skip
        if not path:
            os.utime(self._root_fd, ns=ns)
            return
        with self.parent_fd(path) as (fd, name):
            os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)


def domain_of(path: str) -> str | None:
    """The top-level folder a vault path lies in; None for the vault root itself."""
    return path.split("/", 1)[0] if path else None
