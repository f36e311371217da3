"""The start-up rows of `outheisfs bench`: mounting over a long log.

A mount over an empty log comes first: on a busy machine starting two Python
processes is most of any mount's time. Then a log of N events (messages sent,
delivered, acknowledged, to 10 agents) is written straight into a state folder.
The first mount has no checkpoint and replays it all (and builds the agents'
stream indexes, and writes a checkpoint); after a clean unmount, the second
mount is what a user sees every day: it loads the checkpoint and reads nothing
of the log before it. Each is timed as `outheisfs mount` returning; the server's
own start-up work is read from its log, its memory after the second mount.

`python -m outheisfs.bench.startup [N]` runs these rows alone (default N =
10,000,000: about 1.5 GB of log and 0.3 GB of indexes, and ten minutes here,
nearly all of it writing the log and the first, full replay); `outheisfs bench`
runs them with 1,000,000 (`--quick`: 100,000).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..events import deliver, mount
from ..models import new_id


def write_log(state: Path, count: int, agents: int) -> None:
    """A log of `count` events: messages sent, delivered and acknowledged."""
    state.mkdir(parents=True)
    ts = "2026-01-01T00:00:00.000000Z"
    names = {f"b{i}": "normal" for i in range(agents)}
    with open(state / "events.jsonl", "w", buffering=1 << 20) as f:
        head = {"seq": 1, "ts": ts, **mount("-", 0, "process", names)}
        f.write(json.dumps(head, separators=(",", ":")) + "\n")
        seq = 2
        while seq + 2 <= count:
            mid = new_id()
            to = f"b{seq % agents}"
            f.write(
                f'{{"seq":{seq},"ts":"{ts}","type":"message","id":"{mid}","from":"user",'
                f'"to":"{to}","priority":"normal","body":"event {seq}","reply_to":null,'
                f'"attempt":1}}\n'
            )
            d = {"seq": seq + 1, "ts": ts, **deliver(to, mid, 1)}
            f.write(json.dumps(d, separators=(",", ":")) + "\n")
            f.write(
                f'{{"seq":{seq + 2},"ts":"{ts}","type":"ack","agent":"{to}","id":"{mid}",'
                f'"who":"{to}"}}\n'
            )
            seq += 3


def _memory_mb(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of `pid`, in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _outheisfs(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "outheisfs", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=3600)


def _mount(mp: Path, state: Path, config: Path) -> tuple[float, int]:
    t = time.perf_counter()
    r = _outheisfs("mount", str(mp), "--state", str(state), "--config", str(config))
    ready = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"outheisfs mount failed: {r.stderr.strip()}")
    return ready, int(os.getxattr(mp, "user.outheisfs.pid"))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0


def _startup_work(state: Path) -> tuple[float, float]:
    """The server's own start-up work as its log says: loading the checkpoint, and
    reading the log after it (the rest of `mount`'s time is starting two Python
    processes and mounting)."""
    text = (state / "server.log").read_text(errors="replace")
    m = re.findall(r"loaded in ([0-9.]+) s, [0-9]+ events read in ([0-9.]+) s", text)
    return (float(m[-1][0]), float(m[-1][1])) if m else (0.0, 0.0)


def measure(root: Path, events: int, agents: int = 10) -> dict[str, Any]:
    """Mount twice over a log of `events` events; the figures of both."""
    state = root / "startup.state"
    mp = root / "startup"
    mp.mkdir()
    config = root / "startup.toml"
    config.write_text("max_queue = 10000000\n" + "".join(f"[agents.b{i}]\n" for i in range(agents)))
    out: dict[str, Any] = {"events": events}
    try:
        # The same mount over an empty log: what starting the processes costs now.
        out["empty_ready"], _ = _mount(mp, root / "empty.state", config)
        _outheisfs("umount", str(mp))
        write_log(state, events, agents)
        out["first_ready"], _ = _mount(mp, state, config)
        _outheisfs("umount", str(mp))
        out["ready"], pid = _mount(mp, state, config)
        out["rss_mb"], out["peak_mb"] = _memory_mb(pid)
        with open(state / "events.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - (1 << 16)))
            tail = f.read().splitlines()
        last_mount = json.loads(next(x for x in reversed(tail) if b'"type":"mount"' in x))
        out["checkpoint"] = last_mount.get("checkpoint", 0)
        out["replayed"] = last_mount.get("replayed")
        out["load_s"], out["read_s"] = _startup_work(state)
    finally:
        _outheisfs("umount", str(mp))
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)
    out["log_bytes"] = _size(state / "events.jsonl")
    out["stream_bytes"] = _size(state / "streams")
    out["checkpoint_bytes"] = _size(state / "checkpoints")
    return out


def main(events: int) -> int:
    root = Path(tempfile.mkdtemp(prefix="outheisfs-startup-"))
    try:
        r = measure(root, events)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(r))
    print(
        f"log of {events:,} events ({r['log_bytes'] / 1e6:,.0f} MB; agents' log and outbox "
        f"files {r['stream_bytes'] / 1e6:,.0f} MB; "
        f"checkpoints {r['checkpoint_bytes'] / 1e3:,.0f} kB)\n"
        f"first mount (no checkpoint, full replay): {r['first_ready']:.2f} s\n"
        f"mount over an empty log: {r['empty_ready']:.2f} s\n"
        f"mount after a clean unmount: {r['ready']:.2f} s "
        f"(from the checkpoint at seq {r['checkpoint']:,}, {r['replayed']} events read; "
        f"in the server: {r['load_s']:.2f} s loading it, {r['read_s']:.2f} s reading the log)\n"
        f"server memory after it: {r['rss_mb']:.0f} MB resident, {r['peak_mb']:.0f} MB peak",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000))
