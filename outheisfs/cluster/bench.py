"""`outheisfs bench --cluster URL,...`: the direct nats-py reference figures.

What the cluster mode will be measured against, on the same servers: plain
nats-py on asyncio, no outheisfs and no bridge in between.

1. writes/s over one connection: one publish at a time, each awaited until the
   stream has stored it with the replicas asked for (what a write on one open
   file will cost at least);
2. the echo round trip through the stream: a request event published on one
   connection, seen by an echo on a second connection (another host), which
   publishes its reply event; the first sees the reply come back in the stream.

The outheisfs rows beside them come when the cluster mode is wired in.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api

STREAM = "outheisbench"
SUBJECT = f"{STREAM}.events"
LABEL = "direct nats-py (reference; the outheisfs rows are not measured here yet)"


@dataclass
class Row:
    key: str
    what: str
    unit: str
    value: float
    p99: float | None = None


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def _stream(js: JetStreamContext, replicas: int) -> None:
    try:
        await js.delete_stream(STREAM)
    except nats.js.errors.NotFoundError:
        pass
    await js.add_stream(
        api.StreamConfig(
            name=STREAM,
            subjects=[SUBJECT],
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=120,
        )
    )


async def writes(js: JetStreamContext, n: int) -> Row:
    body = b'{"type":"message","body":"a benchmark message of forty bytes"}'
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        await js.publish(SUBJECT, body, headers={"Nats-Msg-Id": f"w{i}-{t0}"})
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return Row("cluster_writes", "writes/s, one publish at a time", "msg/s", n / wall)


async def roundtrips(urls: list[str], js: JetStreamContext, n: int) -> Row:
    """Echo through the stream between two connections; p50 and p99 in ms."""
    echo_nc = await _connect(urls)
    echo_js = echo_nc.jetstream()
    start = (await js.stream_info(STREAM)).state.last_seq + 1
    pol = api.DeliverPolicy.BY_START_SEQUENCE

    def cfg() -> api.ConsumerConfig:  # one each: nats-py fills in the one it is given
        return api.ConsumerConfig(opt_start_seq=start)

    async def echo() -> None:
        sub = await echo_js.subscribe(
            SUBJECT, ordered_consumer=True, config=cfg(), deliver_policy=pol
        )
        while True:
            msg = await sub.next_msg(timeout=None)
            ev = json.loads(msg.data)
            if ev["type"] == "request":
                reply = json.dumps({"type": "reply", "reply_to": ev["id"]}).encode()
                await echo_js.publish(SUBJECT, reply, headers={"Nats-Msg-Id": "r" + ev["id"]})

    task = asyncio.create_task(echo())
    sub = await js.subscribe(SUBJECT, ordered_consumer=True, config=cfg(), deliver_policy=pol)
    lat = []
    try:
        for i in range(n):
            rid = f"{i}-{time.time()}"
            t = time.perf_counter()
            await js.publish(
                SUBJECT,
                json.dumps({"type": "request", "id": rid}).encode(),
                headers={"Nats-Msg-Id": "q" + rid},
            )
            while True:
                ev = json.loads((await sub.next_msg(timeout=10)).data)
                if ev["type"] == "reply" and ev["reply_to"] == rid:
                    break
            lat.append(time.perf_counter() - t)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.unsubscribe()
        await echo_nc.close()
    return Row(
        "cluster_roundtrip",
        "echo round trip through the stream, p50 (p99)",
        "ms",
        pct(lat, 0.5) * 1000,
        pct(lat, 0.99) * 1000,
    )


async def _connect(urls: list[str]) -> Client:
    async def quiet(e: Exception) -> None:  # one line at the end, not a traceback per try
        pass

    return await asyncio.wait_for(
        nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=1, error_cb=quiet),
        10,
    )


async def measure(urls: list[str], quick: bool) -> tuple[int, list[Row]]:
    nc = await _connect(urls)
    js = nc.jetstream(timeout=10)
    replicas = min(3, len(urls))
    try:
        await _stream(js, replicas)
        rows = [
            await writes(js, 300 if quick else 3000),
            await roundtrips(urls, js, 100 if quick else 1000),
        ]
        await js.delete_stream(STREAM)
    finally:
        await nc.close()
    return replicas, rows


def render(urls: list[str], replicas: int, rows: list[Row]) -> str:
    out = [
        f"outheisfs bench --cluster: {len(urls)} servers, stream with {replicas} replicas",
        LABEL,
    ]
    for r in rows:
        p99 = f" ({r.p99:.2f})" if r.p99 is not None else ""
        out.append(f"  {r.what:48} {r.value:10.2f}{p99} {r.unit}")
    return "\n".join(out)


def main(urls: list[str], quick: bool, as_json: bool) -> int:
    urls = [u.strip() for u in urls if u.strip()]
    try:
        replicas, rows = asyncio.run(measure(urls, quick))
    except (nats.errors.Error, OSError, TimeoutError) as e:
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        print(f"outheisfs: bench --cluster {','.join(urls)}: {why}", file=sys.stderr)
        return 1
    if as_json:
        info: dict[str, Any] = {"servers": urls, "replicas": replicas, "label": LABEL}
        print(json.dumps({**info, "direct": [asdict(r) for r in rows]}))
    else:
        print(render(urls, replicas, rows))
    return 0
