"""The stream's order decides across hosts (`cluster.order`), without NATS: events
as several hosts publish them, applied in one order, as every host applies them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from outheisfs import events
from outheisfs.cluster.order import Order, host_gone
from outheisfs.config import parse_config
from outheisfs.dispatcher import Dispatcher
from outheisfs.events import Event
from outheisfs.models import INFLIGHT, QUEUED, new_id

CONFIG = """
[cluster]
servers = ["nats://127.0.0.1:4222"]

[agents.model]
command = ["true"]
host = ["gpu1", "gpu2"]

[agents.tool]
command = ["true"]
host = "gpu2"

[agents.notes]
"""


class Stream:
    """A stream of events applied in order by one `Order`, as a host does."""

    def __init__(self) -> None:
        self.d = Dispatcher(parse_config(CONFIG, Path("/cfg")), None)
        self.order = Order()
        self.seq = 0
        self.moves: list[tuple[str, str | None, str | None]] = []
        self.order.moved = lambda *m: self.moves.append(m)

    def put(self, ev: Event, host: str | None = None) -> bool:
        self.seq += 1
        full: dict[str, Any] = {"seq": self.seq, "ts": "2026-12-07T00:00:00.000000Z", **ev}
        if host is not None and ev["type"] != "message":
            full.setdefault("host", host)
        return self.order.apply(self.d, full)

    def mount(self, host: str) -> None:
        assert self.put(events.mount("/mnt", 1, "process", {}), host)

    def message(self, to: str = "notes", body: str = "hi") -> str:
        mid = new_id()
        assert self.put(events.message(mid, "user", to, "normal", body, None))
        return mid

    def deliver(self, mid: str, host: str, attempt: int = 1) -> bool:
        return self.put(events.deliver(self.d.messages[mid].to, mid, attempt), host)


def test_the_first_deliver_in_the_stream_wins() -> None:
    s = Stream()
    s.mount("a")
    s.mount("b")
    mid = s.message()
    assert s.deliver(mid, "a")
    assert not s.deliver(mid, "b")  # proposed at the same time, came second
    msg = s.d.messages[mid]
    assert msg.state == INFLIGHT and msg.delivered == 1
    assert s.order.holder[mid] == "a" and s.d.agents["notes"].delivered == 1


def test_a_settlement_counts_only_from_the_host_that_holds_the_message() -> None:
    s = Stream()
    s.mount("a")
    s.mount("b")
    mid = s.message()
    s.deliver(mid, "a")
    assert not s.put(events.ack("notes", mid, "notes"), "b")
    assert not s.put(events.redeliver("notes", mid, 2, "x"), "b")
    assert s.d.messages[mid].state == INFLIGHT
    assert s.put(events.ack("notes", mid, "notes"), "a")
    assert mid not in s.d.messages and mid not in s.order.holder
    assert not s.put(events.ack("notes", mid, "notes"), "a")  # twice: void, no error


def test_a_deliver_from_a_host_declared_gone_is_void() -> None:
    s = Stream()
    s.mount("a")
    s.mount("b")
    mid = s.message()
    assert s.put(host_gone("a", s.order.up["a"]), "b")
    assert not s.deliver(mid, "a")
    assert s.d.messages[mid].state == QUEUED


def test_host_gone_gives_back_its_messages_once_with_attempt_plus_one() -> None:
    s = Stream()
    s.mount("a")
    s.mount("b")
    held, kept = s.message(), s.message()
    s.deliver(held, "a")
    s.deliver(kept, "b")
    since = s.order.up["a"]
    assert s.put(host_gone("a", since), "b")
    assert not s.put(host_gone("a", since), "c")  # reported by another host too: once
    msg = s.d.messages[held]
    assert msg.state == QUEUED and "a" not in s.order.up
    assert s.d.messages[kept].state == INFLIGHT
    assert s.deliver(held, "b", attempt=2)  # the next delivery is attempt 2
    assert s.d.messages[held].delivered == 2


def test_host_gone_about_an_earlier_run_of_a_host_that_is_back_is_void() -> None:
    s = Stream()
    s.mount("a")
    since = s.order.up["a"]
    s.mount("a")  # came back before the report arrived
    assert not s.put(host_gone("a", since), "b")
    assert "a" in s.order.up


def test_a_host_mounted_again_gives_back_what_its_last_run_held() -> None:
    s = Stream()
    s.mount("a")
    mid = s.message()
    s.deliver(mid, "a")
    s.mount("a")
    assert s.d.messages[mid].state == QUEUED


def test_agents_run_on_their_first_host_up_and_stay_where_they_were_taken_over() -> None:
    s = Stream()
    assert s.order.runs_on == {}
    s.mount("gpu2")
    assert s.order.runs_on == {"model": "gpu2", "tool": "gpu2"}
    s.mount("gpu1")
    assert s.order.runs_on["model"] == "gpu2"  # not moved back: one runner
    s.put(events.umount("/mnt"), "gpu2")
    assert s.order.runs_on == {"model": "gpu1", "tool": None}
    s.mount("gpu2")
    assert s.order.runs_on == {"model": "gpu1", "tool": "gpu2"}
    assert s.moves == [
        ("model", None, "gpu2"),
        ("tool", None, "gpu2"),
        ("model", "gpu2", "gpu1"),
        ("tool", "gpu2", None),
        ("tool", None, "gpu2"),
    ]


def test_every_host_applying_the_same_stream_holds_the_same_state() -> None:
    a, b = Stream(), Stream()
    for s in (a, b):
        s.order.moved = None
    mids: list[str] = []
    evs: list[tuple[Event, str | None]] = [
        (events.mount("/m", 1, "process", {}), "gpu1"),
        (events.mount("/m", 2, "process", {}), "gpu2"),
    ]
    for i in range(5):
        mid = new_id()
        mids.append(mid)
        evs.append((events.message(mid, "user", "notes", "normal", i, None), None))
    evs += [
        (events.deliver("notes", mids[0], 1), "gpu1"),
        (events.deliver("notes", mids[0], 1), "gpu2"),
        (events.deliver("notes", mids[1], 1), "gpu2"),
        (host_gone("gpu1", 1), "gpu2"),
        (events.ack("notes", mids[1], "notes"), "gpu2"),
    ]
    for s in (a, b):
        for ev, host in evs:
            s.put(ev, host)
    for s in (a, b):
        assert s.d.messages[mids[0]].state == QUEUED
        assert mids[1] not in s.d.messages
    assert a.order == b.order
    assert [m.id for m in a.d.agents["notes"].inbox.messages()] == [
        m.id for m in b.d.agents["notes"].inbox.messages()
    ]
