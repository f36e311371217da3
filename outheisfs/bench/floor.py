"""The floor: the least a pyfuse3 filesystem can do for a message.

One file, `queue`: a write appends its bytes to a queue in memory, a read takes
what is queued (or returns nothing). It is mounted with outheisfs's options and
answers with the same caching (direct I/O, no attribute or name caching), so
`outheisfs bench` can set every figure beside what pyfuse3 and the kernel cost
on the same machine in the same minute.

Run: python -m outheisfs.bench.floor MOUNTPOINT   (serves until SIGTERM/SIGINT).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from collections import deque

import pyfuse3
import trio

QUEUE_INODE = 2
NAME = b"queue"


class Floor(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.queue: deque[bytes] = deque()
        self.size = 0

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.entry_timeout = 0
        a.attr_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o660
            a.st_nlink = 1
            a.st_size = self.size
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, QUEUE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(QUEUE_INODE)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)  # O_TRUNC: nothing to truncate in a queue

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attrs(QUEUE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != QUEUE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.queue.append(buf)
        self.size += len(buf)
        return len(buf)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if not self.queue:
            return b""
        data = self.queue.popleft()
        if len(data) > size:
            self.queue.appendleft(data[size:])
            data = data[:size]
        self.size -= len(data)
        return data

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass


async def serve(mountpoint: str) -> None:
    await serve_ops(Floor(), mountpoint, "floor")


async def serve_ops(ops: pyfuse3.Operations, mountpoint: str, name: str) -> None:
    """Mount `ops` as file system `name` and serve until unmounted or told to stop.
    The bench's reference file systems (this floor, the vault's passthrough) share it."""
    options = {f"fsname={name}", f"subtype={name}", "noatime"}
    if os.geteuid() == 0:
        options.add("allow_other")
    pyfuse3.init(ops, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:

            async def main() -> None:
                await pyfuse3.main(min_tasks=4, max_tasks=100)
                nursery.cancel_scope.cancel()

            nursery.start_soon(main)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    break
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    trio.run(serve, sys.argv[1])
