"""`retain`: a bounded log. Events older than the rule and held by a checkpoint are dropped.

`retain = "7d"` (s, m, h, d) or `retain = 100000` (events). At each mount, before
the log is opened, the newest checkpoint whose events are all outside the rule
(its last event older than the age, or at least that many events before the
log's end) becomes the log's base: `events.jsonl` is rewritten to begin right
after it, the agents' stream files lose the same events, and the checkpoints
kept are told their new offsets. What the dropped events said stays in the
state, through that checkpoint, which is never pruned afterwards.

Each file is replaced atomically; a journal (`retain.json`: the base seq and the
bytes cut) written first lets a start that finds it finish the change or undo
it, so a crash at any point leaves a log that opens.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from . import checkpoint
from .config import retention
from .eventlog import COMPLETE, MAIN, EventLog, complete_size, first_seq, last_line
from .streamindex import IDX, RECORD, seq_prefix

log = logging.getLogger(__name__)

JOURNAL = "retain.json"


def _ts(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC).timestamp()


def base(state: Path, rule: str | int, now: float) -> checkpoint.Header | None:
    """The checkpoint the log may begin after: the newest one outside the rule."""
    kind, amount = retention(rule)
    elog = EventLog(state, readonly=True)
    try:
        fd = os.open(state / MAIN, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        complete = complete_size(fd)
        last = (seq_prefix(last_line(fd, complete)[1]) or 0) if complete else 0
        first = first_seq(fd)
    finally:
        os.close(fd)
    for seq, path in checkpoint.listing(state):
        if seq < first:  # the log already begins after it
            return None
        try:
            header, _ = checkpoint.read(path)
        except (OSError, ValueError, TypeError) as e:
            log.warning("retain: checkpoint %s not used: %s", path.name, e)
            continue
        if not elog.verify(header.seq, header.offset, header.last):
            continue
        outside = last - seq >= amount if kind == "events" else now - _ts(header.ts) >= amount
        if outside:
            return header if header.seq >= first else None
    return None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _copy_tail(src: Path, dst: Path, offset: int) -> None:
    """dst (atomically) = src from byte `offset` on."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        fi.seek(offset)
        while chunk := fi.read(1 << 20):
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    os.replace(tmp, dst)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_index(path: Path, cut: int) -> int:
    """Drop a stream index's records of lines in the first `cut` bytes of the main
    file and shift the others; return the bytes of stream dropped."""
    data = path.read_bytes()
    n = len(data) // RECORD.size
    values = struct.unpack(f"<{2 * n}Q", data[: n * RECORD.size])
    i = 0
    while i < n and values[2 * i + 1] < cut:
        i += 1
    dropped = values[2 * i - 2] if i else 0
    if i:
        kept = [v - (dropped if j % 2 == 0 else cut) for j, v in enumerate(values[2 * i :])]
        _write(path, struct.pack(f"<{len(kept)}Q", *kept))
    return int(dropped)


def apply(state: Path, rule: str | int, now: float) -> int:
    """Drop what the rule allows; return the seq the log now begins after (0: nothing)."""
    finish(state)
    header = base(state, rule, now)
    if header is None or header.offset == 0:
        return 0
    cut = header.offset
    _write(state / JOURNAL, json.dumps({"seq": header.seq, "bytes": cut}).encode())
    _copy_tail(state / MAIN, state / MAIN, cut)
    _fsync_dir(state)
    _adjust(state, header.seq, cut)
    return header.seq


def finish(state: Path) -> None:
    """Complete a cut a crash interrupted, or forget one that never began."""
    journal = state / JOURNAL
    try:
        j = json.loads(journal.read_bytes())
        seq, cut = int(j["seq"]), int(j["bytes"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        journal.unlink(missing_ok=True)
        return
    try:
        fd = os.open(state / MAIN, os.O_RDONLY)
        try:
            first = first_seq(fd)
        finally:
            os.close(fd)
    except OSError:
        first = 1
    if first == seq + 1:
        _adjust(state, seq, cut, fresh=False)
    else:  # the new log never replaced the old one
        (state / f".{MAIN}.tmp").unlink(missing_ok=True)
        journal.unlink()


def _adjust(state: Path, seq: int, cut: int, fresh: bool = True) -> None:
    """After the main log lost its first `cut` bytes (events up to `seq`): the
    streams lose the same events, checkpoints before `seq` go, the others get
    their new offsets and stream sizes. Finishing an interrupted cut, the stream
    indexes are removed instead (some may be shifted already): the next start
    rebuilds them from the log."""
    elog = EventLog(state, readonly=True)
    dropped: dict[str, int] = {}
    streams = state / "streams"
    if streams.is_dir():
        (streams / COMPLETE).unlink(missing_ok=True)
        for p in sorted(streams.iterdir()):
            if p.name.startswith(".") or not p.name.endswith(IDX):
                continue
            if fresh:
                dropped[p.name.removesuffix(IDX)] = _cut_index(p, cut)
            else:
                p.unlink()
    for s, path in checkpoint.listing(state):
        if s < seq:
            path.unlink(missing_ok=True)
            continue
        try:
            header, body = checkpoint.read(path)
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if elog.verify(header.seq, header.offset, header.last):
            continue  # already adjusted (a finished run, interrupted after it)
        if not elog.verify(header.seq, header.offset - cut, header.last):
            path.unlink(missing_ok=True)
            continue
        sizes = None
        if header.streams is not None and all(n in dropped for n in header.streams):
            sizes = {n: size - dropped[n] for n, size in header.streams.items()}
        checkpoint.rewrite(path, replace(header, offset=header.offset - cut, streams=sizes), body)
    if (state / checkpoint.FOLDER).is_dir():
        _fsync_dir(state / checkpoint.FOLDER)
    (state / JOURNAL).unlink(missing_ok=True)
