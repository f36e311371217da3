"""A close's count of the closer's descriptors runs off the event loop, one at a
time per agent, and closes that arrive together share a count."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from outheisfs import procinfo
from outheisfs.offloop import OffLoop

from .helpers import OpsEnv, make_config, make_ops_env

WR = os.O_WRONLY


@pytest.fixture
def env(tmp_path: Path) -> Iterator[OpsEnv]:
    e = make_ops_env(tmp_path, make_config({"echo": {"send": ["notes"]}, "notes": {}}))
    yield e
    e.log.close()
    e.ops.procs.close()


class SlowCount:
    """`procinfo.writers_of` that blocks its thread until let go, and says so."""

    def __init__(self, copies: int) -> None:
        self.copies = copies
        self.calls = 0
        self.running = threading.Event()
        self.go = threading.Event()

    def __call__(self, tid: int, ino: int, suffix: str, at_most: int | None = None) -> int:
        self.calls += 1
        self.running.set()
        assert self.go.wait(10)
        self.running.clear()
        return self.copies if at_most is None else min(self.copies, at_most)


async def test_closes_of_copies_share_counts_off_the_loop(
    env: OpsEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = SlowCount(copies=1000)
    monkeypatch.setattr(procinfo, "writers_of", count)
    env.ops.procs.labels[os.getpid()] = "echo"
    fh = await env.open("agents/echo/outbox", WR)
    await env.ops.write(fh, 0, b'{"to": "notes", "body": "late"}')
    async with trio.open_nursery() as nursery:
        nursery.start_soon(env.ops.flush, fh)  # a copy closed: its count begins
        await trio.to_thread.run_sync(count.running.wait)
        for _ in range(200):  # two hundred more closed while it runs
            nursery.start_soon(env.ops.flush, fh)
        await trio.testing.wait_all_tasks_blocked()
        # While a count runs, the loop serves others: the operator reads a ctl.
        del env.ops.procs.labels[os.getpid()]
        with trio.fail_after(5):
            assert b"state" in await env.read_all("agents/notes/ctl")
        assert env.ops.files.offloop.busy() == 1
        count.go.set()
    assert count.calls == 2, "the first count, and one begun after the others arrived"
    assert env.ops.files.offloop.busy() == 0, "no turn is kept"
    assert env.events("message") == [], "copies remain: the line waits"
    monkeypatch.setattr(procinfo, "writers_of", lambda *a, **k: 0)
    await env.ops.flush(fh)  # the last copy: the line goes
    assert [e["body"] for e in env.events("message")] == ["late"]
    await env.ops.release(fh)
    assert len(env.events("message")) == 1


async def test_turns_are_per_agent_and_in_order() -> None:
    off = OffLoop()
    order: list[str] = []
    held = trio.Event()

    async def hold(who: str, tag: str) -> None:
        async with off.turn(who):
            order.append(tag)
            if tag == "a1":
                await held.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, "a", "a1")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, "a", "a2")
        nursery.start_soon(hold, "b", "b1")
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a1", "b1"], "b does not wait for a"
        held.set()
    assert order == ["a1", "b1", "a2"]
    assert off.busy() == 0
    assert await off.run(lambda: threading.get_ident()) != threading.get_ident()
