"""Pools that size themselves: the rule (`scaling`), the idle readers (`readers`),
the config keys, and the dispatcher's count of instances (ctl, `scale` events)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from outheisfs import ctl, events, scaling
from outheisfs.config import parse_config
from outheisfs.errors import BadInput, ConfigError
from outheisfs.procstate import Processes
from outheisfs.readers import Readers

from .helpers import make_config, open_dispatcher, replayed

# -- the rule ---------------------------------------------------------------------------


def test_grows_by_one_while_the_oldest_message_waited_longer_than_scale_after() -> None:
    assert scaling.decide(0, 1.5, {}, 1, 1, 4, after=1.0) == 2
    assert scaling.decide(0, 1.5, {}, 3, 1, 4, after=1.0) == 4
    assert scaling.decide(0, 1.5, {}, 4, 1, 4, after=1.0) == 4  # not past max
    assert scaling.decide(0, 0.5, {}, 1, 1, 4, after=1.0) == 1  # not waited long enough
    assert scaling.decide(0, None, {}, 1, 1, 4, after=1.0) == 1  # nothing queued


def test_shrinks_by_one_when_a_reader_waited_idle_for_scale_idle() -> None:
    idle = {0: 100.0, 2: 105.0}
    assert scaling.decide(130.0, None, idle, 3, 1, 4, idle_after=30) == 2
    assert scaling.decide(129.0, None, idle, 3, 1, 4, idle_after=30) == 3  # not yet
    assert scaling.decide(130.0, None, idle, 1, 1, 4, idle_after=30) == 1  # not below min
    assert scaling.decide(130.0, 0.1, idle, 3, 1, 4, idle_after=30) == 3  # work waits
    assert scaling.decide(130.0, None, {}, 3, 1, 4, idle_after=30) == 3  # nobody idle


def test_a_count_outside_the_bounds_is_pulled_in() -> None:
    assert scaling.decide(0, None, {}, 0, 2, 4) == 2
    assert scaling.decide(0, None, {}, 6, 2, 4) == 4


def test_pick_takes_the_reader_idle_longest_and_of_equals_the_highest_number() -> None:
    assert scaling.pick(100.0, {0: 50.0, 1: 40.0, 2: 90.0}, 30) == 1
    assert scaling.pick(100.0, {0: 50.0, 3: 50.0}, 30) == 3
    assert scaling.pick(100.0, {0: 90.0}, 30) is None
    assert scaling.pick(100.0, {}, 30) is None


def test_a_burst_grows_the_pool_to_max_and_idleness_brings_it_back_to_min() -> None:
    """The rule over a modelled burst: 200 jobs of 0.05 s each, looked at every 0.2 s."""
    lo, hi, after, idle_after, tick, work = 1, 4, 0.5, 3.0, 0.2, 0.05
    queue = [0.0] * 200  # send times
    now, current, peak = 0.0, 1, 1
    idle_since: dict[int, float] = {}
    done = 0
    sizes = []
    while now < 30:
        # each instance works through tick / work jobs per tick
        for i in range(current):
            n = min(len(queue), int(tick / work))
            del queue[:n]
            done += n
            if n == 0:
                idle_since.setdefault(i, now)
            else:
                idle_since.pop(i, None)
        now += tick
        age = now - queue[0] if queue else None
        target = scaling.decide(now, age, idle_since, current, lo, hi, after, idle_after)
        if target < current:
            victim = scaling.pick(now, idle_since, idle_after)
            assert victim is not None
            idle_since = {
                (j if j < victim else j - 1): t for j, t in idle_since.items() if j != victim
            }
        current = target
        peak = max(peak, current)
        sizes.append(current)
    assert done == 200
    assert peak == hi
    assert current == lo
    assert sizes.index(hi) * tick <= after + 4 * tick  # up within a second or so


# -- idle readers -----------------------------------------------------------------------


def test_readers_know_who_waits_idle_and_retire_only_those() -> None:
    r = Readers()
    assert not r.retire("w", 0)  # not waiting: not retired
    r.wait("w", 0)
    r.wait("w", 0)  # two threads of one instance
    r.wait("w", 1)
    assert set(r.idle("w")) == {0, 1}
    r.done("w", 0)
    assert set(r.idle("w")) == {0, 1}  # one read still waits
    r.done("w", 0)
    assert set(r.idle("w")) == {1}
    assert r.retire("w", 1)
    assert r.retired("w", 1) and not r.retired("w", 0) and not r.retired("w", None)
    assert r.idle("w") == {}  # a retired reader is not offered again
    r.forget("w", 1)
    assert not r.retired("w", 1)


# -- configuration ----------------------------------------------------------------------


def config(text: str) -> object:
    return parse_config("[agents.w]\ncommand = ['x']\n" + text, Path("."))


def test_a_pool_has_bounds_and_defaults() -> None:
    c = parse_config("[agents.w]\ninstances = { min = 2, max = 5 }\n", Path("."))
    w = c.agents["w"]
    assert (w.pool, w.floor, w.ceiling, w.after, w.idle) == (True, 2, 5, 1.0, 30.0)
    c = parse_config("[agents.w]\ninstances = {}\n", Path("."))
    assert c.agents["w"].floor == 1
    assert c.agents["w"].ceiling == min(64, os.cpu_count() or 1)  # max: the CPUs
    c = parse_config("[agents.w]\ninstances = 3\n", Path("."))
    assert (c.agents["w"].pool, c.agents["w"].floor, c.agents["w"].ceiling) == (False, 3, 3)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "instances = { min = 3, max = 2 }",
            "agents.w.instances: Value error, max 2 is less than min 3",
        ),
        ("instances = { min = 1, max = 65 }", "max 65 is more than 64"),
        ("instances = { min = 0, max = 2 }", "agents.w.instances: Value error, min:"),
        ("instances = { min = 1, most = 2 }", "most: unknown key"),
        ("instances = 0", "agents.w.instances: Value error, must be 1 to 64"),
        ('instances = "4"', "must be a number or { min = M, max = N }"),
        ("scale_after = 1", "agents.w.scale_after: Value error, only for a pool"),
        ("instances = 2\nscale_idle = 5", "agents.w.scale_idle"),
        ("instances = { max = 2 }\nscale_idle = 0", "agents.w.scale_idle"),
    ],
)
def test_a_bad_pool_names_the_key(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(text)
    assert says in str(e.value)


# -- ctl and the dispatcher's count -----------------------------------------------------


@pytest.mark.parametrize(
    "line", ["instances", "instances 0", "instances 65", "instances x", "instances 1 2"]
)
def test_instances_usage(line: str) -> None:
    with pytest.raises(BadInput) as e:
        ctl.parse(line)
    assert "usage: instances N (1 to 64)" in e.value.reason


def test_stop_with_a_number_says_how_to_run_fewer() -> None:
    with pytest.raises(BadInput) as e:
        ctl.parse("stop 1")
    assert e.value.reason == (
        "usage: stop (stop takes no argument: it stops every instance; "
        "to run a number of instances: instances N)"
    )


def test_the_count_follows_ctl_and_scale_events_and_replays(tmp_path: Path) -> None:
    cfg = make_config(
        {"w": {"command": ["x"], "instances": {"min": 1, "max": 4}}, "f": {"instances": 3}}
    )
    d, log = open_dispatcher(tmp_path, cfg)
    assert d.agents["w"].instances == 1 and d.agents["f"].instances == 3
    d.record([events.scale("w", 1, 2, 1, "waited")])
    d.record([events.ctl("f", "user", "instances 5")])
    assert d.agents["w"].instances == 2 and d.agents["f"].instances == 5
    status = ctl.agent_status(d.agents["w"], Processes(cfg).of("w"))
    assert "instances 2 (1..4)\n" in status
    assert "instances 5\n" in ctl.agent_status(d.agents["f"], Processes(cfg).of("f"))
    log.close()
    again = replayed(tmp_path, cfg)
    assert again.agents["w"].instances == 2 and again.agents["f"].instances == 5
    again.install_config()  # what a mount does after replay: the config's count
    assert again.agents["w"].instances == 1 and again.agents["f"].instances == 3


def test_oldest_is_the_first_sent_of_any_class(tmp_path: Path) -> None:
    from .helpers import send

    d, log = open_dispatcher(tmp_path, make_config({"w": {}}))
    assert d.agents["w"].inbox.oldest() is None
    first = send(d, "user", "w", "a", priority="background")[0]
    send(d, "user", "w", "b", priority="interactive")
    oldest = d.agents["w"].inbox.oldest()
    assert oldest is not None and oldest.id == first["id"]
    log.close()


# -- the service's step, with a supervisor that only records -----------------------------


class FakeRunner:
    def __init__(self, config: object) -> None:
        self.config = config


class FakeSupervisor:
    def __init__(self, runners: dict[str, FakeRunner], idle: dict[int, float]) -> None:
        self.runners = runners
        self.shutting_down = False
        self._idle = idle
        self.steps: list[tuple[str, ...]] = []

    def idle(self, name: str) -> dict[int, float]:
        return self._idle

    async def grow(self, name: str, want: int, why: str) -> None:
        self.steps.append(("grow", name, str(want), why))

    def shrink(self, name: str, index: int, want: int, why: str) -> bool:
        self.steps.append(("shrink", name, str(index), str(want)))
        return True


async def test_a_step_grows_a_waiting_pool_and_shrinks_an_idle_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time as time_

    from outheisfs.pools import Pools

    from .helpers import send

    pool = {"command": ["x"], "instances": {"min": 1, "max": 3}, "scale_after": 0.5}
    cfg = make_config({"w": pool, "v": {**pool, "scale_idle": 2.0}})
    d, log = open_dispatcher(tmp_path, cfg)
    send(d, "user", "w", "job")
    d.agents["v"].instances = 2
    sup = FakeSupervisor({n: FakeRunner(cfg.agents[n]) for n in ("w", "v")}, {1: 0.0})
    pools = Pools(d, sup)  # type: ignore[arg-type]
    monkeypatch.setattr(time_, "monotonic", lambda: 100.0)
    await pools.step("w")  # the job has waited a moment only
    assert sup.steps == []
    real = time_.time
    monkeypatch.setattr(time_, "time", lambda: real() + 1.0)
    await pools.step("w")
    assert sup.steps[0][:3] == ("grow", "w", "2")
    assert sup.steps[0][3].startswith("oldest queued message waited 1.")
    await pools.step("v")  # nothing queued, instance 1 idle for 100 s
    assert sup.steps[1] == ("shrink", "v", "1", "1")
    log.close()


def test_instances_n_of_a_pool_stays_within_its_bounds(tmp_path: Path) -> None:
    from outheisfs.procevents import ProcEvents

    cfg = make_config({"w": {"command": ["x"], "instances": {"min": 2, "max": 3}}})
    d, log = open_dispatcher(tmp_path, cfg)
    procs = ProcEvents()
    commands = ctl.Commands(d, procs, Processes(cfg), tmp_path)
    commands.supervisor = type("S", (), {"supervises": lambda self, n: True, "placed": None})()
    commands.check("user", "w", ctl.parse("instances 3"))
    for n in ("1", "4"):
        with pytest.raises(BadInput) as e:
            commands.check("user", "w", ctl.parse(f"instances {n}"))
        assert e.value.reason == f"instances: {n} is outside the pool's 2..3"
    from outheisfs.errors import NotPermitted

    with pytest.raises(NotPermitted):
        commands.check("w", "w", ctl.parse("instances 3"))
    procs.close()
    log.close()
