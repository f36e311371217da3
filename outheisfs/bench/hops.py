"""Where the echo round trip's time goes: each hop timed in one run.

    python -m outheisfs.bench.hops [N]

Mounts a server in the foreground whose read and write handlers stamp the
monotonic clock (the same clock in every process of the machine) as a request
comes in, as a parked read is woken, and as the answer leaves; the echo agent
stamps when its read returns and before it writes; the driver stamps before its
write and after its read. For N round trips (default 2,000) it prints the
median of each hop and their sum beside the median round trip:

    send      driver's write(2) until the server's write handler starts
    write     the server's write handler (echo's inbox): parse, log, apply, wake
    wake      end of that handler until echo's parked read runs again (or, if
              echo's next read came after the message, until it came)
    take      echo's read, woken: deliver event logged, the line made
    to echo   the answer leaves the server until echo's read returns
    echo      in echo: json.loads, json.dumps, until it calls write(2)
    reply     echo's write(2) until the server's write handler starts
    write     the server's write handler (the outbox): the reply sent
    wake      until the driver's parked read runs again
    take      the driver's read, woken: ack of its last answer, deliver, the line
    back      the answer leaves the server until the driver's read returns

The server's part is the sum of the rows it stamps; the rest is FUSE and the
kernel waking processes. The stamps cost a few microseconds per request.
"""

from __future__ import annotations

import atexit
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

STAMPS_ENV = "OUTHEISFS_HOPS"  # the server writes its stamps to this file at exit
LINE = b"a benchmark message of forty bytes....\n"
ECHO = """
import json, os, time
i, o = os.open("inbox", os.O_RDONLY), os.open("outbox", os.O_WRONLY)
while True:
    m = json.loads(os.read(i, 1 << 21))
    t = time.monotonic_ns()
    body = {"got": t, "sends": 0}
    line = json.dumps({"body": body})
    body["sends"] = time.monotonic_ns()
    os.write(o, json.dumps({"body": body}).encode() + b"\\n")
"""
HOPS = [
    "send",
    "write (echo's inbox)",
    "wake echo's read",
    "take (echo's read)",
    "to echo",
    "echo's own work",
    "reply",
    "write (echo's outbox)",
    "wake the driver's read",
    "take (driver's read)",
    "back to the driver",
]
SERVER_HOPS = {1, 2, 3, 7, 8, 9}  # indexes of the hops inside the server


def patch() -> None:
    """In the server process: stamp reads and writes, write the stamps at exit."""
    import trio

    from outheisfs.ops import Operations
    from outheisfs.parking import Parking

    stamps: list[tuple[str, int, int, int, int]] = []  # (op, fh, in, woken, out)
    woken: dict[object, int] = {}  # the request's task -> when its wait ended
    read = Operations.read
    write = Operations.write
    park = Parking.park

    async def parked(self: Parking, *args: Any, **kwargs: Any) -> bool:
        r = await park(self, *args, **kwargs)
        woken[trio.lowlevel.current_task()] = time.monotonic_ns()
        return r

    def stamped(
        op: str, fn: Callable[..., Coroutine[Any, Any, Any]]
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        async def handler(self: Operations, fh: int, *args: Any) -> Any:
            t = time.monotonic_ns()
            r = await fn(self, fh, *args)
            end = time.monotonic_ns()
            stamps.append((op, fh, t, woken.pop(trio.lowlevel.current_task(), 0), end))
            return r

        return handler

    Operations.read = stamped("read", read)  # type: ignore[method-assign]
    Operations.write = stamped("write", write)  # type: ignore[method-assign]
    Parking.park = parked  # type: ignore[method-assign]

    def dump() -> None:
        Path(os.environ[STAMPS_ENV]).write_text(json.dumps(stamps))

    atexit.register(dump)


SERVE = """
import sys
from outheisfs.bench import hops
from outheisfs import cli
hops.patch()
sys.exit(cli.main(["mount", sys.argv[1], "--state", sys.argv[2], "--config", sys.argv[3],
                   "--foreground"]))
"""


def measure(n: int, root: Path) -> dict[str, Any]:
    """N timed round trips through a mount in `root`; the hops' medians (µs)."""
    mp, state, cfg, out = root / "mp", root / "state", root / "hops.toml", root / "stamps.json"
    mp.mkdir()
    cfg.write_text(
        'max_queue = 10000000\n[agents.echo]\ncommand = ["'
        + sys.executable
        + '", "-c", '
        + json.dumps(ECHO)
        + "]\n"
    )
    env = dict(os.environ, **{STAMPS_ENV: str(out)})
    cmd = [sys.executable, "-c", SERVE, str(mp), str(state), str(cfg)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while (
            not (mp / "agents" / "echo" / "ctl").exists()
            or "state running" not in (mp / "agents" / "echo" / "ctl").read_text()
        ):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server for the hop timing did not start")
            time.sleep(0.05)
        to_echo = os.open(mp / "agents" / "echo" / "inbox", os.O_WRONLY)
        replies = os.open(mp / "agents" / "user" / "inbox", os.O_RDONLY)
        driver: list[tuple[int, int, int, dict[str, int]]] = []
        for i in range(n + 50):  # the first 50 warm up
            t0 = time.monotonic_ns()
            os.write(to_echo, LINE)
            t1 = time.monotonic_ns()
            answer = json.loads(os.read(replies, 1 << 16))
            t2 = time.monotonic_ns()
            if i >= 50:
                driver.append((t0, t1, t2, answer["body"]))
        os.close(to_echo)
        os.close(replies)
    finally:
        subprocess.run([sys.executable, "-m", "outheisfs", "umount", str(mp)], capture_output=True)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
    return breakdown(driver, json.loads(out.read_text()))


def _within(stamps: list[list[Any]], key: int, low: int, high: int) -> list[Any] | None:
    """The first stamp whose time `key` lies in [low, high]."""
    i = bisect.bisect_left([s[key] for s in stamps], low)
    return stamps[i] if i < len(stamps) and stamps[i][key] <= high else None


def breakdown(
    driver: list[tuple[int, int, int, dict[str, int]]], stamps: list[list[Any]]
) -> dict[str, Any]:
    """Match the server's stamps to each round trip; the hops' medians in µs."""
    reads = sorted((s for s in stamps if s[0] == "read"), key=lambda s: s[4])
    writes = sorted((s for s in stamps if s[0] == "write"), key=lambda s: s[2])
    for s in reads:
        s.append(bool(s[3]))  # whether it waited (was parked)
        s[3] = s[3] or s[2]  # a read that found its message at once: its start
    hops: list[list[float]] = [[] for _ in HOPS]
    totals: list[float] = []
    waited = [0, 0]  # round trips whose echo read, whose driver's read had waited
    for t0, t1, t2, echo in driver:
        # The requests of this round trip: the write into echo's inbox, echo's
        # read that returned it, echo's write to its outbox, the driver's read.
        w1 = _within(writes, 2, t0, t1)
        r1 = _within(reads, 4, t0, echo["got"])
        w2 = _within(writes, 2, echo["sends"], t2)
        r2 = _within(reads, 4, echo["sends"], t2)
        if w1 is None or r1 is None or w2 is None or r2 is None:
            continue
        points = [t0, w1[2], w1[4], max(r1[3], w1[4]), r1[4], echo["got"], echo["sends"]]
        points += [w2[2], w2[4], max(r2[3], w2[4]), r2[4], t2]
        for k in range(len(HOPS)):
            hops[k].append((points[k + 1] - points[k]) / 1000)
        totals.append((t2 - t0) / 1000)
        waited[0] += r1[5]
        waited[1] += r2[5]
    if not totals:
        raise RuntimeError("no round trip could be matched with the server's stamps")
    medians = [statistics.median(h) for h in hops]
    return {
        "round_trips": len(totals),
        "total_us": statistics.median(totals),
        "hops_us": dict(zip(HOPS, medians, strict=True)),
        "server_us": sum(medians[k] for k in SERVER_HOPS),
        "waited": (waited[0] / len(totals), waited[1] / len(totals)),
    }


def render(r: dict[str, Any]) -> str:
    total = r["total_us"]
    lines = [f"echo round trip, median of {r['round_trips']:,}: {total:.0f} µs", ""]
    for k, (name, v) in enumerate(r["hops_us"].items()):
        where = "server" if k in SERVER_HOPS else ""
        lines.append(f"  {name:26} {v:8.1f} µs  {v / total * 100:5.1f} %  {where}")
    hop_sum = sum(r["hops_us"].values())
    lines.append(f"  {'sum of the medians':26} {hop_sum:8.1f} µs")
    lines.append(f"  {'of which in the server':26} {r['server_us']:8.1f} µs")
    echo, driver = r["waited"]
    lines.append(
        f"echo's read was waiting when the message came in {echo:.0%} of the round trips "
        f"(else that wake-up is the wait for echo's next read), the driver's in {driver:.0%}"
    )
    return "\n".join(lines)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory(prefix="outheisfs-hops-") as root:
        print(render(measure(n, Path(root))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
