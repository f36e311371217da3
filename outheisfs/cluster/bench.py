"""`outheisfs bench --cluster URL,...`: the direct nats-py reference figures.

What the cluster mode will be measured against, on the same servers: plain
nats-py on asyncio, no outheisfs and no bridge in between.

1. writes/s over one connection: one publish at a time, each awaited until the
   stream has stored it with the replicas asked for (what a write on one open
   file will cost at least);
2. the echo round trip through the stream: a request event published on one
   connection, seen by an echo on a second connection (another host), which
   publishes its reply event; the first sees the reply come back in the stream.

Beside them, the same two figures through outheisfs: two hosts (`h1`, `h2`)
mounted on the same servers in a temporary folder, on a stream of their own:

3. writes/s to an inbox over one open file on `h1` (each write returns once its
   message is stored with the replicas and has come back from the stream);
4. the echo round trip across the two hosts: the operator on `h1` writes to an
   echo agent that runs on `h2` and reads the reply from its own inbox on `h1`.

Each outheisfs row is printed with its ratio to the direct one.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api

STREAM = "outheisbench"
SUBJECT = f"{STREAM}.events"
LABEL = "direct nats-py (reference)"
FS_STREAM = "outheisbenchfs"
FS_LABEL = "outheisfs: two hosts mounted on these servers (ratio to the direct row)"
ECHO = """\
import json
with open("inbox") as inbox, open("outbox", "w") as out:
    for line in inbox:
        out.write(json.dumps({"body": json.loads(line)["body"]}) + "\\n")
        out.flush()
"""


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


def _outheisfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outheisfs", *args], capture_output=True, text=True, timeout=120
    )


def fs_rows(urls: list[str], replicas: int, quick: bool) -> list[Row]:
    """Rows 3 and 4: through two outheisfs mounts (see the module's docstring)."""
    with tempfile.TemporaryDirectory(prefix="outheisbench-") as tmp:
        root = Path(tmp)
        (root / "echo.py").write_text(ECHO)
        config = (
            f"[cluster]\nservers = {json.dumps(urls)}\nstream = {json.dumps(FS_STREAM)}\n"
            f"replicas = {replicas}\n\n[agents.sink]\n\n[agents.echo]\n"
            f'command = ["{sys.executable}", "{root / "echo.py"}"]\nhost = "h2"\n'
        )
        mounts: list[Path] = []
        try:
            for host in ("h1", "h2"):
                (root / host / "mnt").mkdir(parents=True)
                (root / host / "outheis.toml").write_text(config)
                r = _outheisfs(
                    "mount", str(root / host / "mnt"), "--config",
                    str(root / host / "outheis.toml"), "--state", str(root / host / "state"),
                    "--host", host,
                )  # fmt: skip
                if r.returncode != 0:
                    raise OSError(f"mount {host}: {r.stderr.strip()}")
                mounts.append(root / host / "mnt")
            h1 = mounts[0]
            n = 300 if quick else 2000
            fd = os.open(h1 / "agents" / "sink" / "inbox", os.O_WRONLY)
            t0 = time.perf_counter()
            for i in range(n):
                os.write(fd, b"a benchmark message %d\n" % i)
            wall = time.perf_counter() - t0
            os.close(fd)
            rows = [Row("fs_writes", "writes/s over one open file", "msg/s", n / wall)]
            deadline = time.monotonic() + 30
            while b"echo running" not in (mounts[1] / "ctl").read_bytes():
                if time.monotonic() > deadline:
                    raise OSError("the echo agent did not start on h2")
                time.sleep(0.05)
            wfd = os.open(h1 / "agents" / "echo" / "inbox", os.O_WRONLY)
            rfd = os.open(h1 / "agents" / "user" / "inbox", os.O_RDONLY)
            lat = []
            try:
                for _ in range(100 if quick else 1000):
                    t = time.perf_counter()
                    os.write(wfd, b"ping\n")
                    os.read(rfd, 1 << 20)
                    lat.append(time.perf_counter() - t)
            finally:
                os.close(wfd)
                os.close(rfd)
            rows.append(
                Row(
                    "fs_roundtrip",
                    "echo round trip h1 -> h2 -> h1, p50 (p99)",
                    "ms",
                    pct(lat, 0.5) * 1000,
                    pct(lat, 0.99) * 1000,
                )
            )
            return rows
        finally:
            for mp in mounts:
                if _outheisfs("umount", str(mp)).returncode != 0:
                    subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


async def _forget_fs_stream(urls: list[str]) -> None:
    nc = await _connect(urls)
    js = nc.jetstream(timeout=10)
    try:
        for name in (FS_STREAM, f"KV_{FS_STREAM}-hosts"):
            try:
                await js.delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await nc.close()


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


def ratios(direct: list[Row], fs: list[Row]) -> dict[str, float]:
    """outheisfs against direct: writes as a fraction (higher is better), the round
    trip's p50 as a multiple (lower is better)."""
    d = {r.key: r.value for r in direct}
    f = {r.key: r.value for r in fs}
    out: dict[str, float] = {}
    if "fs_writes" in f:
        out["fs_writes"] = f["fs_writes"] / d["cluster_writes"]
    if "fs_roundtrip" in f:
        out["fs_roundtrip"] = f["fs_roundtrip"] / d["cluster_roundtrip"]
    return out


def render(
    urls: list[str],
    replicas: int,
    rows: list[Row],
    fs: list[Row] | None = None,
    note: str = "",
) -> str:
    out = [
        f"outheisfs bench --cluster: {len(urls)} servers, stream with {replicas} replicas",
        LABEL,
    ]
    for r in rows:
        p99 = f" ({r.p99:.2f})" if r.p99 is not None else ""
        out.append(f"  {r.what:48} {r.value:10.2f}{p99} {r.unit}")
    out.append(FS_LABEL)
    if note:
        out.append(f"  not measured: {note}")
    ratio = ratios(rows, fs or [])
    for r in fs or []:
        p99 = f" ({r.p99:.2f})" if r.p99 is not None else ""
        out.append(f"  {r.what:48} {r.value:10.2f}{p99} {r.unit}  ratio {ratio[r.key]:.2f}")
    return "\n".join(out)


def main(urls: list[str], quick: bool, as_json: bool) -> int:
    urls = [u.strip() for u in urls if u.strip()]
    try:
        replicas, rows = asyncio.run(measure(urls, quick))
    except (nats.errors.Error, OSError, TimeoutError) as e:
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        print(f"outheisfs: bench --cluster {','.join(urls)}: {why}", file=sys.stderr)
        return 1
    fs: list[Row] = []
    note = ""
    try:
        fs = fs_rows(urls, replicas, quick)
    except (OSError, subprocess.SubprocessError) as e:
        note = str(e).splitlines()[0] if str(e) else type(e).__name__
    finally:
        try:
            asyncio.run(_forget_fs_stream(urls))
        except (nats.errors.Error, OSError, TimeoutError):
            pass
    if as_json:
        info: dict[str, Any] = {"servers": urls, "replicas": replicas, "label": LABEL}
        print(
            json.dumps(
                {
                    **info,
                    "direct": [asdict(r) for r in rows],
                    "outheisfs": [asdict(r) for r in fs],
                    "ratios": ratios(rows, fs),
                    "note": note or None,
                }
            )
        )
    else:
        print(render(urls, replicas, rows, fs, note))
    return 0
