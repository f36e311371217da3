"""The asyncio thread that nats-py runs on, called from trio (no servers needed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import trio

from outheisfs.cluster.bridge import Bridge


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    b = Bridge()
    yield b
    b.close()


async def test_results_and_exceptions_cross_over(bridge: Bridge) -> None:
    async def where(x: int) -> tuple[int, str]:
        await asyncio.sleep(0)
        return x + 1, threading.current_thread().name

    assert await bridge.call(where, 1) == (2, "outheisfs-nats")

    async def fail() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        await bridge.call(fail)


async def test_many_trio_tasks_wait_without_threads_each(bridge: Bridge) -> None:
    gate = asyncio.Event()

    async def wait_gate(i: int) -> int:
        await gate.wait()
        return i

    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await bridge.call(wait_gate, i))

    async with trio.open_nursery() as n:
        for i in range(200):
            n.start_soon(one, i)
        await trio.sleep(0.05)
        assert threading.active_count() < 20  # waiting holds no thread per call
        bridge.loop.call_soon_threadsafe(gate.set)
    assert sorted(results) == list(range(200))


async def test_a_trio_cancellation_cancels_the_asyncio_task(bridge: Bridge) -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with trio.move_on_after(0.1) as scope:
        await bridge.call(forever)
    assert scope.cancelled_caught
    with trio.fail_after(5):
        while not cancelled.is_set():
            await trio.sleep(0.01)


def test_close_stops_the_thread() -> None:
    b = Bridge()
    b.close()
    assert b.loop.is_closed()
    assert not any(t.name == "outheisfs-nats" and t.is_alive() for t in threading.enumerate())
