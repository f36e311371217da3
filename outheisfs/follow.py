"""`outheisfs follow`: print the event log as it grows, across remounts.

It reads the mount's `log` file like `tail -f`, but every POLL seconds (so an
event shows within a few tens of milliseconds of its logging), from event SEQ
or from the end, through filters by agent and type. Each event's `seq` rises by
one, so it knows exactly where it is: when the mount goes away (unmounted, its
server killed or restarted) it waits for the mount to answer again, checks that
the log still holds the last event it printed at the same place, and goes on
from the next one: nothing is printed twice and nothing is left out. (If the log
there is not the same, it looks for the next event from the start.)
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from .eventlog import concerned

POLL = 0.01  # seconds between reads at the end of the log
RETRY = 0.05  # seconds between attempts to reach a mount that is away
CHUNK = 1 << 20
_SEQ = re.compile(rb'\{\s*"seq"\s*:\s*(\d+)\s*[,}]')  # every event begins with its seq
XATTR_PID = "user.outheisfs.pid"
GONE = {errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT, errno.ENODEV, errno.EIO, errno.EBADF}


def seq_of(line: bytes) -> int | None:
    m = _SEQ.match(line)
    return int(m.group(1)) if m else None


@dataclass
class Filter:
    agents: set[str] = field(default_factory=set)
    types: set[str] = field(default_factory=set)

    def __call__(self, line: bytes) -> bool:
        if not self.agents and not self.types:
            return True
        try:
            ev = json.loads(line)
        except ValueError:
            return False
        if self.types and ev.get("type") not in self.types:
            return False
        return not self.agents or bool(concerned(ev) & self.agents)


@dataclass
class Position:
    """Where the follower is: the byte after the last whole line it took, and
    that line's seq. Lines with a seq it has taken already are skipped."""

    offset: int = 0
    seq: int = 0

    def take(self, data: bytes, wanted: Callable[[bytes], bool]) -> list[bytes]:
        """The wanted lines among the whole lines of `data` (read at `offset`)."""
        out = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            line = data[start : end + 1]
            start = end + 1
            seq = seq_of(line)
            if seq is None or seq <= self.seq:
                continue
            self.seq = seq
            if wanted(line):
                out.append(line)
        self.offset += start
        return out


def last_line(fd: int, end: int) -> bytes:
    """The whole line that ends at byte `end` of the file (b"" if none)."""
    back = 1 << 16
    while True:
        start = max(0, end - back)
        data = os.pread(fd, end - start, start)
        if not data.endswith(b"\n"):
            return b""
        i = data.rfind(b"\n", 0, len(data) - 1)
        if i >= 0 or start == 0:
            return data[i + 1 :]
        back *= 4


class Follower:
    def __init__(
        self,
        mp: Path,
        since: int | None,
        wanted: Callable[[bytes], bool],
        out: BinaryIO,
        err: TextIO,
        poll: float = POLL,
    ) -> None:
        self.mp = mp
        self.since = since
        self.wanted = wanted
        self.out = out
        self.err = err
        self.poll = poll
        self.pos: Position | None = None

    def _open(self, quiet: bool) -> int:
        """The mount's log, opened; waits while the mount is away."""
        said = quiet
        while True:
            try:
                os.getxattr(self.mp, XATTR_PID)  # an outheisfs mount, not the folder under it
            except OSError:
                pass
            else:
                try:
                    return os.open(self.mp / "log", os.O_RDONLY)
                except OSError as e:
                    if e.errno not in GONE:
                        raise
            if not said:
                print(f"outheisfs: follow: waiting for {self.mp} to be mounted", file=self.err)
                said = True
            time.sleep(RETRY)

    def _place(self, fd: int) -> None:
        """Set the position after (re)opening the log."""
        size = os.fstat(fd).st_size
        if self.pos is None:
            if self.since is None:  # from the end
                self.pos = Position(size, seq_of(last_line(fd, size)) or 0)
            else:
                self.pos = Position(0, self.since - 1)
            return
        pos = self.pos
        if pos.offset and (pos.offset > size or seq_of(last_line(fd, pos.offset)) != pos.seq):
            pos.offset = 0  # not the same log at the same place: look from the start
        print(f"outheisfs: follow: {self.mp} is back; after seq {pos.seq}", file=self.err)

    def run(self) -> None:
        fd = self._open(quiet=False)
        try:
            self._place(fd)
            while True:
                assert self.pos is not None
                try:
                    data = os.pread(fd, CHUNK, self.pos.offset)
                except OSError as e:
                    if e.errno not in GONE:
                        raise
                    data = None
                if data is None:  # the mount went away: wait for it, and go on
                    _close(fd)
                    fd = -1
                    fd = self._open(quiet=False)
                    self._place(fd)
                    continue
                lines = self.pos.take(data, self.wanted)
                if lines:
                    self.out.write(b"".join(lines))
                    self.out.flush()
                if len(data) < CHUNK:
                    time.sleep(self.poll)
        finally:
            if fd >= 0:
                _close(fd)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # ENOTCONN from a mount that is gone: the descriptor is closed anyway
        pass


def follow(mp: Path, since: int | None, agents: list[str], types: list[str]) -> int:
    """The command: 0 at Ctrl-C or when the reader of its output goes away."""
    wanted = Filter(_names(agents), _names(types))
    try:
        Follower(mp, since, wanted, sys.stdout.buffer, sys.stderr).run()
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # Nothing more can be written; keep the interpreter from trying at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def _names(values: list[str]) -> set[str]:
    return {n for v in values for n in v.split(",") if n}
