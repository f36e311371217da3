"""The vault's floor: a minimal pyfuse3 passthrough of a backing folder.

It serves a folder of the host as it is, with no views, no events and no
checks: inode numbers are the backing files' own, known by path; each request
is the one or two system calls it asks for. It is mounted with outheisfs's
options and answers with the vault's caching (no name or attribute caching, the
page cache dropped at each open, listings read once per open folder), so
`outheisfs bench` can set the vault's figures beside what pyfuse3 and the kernel
cost for the same operations on the same folder.

Run: python -m outheisfs.bench.passthrough BACKING MOUNTPOINT   (serves until SIGTERM/SIGINT).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import pyfuse3
import trio

from .floor import serve_ops

T = TypeVar("T")


def _do(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except OSError as e:
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from None


class Passthrough(pyfuse3.Operations):
    def __init__(self, root: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: root}
        self.files: dict[int, int] = {}  # fh -> backing descriptor
        self.dirs: dict[int, tuple[str, list[str]]] = {}
        self._next = 1

    def _path(self, inode: int) -> str:
        path = self.paths.get(inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path

    def _attrs(self, path: str, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        st = st or _do(lambda: os.lstat(path))
        a = pyfuse3.EntryAttributes()
        ino = pyfuse3.ROOT_INODE if path == self.paths[pyfuse3.ROOT_INODE] else st.st_ino
        self.paths[ino] = path
        a.st_ino = ino
        a.entry_timeout = 0
        a.attr_timeout = 0
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks"):
            setattr(a, name, getattr(st, name))
        a.st_blksize = 4096
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return a

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._child(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._path(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        if fields.update_size:
            _do(lambda: os.truncate(path, attr.st_size))
        if fields.update_mode:
            _do(lambda: os.chmod(path, attr.st_mode & 0o7777))
        if fields.update_atime or fields.update_mtime:
            _do(lambda: os.utime(path, ns=(attr.st_atime_ns, attr.st_mtime_ns)))
        return self._attrs(path)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        v = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        s = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):  # fmt: skip
            setattr(s, name, getattr(v, name))
        return s

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = self._next
        self._next += 1
        self.dirs[fh] = (self._path(inode), [])
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        path, names = self.dirs[fh]
        if start_id == 0:
            names[:] = _do(lambda: sorted(os.listdir(path)))
        for i in range(start_id, len(names)):
            child = os.path.join(path, names[i])
            try:
                st = os.lstat(child)
            except OSError:
                continue
            if not pyfuse3.readdir_reply(
                token, os.fsencode(names[i]), self._attrs(child, st), i + 1
            ):
                return

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        _do(lambda: os.mkdir(path, mode))
        return self._attrs(path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _do(lambda: os.rmdir(self._child(parent_inode, name)))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _do(lambda: os.unlink(self._child(parent_inode, name)))

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        _do(lambda: os.rename(old, new))
        self._attrs(new)

    def _fh(self, fd: int) -> int:
        fh = self._next
        self._next += 1
        self.files[fh] = fd
        return fh

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path = self._path(inode)
        fd = _do(lambda: os.open(path, flags & ~(os.O_CREAT | os.O_EXCL | os.O_DIRECT)))
        return pyfuse3.FileInfo(fh=self._fh(fd), keep_cache=False)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd = _do(lambda: os.open(path, (flags | os.O_CREAT) & ~os.O_DIRECT, mode))
        return pyfuse3.FileInfo(fh=self._fh(fd), keep_cache=False), self._attrs(path, os.fstat(fd))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return _do(lambda: os.pread(self.files[fh], size, off))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return _do(lambda: os.pwrite(self.files[fh], buf, off))

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        os.close(self.files.pop(fh))

    async def fsync(self, fh: int, datasync: bool) -> None:
        _do(lambda: os.fsync(self.files[fh]))


async def serve(root: str, mountpoint: str) -> None:
    await serve_ops(Passthrough(root), mountpoint, "passthrough")


if __name__ == "__main__":
    trio.run(serve, sys.argv[1], sys.argv[2])
