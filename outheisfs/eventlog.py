"""The append-only event log: the single source of truth.

Layout of the state folder:

    events.jsonl              every event, one JSON line each; `seq` rises by one per line
    streams/NAME.log.idx      where the events that concern agent NAME are (derived)
    streams/NAME.outbox.idx   where the messages NAME sent are (derived)
    streams/approvals.idx     where the `held` events are: messages waiting for the operator

The root `log` file of the mount serves `events.jsonl` itself, byte for byte, so
offsets, sizes and `tail -f` come for free. An agent's `log`, `outbox` and
`errors` are streams: their lines are lines of `events.jsonl`, read from there
through an index of 16 bytes per line (the stream's size after the line, and the
line's offset in the main file), not copies of them. The indexes can be rebuilt
from the main file at any time; at start-up each is checked against the main
file and caught up, so a crash between the two writes loses nothing.

A torn last line (a write cut short by a crash) is cut off and reported; a bad
line anywhere before the end is damage, and opening refuses with its position.
Plain JSON lines were chosen over SQLite after measuring both: one append here
costs ~5 µs against ~33 µs for an SQLite commit in WAL mode, and a FUSE request
itself costs ~120 µs, so SQLite alone would have eaten the performance budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgspec
import trio

from . import streamindex
from .errors import LogDamaged
from .events import Event
from .models import json_bytes, now
from .names import NOBODY, SERVER
from .streamindex import IDX, RECORD, seq_prefix

log = logging.getLogger(__name__)

NOT_AGENTS = {SERVER, NOBODY}  # who may be the server itself, or a caller attributed to no one
STREAM_BATCH = 4096  # lines held before their stream index records are written
MAIN = "events.jsonl"
APPROVALS = "approvals"  # the messages held for the operator's approval (root `approvals`)
COMPLETE = ".complete"  # in streams/: the seq all streams hold, and their sizes then


def concerned(ev: Event) -> set[str]:
    """The agents an event concerns: whose `log` file shows it."""
    names: set[str] = set()
    for key in ("agent", "from", "who"):
        v = ev.get(key)
        if isinstance(v, str) and v not in NOT_AGENTS:
            names.add(v)
    to = ev.get("to")
    if isinstance(to, str):
        names.add(to)
    elif isinstance(to, list):
        names.update(x for x in to if isinstance(x, str))
    return names


def streams_of(ev: Event) -> list[str]:
    kind = ev.get("type")
    if kind == "denied":
        # Only in the main log: an agent reading its own log must not learn which
        # hidden names exist from which of its attempts were refusals. Its `errors`
        # file has the refusals of paths it sees (EACCES), not of hidden ones.
        who = ev.get("who")
        visible = isinstance(who, str) and who not in NOT_AGENTS and ev.get("errno") == "EACCES"
        return [f"{who}.errors"] if visible else []
    out = [f"{name}.log" for name in concerned(ev)]
    if kind == "error":
        who = ev.get("who")
        if isinstance(who, str) and who not in NOT_AGENTS:
            out.append(f"{who}.errors")
    if kind == "message":
        out.append(f"{ev['from']}.outbox")
    elif kind == "held":
        out.append(APPROVALS)
    return out


def encode(ev: Event) -> bytes:
    """An event's line in the log, with its newline: the standard JSON encoder's
    bytes (compact, UTF-8 as is), made by msgspec where it gives the same."""
    return json_bytes(ev) + b"\n"


_decode = msgspec.json.Decoder().decode


def decode(raw: bytes) -> Any:
    """`json.loads(raw)` of a log line: by msgspec, which parses what json.loads
    parses to the same values (integers of any size included) three times
    quicker; what it refuses (NaN, infinities, lone surrogates, a byte order
    mark, damage) goes to json.loads, for its value or its error."""
    try:
        return _decode(raw)
    except msgspec.DecodeError:
        return json.loads(raw)


_DECIDING = ("type", "agent", "from", "who", "to", "errno")  # all that streams_of looks at
_ABSENT = object()


@lru_cache(maxsize=4096)
def _streams_by(key: tuple[Any, ...]) -> tuple[str, ...]:
    ev = {k: v for k, v in zip(_DECIDING, key, strict=True) if v is not _ABSENT}
    return tuple(streams_of(ev))


@lru_cache(maxsize=4096)
def _message_streams(sender: str, to: str) -> tuple[str, ...]:
    return tuple(streams_of({"type": "message", "from": sender, "to": to}))


def _streams(ev: Event) -> Iterable[str]:
    """`streams_of(ev)`, remembered: the same few agents recur in every event."""
    get = ev.get
    if get("type") == "message" and "agent" not in ev and "who" not in ev:
        sender, to = get("from"), get("to")
        if type(sender) is str and type(to) is str:  # as the dispatcher makes them
            return _message_streams(sender, to)
    key = (
        get("type"),
        get("agent", _ABSENT),
        get("from", _ABSENT),
        get("who", _ABSENT),
        get("to"),
        get("errno", _ABSENT),
    )
    if all(type(v) is str or v is None or v is _ABSENT for v in key):
        return _streams_by(key)
    # A list of recipients, or a hand-edited event: 1, 1.0 and True are equal keys.
    return streams_of(ev)


@dataclass
class ReplayReport:
    last_seq: int = 0
    events: int = 0  # lines read
    torn: tuple[int, int] | None = None  # (offset, bytes cut)
    checkpoint: int = 0  # the seq of the checkpoint replay started from (0: none)


@dataclass(frozen=True)
class Start:
    """Where a replay from a checkpoint begins: after event `seq`, at byte `offset`;
    the stream files' sizes when the checkpoint was taken (None: unknown)."""

    seq: int
    offset: int
    streams: dict[str, int] | None = None


def last_line(fd: int, size: int) -> tuple[int, bytes]:
    """(offset, bytes) of the last complete line of a file that ends with a newline."""
    end = size - 1  # the final newline
    pos = end
    chunk = 65536
    while pos > 0:
        start = max(0, pos - chunk)
        data = os.pread(fd, pos - start, start)
        i = data.rfind(b"\n")
        if i >= 0:
            return start + i + 1, os.pread(fd, end - (start + i + 1), start + i + 1)
        pos = start
    return 0, os.pread(fd, end, 0)


def complete_size(fd: int) -> int:
    """Size of the file up to and including its last newline."""
    size = os.fstat(fd).st_size
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        data = os.pread(fd, pos - start, start)
        i = data.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def first_seq(fd: int) -> int:
    """The seq of a log file's first line (1 if it cannot be read)."""
    return seq_prefix(os.pread(fd, 256, 0)) or 1


def _seq_of(line: bytes) -> int | None:
    try:
        ev = json.loads(line)
        seq = ev["seq"]
        return seq if isinstance(seq, int) else None
    except (ValueError, KeyError, TypeError):
        return None


class EventLog:
    """Appends events, serves them back by offset, replays them at start."""

    def __init__(self, state: Path, durability: str = "process", readonly: bool = False) -> None:
        self.state = state
        self.path = state / MAIN
        self.durability = durability
        self.readonly = readonly
        self.seq = 0
        self._fd = -1
        self._size = 0
        self._synced = 0
        self._syncing: trio.Event | None = None
        self._streams: dict[str, int] = {}  # stream -> fd of its index
        self._stream_size: dict[str, int] = {}  # bytes of the stream as read
        self._stream_bytes: dict[str, int] = {}  # bytes of its index file
        self._stream_last: dict[str, int] = {}  # only during replay
        self._stale: set[str] = set()
        # Lines not yet in their streams' indexes: (streams, length, offset in MAIN).
        self._pending: list[tuple[Iterable[str], int, int]] = []
        self._broken: str | None = None
        self._progress: Callable[[int, int], None] | None = None
        self.mtime_ns = time.time_ns()
        self.first = 1  # the seq the file begins with (`retain` drops what is before)

    # -- opening and replay ------------------------------------------------------------

    def open(
        self,
        apply: Callable[[Event], None],
        until: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        start: Start | None = None,
    ) -> ReplayReport:
        """Check the log, repair a torn tail, replay every event into `apply`;
        `progress(bytes read, bytes in all)` is called now and then. With `start`
        (a checkpoint's seq, offset and stream sizes, checked by `verify`), `apply`
        already holds the state up to that seq: only the events after it are read."""
        report = ReplayReport()
        self._progress = progress
        if self.readonly:
            if not self.path.exists():
                return report
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if start is not None:
                    f.seek(start.offset)
                    report.checkpoint = start.seq
                    self._scan(f, apply, report, until, size, start.offset, start.seq + 1)
                else:
                    self._scan(f, apply, report, until, size, 0, self._first(f.fileno()))
            return report
        (self.state / "streams").mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        if new:
            dfd = os.open(self.state, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        size = os.fstat(self._fd).st_size
        main_last = 0
        complete = complete_size(self._fd)
        if complete:
            main_last = _seq_of(last_line(self._fd, complete)[1]) or 0
        low = self._open_streams(main_last, start, complete)
        self.first = first_seq(self._fd)
        with open(self._fd, "rb", closefd=False) as f:
            if start is not None and low >= start.seq:
                f.seek(start.offset)
                report.checkpoint = start.seq
                self._scan(f, apply, report, until, size, start.offset, start.seq + 1, low)
            elif start is not None:  # streams to catch up from before the checkpoint
                report.checkpoint = start.seq
                first = self._first(self._fd, start)
                self._scan(f, apply, report, until, size, 0, first, low, start.seq + 1)
            else:
                self._scan(f, apply, report, until, size, 0, self._first(self._fd), low)
        if report.torn:
            os.ftruncate(self._fd, report.torn[0])
            os.fsync(self._fd)
        self._size = self._synced = os.fstat(self._fd).st_size
        self._stream_last.clear()
        return report

    def _first(self, fd: int, start: Start | None = None) -> int:
        """The seq the file begins with: 1, unless `retain` dropped the events before,
        which only a checkpoint at or after them can stand for."""
        first = self.first = first_seq(fd)
        if first != 1 and (start is None or first > start.seq + 1):
            raise LogDamaged(
                str(self.path),
                0,
                1,
                f"the log begins at seq {first}: the events before it were dropped "
                "(retain) and no checkpoint that holds them could be used",
            )
        return first

    def verify(self, seq: int, offset: int, last: str) -> bool:
        """Whether event `seq` is the line that ends right before byte `offset`,
        with the SHA-256 `last`: a checkpoint of this very log."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            if offset == 0:  # `retain` cut everything up to it: the log begins after it
                return os.fstat(fd).st_size > 0 and first_seq(fd) == seq + 1
            if offset < 0 or offset > os.fstat(fd).st_size:
                return False
            if os.pread(fd, 1, offset - 1) != b"\n":
                return False
            line = last_line(fd, offset)[1]
        finally:
            os.close(fd)
        return _seq_of(line) == seq and hashlib.sha256(line).hexdigest() == last

    def mark(self) -> tuple[int, bytes, str, dict[str, int] | None] | None:
        """Where the log stands, for a checkpoint: the size of the main file, its last
        line, that event's time, and the sizes of the stream files (None when some
        could not be written: the next start must catch them up)."""
        if self._broken or self._fd < 0 or self._size == 0:
            return None
        self.flush_streams()
        line = last_line(self._fd, self._size)[1]
        ev = decode(line + b"\n")
        streams = None if self._stale else dict(self._stream_size)
        return self._size, line, ev["ts"], streams

    def sync(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)

    def _open_streams(self, main_last: int, start: Start | None, complete: int) -> int:
        """Open the stream indexes; return the seq up to which all of them are
        complete: as of the last clean close (the marker) or of the checkpoint, if
        they have not shrunk since. An index whose last line is not a line of the
        main file (damaged, or ahead of it) is rebuilt from the start."""
        folder = self.state / "streams"
        low = -1
        for p in folder.iterdir():
            name = p.name
            if name.startswith("."):
                continue
            if not name.endswith(IDX):  # a copy made by an older version: the index replaces it
                p.unlink(missing_ok=True)
                continue
            name = name.removesuffix(IDX)
            fd = self._stream_fd(name)
            n = os.fstat(fd).st_size
            whole = n - n % RECORD.size
            end, last = streamindex.check(fd, whole, self._fd, main_last, complete)
            if last < 0:
                whole, end, last, low = 0, 0, 0, 0  # not lines of the main file: rebuild
            if whole != n:
                os.ftruncate(fd, whole)
            self._stream_bytes[name] = whole
            self._stream_size[name] = end
            self._stream_last[name] = last
        if low == 0:
            return 0
        marks: list[tuple[int, dict[str, int]]] = []
        try:
            meta = json.loads((folder / COMPLETE).read_text())
            marks.append((min(int(meta["seq"]), main_last), dict(meta["sizes"])))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if start is not None and start.streams is not None:
            marks.append((start.seq, start.streams))
        low = 0
        for seq, sizes in marks:
            # Streams only grow: one missing or shorter than then was damaged
            # since, and must be caught up from further back.
            if all(self._stream_size.get(n, -1) >= size for n, size in sizes.items()):
                low = max(low, seq)
        return low

    def _scan(
        self,
        f: Any,
        apply: Callable[[Event], None],
        report: ReplayReport,
        until: int | None,
        size: int,
        offset: int = 0,
        expected: int = 1,
        low: int = 0,
        apply_from: int = 0,
    ) -> None:
        """Read lines from `offset` (event `expected`) to the end: apply each event
        from `apply_from` on (up to `until`), and copy to its streams what they lack."""
        report.last_seq = expected - 1
        lineno = expected - 1  # as a seq; the line's number is counted from the file's first
        catch_up = not self.readonly
        progress = self._progress
        for raw in f:
            lineno += 1
            if progress is not None and not lineno & 0x3FFF:
                progress(offset, size)
            last = offset + len(raw) >= size
            if not raw.endswith(b"\n"):
                report.torn = (offset, len(raw))
                break
            try:
                ev = decode(raw)
                if not isinstance(ev, dict) or ev.get("seq") != expected:
                    raise ValueError(f"expected an event with seq {expected}")
                if not isinstance(ev.get("type"), str) or not isinstance(ev.get("ts"), str):
                    raise ValueError("event without type or ts")
                if (until is None or expected <= until) and expected >= apply_from:
                    apply(ev)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                # A crash can leave zero bytes at the end (a file extended before its
                # data reached the disk); anything else in a full line is damage.
                if last and not raw.rstrip(b"\n").strip(b"\0"):
                    report.torn = (offset, len(raw))
                    break
                lineno -= first_seq(f.fileno()) - 1  # counted from the file's first line
                raise LogDamaged(
                    str(self.path), offset, lineno, str(e) or type(e).__name__
                ) from None
            if catch_up and expected > low:
                streams = _streams(ev)
                if self._stream_last:  # some streams hold this event already
                    streams = [s for s in streams if self._stream_last.get(s, 0) < expected]
                self._stream_write(streams, len(raw), offset)
            report.last_seq = expected
            report.events += 1
            expected += 1
            offset += len(raw)
        self.seq = report.last_seq

    # -- appending ---------------------------------------------------------------------

    def append(self, events: Iterable[Event]) -> list[Event]:
        """Give each event its seq and ts, write them all, return the full events.

        Returns once the lines are in the file (durability `process`); with `disk`
        the caller then awaits `durable()`. On an OSError nothing is kept.
        """
        if self._broken:
            raise OSError(5, self._broken)
        out: list[Event] = []
        raws: list[bytes] = []
        seq = self.seq
        _, ts = now()  # the events of one append share a timestamp
        for ev in events:
            seq += 1
            full: Event = {"seq": seq, "ts": ts}
            full.update(ev)
            out.append(full)
            raws.append(encode(full))
        if not raws:
            return out
        at = self._size
        self._write_all(b"".join(raws))
        self.seq = seq
        self.mtime_ns = time.time_ns()
        for full, raw in zip(out, raws, strict=True):
            self._stream_write(_streams(full), len(raw), at)
            at += len(raw)
        return out

    def _write_all(self, data: bytes) -> None:
        start = self._size
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError as e:
                self._broken = f"event log cannot be repaired after a failed write: {e}"
            raise
        self._size = start + len(data)

    def _stream_fd(self, stream: str) -> int:
        fd = self._streams.get(stream)
        if fd is None:
            path = self.state / "streams" / (stream + IDX)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            self._streams[stream] = fd
            n = os.fstat(fd).st_size
            n -= n % RECORD.size
            self._stream_bytes[stream] = n
            end = RECORD.unpack(os.pread(fd, RECORD.size, n - RECORD.size))[0] if n else 0
            self._stream_size[stream] = end
        return fd

    def _stream_write(self, streams: Iterable[str], length: int, offset: int) -> None:
        """Add a line to streams. Streams are derived from the main log (rebuilt
        at start), so their index records are written in batches: before a stream
        is read or its size asked, once STREAM_BATCH lines wait, and at close."""
        self._pending.append((streams, length, offset))
        if len(self._pending) >= STREAM_BATCH:
            self.flush_streams()

    def flush_streams(self) -> None:
        if not self._pending:
            return
        parts: dict[str, list[int]] = {}
        for streams, length, offset in self._pending:
            for stream in streams:
                lines = parts.get(stream)
                if lines is None:
                    parts[stream] = [length, offset]
                else:
                    lines += (length, offset)
        self._pending.clear()
        for stream, lines in parts.items():
            if stream not in self._stale:
                self._flush(stream, lines)

    def _flush(self, stream: str, lines: list[int]) -> None:
        """Append index records for `lines` (length, offset, length, offset, ...)."""
        try:
            fd = self._stream_fd(stream)
        except OSError:
            self._stale.add(stream)  # as below
            return
        data, end = streamindex.records(lines, self._stream_size[stream])
        start = self._stream_bytes[stream]
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            # Derived data: stop feeding it; the next start catches it up.
            self._stale.add(stream)
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            return
        self._stream_bytes[stream] = start + len(data)
        self._stream_size[stream] = end

    async def durable(self) -> None:
        """With durability `disk`: return once everything written so far is fsynced.

        Concurrent callers share one fsync (group commit).
        """
        if self.durability != "disk":
            return
        target = self._size
        while self._synced < target:
            if self._syncing is not None:
                await self._syncing.wait()
                continue
            self._syncing = done = trio.Event()
            upto = self._size
            try:
                await trio.to_thread.run_sync(os.fsync, self._fd)
                self._synced = max(self._synced, upto)
            finally:
                self._syncing = None
                done.set()

    @property
    def away(self) -> bool:
        """Whether the log is out of reach now: never for the file. (A cluster's
        log: while the engine cannot be reached, O_NONBLOCK writes get EAGAIN.)"""
        return False

    async def settled(self) -> bool:
        """Whether the caller's last events took effect: on one host they are
        applied as they are appended, so always. (A cluster's log waits for them
        to come back from the stream: `cluster.node`.)"""
        return True

    # -- reading -----------------------------------------------------------------------

    def size(self, stream: str | None = None) -> int:
        if stream is None:
            return self._size
        self.flush_streams()
        if stream not in self._stream_size:
            if not (self.state / "streams" / (stream + IDX)).exists():
                return 0
            self._stream_fd(stream)
        return self._stream_size[stream]

    def read(self, stream: str | None, offset: int, size: int) -> bytes:
        if stream is None:
            if offset >= self._size:
                return b""
            return os.pread(self._fd, min(size, self._size - offset), offset)
        end = self.size(stream)  # with every line indexed
        if offset >= end or size <= 0:
            return b""
        return streamindex.read(self._streams[stream], self._fd, offset, min(end, offset + size))

    def close(self) -> None:
        """Make everything durable and close the files. Never raises: the mount
        must come down even when the disk is full or failing."""
        if self._fd < 0:
            return
        marker = self.state / "streams" / COMPLETE
        tmp = marker.with_suffix(".tmp")
        try:
            self.flush_streams()
            os.fsync(self._fd)
            for fd in self._streams.values():
                os.fsync(fd)
            if not self._stale and not self._broken:
                tmp.write_text(json.dumps({"seq": self.seq, "sizes": self._stream_size}))
                os.replace(tmp, marker)
        except OSError as e:
            # An older marker stays true (streams only grow); without one, the next
            # start checks every stream from the beginning.
            log.error("event log closed without a clean finish: %s", e)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        finally:
            os.close(self._fd)
            self._fd = -1
            for fd in self._streams.values():
                os.close(fd)
            self._streams.clear()
