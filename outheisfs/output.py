"""What agent processes print: stdout and stderr, line by line, kept with rotation.

Each supervised process writes its standard output and error into two pipes;
the server reads them and appends one line per line written to
`STATE/output/NAME.log`, served read-only as `agents/NAME/output`:

    2026-12-07T10:00:00.123456Z 1 4242 stderr Traceback (most recent call last):

(time, instance, pid of the instance's process, stream, the text). A line is cut
at MAX_LINE bytes; the rest follows as lines of its own. The file grows up to
`output_max` bytes; the next line then moves it to `NAME.log.1` (replacing the
one before) and starts a new one, so an agent keeps at most twice `output_max`
on disk. The mount shows the current file: after a rotation it starts again
from empty (`tail -f` says "file truncated" and goes on).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from .models import now

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10  # bytes of one line before it is cut
CHUNK = 64 << 10


class Output:
    """The output files of every agent, in one folder."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path(name), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            self._fds[name] = fd
            self._sizes[name] = os.fstat(fd).st_size
        return fd

    def write(self, name: str, instance: int, pid: int, stream: str, text: bytes) -> None:
        """Append one line (without its newline)."""
        line = b"%s %d %d %s %s\n" % (now()[1].encode(), instance, pid, stream.encode(), text)
        fd = self._fd(name)
        if self._sizes[name] and self._sizes[name] + len(line) > self.max_bytes:
            fd = self._rotate(name)
        try:
            os.write(fd, line)
        except OSError as e:  # a full disk: the line is lost, the agent goes on
            log.error("output of %s not written: %s", name, e)
            return
        self._sizes[name] += len(line)

    def _rotate(self, name: str) -> int:
        os.close(self._fds.pop(name))
        try:
            os.replace(self.path(name), self.folder / f"{name}.log.1")
        except OSError as e:
            log.error("output of %s not rotated: %s", name, e)
            os.truncate(self.path(name), 0)
        return self._fd(name)

    def size(self, name: str) -> int:
        if name not in self._sizes:
            if not self.path(name).exists():
                return 0
            self._fd(name)
        return self._sizes[name]

    def read(self, name: str, offset: int, size: int) -> bytes:
        end = self.size(name)
        if offset >= end:
            return b""
        return os.pread(self._fds[name], min(size, end - offset), offset)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._sizes.clear()

    async def pump(self, fd: int, name: str, instance: int, pid: int, stream: str) -> None:
        """Read a pipe to its end (every writer gone), a line at a time."""
        partial = b""
        async with trio.lowlevel.FdStream(fd) as pipe:
            while data := await pipe.receive_some(CHUNK):
                lines = (partial + data).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    self._write_cut(name, instance, pid, stream, line)
                while len(partial) >= MAX_LINE:
                    self.write(name, instance, pid, stream, partial[:MAX_LINE])
                    partial = partial[MAX_LINE:]
        if partial:  # a last line without its newline
            self.write(name, instance, pid, stream, partial)

    def _write_cut(self, name: str, instance: int, pid: int, stream: str, line: bytes) -> None:
        for start in range(0, max(len(line), 1), MAX_LINE):
            self.write(name, instance, pid, stream, line[start : start + MAX_LINE])
