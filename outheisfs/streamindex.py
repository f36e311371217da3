"""Stream indexes: an agent's `log`, `outbox` and `errors` as positions in the main log.

A stream's lines are lines of `events.jsonl`. Its index file (`streams/NAME.log.idx`)
holds one record of 16 bytes per line: the stream's size after that line, and the
line's offset in the main file (little-endian 64-bit integers). A read at offset X of
the stream finds the first line that ends after X by binary search over the records,
then reads the lines from the main file, neighbouring lines in one `pread`. So the
stream costs 16 bytes per line on disk instead of a copy of the line, and nothing in
memory. The index is derived data, written by `eventlog` after the main file.
"""

from __future__ import annotations

import os
import re
import struct

IDX = ".idx"  # a stream's index file: streams/NAME.log.idx
RECORD = struct.Struct("<QQ")  # the stream's size after a line, the line's offset in MAIN
_SEQ_PREFIX = re.compile(rb'\{"seq":([0-9]+)[,}]')


def seq_prefix(line: bytes) -> int | None:
    """The seq a log line begins with (every line the log writes does), or None."""
    m = _SEQ_PREFIX.match(line)
    return int(m.group(1)) if m else None


def records(lines: list[int], end: int) -> tuple[bytes, int]:
    """Index records for lines given as (length, offset, length, offset, ...) of a
    stream now `end` bytes long; and its size after them."""
    values = list(lines)
    for i in range(0, len(values), 2):
        end += values[i]
        values[i] = end
    return struct.pack(f"<{len(values)}Q", *values), end


def check(fd: int, whole: int, main_fd: int, main_last: int, complete: int) -> tuple[int, int]:
    """(the stream's size, the seq of its last line) for an index of `whole` bytes,
    or (0, -1) if its last record does not point at a complete line of the main
    file (`complete` bytes, last seq `main_last`)."""
    if whole == 0:
        return 0, 0
    end, offset = RECORD.unpack(os.pread(fd, RECORD.size, whole - RECORD.size))
    before = 0
    if whole > RECORD.size:
        before = RECORD.unpack(os.pread(fd, RECORD.size, whole - 2 * RECORD.size))[0]
    length = end - before
    if length <= 0 or offset + length > complete:
        return 0, -1
    line = os.pread(main_fd, length, offset)
    seq = seq_prefix(line)
    if not line.endswith(b"\n") or seq is None or seq > main_last:
        return 0, -1
    return end, seq


def read(fd: int, main_fd: int, offset: int, stop: int) -> bytes:
    """Bytes [offset, stop) of the stream whose index is `fd`."""
    rec = RECORD.size

    def end_of(i: int) -> int:
        return int(RECORD.unpack(os.pread(fd, rec, i * rec))[0])

    n = os.fstat(fd).st_size // rec
    lo, hi = 0, n
    while lo < hi:  # the first line that ends after `offset`
        mid = (lo + hi) // 2
        if end_of(mid) > offset:
            hi = mid
        else:
            lo = mid + 1
    i = lo
    pos = first = end_of(i - 1) if i else 0
    parts: list[bytes] = []
    run_at = run_len = 0
    while pos < stop and i < n:
        k = min(n - i, 512)
        values = struct.unpack(f"<{2 * k}Q", os.pread(fd, k * rec, i * rec))
        for j in range(0, 2 * k, 2):
            end, at = values[j], values[j + 1]
            length = end - pos
            if run_len and at == run_at + run_len:
                run_len += length
            else:
                if run_len:
                    parts.append(os.pread(main_fd, run_len, run_at))
                run_at, run_len = at, length
            pos = end
            i += 1
            if pos >= stop:
                break
    if run_len:
        parts.append(os.pread(main_fd, run_len, run_at))
    data = b"".join(parts)
    return data[offset - first : stop - first]
