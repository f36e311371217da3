"""The dispatcher: routing, order, delivery and retries, and replay [SPEC §4.2, §4.3, §5]."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from outheisfs.config import PRIORITIES, Config
from outheisfs.dispatcher import Dispatcher
from outheisfs.errors import BadInput, Exists, NoRight, NotEmpty, NotFound, OutheisError
from outheisfs.eventlog import EventLog
from outheisfs.models import Draft, Message
from outheisfs.procstate import Processes

from .helpers import (
    Clock,
    make_config,
    open_dispatcher,
    read_events,
    replayed,
    send,
    snapshot,
)

AGENTS = {"echo": {}, "notes": {}, "bg": {"priority": "background"}}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock().install(monkeypatch)


class Env:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.logs: list[EventLog] = []

    def open(self, **top: object) -> Dispatcher:
        config = make_config(AGENTS, **top)
        d, log = open_dispatcher(self.state, config)
        self.logs.append(log)
        return d


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    for log in e.logs:
        log.close()


def drain(d: Dispatcher, name: str) -> list[Message]:
    out = []
    while (m := d.take(name)) is not None:
        out.append(m)
        d.ack(m, name)
    return out


# -- sending and taking --------------------------------------------------------------


def test_send_take_ack(env: Env) -> None:
    d = env.open()
    events = send(d, "user", "echo", {"x": 1})
    assert len(events) == 1
    assert d.agents["echo"].queued == 1
    m = d.take("echo")
    assert m is not None
    assert (m.body, m.sender, m.to, m.delivered, m.reply_to) == ({"x": 1}, "user", "echo", 1, None)
    logged = read_events(env.state, "message")[0]
    assert m.seq == logged["seq"] and m.id == logged["id"] == events[0]["id"]
    assert d.agents["echo"].queued == 0 and list(d.agents["echo"].inflight) == [m.id]
    assert d.take("echo") is None
    d.ack(m, "echo")
    assert d.agents["echo"].inflight == {} and m.id not in d.messages
    assert d.agents["echo"].delivered == 1
    kinds = [e["type"] for e in read_events(env.state)]
    assert kinds == ["message", "deliver", "ack"]


def test_ack_twice_logs_once(env: Env) -> None:
    d = env.open()
    send(d, "user", "echo")
    m = d.take("echo")
    assert m is not None
    d.ack(m, "echo")
    d.ack(m, "echo")
    assert len(read_events(env.state, "ack")) == 1


def test_message_event_is_the_envelope(env: Env) -> None:
    d = env.open()
    send(d, "user", "echo", "hello", priority="interactive")
    ev = read_events(env.state, "message")[0]
    assert ev["from"] == "user" and ev["to"] == "echo" and ev["body"] == "hello"
    assert ev["priority"] == "interactive" and ev["reply_to"] is None
    assert {"id", "seq", "ts", "attempt"} <= set(ev)


def test_priority_order_and_fifo(env: Env) -> None:
    d = env.open()
    order = ["background", "normal", "interactive", "normal", "background", "interactive"]
    for i, p in enumerate(order):
        send(d, "user", "echo", i, priority=p)
    got = [m.body for m in drain(d, "echo")]
    assert got == [2, 5, 1, 3, 0, 4]


def test_priority_defaults_to_senders_class(env: Env) -> None:
    d = env.open()
    send(d, "bg", "echo", "from bg")
    send(d, "user", "echo", "from user")
    assert [m.priority for m in drain(d, "echo")] == ["normal", "background"]


def test_one_write_many_messages_is_one_append(env: Env) -> None:
    d = env.open()
    events = d.plan("user", [Draft(body=i) for i in range(5)], "echo")
    d.deliver(events)
    assert [e["seq"] for e in read_events(env.state)] == [1, 2, 3, 4, 5]
    assert [m.body for m in drain(d, "echo")] == [0, 1, 2, 3, 4]


def test_outbox_to_several(env: Env) -> None:
    d = env.open()
    send(d, "echo", None, "hi", targets=["notes", "user"])
    assert [m.sender for m in drain(d, "notes")] == ["echo"]
    assert [m.body for m in drain(d, "user")] == ["hi"]


# -- aging ---------------------------------------------------------------------------


def aged_pair(env: Env, clock: Clock, first: str, wait: float, second: str) -> Dispatcher:
    d = env.open(aging=10.0)
    send(d, "user", "echo", "old", priority=first)
    clock.t += wait
    send(d, "user", "echo", "new", priority=second)
    return d


@pytest.mark.parametrize(
    ("first", "wait", "second", "now", "winner"),
    [
        # one class higher after `aging` seconds
        ("background", 9.0, "normal", 9.5, "new"),
        ("background", 9.0, "normal", 10.5, "old"),
        ("normal", 9.0, "interactive", 9.5, "new"),
        ("normal", 9.0, "interactive", 10.5, "old"),
        # but not two classes higher before twice `aging`
        ("background", 15.0, "interactive", 15.5, "new"),
        ("background", 15.0, "interactive", 19.5, "new"),
        # two classes higher after twice `aging`
        ("background", 19.0, "interactive", 20.5, "old"),
        # and never beyond the top
        ("interactive", 1.0, "interactive", 100.0, "old"),
    ],
)
def test_aging(
    env: Env, clock: Clock, first: str, wait: float, second: str, now: float, winner: str
) -> None:
    start = clock.t
    d = aged_pair(env, clock, first, wait, second)
    clock.t = start + now
    m = d.take("echo")
    assert m is not None and m.body == winner


def test_aging_fresh_messages_keep_their_class(env: Env, clock: Clock) -> None:
    d = env.open(aging=10.0)
    send(d, "user", "echo", "bg", priority="background")
    send(d, "user", "echo", "n", priority="normal")
    clock.t += 5
    assert [m.body for m in drain(d, "echo")] == ["n", "bg"]


def test_aging_nothing_starves(env: Env, clock: Clock) -> None:
    d = env.open(aging=10.0)
    send(d, "user", "echo", "starving", priority="background")
    served = []
    for i in range(100):
        send(d, "user", "echo", i, priority="interactive")
        clock.t += 1.0
        m = d.take("echo")
        assert m is not None
        d.ack(m, "echo")
        served.append(m.body)
        if m.body == "starving":
            break
    assert "starving" in served
    assert len(served) <= 25


def test_clock_stepping_back_never_demotes(env: Env, clock: Clock) -> None:
    d = env.open(aging=10.0)
    send(d, "user", "echo", "normal", priority="normal")
    clock.t -= 100.0  # NTP steps the wall clock back
    send(d, "user", "echo", "background", priority="background")
    clock.t += 1.0
    assert [m.body for m in drain(d, "echo")] == ["normal", "background"]


# -- retries and dead letters --------------------------------------------------------


def test_retry_increments_attempt_then_dead(env: Env) -> None:
    d = env.open(max_attempts=3)
    send(d, "user", "echo", "fragile")
    attempts = []
    for _ in range(3):
        m = d.take("echo")
        assert m is not None
        attempts.append(m.delivered)
        attempts_id = m.id
        assert f'"attempt":{m.delivered}'.encode() in m.line()
        d.retry(m, "killed by signal 9")
    assert attempts == [1, 2, 3]
    a = d.agents["echo"]
    assert a.dead == 1 and a.queued == 0 and a.inflight == {} and d.messages == {}
    assert d.take("echo") is None
    dead = read_events(env.state, "dead")
    assert len(dead) == 1 and dead[0]["id"] == attempts_id and dead[0]["agent"] == "echo"
    redeliver = read_events(env.state, "redeliver")
    assert [e["attempt"] for e in redeliver] == [2, 3]


def test_default_max_attempts_is_five(env: Env) -> None:
    d = env.open()
    send(d, "user", "echo")
    n = 0
    while (m := d.take("echo")) is not None:
        n += 1
        d.retry(m, "crash")
    assert n == 5 and d.agents["echo"].dead == 1


def test_retry_keeps_place_in_line(env: Env) -> None:
    d = env.open()
    send(d, "user", "echo", "a")
    send(d, "user", "echo", "b")
    m = d.take("echo")
    assert m is not None and m.body == "a"
    d.retry(m, "crash")
    assert [(m.body, m.delivered) for m in drain(d, "echo")] == [("a", 2), ("b", 1)]


def test_retry_after_ack_is_ignored(env: Env) -> None:
    d = env.open()
    send(d, "user", "echo")
    m = d.take("echo")
    assert m is not None
    d.ack(m, "echo")
    d.retry(m, "late")
    assert d.agents["echo"].queued == 0 and read_events(env.state, "redeliver") == []


def test_ack_all(env: Env) -> None:
    d = env.open()
    for i in range(3):
        send(d, "user", "echo", i)
    ms = [d.take("echo") for _ in range(3)]
    assert d.ack_all("echo", "user", ms[1].id) == 1  # type: ignore[union-attr]
    assert set(d.agents["echo"].inflight) == {ms[0].id, ms[2].id}  # type: ignore[union-attr]
    assert d.ack_all("echo", "user") == 2
    assert d.agents["echo"].inflight == {}
    with pytest.raises(BadInput):
        d.ack_all("echo", "user", ms[0].id)  # type: ignore[union-attr]


# -- replies through the outbox ------------------------------------------------------


def test_reply_goes_to_sender_of_held_message(env: Env) -> None:
    d = env.open()
    send(d, "notes", "echo", "ping")
    m = d.take("echo")
    assert m is not None
    events = send(d, "echo", None, "pong")
    assert events[0]["to"] == "notes" and events[0]["reply_to"] == m.id
    reply = d.take("notes")
    assert reply is not None
    assert (reply.sender, reply.body, reply.reply_to) == ("echo", "pong", m.id)


def test_reply_with_nothing_in_flight(env: Env) -> None:
    d = env.open()
    with pytest.raises(BadInput):
        send(d, "echo", None, "pong")
    send(d, "user", "echo", "ping")
    with pytest.raises(BadInput):  # queued is not held
        send(d, "echo", None, "pong")
    assert read_events(env.state, "message")[-1]["body"] == "ping"


def test_reply_with_several_in_flight(env: Env) -> None:
    d = env.open()
    send(d, "user", "echo", "1")
    send(d, "notes", "echo", "2")
    a, b = d.take("echo"), d.take("echo")
    assert a is not None and b is not None
    before = d.seq
    with pytest.raises(BadInput):
        send(d, "echo", None, "which?")
    assert d.seq == before
    # reply_to picks one.
    events = send(d, "echo", None, "to 2", reply_to=b.id)
    assert events[0]["to"] == "notes" and events[0]["reply_to"] == b.id
    # A reply after the ack is allowed: the right comes from the logged delivery.
    d.ack(a, "echo")
    events = send(d, "echo", None, "late", reply_to=a.id)
    assert events[0]["to"] == "user" and events[0]["reply_to"] == a.id
    # A reply_to naming a message echo never received: EACCES.
    with pytest.raises(NoRight):
        send(d, "echo", None, "x", reply_to=events[0]["id"])


def test_unknown_recipient(env: Env) -> None:
    d = env.open()
    with pytest.raises(NotFound):
        send(d, "user", "nobody")
    with pytest.raises(NotFound):
        send(d, "echo", None, targets=["notes", "nobody"])
    with pytest.raises(NotFound):
        send(d, "nobody", "echo")
    assert read_events(env.state) == []


def test_one_bad_draft_refuses_the_whole_write(env: Env) -> None:
    d = env.open()
    drafts = [Draft(body="ok", to=["notes"]), Draft(body="no", to=["nobody"])]
    with pytest.raises(NotFound):
        d.deliver(d.plan("echo", drafts, None))
    assert d.agents["notes"].queued == 0 and read_events(env.state) == []


def test_full(env: Env) -> None:
    d = env.open(max_queue=3)
    for i in range(3):
        events = d.plan("user", [Draft(body=i)], "echo")
        assert d.full(events) is None
        d.deliver(events)
    more = d.plan("user", [Draft(body=3)], "echo")
    full = d.full(more)
    assert full is not None and full.name == "echo"
    assert d.full(d.plan("user", [Draft(body=3)], "notes")) is None
    m = d.take("echo")
    assert m is not None
    assert d.full(more) is None, "a message taken frees a place"
    two = d.plan("user", [Draft(body=4), Draft(body=5)], "echo")
    assert d.full(two) is not None


# -- agents come and go --------------------------------------------------------------


def test_mkdir(env: Env) -> None:
    d = env.open()
    a = d.mkdir("new.agent_1-x", "user")
    assert a is not None and a.name in d.agents
    assert Processes(d.config).of(a.name).state == "external"
    send(d, "user", "new.agent_1-x", "hi")
    assert d.agents["new.agent_1-x"].queued == 1
    for existing in ("new.agent_1-x", "echo", "user"):
        with pytest.raises(Exists):
            d.mkdir(existing, "user")


@pytest.mark.parametrize("name", ["", "Big", "-x", ".x", "_x", "a b", "a/b", "x" * 65, "ü"])
def test_mkdir_bad_name(env: Env, name: str) -> None:
    d = env.open()
    with pytest.raises(BadInput):
        d.mkdir(name, "user")
    assert name not in d.agents


def test_mkdir_longest_name(env: Env) -> None:
    d = env.open()
    d.mkdir("x" * 64, "user")
    assert "x" * 64 in d.agents


def test_rmdir(env: Env) -> None:
    d = env.open()
    d.mkdir("tmp", "user")
    send(d, "user", "tmp")
    with pytest.raises(NotEmpty):
        d.rmdir("tmp", "user")
    m = d.take("tmp")
    assert m is not None
    with pytest.raises(NotEmpty):  # in flight still counts
        d.rmdir("tmp", "user")
    d.ack(m, "tmp")
    d.rmdir("tmp", "user")
    assert "tmp" not in d.agents
    with pytest.raises(NotFound):
        d.rmdir("tmp", "user")
    with pytest.raises(NotFound):
        send(d, "user", "tmp")
    d.mkdir("tmp", "user")  # and it can come back
    assert d.agents["tmp"].queued == 0


def test_user_cannot_be_removed(env: Env) -> None:
    d = env.open()
    with pytest.raises(OutheisError):
        d.rmdir("user", "user")
    assert "user" in d.agents


# -- replay --------------------------------------------------------------------------


def random_ops(d: Dispatcher, rng: random.Random, n: int) -> None:
    made = 0
    for _ in range(n):
        names = sorted(d.agents)
        held = sorted(
            (m for a in d.agents.values() for m in a.inflight.values()), key=lambda m: m.id
        )
        op = rng.choices(
            ["send", "take", "ack", "retry", "reply", "mkdir", "rmdir", "prio", "note"],
            weights=[30, 25, 10, 10, 6, 3, 3, 3, 2],
        )[0]
        try:
            if op == "send":
                drafts = [
                    Draft(body=rng.randrange(1000), priority=rng.choice([None, *PRIORITIES]))
                    for _ in range(rng.randint(1, 3))
                ]
                events = d.plan(rng.choice(names), drafts, rng.choice(names))
                if d.full(events) is None:
                    d.deliver(events)
            elif op == "take":
                d.take(rng.choice(names))
            elif op == "ack" and held:
                d.ack(rng.choice(held), "user")
            elif op == "retry" and held:
                d.retry(rng.choice(held), "crash")
            elif op == "reply":
                holders = [a for a in d.agents.values() if len(a.inflight) == 1]
                if holders:
                    d.deliver(d.plan(rng.choice(holders).name, [Draft(body="re")], None))
            elif op == "mkdir":
                made += 1
                d.mkdir(f"dyn{made}", "user")
            elif op == "rmdir":
                d.rmdir(rng.choice(names), "user")
            elif op == "prio":
                name = rng.choice(names)
                prio = rng.choice(PRIORITIES)
                d.record(
                    [{"type": "ctl", "agent": name, "who": "user", "command": f"priority {prio}"}]
                )
            else:
                d.note({"type": "error", "who": "user", "where": "/x", "why": "test"})
        except OutheisError:
            pass


@pytest.mark.parametrize("seed", range(4))
def test_replay_equivalence(env: Env, clock: Clock, seed: int) -> None:
    d = env.open(max_attempts=3, max_queue=50)
    rng = random.Random(seed)
    for _ in range(6):
        random_ops(d, rng, 50)
        clock.t += rng.choice([0.5, 3.0, 12.0])
    assert d.seq > 100
    kinds = {e["type"] for e in read_events(env.state)}
    assert {"message", "deliver", "ack", "redeliver", "agent", "ctl"} <= kinds
    d2 = replayed(env.state, d.config)
    # The same state, and the same next message for every inbox now and later.
    for later in (0.0, 5.0, 11.0, 25.0):
        assert snapshot(d2, at=clock.t + later) == snapshot(d, at=clock.t + later)


def test_replay_until(env: Env) -> None:
    d = env.open()
    send(d, "user", "echo", "a")
    mid = snapshot(d)
    m = d.take("echo")
    assert m is not None
    d.ack(m, "echo")
    d2 = Dispatcher(d.config, None)
    EventLog(env.state, readonly=True).open(d2.apply, until=1)
    assert snapshot(d2) == mid


def test_replay_keeps_priority_and_agents(env: Env) -> None:
    d = env.open()
    d.mkdir("made", "user")
    d.mkdir("gone", "user")
    d.rmdir("gone", "user")
    d.record([{"type": "ctl", "agent": "echo", "who": "user", "command": "priority interactive"}])
    d2 = replayed(env.state, d.config)
    assert "made" in d2.agents and "gone" not in d2.agents
    assert d2.agents["echo"].priority == "interactive"


def test_requeue_inflight_after_restart(tmp_path: Path) -> None:
    config: Config = make_config(AGENTS, max_attempts=2)
    d, log = open_dispatcher(tmp_path, config)
    send(d, "user", "echo", "a")
    send(d, "user", "echo", "b")
    send(d, "user", "notes", "c")
    a = d.take("echo")
    c = d.take("notes")
    assert a is not None and c is not None
    d.retry(c, "crash")
    c = d.take("notes")  # attempt 2 of 2
    assert c is not None
    log.close()  # the server stops with both in flight

    d2, log2 = open_dispatcher(tmp_path, config)
    try:
        assert set(d2.agents["echo"].inflight) == {a.id}
        d2.requeue_inflight()
        re = read_events(tmp_path, "redeliver")[-1]
        assert re["id"] == a.id and re["attempt"] == 2
        dead = read_events(tmp_path, "dead")
        assert [e["id"] for e in dead] == [c.id], "no attempts left: a dead letter"
        assert d2.agents["echo"].inflight == {} and d2.agents["echo"].queued == 2
        got = drain(d2, "echo")
        assert [(m.body, m.delivered) for m in got] == [("a", 2), ("b", 1)]
        assert d2.agents["notes"].dead == 1
    finally:
        log2.close()


# -- agents across mounts and configs ---------------------------------------------


def mount_with(state: Path, agents: dict[str, dict[str, object]]) -> tuple[Dispatcher, EventLog]:
    """Open the state as `mount` does, with a config holding `agents`, and log the mount."""
    config = make_config(agents)
    d, log = open_dispatcher(state, config)
    d.record([{"type": "mount", "agents": {n: a.priority for n, a in config.agents.items()}}])
    return d, log


def test_ack_with_nothing_in_flight_writes_nothing(tmp_path: Path) -> None:
    d, log = open_dispatcher(tmp_path, make_config({"echo": {}}))
    assert d.ack_all("echo", "user") == 0
    log.close()
    _, log2 = open_dispatcher(tmp_path, make_config({"echo": {}}))  # not damaged
    log2.close()


def test_config_agent_removed_once_keeps_its_config(tmp_path: Path) -> None:
    d, log = mount_with(tmp_path, {"echo": {}})
    d.rmdir("echo", "user")
    log.close()
    d, log = mount_with(tmp_path, {"echo": {"command": ["true"], "restart": "transient"}})
    assert d.agents["echo"].config is not None
    assert d.agents["echo"].config.restart == "transient"
    assert Processes(d.config).of("echo").state == "stopped"
    log.close()


def test_agents_of_an_older_config_leave_unless_they_hold_messages(tmp_path: Path) -> None:
    d, log = mount_with(tmp_path, {"old": {}, "busy": {}})
    send(d, "user", "busy", "pending")
    log.close()
    d, log = mount_with(tmp_path, {"new": {}})
    assert "old" not in d.agents
    assert "busy" in d.agents and d.agents["busy"].queued == 1
    assert "new" in d.agents
    log.close()
    again = replayed(tmp_path, Config())
    assert sorted(again.agents) == sorted(d.agents)


def test_mkdir_agent_survives_mounts(tmp_path: Path) -> None:
    d, log = mount_with(tmp_path, {})
    d.mkdir("helper", "user")
    log.close()
    d, log = mount_with(tmp_path, {})
    assert "helper" in d.agents
    log.close()


def test_a_queue_keeps_nothing_of_messages_taken_without_peeking() -> None:
    """Replay takes messages (deliver events) without asking which is next: the
    heap must not keep every message the log ever held (memory follows what is
    pending, not the log's length [SPEC §5])."""
    from outheisfs.inbox import Inbox
    from outheisfs.models import new_id

    q = Inbox(aging=10.0)
    for seq in range(1, 1001):
        prio = PRIORITIES[seq % 3]
        m = Message(new_id(), seq, "a", "b", "2026-01-01T00:00:00.000000Z", 0.0, prio, "x", None)
        q.push(m)
        q.taken(m)
    assert len(q) == 0
    assert sum(len(h) for h in q._heaps) == 0
