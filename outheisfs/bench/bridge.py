"""Measure the trio <-> asyncio bridge on the write path (docs/design.md, "Cluster engine").

Starts three local nats-server processes (a stream with 3 replicas, fsync on
every store) and publishes one event per call through the same coroutine
(`Engine._publish`) three ways: plain asyncio (no bridge, the reference), from
trio through the thread bridge (`outheisfs.cluster.bridge`), and from trio
through trio-asyncio (`pip install trio-asyncio` to include it). For each:
latency p50/p99 and throughput of one writer at a time, and of 64 concurrent
writers. Run: python -m outheisfs.bench.bridge [N]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import trio

from outheisfs.cluster.bridge import Bridge
from outheisfs.cluster.engine import ConnectOptions, Engine, open_engine
from outheisfs.cluster.local import LocalCluster

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
WRITERS = 64
counter = 0


def events() -> list[tuple[str, bytes]]:
    global counter
    counter += 1
    return [(f"m{counter}", b'{"type":"message","body":"a benchmark message of forty"}')]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


def row(label: str, lat: list[float], wall: float) -> str:
    return (
        f"{label:34} p50 {pct(lat, 0.5):6.2f} ms  p99 {pct(lat, 0.99):6.2f} ms  "
        f"{len(lat) / wall:7.0f} publishes/s"
    )


async def trio_rounds(label: str, publish: Callable[[], Awaitable[Any]]) -> list[str]:
    out = []
    lat: list[float] = []
    t0 = time.perf_counter()
    for _ in range(N):
        t = time.perf_counter()
        await publish()
        lat.append(time.perf_counter() - t)
    out.append(row(f"{label}, 1 writer", lat, time.perf_counter() - t0))
    lat = []

    async def writer() -> None:
        for _ in range(N // WRITERS * 4):
            t = time.perf_counter()
            await publish()
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for _ in range(WRITERS):
            n.start_soon(writer)
    out.append(row(f"{label}, {WRITERS} writers", lat, time.perf_counter() - t0))
    return out


async def asyncio_rounds(urls: list[str]) -> list[str]:
    nc = await nats.connect(servers=urls)
    engine = Engine(None, nc, "bench", 3, 30.0)  # type: ignore[arg-type]
    out = []
    lat: list[float] = []
    t0 = time.perf_counter()
    for _ in range(N):
        t = time.perf_counter()
        await engine._publish(events())
        lat.append(time.perf_counter() - t)
    out.append(row("asyncio, no bridge, 1 writer", lat, time.perf_counter() - t0))
    lat = []

    async def writer() -> None:
        for _ in range(N // WRITERS * 4):
            t = time.perf_counter()
            await engine._publish(events())
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(WRITERS)))
    out.append(row(f"asyncio, no bridge, {WRITERS} writers", lat, time.perf_counter() - t0))
    await nc.close()
    return out


async def thread_bridge(urls: list[str]) -> list[str]:
    bridge = Bridge()
    try:
        async with open_engine(ConnectOptions(urls), "bench", 3, bridge=bridge) as e:
            return await trio_rounds("trio, thread bridge", lambda: e.publish(events()))
    finally:
        bridge.close()


async def trio_asyncio_bridge(urls: list[str]) -> list[str]:
    import trio_asyncio

    async with trio_asyncio.open_loop():
        nc = await trio_asyncio.aio_as_trio(nats.connect)(servers=urls)
        engine = Engine(None, nc, "bench", 3, 30.0)  # type: ignore[arg-type]
        publish = trio_asyncio.aio_as_trio(engine._publish)
        out = await trio_rounds("trio, trio-asyncio", lambda: publish(events()))
        await trio_asyncio.aio_as_trio(nc.close)()
        return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(Path(tmp)) as cluster:
        urls = cluster.urls
        trio.run(thread_bridge, urls)  # creates the stream (3 replicas) and warms up
        lines: list[str] = []
        for _ in range(2):  # alternate, so a noisy machine slows each alike
            lines += asyncio.run(asyncio_rounds(urls))
            lines += trio.run(thread_bridge, urls)
            try:
                lines += trio.run(trio_asyncio_bridge, urls)
            except ImportError:
                lines.append("trio-asyncio: not installed")
        print(f"{N} single-event publishes per writer pattern, stream with 3 replicas, fsync")
        for line in sorted(lines, key=lambda s: s.split(",")[0]):
            print(line)


if __name__ == "__main__":
    main()
