"""The event log [SPEC §5, §8]: append, replay, repair a torn tail, refuse damage."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from outheisfs import eventlog as eventlog_mod
from outheisfs import events
from outheisfs.errors import LogDamaged
from outheisfs.eventlog import MAIN, EventLog, concerned, decode, encode, streams_of
from outheisfs.eventlog import _streams as streams_quick
from outheisfs.models import dumps
from outheisfs.streamindex import IDX, RECORD

from .helpers import read_events, tree_bytes

Event = dict[str, Any]

# Events of the kinds the server writes, with the agents each one concerns.
SAMPLES: list[tuple[Event, set[str]]] = [
    ({"type": "mount", "mountpoint": "/m", "pid": 1, "agents": {"echo": "normal"}}, set()),
    (
        {"type": "message", "id": "A", "from": "user", "to": "echo", "body": "hi"},
        {"user", "echo"},
    ),
    ({"type": "deliver", "agent": "echo", "id": "A", "attempt": 1}, {"echo"}),
    (
        {"type": "message", "id": "B", "from": "echo", "to": "user", "body": {"re": "hi"}},
        {"user", "echo"},
    ),
    ({"type": "ack", "agent": "echo", "id": "A", "who": "echo"}, {"echo"}),
    (
        {"type": "ctl", "agent": "notes", "who": "user", "command": "priority background"},
        {
            "notes",
            "user",
        },
    ),
    ({"type": "error", "who": "notes", "where": "/agents/echo/inbox", "why": "x"}, {"notes"}),
    ({"type": "agent", "op": "create", "agent": "new", "who": "user"}, {"new", "user"}),
    (
        {"type": "message", "id": "C", "from": "notes", "to": "echo", "body": "snow ☃"},
        {"notes", "echo"},
    ),
    ({"type": "dead", "agent": "echo", "id": "C", "attempts": 5, "reason": "r"}, {"echo"}),
    ({"type": "umount", "mountpoint": "/m"}, set()),
]


def sample(i: int) -> Event:
    ev = dict(SAMPLES[i % len(SAMPLES)][0])
    if "id" in ev:
        ev["id"] = f"{ev['id']}{i}"
    return ev


def opened(state: Path, durability: str = "process") -> tuple[EventLog, list[Event]]:
    seen: list[Event] = []
    log = EventLog(state, durability)
    log.open(seen.append)
    return log, seen


def fill(state: Path, n: int, per_append: int = 1) -> list[Event]:
    log, seen = opened(state)
    assert seen == []
    out: list[Event] = []
    i = 0
    while i < n:
        k = min(per_append, n - i)
        out += log.append([sample(j) for j in range(i, i + k)])
        i += k
    log.close()
    return out


@pytest.fixture
def logs() -> Iterator[list[EventLog]]:
    """Logs put here are closed after the test, whatever happened."""
    held: list[EventLog] = []
    yield held
    for log in held:
        log.close()


def lines_of(state: Path) -> list[bytes]:
    return (state / MAIN).read_bytes().splitlines(keepends=True)


# -- append and replay ---------------------------------------------------------------


def test_concerned_matches_samples() -> None:
    for ev, names in SAMPLES:
        assert concerned(ev) == names, ev


BODIES: list[Any] = [
    "hi",
    "",
    'quote " backslash \\ newline \n tab \t bell \x07 del \x7f',
    "snow ☃, emoji 🦉, nul \x00, separator \u2028",
    "\ud800 lone surrogate",
    0,
    -1,
    2**64 + 1,
    -(2**100),
    1.5,
    1e300,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
    None,
    [],
    {},
    [1, "two", None, {"three": [3.0]}],
    {"re": "hi", "n": 2**70, "nested": {"a": [True, None]}},
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_message_lines_are_what_the_encoder_gives(body: Any) -> None:
    ev = {
        "seq": 12,
        "ts": "2026-01-01T00:00:00.000001Z",
        "type": "message",
        "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "from": "user",
        "to": "echo",
        "priority": "normal",
        "body": body,
        "reply_to": None,
        "attempt": 1,
    }

    def outcome(fn: Any, e: Event) -> bytes | type[Exception]:
        try:
            return bytes(fn(e))
        except Exception as x:  # a lone surrogate cannot be written
            return type(x)

    def encoder(e: Event) -> bytes:
        return (dumps(e) + "\n").encode()

    for changes in ({}, {"reply_to": "01ARZ3NDEKTSV4RRFFQ69G5FAW", "attempt": 3, "from": "a"}):
        e = {**ev, **changes}
        assert outcome(encode, e) == outcome(encoder, e)
        assert sorted(streams_quick(e)) == sorted(streams_of(e))
    # Any other shape, as a hand-edited log may hold, goes through the encoder.
    odd = {**ev, "extra": 1, "to": ["a", "b"]}
    assert outcome(encode, odd) == outcome(encoder, odd)
    assert sorted(streams_quick(odd)) == sorted(streams_of(odd))
    same = {**ev, "to": "user"}
    assert sorted(streams_quick(same)) == sorted(streams_of(same))


def test_streams_remembered_are_streams_of() -> None:
    events = [ev for ev, _ in SAMPLES] + [
        {"type": "message", "from": None, "to": "a"},
        {"type": "message", "to": "a"},
        {"type": "message", "from": "a", "to": ["b", "c", 1]},
        {"type": "denied", "who": "a", "path": "/x"},
        {"type": "ctl", "agent": {"odd": 1}, "who": "a"},
        {"type": "deliver", "agent": "server"},
        {"type": "x", "who": "-", "to": "a"},
    ]
    for ev in events * 2:  # the second time from what was remembered
        try:
            expected: Any = sorted(streams_of(ev))
        except KeyError:
            expected = KeyError
        try:
            got: Any = sorted(streams_quick(ev))
        except KeyError:
            got = KeyError
        assert got == expected, ev


LINES = [
    b'{"seq":1,"ts":"t","type":"x"}\n',
    b'{"seq":1,"body":"\xed\xa0\x80"}\n',  # a surrogate, UTF-8 encoded
    b'{"seq":1,"body":"\\ud800 \xe2\x98\x83"}\n',
    b'{"seq":1} \n',
    b'{"seq":1}\r\n',
    b' {"seq":1}\n',
    b'\xef\xbb\xbf{"seq":1}\n',
    b'{"seq":1}{"seq":2}\n',
    b'{"seq":1}x\n',
    b'{"seq":1\n',
    b'{"seq":NaN,"n":123456789012345678901234567890}\n',
    b'{"seq":1,"body":"\xff"}\n',
    b'{"seq":1,"body":"a\tb"}\n',
    b'{"seq":1,"seq":2}\n',
    b'{"\n',
    b"\0\0\0\0\n",
    b"[1]\n",
    b"\n",
]


@pytest.mark.parametrize("raw", LINES, ids=range(len(LINES)))
def test_decode_is_json_loads(raw: bytes) -> None:
    def outcome(fn: Any) -> Any:
        try:
            return ("ok", repr(fn(raw)))
        except ValueError as e:
            return (type(e), str(e))

    assert outcome(decode) == outcome(json.loads)


def test_append_fills_seq_and_ts(tmp_path: Path, logs: list[EventLog]) -> None:
    log, _ = opened(tmp_path)
    logs.append(log)
    out = log.append([sample(1), sample(2)])
    assert [e["seq"] for e in out] == [1, 2]
    assert all(isinstance(e["ts"], str) and e["ts"].endswith("Z") for e in out)
    assert out[0]["body"] == "hi" and out[0]["type"] == "message"
    assert log.seq == 2
    assert read_events(tmp_path) == out
    for line in lines_of(tmp_path):
        assert list(json.loads(line))[:3] == ["seq", "ts", "type"]


def test_reopen_replays_in_order(tmp_path: Path) -> None:
    first = fill(tmp_path, 7, per_append=3)
    log, seen = opened(tmp_path)
    more = log.append([sample(7), sample(8)])
    log.close()
    assert seen == first
    log, seen = opened(tmp_path)
    log.close()
    assert seen == first + more
    assert [e["seq"] for e in seen] == list(range(1, 10))


def test_open_until(tmp_path: Path) -> None:
    events = fill(tmp_path, 6)
    seen: list[Event] = []
    report = EventLog(tmp_path, readonly=True).open(seen.append, until=4)
    assert seen == events[:4]
    assert report.torn is None


def test_root_log_bytes_match_read_at_offsets(tmp_path: Path, logs: list[EventLog]) -> None:
    log, _ = opened(tmp_path)
    logs.append(log)
    rng = random.Random(1)
    for i in range(40):
        log.append([sample(i)])
        data = (tmp_path / MAIN).read_bytes()
        assert log.size() == len(data)
        for _ in range(5):
            off = rng.randrange(0, len(data) + 10)
            size = rng.choice([1, 7, 100, 4096, 1 << 20])
            assert log.read(None, off, size) == data[off : off + size]
    assert log.read(None, log.size(), 100) == b""
    assert log.read(None, 0, 1 << 30) == (tmp_path / MAIN).read_bytes()


def test_stream_files_hold_what_concerns_each_agent(tmp_path: Path, logs: list[EventLog]) -> None:
    log, _ = opened(tmp_path)
    logs.append(log)
    events = log.append([sample(i) for i in range(len(SAMPLES))])
    events += log.append([sample(i) for i in range(len(SAMPLES), 3 * len(SAMPLES))])
    raw = lines_of(tmp_path)
    names = {"user", "echo", "notes", "new"}
    for name in names:
        want = b"".join(line for i, line in enumerate(raw) if name in SAMPLES[i % len(SAMPLES)][1])
        assert want, name
        assert log.read(f"{name}.log", 0, 1 << 20) == want
        assert log.size(f"{name}.log") == len(want)
        # Not a copy: 16 bytes of index per line, the line itself stays in the log.
        index = tmp_path / "streams" / f"{name}.log{IDX}"
        assert index.stat().st_size == RECORD.size * len(want.splitlines())
        outbox = b"".join(
            line
            for line, ev in zip(raw, events, strict=True)
            if ev["type"] == "message" and ev["from"] == name
        )
        assert log.read(f"{name}.outbox", 0, 1 << 20) == outbox
        assert log.size(f"{name}.outbox") == len(outbox)
    # An agent nothing concerns has empty files.
    assert log.size("nobody.log") == 0 and log.read("nobody.log", 0, 10) == b""
    # Streams read at offsets like the root log.
    data = log.read("echo.log", 0, 1 << 20)
    for off in range(0, len(data), 37):
        assert log.read("echo.log", off, 50) == data[off : off + 50]


def test_a_batch_of_messages_fills_the_streams_as_one_by_one(
    tmp_path: Path, logs: list[EventLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    def msg(i: int, sender: str, to: str) -> Event:
        return events.message(f"m{i}", sender, to, "normal", f"body {i}", None)

    batch = [msg(i, "user", "echo") for i in range(4)] + [msg(4, "echo", "user")]
    batch += [events.deliver("echo", "m0", 1), msg(5, "user", "echo"), msg(6, "user", "echo")]
    monkeypatch.setattr(eventlog_mod, "now", lambda: (0.0, "2026-01-01T00:00:00.000000Z"))
    folders = []
    for per in (len(batch), 1):
        state = tmp_path / f"per{per}"
        log, _ = opened(state)
        logs.append(log)
        for k in range(0, len(batch), per):
            log.append(batch[k : k + per])
        log.flush_streams()
        folders.append(state / "streams")
    together, alone = folders
    names = sorted(p.name for p in alone.iterdir())
    assert names == sorted(p.name for p in together.iterdir())
    want = {"user.log", "echo.log", "user.outbox", "echo.outbox"}
    assert {n + IDX for n in want} <= set(names)
    for name in names:
        assert (together / name).read_bytes() == (alone / name).read_bytes(), name


# -- a torn tail ---------------------------------------------------------------------


def test_torn_last_record_every_cut(tmp_path: Path) -> None:
    orig = tmp_path / "orig"
    events = fill(orig, 10)
    lines = lines_of(orig)
    start = sum(map(len, lines[:-1]))
    full = (orig / MAIN).read_bytes()
    streams_before = {p.name: p.read_bytes() for p in (orig / "streams").iterdir()}
    echo_want = b"".join(
        line for line, ev in zip(lines[:-1], events, strict=False) if "echo" in concerned(ev)
    )
    assert events[-1]["type"] == "dead" and events[-1]["agent"] == "echo"
    for cut in range(start + 1, len(full)):
        state = tmp_path / f"cut{cut}"
        shutil.copytree(orig, state)
        (state / MAIN).write_bytes(full[:cut])
        log, seen = EventLog(state), list[dict[str, Any]]()
        report = log.open(seen.append)
        try:
            assert report.torn == (start, cut - start), cut
            assert seen == events[:-1]
            assert report.last_seq == 9 and report.events == 9
            assert (state / MAIN).read_bytes() == full[:start]
            # The stream held the lost event: it is rebuilt to match the main log.
            assert log.read("echo.log", 0, 1 << 20) == echo_want
            # Appending goes on after the last full line.
            ev = log.append([{"type": "umount"}])[0]
            assert ev["seq"] == 10
        finally:
            log.close()
        seen = []
        assert EventLog(state, readonly=True).open(seen.append).torn is None
        assert [e["seq"] for e in seen] == list(range(1, 11))
        shutil.rmtree(state)
    assert streams_before  # sanity: there were streams to rebuild


@pytest.mark.parametrize("tail", [b"\0" * 100, b"\0" * 30 + b"\n", b"{", b'{"seq": 9'])
def test_torn_garbage_tail(tmp_path: Path, tail: bytes) -> None:
    events = fill(tmp_path, 4)
    good = (tmp_path / MAIN).read_bytes()
    (tmp_path / MAIN).write_bytes(good + tail)
    log, seen = opened(tmp_path)
    log.close()
    assert seen == events
    assert (tmp_path / MAIN).read_bytes() == good


def test_torn_only_line(tmp_path: Path) -> None:
    fill(tmp_path, 1)
    data = (tmp_path / MAIN).read_bytes()
    (tmp_path / MAIN).write_bytes(data[:-1])
    log, seen = opened(tmp_path)
    log.close()
    assert seen == []
    assert (tmp_path / MAIN).read_bytes() == b""


def test_empty_and_missing_log(tmp_path: Path) -> None:
    log, seen = opened(tmp_path / "new")
    assert seen == [] and log.seq == 0
    assert log.append([{"type": "mount"}])[0]["seq"] == 1
    log.close()
    (tmp_path / "new" / MAIN).write_bytes(b"")
    log, seen = opened(tmp_path / "new")
    log.close()
    assert seen == []


# -- damage before the end -----------------------------------------------------------


def damaged(state: Path, line_no: int, why: str = "") -> LogDamaged:
    before = tree_bytes(state)
    with pytest.raises(LogDamaged) as e:
        EventLog(state).open(lambda ev: None)
    assert e.value.line == line_no
    assert str(e.value.offset) in str(e.value) and str(line_no) in str(e.value)
    assert why in str(e.value)
    after = tree_bytes(state)
    assert after[MAIN] == before[MAIN], "a damaged log is left as it was"
    with pytest.raises(LogDamaged):
        EventLog(state, readonly=True).open(lambda ev: None)
    assert tree_bytes(state) == after
    return e.value


@pytest.mark.parametrize(
    ("line_no", "where"),
    [
        (n, w)
        for n in (1, 4, 7)
        for w in ("first", "colon", "last", "newline", "utf8", "zeros")
        if (n, w) != (7, "newline")
    ]
    + [pytest.param(7, "newline", marks=())],
)
def test_garbled_middle_line(tmp_path: Path, where: str, line_no: int) -> None:
    fill(tmp_path, 8)
    lines = lines_of(tmp_path)
    offset = sum(map(len, lines[: line_no - 1]))
    line = bytearray(lines[line_no - 1])
    if where == "first":
        line[0:1] = b"#"
    elif where == "colon":
        i = line.index(b":")
        line[i : i + 1] = b"#"
    elif where == "last":
        line[-2:-1] = b"#"
    elif where == "newline":
        line[-1:] = b"#"
    elif where == "utf8":
        i = line.index(b'"type"')
        line[i + 1 : i + 2] = b"\xff"
    else:
        line[:-1] = b"\0" * (len(line) - 1)
    lines[line_no - 1] = bytes(line)
    (tmp_path / MAIN).write_bytes(b"".join(lines))
    e = damaged(tmp_path, line_no)
    assert e.offset == offset


@pytest.mark.parametrize("how", ["skip", "repeat", "jump", "missing", "string"])
def test_broken_seq_continuity(tmp_path: Path, how: str) -> None:
    fill(tmp_path, 8)
    lines = lines_of(tmp_path)
    k = 4  # line number of the damage
    offset = sum(map(len, lines[: k - 1]))
    ev = json.loads(lines[k - 1])
    if how == "skip":
        del lines[k - 1]  # seq 5 where 4 is expected
    elif how == "repeat":
        lines.insert(k - 1, lines[k - 2])  # seq 3 twice
    else:
        if how == "jump":
            ev["seq"] = 40
        elif how == "missing":
            del ev["seq"]
        else:
            ev["seq"] = str(ev["seq"])
        lines[k - 1] = (json.dumps(ev) + "\n").encode()
    (tmp_path / MAIN).write_bytes(b"".join(lines))
    e = damaged(tmp_path, k, "seq")
    assert e.offset == offset


def test_complete_last_line_with_wrong_seq_is_damage(tmp_path: Path) -> None:
    fill(tmp_path, 5)
    lines = lines_of(tmp_path)
    offset = sum(map(len, lines[:-1]))
    ev = json.loads(lines[-1])
    ev["seq"] = 9
    lines[-1] = (json.dumps(ev) + "\n").encode()
    (tmp_path / MAIN).write_bytes(b"".join(lines))
    assert damaged(tmp_path, 5).offset == offset


def test_event_without_type_is_damage(tmp_path: Path) -> None:
    fill(tmp_path, 5)
    lines = lines_of(tmp_path)
    ev = json.loads(lines[2])
    del ev["type"]
    lines[2] = (json.dumps(ev) + "\n").encode()
    (tmp_path / MAIN).write_bytes(b"".join(lines))
    damaged(tmp_path, 3)


# -- stream files: derived, rebuilt at open ------------------------------------------


def stream(state: Path, name: str) -> Path:
    return state / "streams" / (name + IDX)


def expected_streams(state: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for line in lines_of(state):
        ev = json.loads(line)
        for name in concerned(ev):
            out[f"{name}.log"] = out.get(f"{name}.log", b"") + line
        if ev["type"] == "message":
            key = f"{ev['from']}.outbox"
            out[key] = out.get(key, b"") + line
    return out


def check_streams(state: Path) -> None:
    want = expected_streams(state)
    log, _ = opened(state)
    try:
        for name, data in want.items():
            assert log.read(name, 0, 1 << 20) == data, name
            assert stream(state, name).stat().st_size == RECORD.size * data.count(b"\n"), name
    finally:
        log.close()


def crash(state: Path) -> None:
    """Make the state look like the server was killed (no clean close)."""
    (state / "streams" / ".complete").unlink(missing_ok=True)


@pytest.mark.parametrize(
    "clean",
    [False, pytest.param(True, marks=())],
    ids=["after-crash", "after-clean-close"],
)
@pytest.mark.parametrize("damage", ["deleted", "truncated", "cut-mid-line", "emptied"])
def test_stream_rebuilt(tmp_path: Path, damage: str, clean: bool) -> None:
    fill(tmp_path, 12)
    if not clean:
        crash(tmp_path)
    p = stream(tmp_path, "echo.log")
    data = p.read_bytes()
    if damage == "deleted":
        p.unlink()
        stream(tmp_path, "user.outbox").unlink()
    elif damage == "truncated":
        p.write_bytes(data[: 2 * RECORD.size])
    elif damage == "cut-mid-line":
        p.write_bytes(data[: len(data) // 2 + 3])
    else:
        p.write_bytes(b"")
    check_streams(tmp_path)


def test_stream_ahead_of_main_log_rebuilt(tmp_path: Path) -> None:
    fill(tmp_path, 10)
    crash(tmp_path)
    lines = lines_of(tmp_path)
    (tmp_path / MAIN).write_bytes(b"".join(lines[:7]))  # the main log lost its last lines
    check_streams(tmp_path)


def test_stream_ahead_of_main_log_after_clean_close(tmp_path: Path) -> None:
    fill(tmp_path, 10)
    lines = lines_of(tmp_path)
    (tmp_path / MAIN).write_bytes(b"".join(lines[:7]))
    check_streams(tmp_path)


def test_stream_with_garbage_rebuilt(tmp_path: Path) -> None:
    fill(tmp_path, 10)
    crash(tmp_path)
    stream(tmp_path, "echo.log").write_bytes(b"not json at all\n")
    check_streams(tmp_path)


def test_all_streams_gone(tmp_path: Path) -> None:
    fill(tmp_path, 10)
    shutil.rmtree(tmp_path / "streams")
    check_streams(tmp_path)


# -- readonly ------------------------------------------------------------------------


def test_readonly_never_writes(tmp_path: Path) -> None:
    events = fill(tmp_path, 6)
    crash(tmp_path)
    full = (tmp_path / MAIN).read_bytes()
    (tmp_path / MAIN).write_bytes(full[:-5])  # torn tail
    stream(tmp_path, "echo.log").unlink()  # and a stream to rebuild
    stream(tmp_path, "user.log").write_bytes(b"x")
    before = tree_bytes(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    seen: list[Event] = []
    report = EventLog(tmp_path, readonly=True).open(seen.append)
    assert report.torn is not None
    assert seen == events[:-1]
    assert tree_bytes(tmp_path) == before
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes


def test_readonly_missing_state_creates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "none"
    report = EventLog(state, readonly=True).open(lambda ev: None)
    assert report.last_seq == 0 and report.events == 0
    assert not state.exists()


# -- durability ----------------------------------------------------------------------


class FsyncCounter:
    def __init__(self, real: Any, delay: float) -> None:
        self.real = real
        self.delay = delay
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        self.real(fd)


async def test_disk_durability_group_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[EventLog]
) -> None:
    log, _ = opened(tmp_path, "disk")
    logs.append(log)
    counter = FsyncCounter(os.fsync, 0.05)
    monkeypatch.setattr(os, "fsync", counter)
    done: list[int] = []

    async def writer(i: int) -> None:
        log.append([sample(i)])
        await log.durable()
        done.append(i)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(writer, i)
    assert sorted(done) == list(range(20))
    assert 1 <= counter.calls <= 2, "concurrent writers share fsyncs"
    # Nothing new: durable() returns without another fsync.
    calls = counter.calls
    await log.durable()
    assert counter.calls == calls


async def test_disk_durability_covers_later_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[EventLog]
) -> None:
    log, _ = opened(tmp_path, "disk")
    logs.append(log)
    counter = FsyncCounter(os.fsync, 0.05)
    monkeypatch.setattr(os, "fsync", counter)
    done: list[str] = []

    async def early() -> None:
        log.append([sample(0)])
        await log.durable()
        done.append("early")

    async def late() -> None:
        with trio.fail_after(5):  # appends while the first fsync runs
            while counter.calls == 0:
                await trio.sleep(0.001)
        log.append([sample(1)])
        await log.durable()
        # Its data was written after the first fsync began: a second one covers it.
        done.append("late")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(early)
            nursery.start_soon(late)
    assert sorted(done) == ["early", "late"]
    assert counter.calls == 2


async def test_process_durability_never_fsyncs_on_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[EventLog]
) -> None:
    log, _ = opened(tmp_path, "process")
    logs.append(log)
    counter = FsyncCounter(os.fsync, 0)
    monkeypatch.setattr(os, "fsync", counter)
    for i in range(5):
        log.append([sample(i)])
        await log.durable()
    assert counter.calls == 0
    # Yet each write is in the file at once: a SIGKILL now loses nothing.
    assert len(lines_of(tmp_path)) == 5
