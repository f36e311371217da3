"""Checkpoints and `retain`, below FUSE: a state rebuilt from a checkpoint and the
log's tail is the state a full replay gives, for random event sequences; a damaged,
missing, foreign or too new checkpoint is skipped (full replay, same state); a crash
while writing one leaves the old set; `retain` cuts the log after a checkpoint and
replay still gives the same state."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outheisfs import checkpoint, events, flows, retain
from outheisfs.config import Config, parse_config
from outheisfs.dispatcher import Dispatcher
from outheisfs.errors import LogDamaged
from outheisfs.eventlog import EventLog
from outheisfs.models import Draft, Message
from outheisfs.names import OPERATOR
from outheisfs.streamindex import RECORD

from .helpers import make_config, open_dispatcher

# -- comparing states ---------------------------------------------------------------------


def canonical(obj: Any) -> Any:
    """A plain, comparable form of any state: every attribute of every object,
    sets sorted, dict order kept (bounded tables drop by insertion order)."""
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if isinstance(obj, dict):
        return ("dict", [(canonical(k), canonical(v)) for k, v in obj.items()])
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, [canonical(x) for x in obj])
    if isinstance(obj, set | frozenset):
        return ("set", sorted((canonical(x) for x in obj), key=repr))
    if dataclasses.is_dataclass(obj):
        return (
            type(obj).__name__,
            [(f.name, canonical(getattr(obj, f.name))) for f in dataclasses.fields(obj)],
        )
    if hasattr(obj, "model_dump"):  # an agent's settings (pydantic)
        return ("config", obj.model_dump())
    return (type(obj).__name__, canonical(vars(obj)))


def state(d: Dispatcher) -> Any:
    return canonical(checkpoint.state_of(d))


def full_replay(path: Path, config: Config, until: int | None = None) -> Dispatcher:
    d = Dispatcher(config, None)
    EventLog(path, readonly=True).open(d.apply, until)
    return d


def lines(path: Path) -> list[bytes]:
    return (path / "events.jsonl").read_bytes().splitlines(keepends=True)


def checkpoint_at(path: Path, config: Config, seq: int) -> Path:
    """Write a checkpoint of the state as of event `seq`, as the server would."""
    d = full_replay(path, config, seq)
    raw = lines(path)
    offset = sum(len(x) for x in raw[:seq])
    last = raw[seq - 1].rstrip(b"\n")
    header = checkpoint.Header(seq, offset, checkpoint.digest(last), json.loads(last)["ts"], None)
    return checkpoint.write(path, header, checkpoint.dumps(d))


def restored(path: Path, config: Config, until: int | None = None) -> tuple[Dispatcher, Any]:
    elog = EventLog(path, readonly=True)
    d, start = checkpoint.restore(path, config, elog, until)
    report = elog.open(d.apply, until, start=start)
    return d, report


# -- random event sequences ---------------------------------------------------------------

CONFIG = make_config(
    {
        "a": {"ack": "explicit", "ack_wait": 5.0, "send": ["b"]},
        "b": {"send": ["*"], "unveil": {"/vault/x": "r"}},
    },
    max_attempts=2,
    aging=3.0,
)
NAMES = ["a", "b", "c", OPERATOR]
STEPS = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(NAMES), st.sampled_from(NAMES), st.integers(1, 3)),
    st.tuples(st.just("take"), st.sampled_from(NAMES), st.integers(0, 1)),
    st.tuples(st.just("ack"), st.sampled_from(NAMES)),
    st.tuples(st.just("crash"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("nack"), st.sampled_from(NAMES), st.sampled_from([0.0, 2.0])),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 4.0, 6.0])),
    st.tuples(st.just("requeue"), st.sampled_from(NAMES)),
    st.tuples(st.just("purge"), st.sampled_from(NAMES)),
    st.tuples(st.just("mkdir"), st.sampled_from(["c", "d"])),
    st.tuples(st.just("rmdir"), st.sampled_from(["c", "d"])),
    st.tuples(st.just("unveil"), st.sampled_from(NAMES), st.sampled_from(["r", "-"])),
    st.tuples(st.just("priority"), st.sampled_from(NAMES)),
    st.tuples(st.just("start"), st.sampled_from(NAMES)),
    st.tuples(
        st.just("restart"),
    ),
)


def run_steps(path: Path, program: list[tuple[Any, ...]]) -> None:
    """Drive the dispatcher's operations; refusals are part of the game."""
    d, log = open_dispatcher(path, CONFIG)
    now = 1_800_000_000.0
    for op, *args in [("restart",), *program]:
        try:
            if op == "send":
                frm, to, n = args
                if to in d.agents and frm in d.agents:
                    d.deliver(d.plan(frm, [Draft(body=f"m{i}") for i in range(n)], to))
            elif op == "take" and args[0] in d.agents:
                d.take(args[0], 100 + args[1], args[1], now)
            elif op == "ack" and args[0] in d.agents:
                d.ack_all(args[0], args[0])
            elif op == "crash" and args[0] in d.agents:
                for m in list(d.agents[args[0]].inflight.values())[:1]:
                    d.retry(m, "killed", counted=args[1])
            elif op == "nack" and args[0] in d.agents:
                for m in list(d.agents[args[0]].inflight.values())[:1]:
                    flows.nack(d, m, args[0], args[1], now)
            elif op == "tick":
                now += args[0]
                flows.expire(d, now)
            elif op == "requeue" and args[0] in d.agents:
                flows.requeue(d, args[0], None, OPERATOR)
            elif op == "purge" and args[0] in d.agents:
                flows.purge(d, args[0], None, OPERATOR)
            elif op == "mkdir":
                d.mkdir(args[0], OPERATOR)
            elif op == "rmdir":
                d.rmdir(args[0], OPERATOR)
            elif op == "unveil" and args[0] in d.agents:
                d.record([events.ctl(args[0], OPERATOR, f"unveil /vault/y {args[1]}")])
            elif op == "priority" and args[0] in d.agents:
                d.record([events.ctl(args[0], OPERATOR, "priority background")])
            elif op == "start" and args[0] in d.agents:
                d.record([events.start(args[0], 4242, 0)])
            elif op == "restart":
                d.record([events.mount("/m", 1, "process", {"a": "normal", "b": "normal"})])
                d.requeue_inflight()
        except Exception as e:  # a refusal the dispatcher raises (EINVAL, ENOENT, ...)
            assert hasattr(e, "errno"), e
    log.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip
@given(st.lists(STEPS, min_size=5, max_size=50), st.data())
def test_a_checkpoint_and_the_tail_give_the_state_of_a_full_replay(
    program: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        run_steps(path, program)
        last = len(lines(path))
        want = state(full_replay(path, CONFIG))
        cuts = data.draw(st.lists(st.integers(1, last), min_size=1, max_size=4, unique=True))
        for seq in cuts:
            checkpoint_at(path, CONFIG, seq)
        # The newest checkpoint is used, and only the events after it are read.
        d, report = restored(path, CONFIG)
        assert report.checkpoint == max(cuts)
        assert report.events == last - max(cuts)
        assert state(d) == want
        # Any SEQ: from the newest checkpoint at or before it, the same as a full replay.
        until = data.draw(st.integers(1, last))
        d, report = restored(path, CONFIG, until)
        assert report.checkpoint == max([c for c in cuts if c <= until], default=0)
        assert state(d) == state(full_replay(path, CONFIG, until))


def test_the_state_round_trips_whole(tmp_path: Path) -> None:
    """dumps/loads keep every attribute, and shared messages stay one object."""
    program: list[tuple[Any, ...]] = [("send", OPERATOR, "a", 3), ("take", "a", 0)]
    program += [("nack", "a", 2.0), ("take", "b", 0), ("send", "b", "a", 2)]
    program += [("take", "a", 1), ("tick", 6.0), ("mkdir", "c")]
    run_steps(tmp_path, program)
    d = full_replay(tmp_path, CONFIG)
    back = checkpoint.loads(checkpoint.dumps(d), CONFIG)
    assert state(back) == state(d)
    for agent in back.agents.values():
        for m in agent.inflight.values():
            assert back.messages[m.id] is m
        assert agent.config is CONFIG.agents.get(agent.name)
        assert agent.inbox.aging == CONFIG.aging


# -- checkpoints that must not be used --------------------------------------------------------


def some_log(path: Path, n: int = 30) -> None:
    run_steps(path, [("send", OPERATOR, "b", 3), ("take", "b", 0), ("ack", "b")] * (n // 3))


@pytest.mark.parametrize(
    "damage", ["flip", "truncate", "empty", "header", "shape", "seq", "missing"]
)  # fmt: skip
def test_a_damaged_or_missing_checkpoint_is_skipped_for_a_full_replay(
    tmp_path: Path, damage: str
) -> None:
    some_log(tmp_path)
    want = state(full_replay(tmp_path, CONFIG))
    path = checkpoint_at(tmp_path, CONFIG, 20)
    data = path.read_bytes()
    head, _, body = data.partition(b"\n")
    header = json.loads(head)
    if damage == "flip":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "header":
        path.write_bytes(b"{not json\n" + body)
    elif damage == "shape":
        path.write_bytes(json.dumps({**header, "shape": "0" * 16}).encode() + b"\n" + body)
    elif damage == "seq":  # a file renamed to another seq
        path.rename(path.with_name(checkpoint.name_of(25)))
    else:
        path.unlink()
    d, report = restored(tmp_path, CONFIG)
    assert report.checkpoint == 0
    assert report.events == len(lines(tmp_path))
    assert state(d) == want


def test_an_older_good_checkpoint_is_used_when_the_newest_is_damaged(tmp_path: Path) -> None:
    some_log(tmp_path)
    checkpoint_at(tmp_path, CONFIG, 10)
    newest = checkpoint_at(tmp_path, CONFIG, 20)
    newest.write_bytes(newest.read_bytes()[:-1])
    d, report = restored(tmp_path, CONFIG)
    assert (report.checkpoint, report.events) == (10, len(lines(tmp_path)) - 10)
    assert state(d) == state(full_replay(tmp_path, CONFIG))


def test_a_checkpoint_ahead_of_the_log_or_of_another_log_is_ignored(tmp_path: Path) -> None:
    some_log(tmp_path)
    checkpoint_at(tmp_path, CONFIG, 30)
    raw = lines(tmp_path)
    # The log lost its tail (a disk that did not keep what was not fsynced).
    (tmp_path / "events.jsonl").write_bytes(b"".join(raw[:25]))
    d, report = restored(tmp_path, CONFIG)
    assert (report.checkpoint, report.events) == (0, 25)
    assert state(d) == state(full_replay(tmp_path, CONFIG))
    # Same length, other events: the last line's checksum tells them apart.
    other = tmp_path / "other"
    other.mkdir()
    some_log(other)
    os.replace(other / "events.jsonl", tmp_path / "events.jsonl")
    d, report = restored(tmp_path, CONFIG)
    assert report.checkpoint == 0


def test_a_checkpoint_that_names_a_foreign_class_is_refused(tmp_path: Path) -> None:
    some_log(tmp_path)
    path = checkpoint_at(tmp_path, CONFIG, 20)
    head = json.loads(path.read_bytes().partition(b"\n")[0])
    evil = pickle.dumps({"agents": os.system})  # would run code if loaded blindly
    head.update(sha256=checkpoint.digest(evil), size=len(evil))
    path.write_bytes(json.dumps(head).encode() + b"\n" + evil)
    with pytest.raises(pickle.UnpicklingError, match="not a class a checkpoint may hold"):
        checkpoint.loads(evil, CONFIG)
    assert restored(tmp_path, CONFIG)[1].checkpoint == 0


def test_a_crash_while_writing_leaves_the_previous_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    some_log(tmp_path)
    checkpoint_at(tmp_path, CONFIG, 10)

    def crash(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        checkpoint_at(tmp_path, CONFIG, 20)
    monkeypatch.undo()
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [10]
    # A temporary file left by a process killed mid-write is never taken for one.
    (tmp_path / "checkpoints" / ".000000000020.ckpt.tmp").write_bytes(b"half")
    _d, report = restored(tmp_path, CONFIG)
    assert report.checkpoint == 10
    checkpoint.prune(tmp_path, set())
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [checkpoint.name_of(10)]


def test_prune_keeps_the_newest_and_the_base_of_a_cut_log(tmp_path: Path) -> None:
    some_log(tmp_path)
    for seq in (3, 9, 15, 21, 27):
        checkpoint_at(tmp_path, CONFIG, seq)
    checkpoint.prune(tmp_path, {9})
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [27, 21, 9]


# -- the live server's checkpoints, and the stream files ---------------------------------------


def test_start_up_reads_only_the_events_after_the_checkpoint_and_streams_stay_whole(
    tmp_path: Path,
) -> None:
    d, log = open_dispatcher(tmp_path, CONFIG)
    for i in range(20):
        d.deliver(d.plan(OPERATOR, [Draft(body=f"x{i}")], "b"))
    assert checkpoint.Checkpoints(d, log, tmp_path, 10).write_now()
    for i in range(5):
        d.deliver(d.plan(OPERATOR, [Draft(body=f"y{i}")], "b"))
    want_stream = log.read("b.log", 0, 1 << 30)
    os.close(log._fd)  # a crash: no clean close, no marker for the streams
    log._fd = -1
    # The stream lost its last lines (they were still buffered when the server died).
    index = tmp_path / "streams" / "b.log.idx"
    index.write_bytes(index.read_bytes()[: -2 * RECORD.size])

    log2 = EventLog(tmp_path)
    d2, start = checkpoint.restore(tmp_path, CONFIG, log2)
    report = log2.open(d2.apply, start=start)
    assert (report.checkpoint, report.events) == (20, 5)
    assert state(d2) == state(full_replay(tmp_path, CONFIG))
    assert log2.read("b.log", 0, 1 << 30) == want_stream
    log2.close()


def test_a_stream_damaged_before_the_checkpoint_is_caught_up_without_applying_twice(
    tmp_path: Path,
) -> None:
    d, log = open_dispatcher(tmp_path, CONFIG)
    for i in range(20):
        d.deliver(d.plan(OPERATOR, [Draft(body=f"x{i}")], "b"))
    checkpoint.Checkpoints(d, log, tmp_path, 10).write_now()
    want = log.read("b.log", 0, 1 << 30)
    log.close()
    index = tmp_path / "streams" / "b.log.idx"
    index.write_bytes(index.read_bytes()[:100])  # shorter than recorded, cut mid-record
    log2 = EventLog(tmp_path)
    d2, start = checkpoint.restore(tmp_path, CONFIG, log2)
    report = log2.open(d2.apply, start=start)
    assert report.checkpoint == 20
    assert len(d2.agents["b"].inbox) == 20  # applied once, not twice
    assert log2.read("b.log", 0, 1 << 30) == want
    log2.close()


async def test_the_running_server_writes_a_checkpoint_every_so_many_events(
    tmp_path: Path,
) -> None:
    d, log = open_dispatcher(tmp_path, CONFIG)
    ck = checkpoint.Checkpoints(d, log, tmp_path, 10)
    ck.interval = 0.01

    async def written(n: int) -> None:
        with trio.fail_after(30):
            while ck.written < n:
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(ck.run)
        for i in range(9):
            d.deliver(d.plan(OPERATOR, [Draft(body=f"x{i}")], "b"))
        await trio.sleep(0.1)
        assert ck.written == 0  # 9 events: not yet
        d.deliver(d.plan(OPERATOR, [Draft(body="x9")], "b"))
        await written(1)
        for i in range(10):
            d.deliver(d.plan(OPERATOR, [Draft(body=f"y{i}")], "b"))
        await written(2)
        nursery.cancel_scope.cancel()
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [20, 10]
    log.close()


# -- retain ---------------------------------------------------------------------------------


def test_retain_cuts_the_log_after_a_checkpoint_and_replay_gives_the_same_state(
    tmp_path: Path,
) -> None:
    d, log = open_dispatcher(tmp_path, CONFIG)
    for i in range(30):
        d.deliver(d.plan(OPERATOR, [Draft(body=f"x{i}")], "b"))
        if i % 2:
            d.take("b", 1, 0, 1_800_000_000.0 + i)
            d.ack_all("b", "b")
    ck = checkpoint.Checkpoints(d, log, tmp_path, 1000)
    ck.write_now()
    base = d.seq
    for i in range(10):
        d.deliver(d.plan(OPERATOR, [Draft(body=f"y{i}")], "b"))
    ck.write_now()
    log.close()
    want = state(full_replay(tmp_path, CONFIG))
    size = (tmp_path / "events.jsonl").stat().st_size

    assert retain.apply(tmp_path, 5, 0.0) == base
    assert (tmp_path / "events.jsonl").stat().st_size < size / 3
    assert json.loads(lines(tmp_path)[0])["seq"] == base + 1
    assert not (tmp_path / retain.JOURNAL).exists()
    d2, report = restored(tmp_path, CONFIG)
    assert state(d2) == want
    # Without its newest checkpoint: from the base one.
    checkpoint.listing(tmp_path)[0][1].unlink()
    d2, report = restored(tmp_path, CONFIG)
    assert (report.checkpoint, report.events) == (base, 10)
    assert state(d2) == want
    # Before the base, nothing can be rebuilt: said plainly.
    with pytest.raises(LogDamaged, match=f"begins at seq {base + 1}"):
        restored(tmp_path, CONFIG, base - 1)
    # A server opens it, stream files included.
    log3 = EventLog(tmp_path)
    d3, start = checkpoint.restore(tmp_path, CONFIG, log3)
    assert start is not None and start.offset == 0
    log3.open(d3.apply, start=start)
    assert state(d3) == want
    # Agents' log files lost the same events, and show the rest.
    b_log = [json.loads(x) for x in log3.read("b.log", 0, 1 << 30).splitlines()]
    assert b_log[0]["seq"] == base + 1
    assert [e["seq"] for e in b_log] == [json.loads(x)["seq"] for x in lines(tmp_path)]
    log3.close()
    assert retain.apply(tmp_path, 5, 0.0) == 0  # nothing more to drop


def test_retain_by_age_keeps_what_is_younger(tmp_path: Path) -> None:
    some_log(tmp_path)
    ck = checkpoint_at(tmp_path, CONFIG, 15)
    ts = json.loads(ck.read_bytes().partition(b"\n")[0])["ts"]
    t = retain._ts(ts)
    assert retain.apply(tmp_path, "1h", t + 60) == 0  # younger than an hour
    assert retain.apply(tmp_path, "1h", t + 3601) == 15


@pytest.mark.parametrize("when", ["before-rename", "after-rename"])
def test_a_crash_in_the_middle_of_a_cut_is_finished_or_undone(
    tmp_path: Path, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    some_log(tmp_path)
    want = state(full_replay(tmp_path, CONFIG))
    checkpoint_at(tmp_path, CONFIG, 12)
    checkpoint_at(tmp_path, CONFIG, 27)

    class Crash(Exception):
        pass

    def boom(*args: Any) -> None:
        raise Crash

    monkeypatch.setattr(retain, "_copy_tail" if when == "before-rename" else "_adjust", boom)
    with pytest.raises(Crash):
        retain.apply(tmp_path, 30, 0.0)  # 51 events: the checkpoint at 12 is the base
    monkeypatch.undo()
    assert (tmp_path / retain.JOURNAL).exists()
    retain.finish(tmp_path)
    assert not (tmp_path / retain.JOURNAL).exists()
    first = json.loads(lines(tmp_path)[0])["seq"]
    assert first == (1 if when == "before-rename" else 13)
    d, report = restored(tmp_path, CONFIG)
    assert report.checkpoint == 27
    assert state(d) == want
    checkpoint.listing(tmp_path)[0][1].unlink()
    assert state(restored(tmp_path, CONFIG)[0]) == want


def test_a_cut_log_loads_a_checkpoint_of_code_with_fewer_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `retain`, the base checkpoint is the only record of what was dropped:
    a field added to the state since it was written takes its default."""
    some_log(tmp_path)
    want = state(full_replay(tmp_path, CONFIG))
    checkpoint_at(tmp_path, CONFIG, 20)
    assert retain.apply(tmp_path, 5, 0.0) == 20

    @dataclasses.dataclass(slots=True, eq=False)
    class Newer(Message):
        grown: int = 7  # a field this checkpoint was written without

    monkeypatch.setattr(checkpoint, "shape", lambda: "another")
    monkeypatch.setitem(checkpoint._ALLOWED, ("outheisfs.models", "Message"), Newer)
    monkeypatch.setitem(checkpoint.CLASSES, Newer, lambda: None)
    d, report = restored(tmp_path, CONFIG)
    assert report.checkpoint == 20
    loaded = [m for m in d.messages.values() if isinstance(m, Newer)]  # the rest: the tail's
    assert loaded and all(m.grown == 7 for m in loaded)
    monkeypatch.undo()
    assert state(restored(tmp_path, CONFIG)[0]) == want
    # With the whole log, such a checkpoint is not used: the full replay is exact.
    other = tmp_path / "whole"
    other.mkdir()
    some_log(other)
    checkpoint_at(other, CONFIG, 20)
    monkeypatch.setattr(checkpoint, "shape", lambda: "another")
    assert restored(other, CONFIG)[1].checkpoint == 0


@pytest.mark.parametrize(
    ("text", "ok"),
    [('retain = "7d"', True), ('retain = "90s"', True), ("retain = 1000", True),
     ('retain = "7x"', False), ("retain = 0", False), ("retain = true", False),
     ("checkpoint_every = 0", False)],
)  # fmt: skip
def test_retain_and_checkpoint_every_are_checked_and_named(text: str, ok: bool) -> None:
    from outheisfs.config import parse_config
    from outheisfs.errors import ConfigError

    if ok:
        assert parse_config(text, Path(".")).retain is not None
    else:
        with pytest.raises(ConfigError, match=text.split()[0]):
            parse_config(text, Path("."))


def test_held_messages_and_topics_survive_a_checkpoint(tmp_path: Path) -> None:
    """A message held at the gate is state a checkpoint carries; the topics (with
    their compiled rules) are the config's, rebuilt at load, not pickled."""
    config = parse_config(
        """
[topics.desk]
deliver = ["a"]
[[topics.desk.rule]]
match = { "body.text" = { regex = "(?i)refund" } }
deliver = ["g"]
[agents.a]
send = ["g", "topics/desk"]
[agents.g]
approve = ["a"]
""",
        tmp_path,
    )
    d, log = open_dispatcher(tmp_path, config)
    d.deliver(d.plan("a", [Draft(body="please refund")], "g"))
    held = dict(d.agents["g"].held)
    assert len(held) == 1 and d.agents["g"].queued == 0
    back = checkpoint.loads(checkpoint.dumps(d), config)
    back.install_config()
    assert state(back) == state(d)
    assert list(back.agents["g"].held) == list(held)
    assert back.topics.keys() == {"desk"}
    log.close()
