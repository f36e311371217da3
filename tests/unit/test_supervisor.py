"""The supervisor below FUSE: restart policies, intensity and backoff [SPEC §3].

No process is started. `Supervisor._spawn` is replaced by a fake that makes up
pids beyond any pid_max, `_signal` by one that ends those fakes, and exits are
fed to `Supervisor._exited` the way the reaper feeds them. Time is trio's
MockClock with autojump: whenever every task sleeps, the clock jumps, so a test
can wait out windows of many seconds at once and read exact spawn times.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from trio.testing import MockClock

from outheisfs import events
from outheisfs import supervisor as supervisor_mod
from outheisfs.errors import BadInput
from outheisfs.eventlog import EventLog
from outheisfs.procevents import ProcEvents
from outheisfs.procinfo import abnormal, describe
from outheisfs.procstate import ProcState
from outheisfs.supervisor import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    Instance,
    Intensity,
    Runner,
    Supervisor,
    backoff,
    should_restart,
)

from .helpers import make_config, open_dispatcher, read_events

# Raw waitpid statuses.
EXIT0 = 0
EXIT1 = 1 << 8
EXIT3 = 3 << 8
KILLED = 9  # SIGKILL
TERMED = 15  # SIGTERM
SEGV_CORE = 0x80 | 11  # SIGSEGV with a core dump

FAKE_PID = 10_000_000  # above any pid_max: no real process can have such a pid
LONG = 1000.0  # "never", for a fake process that does not end on its own


@pytest.fixture
def clock() -> MockClock:
    """pytest-trio runs a test under any Clock it is given as an argument."""
    return MockClock(autojump_threshold=0)


# -- the rules, apart from processes ---------------------------------------------------


# OTP's meanings: (policy, how the process ended, restarted?)
OTP_RULES = [
    ("permanent", EXIT0, True),
    ("permanent", EXIT3, True),
    ("permanent", KILLED, True),
    ("transient", EXIT0, False),
    ("transient", EXIT3, True),
    ("transient", KILLED, True),
    ("temporary", EXIT0, False),
    ("temporary", EXIT3, False),
    ("temporary", KILLED, False),
]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (EXIT0, {"code": 0}),
        (EXIT1, {"code": 1}),
        (EXIT3, {"code": 3}),
        (255 << 8, {"code": 255}),
        (KILLED, {"signal": 9}),
        (TERMED, {"signal": 15}),
        (SEGV_CORE, {"signal": 11}),
    ],
)
def test_describe(status: int, expected: dict[str, int]) -> None:
    assert describe(status) == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [(EXIT0, False), (EXIT1, True), (EXIT3, True), (KILLED, True), (TERMED, True)],
)
def test_abnormal(status: int, expected: bool) -> None:
    assert abnormal(status) is expected


@pytest.mark.parametrize(
    ("policy", "status", "expected"),
    OTP_RULES,
)
def test_should_restart(policy: str, status: int, expected: bool) -> None:
    assert should_restart(policy, status) is expected


def test_intensity_allows_exactly_max_restarts_in_the_window() -> None:
    it = Intensity(3, 5.0)
    assert [it.allow(t) for t in (100.0, 101.0, 102.0)] == [True, True, True]
    assert it.recent(102.0) == 3
    assert not it.allow(102.0)
    assert not it.allow(104.9)  # the first is still within 5 s
    assert it.recent(104.9) == 3  # a refused restart is not counted


def test_intensity_allows_again_once_the_window_has_passed() -> None:
    it = Intensity(2, 5.0)
    assert it.allow(0.0) and it.allow(3.0)
    assert not it.allow(4.0)
    assert it.allow(5.5)  # 0.0 has left the window; 3.0 has not
    assert it.recent(5.5) == 2
    assert not it.allow(7.9)
    assert it.allow(8.1)  # 3.0 has left too
    assert it.recent(20.0) == 0


def test_intensity_same_instant() -> None:
    it = Intensity(2, 1.0)
    assert it.allow(7.0) and it.allow(7.0)
    assert not it.allow(7.0)


def test_intensity_zero_restarts_refuses_all() -> None:
    it = Intensity(0, 5.0)
    assert not it.allow(0.0)
    assert not it.allow(100.0)
    assert it.recent(100.0) == 0


def test_intensity_reset() -> None:
    it = Intensity(2, 60.0)
    assert it.allow(1.0) and it.allow(2.0)
    assert not it.allow(3.0)
    it.reset()
    assert it.recent(3.0) == 0
    assert it.allow(3.0) and it.allow(3.0)
    assert not it.allow(3.0)


def test_backoff_doubles_from_a_tenth_up_to_five_seconds() -> None:
    assert (BACKOFF_FIRST, BACKOFF_MAX) == (0.1, 5.0)
    got = [backoff(n) for n in range(1, 10)]
    assert got == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert backoff(0) == pytest.approx(0.1)  # never less than the first
    assert backoff(64) == 5.0
    assert all(isinstance(backoff(n), float) for n in range(12))


def test_backoff_capped_for_any_count() -> None:
    assert backoff(1025) == 5.0


# -- a supervisor over fake processes ------------------------------------------------


class FakeProcs:
    """What the supervisor asks of ProcEvents, for fake processes only."""

    def __init__(self) -> None:
        self.labels: dict[int, str] = {}
        self.spawned_as: list[str] = []

    def drain(self) -> None:
        pass

    @contextmanager
    def spawning(self, label: str) -> Iterator[None]:
        self.spawned_as.append(label)
        yield

    def label(self, pid: int, label: str, since: float | None = None) -> None:
        self.labels[pid] = label

    def members(self, labels: set[str]) -> set[int]:
        return {pid for pid, lab in self.labels.items() if lab in labels}


@dataclass(frozen=True)
class Spawned:
    t: float
    agent: str
    index: int
    pid: int


@dataclass(frozen=True)
class Crash:
    """Every process of the agent ends `after` seconds after its start with `status`."""

    after: float
    status: int


class World:
    """A Supervisor with a real Dispatcher and EventLog, over fake processes."""

    def __init__(self, tmp_path: Path, agents: dict[str, dict[str, Any]]) -> None:
        self.state = tmp_path / "state"
        self.d, self.log = open_dispatcher(self.state, make_config(agents))
        self.procs = FakeProcs()
        self.sup = Supervisor(
            self.d,
            cast(ProcEvents, self.procs),
            tmp_path / "mnt",
            self.state,
            tmp_path,
            grace=1.0,
        )
        self.spawns: list[Spawned] = []
        self.signals: list[tuple[int, int]] = []
        self.crash: dict[str, Crash] = {}
        self.live: dict[int, tuple[Runner, Instance]] = {}
        self._pids = itertools.count(FAKE_PID)
        self.t0 = 0.0

    # -- the fakes the supervisor calls ----------------------------------------------

    async def spawn(self, runner: Runner, index: int) -> None:
        """Stands for Supervisor._spawn, with the same bookkeeping."""
        inst = Instance(index=index, label=f"{runner.name}#{index}")
        runner.instances[index] = inst
        await trio.lowlevel.checkpoint()  # the real one waits for a thread
        with self.procs.spawning(inst.label):
            inst.pid = next(self._pids)
        self.procs.label(inst.pid, inst.label)
        self.live[inst.pid] = (runner, inst)
        self.spawns.append(Spawned(trio.current_time() - self.t0, runner.name, index, inst.pid))
        self.d.note(events.start(runner.name, inst.pid, index))
        self.sup._update(runner)
        crash = self.crash.get(runner.name)
        if crash is not None:
            self.nursery.start_soon(self._end_after, inst.pid, crash.after, crash.status)

    def signal(self, pids: set[int], sig: int) -> None:
        """Stands for supervisor._signal: a fake dies of any signal."""
        for pid in sorted(pids):
            assert pid >= FAKE_PID, "a real process was about to be signalled"
            self.signals.append((pid, sig))
            self.exit(pid, sig)

    # -- driving ---------------------------------------------------------------------

    @property
    def nursery(self) -> trio.Nursery:
        assert self.sup._nursery is not None
        return self.sup._nursery

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Supervisor]:
        """The supervisor's nursery, with every agent started as `run` starts them."""
        async with trio.open_nursery() as nursery:
            self.sup._nursery = nursery
            self.t0 = trio.current_time()
            for runner in self.sup.runners.values():
                await self.sup._start_all(runner)
            yield self.sup
            nursery.cancel_scope.cancel()

    async def _end_after(self, pid: int, after: float, status: int) -> None:
        await trio.sleep(after)
        self.exit(pid, status)

    def exit(self, pid: int, status: int) -> None:
        """Process `pid` has ended: what the reaper does when it reaps it."""
        if self.procs.labels.pop(pid, None) is None:
            return  # gone already
        runner, inst = self.live.pop(pid)
        self.nursery.start_soon(self.sup._exited, runner, inst, status)

    async def wait(self, seconds: float) -> None:
        await trio.sleep(seconds)

    # -- looking -----------------------------------------------------------------------

    def now(self) -> float:
        return trio.current_time() - self.t0

    def agent(self, name: str) -> ProcState:
        return self.sup.table.of(name)

    def pid(self, name: str, index: int = 0) -> int:
        return self.sup.runners[name].instances[index].pid

    def times(self, name: str, index: int | None = None) -> list[float]:
        return [s.t for s in self.spawns if s.agent == name and (index is None or s.index == index)]

    def events(self, kind: str, name: str) -> list[dict[str, Any]]:
        return [e for e in read_events(self.state, kind) if e.get("agent") == name]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., World]]:
    logs: list[EventLog] = []

    def make(**agents: dict[str, Any]) -> World:
        w = World(tmp_path, agents)
        logs.append(w.log)
        monkeypatch.setattr(w.sup, "_spawn", w.spawn)
        monkeypatch.setattr(supervisor_mod, "_signal", w.signal)
        return w

    yield make
    for log in logs:
        log.close()


def cmd(**keys: Any) -> dict[str, Any]:
    return {"command": ["/nonexistent/agent"], **keys}


# -- starting ------------------------------------------------------------------------


async def test_only_agents_with_a_command_are_supervised(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(instances=2), ext={})
    assert set(w.sup.runners) == {"a"}
    assert w.agent("a").state == "stopped" and w.agent("ext").state == "external"
    async with w.running() as sup:
        assert [(s.agent, s.index, s.t) for s in w.spawns] == [("a", 0, 0.0), ("a", 1, 0.0)]
        assert w.agent("a").state == "running"
        assert w.agent("a").pids == sorted(s.pid for s in w.spawns)
        assert w.agent("ext").state == "external"
        with pytest.raises(BadInput):
            await sup.start("ext")
        with pytest.raises(BadInput):
            await sup.stop("nobody")
        await sup.start("a")  # running already: nothing more starts
        assert len(w.spawns) == 2


# -- restarts ------------------------------------------------------------------------


async def test_permanent_crash_loop_fails_after_max_restarts(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(restart="permanent", max_restarts=3, restart_window=5.0))
    w.crash["a"] = Crash(after=0.0, status=EXIT1)
    async with w.running():
        await w.wait(1.0)
        # started, then restarted 3 times after 0.1, 0.2, 0.4 s
        assert w.times("a") == pytest.approx([0.0, 0.1, 0.3, 0.7])
        agent = w.agent("a")
        assert agent.state == "failed"
        assert agent.pids == [] and w.sup.runners["a"].instances == {}
        assert agent.restarts == 3
        restarts = w.events("restart", "a")
        assert [e["delay"] for e in restarts] == pytest.approx([0.1, 0.2, 0.4])
        assert [e["restarts"] for e in restarts] == [1, 2, 3]
        exits = w.events("exit", "a")
        assert [e["pid"] for e in exits] == [s.pid for s in w.spawns]
        assert all(e["code"] == 1 and "signal" not in e for e in exits)
        (failed,) = w.events("failed", "a")
        assert (failed["restarts"], failed["window"]) == (3, 5.0)
        assert failed["seq"] > exits[-1]["seq"]


async def test_failed_stays_down_until_start(world: Callable[..., World], clock: MockClock) -> None:
    w = world(a=cmd(max_restarts=2, restart_window=5.0, cooldown=0))  # no cool-down
    w.crash["a"] = Crash(after=0.0, status=KILLED)
    async with w.running() as sup:
        await w.wait(1.0)
        assert w.agent("a").state == "failed"
        assert len(w.spawns) == 3
        await w.wait(2 * 600.0)  # the longest cool-down has long passed: nothing starts it
        assert len(w.spawns) == 3
        assert w.agent("a").state == "failed"
        assert len(w.events("failed", "a")) == 1
        del w.crash["a"]
        t = w.now()
        await sup.start("a")
        assert w.times("a")[3:] == pytest.approx([t])
        assert w.agent("a").state == "running"
        assert w.agent("a").pids == [w.spawns[-1].pid]
        await w.wait(30.0)
        assert len(w.spawns) == 4 and w.agent("a").state == "running"


async def test_failed_starts_again_after_a_doubling_cooldown(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(max_restarts=1, restart_window=5.0, cooldown=10.0))
    w.crash["a"] = Crash(after=0.0, status=EXIT1)
    async with w.running() as sup:
        await w.wait(1.0)
        assert w.agent("a").state == "failed" and len(w.spawns) == 2
        (failed,) = w.events("failed", "a")
        assert failed["cooldown"] == 10.0 and failed["next_start"].endswith("Z")
        assert w.agent("a").next_start == failed["next_start"]
        await w.wait(9.0)  # it failed at 0.1 s
        assert len(w.spawns) == 2  # still cooling down
        await w.wait(1.0)  # 10 s after it failed: started again, fails again
        assert len(w.spawns) == 4 and w.agent("a").state == "failed"
        assert [e["cooldown"] for e in w.events("failed", "a")] == [10.0, 20.0]
        assert [e for e in w.events("restart", "a") if e.get("after") == "cooldown"]
        await w.wait(19.0)
        assert len(w.spawns) == 4
        del w.crash["a"]
        await w.wait(2.0)  # 20 s: started again, and it stays up now
        assert w.agent("a").state == "running" and len(w.spawns) == 5
        assert w.agent("a").next_start == ""
        # An operator's stop during a cool-down cancels the pending start.
        w.crash["a"] = Crash(after=0.0, status=EXIT1)
        await sup.kill("a")
        await w.wait(1.0)
        assert w.agent("a").state == "failed"
        await sup.stop("a")
        await w.wait(700.0)
        assert w.agent("a").state == "stopped"


async def test_start_after_failed_resets_the_intensity(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(max_restarts=3, restart_window=60.0))
    w.crash["a"] = Crash(after=0.0, status=EXIT3)
    async with w.running() as sup:
        await w.wait(1.0)
        assert w.agent("a").state == "failed"
        assert w.times("a") == pytest.approx([0.0, 0.1, 0.3, 0.7])
        # Well within the window: had the count stayed, the next crash would fail it.
        await sup.start("a")
        await w.wait(1.0)
        assert w.times("a") == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.0, 1.1, 1.3, 1.7])
        assert w.agent("a").state == "failed"
        assert w.agent("a").restarts == 6
        assert len(w.events("failed", "a")) == 2


@pytest.mark.parametrize(
    ("policy", "status", "restarted"),
    OTP_RULES,
)
async def test_one_exit_under_each_policy(
    world: Callable[..., World], clock: MockClock, policy: str, status: int, restarted: bool
) -> None:
    w = world(a=cmd(restart=policy))
    async with w.running():
        await w.wait(2.0)
        first = w.pid("a")
        w.exit(first, status)
        await w.wait(20.0)
        agent = w.agent("a")
        (exit_,) = w.events("exit", "a")
        assert exit_["pid"] == first
        assert describe(status).items() <= exit_.items()
        if restarted:
            assert w.times("a") == pytest.approx([0.0, 2.1])
            assert agent.state == "running" and agent.pids == [w.spawns[-1].pid]
            assert agent.restarts == 1
            assert len(w.events("restart", "a")) == 1
        else:
            assert w.times("a") == [0.0]
            assert agent.state == "stopped" and agent.pids == []
            assert agent.restarts == 0
            assert w.events("restart", "a") == []
        assert w.events("failed", "a") == []


@pytest.mark.parametrize(("policy", "restarted"), [("transient", True), ("temporary", False)])
async def test_kill_is_an_abnormal_exit(
    world: Callable[..., World], clock: MockClock, policy: str, restarted: bool
) -> None:
    w = world(a=cmd(restart=policy))
    async with w.running() as sup:
        first = w.pid("a")
        await sup.kill("a")
        assert w.signals == [(first, KILLED)]
        await w.wait(10.0)
        assert w.events("exit", "a")[0]["signal"] == KILLED
        assert len(w.spawns) == (2 if restarted else 1)
        assert w.agent("a").state == ("running" if restarted else "stopped")


@pytest.mark.parametrize(("lifetime", "fails"), [(0.2, True), (0.6, False)])
async def test_restarts_leave_the_window(
    world: Callable[..., World], clock: MockClock, lifetime: float, fails: bool
) -> None:
    """Two restarts per second are allowed: a process that lives 0.6 s (plus the
    backoff) never has three in a second; one that lives 0.2 s has."""
    w = world(a=cmd(max_restarts=2, restart_window=1.0))
    w.crash["a"] = Crash(after=lifetime, status=EXIT1)
    async with w.running():
        await w.wait(30.0)
        agent = w.agent("a")
        if fails:
            assert w.times("a") == pytest.approx([0.0, 0.3, 0.7])
            assert agent.state == "failed" and agent.restarts == 2
        else:
            assert agent.state == "running"
            assert agent.restarts > 30
            assert w.events("failed", "a") == []
            # the window forgets old restarts, so the backoff never grows past the second
            delays = [e["delay"] for e in w.events("restart", "a")]
            assert delays[:3] == pytest.approx([0.1, 0.2, 0.2])
            assert max(delays) == pytest.approx(0.2)


async def test_backoff_doubles_with_restarts_in_the_window(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(max_restarts=9, restart_window=100.0))
    w.crash["a"] = Crash(after=0.0, status=EXIT1)
    async with w.running():
        await w.wait(60.0)
        delays = [e["delay"] for e in w.events("restart", "a")]
        assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
        times = w.times("a")
        assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx(delays)
        assert w.agent("a").state == "failed" and w.agent("a").restarts == 9


async def test_only_the_crashed_instance_restarts(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(instances=3))
    async with w.running():
        keep = [w.pid("a", 0), w.pid("a", 2)]
        await w.wait(1.0)
        w.exit(w.pid("a", 1), EXIT1)
        await w.wait(1.0)
        assert w.agent("a").state == "running"
        assert len(w.agent("a").pids) == 3
        assert w.times("a", 1) == pytest.approx([0.0, 1.1])
        assert [w.pid("a", 0), w.pid("a", 2)] == keep
        (restart,) = w.events("restart", "a")
        assert restart["instance"] == 1


async def test_failing_ends_the_other_instances(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(instances=2, max_restarts=0))
    async with w.running():
        other = w.pid("a", 1)
        w.exit(w.pid("a", 0), EXIT1)
        await w.wait(10.0)
        assert w.signals == [(other, TERMED)]
        assert len(w.spawns) == 2
        assert w.agent("a").state == "failed" and w.agent("a").pids == []
        assert len(w.events("failed", "a")) == 1


async def test_failed_with_a_restart_pending(world: Callable[..., World], clock: MockClock) -> None:
    w = world(a=cmd(instances=2, max_restarts=1, restart_window=5.0))
    async with w.running():
        w.exit(w.pid("a", 0), EXIT1)  # allowed: restarts after 0.1 s
        await w.wait(0.05)
        w.exit(w.pid("a", 1), EXIT1)  # one too many: failed
        await w.wait(10.0)
        assert len(w.spawns) == 2  # (this part holds: nothing is started again)
        assert len(w.events("failed", "a")) == 1
        assert w.agent("a").state == "failed"


async def test_shutting_down_restarts_nothing(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd())
    async with w.running() as sup:
        sup.shutting_down = True
        w.exit(w.pid("a"), KILLED)
        await w.wait(10.0)
        assert len(w.spawns) == 1 and w.agent("a").restarts == 0


# -- stop, start, restart ------------------------------------------------------------


async def test_stop_ends_the_agent_and_prevents_restarts(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(restart="permanent", instances=2))
    async with w.running() as sup:
        pids = w.agent("a").pids
        await sup.stop("a")
        assert sorted(w.signals) == [(pid, TERMED) for pid in pids]
        assert w.agent("a").state == "stopped" and w.agent("a").pids == []
        await w.wait(20.0)
        assert len(w.spawns) == 2
        assert w.agent("a").state == "stopped" and w.agent("a").restarts == 0
        assert [e["signal"] for e in w.events("exit", "a")] == [TERMED, TERMED]
        assert w.events("restart", "a") == []
        t = w.now()
        await sup.start("a")
        assert w.times("a") == pytest.approx([0.0, 0.0, t, t])
        assert w.agent("a").state == "running" and len(w.agent("a").pids) == 2


async def test_stop_during_a_backoff_prevents_the_restart(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(restart="permanent"))
    async with w.running() as sup:
        w.exit(w.pid("a"), EXIT1)
        await w.wait(0.05)  # the restart waits out its 0.1 s backoff
        assert w.agent("a").state == "starting"
        await sup.stop("a")
        await w.wait(20.0)
        assert len(w.spawns) == 1
        assert w.agent("a").state == "stopped" and w.agent("a").pids == []


async def test_stop_during_a_backoff_reports_stopped_at_once(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(restart="permanent"))
    async with w.running() as sup:
        w.exit(w.pid("a"), EXIT1)
        await w.wait(0.05)
        await sup.stop("a")
        assert w.agent("a").state == "stopped"


async def test_start_during_a_backoff_starts_once(
    world: Callable[..., World], clock: MockClock
) -> None:
    w = world(a=cmd(restart="permanent"))
    async with w.running() as sup:
        w.exit(w.pid("a"), EXIT1)
        await w.wait(0.05)
        await sup.start("a")
        await w.wait(10.0)
        assert w.times("a") == pytest.approx([0.0, 0.05])
        assert w.agent("a").pids == [w.spawns[-1].pid]


async def test_restart_command(world: Callable[..., World], clock: MockClock) -> None:
    w = world(a=cmd(restart="temporary"))
    async with w.running() as sup:
        first = w.pid("a")
        await w.wait(3.0)
        await sup.restart("a")
        assert w.signals == [(first, TERMED)]
        assert w.times("a") == pytest.approx([0.0, 3.0])
        assert w.agent("a").state == "running" and w.agent("a").pids == [w.spawns[-1].pid]
