"""`outheisfs bench`: what a message costs, beside the floor.

Every figure is measured through real mounts served by separate processes:
outheisfs, and the floor (`bench/floor.py`, a pyfuse3 filesystem whose one file only
queues bytes), mounted and driven the same way by this process. Floor and
outheisfs runs alternate, so a noisy machine slows both alike, and the median
of the runs is reported with its ratio to the floor's. Where `redis-server` is
installed, the echo round trip is also taken through Redis Streams on a private
server (`bench/redisref.py`), in turn with outheisfs's, as a reference.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

from .. import events
from ..models import new_id
from . import redisref

LINE = b"a benchmark message of forty bytes....\n"
# The echo agent of the round trip: the example Python agent, in short.
ECHO = """
import json, os
i, o = os.open("inbox", os.O_RDONLY), os.open("outbox", os.O_WRONLY)
while True:
    os.write(o, json.dumps({"body": json.loads(os.read(i, 1 << 21))["body"]}).encode() + b"\\n")
"""
# The same with explicit acks: it acks by id, then replies by `reply_to`.
ECHO_EXPLICIT = """
import json, os
i, o = os.open("inbox", os.O_RDONLY), os.open("outbox", os.O_WRONLY)
c = os.open("ctl", os.O_WRONLY)
while True:
    m = json.loads(os.read(i, 1 << 21))
    os.write(c, b"ack " + m["id"].encode() + b"\\n")
    os.write(o, json.dumps({"reply_to": m["id"], "body": m["body"]}).encode() + b"\\n")
"""


@dataclass
class Settings:
    runs: int
    writes: int  # figure 1 and 2, per run
    batch: int  # figure 3
    roundtrips: int
    agents: int
    log_events: int
    idle_readers: int
    idle_seconds: float
    quick: bool = False

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(3, 1000, 10_000, 200, 1000, 100_000, 100, 2.0, True)
        return cls(7, 5000, 10_000, 2000, 1000, 1_000_000, 100, 5.0)


@dataclass
class Figure:
    key: str
    what: str
    unit: str
    value: float | None  # None: not measured, `note` says why
    floor: float | None = None  # the floor's figure, where there is one
    ratio: float | None = None  # value / floor (or as the target reads)
    target: str = ""
    met: bool | None = None
    note: str = ""


# -- mounts --------------------------------------------------------------------------


@dataclass
class Mount:
    """A filesystem served by a child process at `mp`."""

    mp: Path
    pid: int
    ready: float = 0.0  # seconds `outheisfs mount` took to return

    def path(self, *parts: str) -> str:
        return str(self.mp.joinpath(*parts))


def _wait_mounted(mp: Path, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mp):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {mp} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mp} not mounted after {timeout} s")
        time.sleep(0.01)


@contextmanager
def floor_mount(root: Path) -> Iterator[Mount]:
    mp = root / "floor"
    mp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "outheisfs.bench.floor", str(mp)])
    try:
        _wait_mounted(mp, proc, 30)
        yield Mount(mp, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)


@contextmanager
def outheis_mount(root: Path, name: str, config: str, state: Path | None = None) -> Iterator[Mount]:
    """Mount outheisfs with `config`; the time to mount is in `.ready`."""
    mp = root / name
    mp.mkdir()
    state = state or root / f"{name}.state"
    cfg = root / f"{name}.toml"
    cfg.write_text(config)
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "outheisfs", "mount", str(mp), "--state", str(state)]
    r = subprocess.run([*cmd, "--config", str(cfg)], capture_output=True, text=True)
    ready = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"outheisfs mount failed: {r.stderr.strip()}")
    m = Mount(mp, int(os.getxattr(mp, "user.outheisfs.pid")), ready)
    try:
        yield m
    finally:
        subprocess.run(
            [sys.executable, "-m", "outheisfs", "umount", str(mp)], capture_output=True, check=False
        )


def bench_config(agents: int, durability: str = "process", echo: bool = False) -> str:
    lines = [f'durability = "{durability}"', "max_queue = 10000000"]
    for i in range(agents):
        lines.append(f"[agents.b{i}]")
    if echo:
        lines.append(f"[agents.echo]\ncommand = {json.dumps([sys.executable, '-c', ECHO])}")
        xecho = json.dumps([sys.executable, "-c", ECHO_EXPLICIT])
        lines.append(f'[agents.xecho]\ncommand = {xecho}\nack = "explicit"')
    return "\n".join(lines) + "\n"


# -- drivers: the same code drives the floor and outheisfs ---------------------------


def one_fd(path: str, n: int) -> float:
    """Messages/s: n writes of one message over one open file."""
    fd = os.open(path, os.O_WRONLY)
    t = time.perf_counter()
    for _ in range(n):
        os.write(fd, LINE)
    dt = time.perf_counter() - t
    os.close(fd)
    return n / dt


def open_write_close(path: str, n: int) -> float:
    """Messages/s of `echo msg > inbox`: open, write, close per message."""
    t = time.perf_counter()
    for _ in range(n):
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, LINE)
        os.close(fd)
    return n / (time.perf_counter() - t)


def one_big_write(path: str, n: int) -> float:
    """Messages/s of one write(2) holding n messages."""
    data = LINE * n
    fd = os.open(path, os.O_WRONLY)
    t = time.perf_counter()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    dt = time.perf_counter() - t
    os.close(fd)
    return n / dt


def concurrent(paths: list[str], n: int) -> float:
    """Messages/s of one thread per path, each writing n messages over its own file."""
    writers = len(paths)
    threads = [threading.Thread(target=one_fd, args=(path, n)) for path in paths]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return writers * n / (time.perf_counter() - t)


@contextmanager
def echo_roundtrips(m: Mount, echo: str = "echo") -> Iterator[Callable[[int], list[float]]]:
    """Yields `run(n)`: n times from writing to the echo agent's inbox until its
    answer is read (each read acks the answer before)."""
    to_echo = os.open(m.path("agents", echo, "inbox"), os.O_WRONLY)
    replies = os.open(m.path("agents", "user", "inbox"), os.O_RDONLY)

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            os.write(to_echo, LINE)
            os.read(replies, 1 << 16)
            times.append(time.perf_counter() - t)
        return times

    try:
        yield run
    finally:
        os.close(to_echo)
        os.close(replies)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of `pid`, in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def write_log(state: Path, count: int, agents: int) -> None:
    """A log of `count` events: messages sent, delivered and acknowledged."""
    state.mkdir(parents=True)
    ts = "2026-01-01T00:00:00.000000Z"
    with open(state / "events.jsonl", "w") as f:

        def put(seq: int, ev: dict[str, Any]) -> None:
            f.write(json.dumps({"seq": seq, "ts": ts, **ev}, separators=(",", ":")) + "\n")

        names = {f"b{i}": "normal" for i in range(agents)}
        put(1, events.mount("-", 0, "process", names))
        seq = 2
        while seq + 2 <= count:
            mid = new_id()
            to = f"b{seq % agents}"
            put(seq, events.message(mid, "user", to, "normal", f"event {seq}", None))
            put(seq + 1, events.deliver(to, mid, 1))
            put(seq + 2, events.ack(to, mid, to))
            seq += 3


# -- the run -------------------------------------------------------------------------


def alternate(runs: int, a: Callable[[], float], b: Callable[[], float]) -> tuple[float, float]:
    """Run a and b in turn, `runs` times each; their medians."""
    xs, ys = [], []
    for _ in range(runs):
        xs.append(a())
        ys.append(b())
    return statistics.median(xs), statistics.median(ys)


def interleave(
    runs: int, n: int, samplers: dict[str, Callable[[int], list[float]]]
) -> dict[str, list[float]]:
    """n samples from each sampler, taken in `runs` blocks in turn."""
    out: dict[str, list[float]] = {key: [] for key in samplers}
    for i in range(runs):
        size = n // runs + (i < n % runs)
        for key, run in samplers.items():
            out[key] += run(size)
    return out


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def rate(key: str, what: str, ours: float, floor: float, target: float | None) -> Figure:
    ratio = ours / floor
    return Figure(
        key,
        what,
        "msg/s",
        ours,
        floor,
        ratio,
        f">= {target}x floor" if target else "",
        None if target is None else ratio >= target,
    )


# The reference rows: Redis with an append-only file written (not synced) before
# each reply, as `process` durability does; and Redis in memory only.
REDIS = {
    "redis_roundtrip": (True, "echo round trip via Redis Streams p{p}"),
    "redis_memory_roundtrip": (False, "echo round trip via Redis, memory only p{p}"),
}


def roundtrip_figures(
    key: str,
    what: str,
    times: list[float] | None,
    floor_write: float,
    *,
    targets: bool = False,
    note: str = "",
) -> list[Figure]:
    """p50 and p99 of `times` (seconds) beside one floor write (None: `note` says why).

    `what` holds `{p}` where the percentile goes; `targets`: outheisfs's (performance.md)."""
    figs = []
    for p, target in ((50, 6.0), (99, 25.0)):
        f = Figure(f"{key}_p{p}", what.format(p=p), "ms", None, note=note)
        if times is not None:
            v = percentile(times, p)
            f.value, f.floor, f.ratio = v * 1e3, floor_write * 1e3, v / floor_write
            if targets:
                f.target, f.met = f"<= {target}x floor", f.ratio <= target
        figs.append(f)
    return figs


# outheisfs's round trip beside Redis Streams with the same persistence: targets.
BESIDE_REDIS = {50: 1.5, 99: 2.0}


def beside_redis(ours: list[float], redis: list[float] | None) -> list[Figure]:
    """outheisfs's round trip p50 and p99 over Redis Streams' (AOF, no fsync), both
    taken in the same run; None where redis-server is not installed."""
    figs = []
    for p, target in BESIDE_REDIS.items():
        f = Figure(
            f"roundtrip_vs_redis_p{p}",
            f"echo round trip p{p} beside Redis Streams",
            "ms",
            None,
            target=f"<= {target}x Redis",
            note="" if redis is not None else "redis-server not installed",
        )
        if redis is not None:
            f.value, f.floor = percentile(ours, p) * 1e3, percentile(redis, p) * 1e3
            f.ratio = f.value / f.floor
            f.met = f.ratio <= target
        figs.append(f)
    return figs


def measure(s: Settings, progress: Callable[[str], None]) -> list[Figure]:
    figs: list[Figure] = []
    root = Path(tempfile.mkdtemp(prefix="outheisfs-bench-"))
    try:
        with (
            floor_mount(root) as fl,
            outheis_mount(root, "small", bench_config(10, echo=True)) as m,
        ):
            q = fl.path("queue")
            inbox = m.path("agents", "b0", "inbox")
            progress("1/6 one open file, one message per write")
            f1, o1 = alternate(s.runs, lambda: one_fd(q, s.writes), lambda: one_fd(inbox, s.writes))
            figs.append(rate("one_fd", "one open file, one message per write", o1, f1, 0.75))
            progress("2/6 open, write, close per message")
            f2, o2 = alternate(
                s.runs,
                lambda: open_write_close(q, s.writes),
                lambda: open_write_close(inbox, s.writes),
            )
            figs.append(rate("open_write_close", "open, write, close per message", o2, f2, 0.65))
            progress("3/6 one write of 10,000 messages")
            f3, o3 = alternate(
                s.runs, lambda: one_big_write(q, s.batch), lambda: one_big_write(inbox, s.batch)
            )
            fig3 = rate("big_write", f"one write of {s.batch:,} messages", o3, f3, None)
            fig3.target, fig3.met = ">= 200,000 msg/s", o3 >= 200_000
            figs.append(fig3)
            redis = shutil.which("redis-server") is not None
            progress("4/6 echo round trip" + (", and through Redis Streams" if redis else ""))
            _wait_running(m, "echo")
            _wait_running(m, "xecho")
            with ExitStack() as stack:
                samplers = {"roundtrip": stack.enter_context(echo_roundtrips(m))}
                samplers["explicit"] = stack.enter_context(echo_roundtrips(m, "xecho"))
                if redis:
                    for key, (aof, _) in REDIS.items():
                        redis_rt = redisref.echo_roundtrips(root / key, aof)
                        samplers[key] = stack.enter_context(redis_rt)
                times = interleave(s.runs, s.roundtrips, samplers)
            floor_write = 1 / f1
            figs += roundtrip_figures(
                "roundtrip",
                "echo round trip p{p} (floor: one write)",
                times["roundtrip"],
                floor_write,
                targets=True,
            )
            explicit = roundtrip_figures(
                "explicit_roundtrip",
                "echo round trip, explicit acks p{p}",
                times["explicit"],
                floor_write,
            )
            for f, auto in zip(explicit, figs[-2:], strict=True):
                assert f.value is not None and auto.value is not None
                f.note = f"{f.value / auto.value:.2f}x the auto-ack round trip"
            figs += explicit
            for key, (_, what) in REDIS.items():
                note = "" if redis else "redis-server not installed"
                figs += roundtrip_figures(key, what, times.get(key), floor_write, note=note)
            figs += beside_redis(times["roundtrip"], times.get("redis_roundtrip"))
            progress("5/6 idle with blocked readers")
            figs.append(idle_cpu(m, s))
            progress(f"6/6 10 against {s.agents:,} agents")
            with outheis_mount(root, "many", bench_config(s.agents)) as many:
                far = many.path("agents", f"b{s.agents - 1}", "inbox")
                near = m.path("agents", "b1", "inbox")
                drivers: list[tuple[str, Callable[[str, int], float]]] = [
                    ("one open file", one_fd),
                    ("open, write, close", open_write_close),
                ]
                for what, fn in drivers:
                    few, lots = alternate(
                        s.runs, partial(fn, near, s.writes), partial(fn, far, s.writes)
                    )
                    cost = few / lots  # time per message with many agents over 10
                    figs.append(
                        Figure(
                            f"agents_{fn.__name__}",
                            f"{what}: {s.agents:,} agents (ratio: cost over 10)",
                            "msg/s",
                            lots,
                            few,
                            cost,
                            "<= 1.10",
                            cost <= 1.10,
                        )
                    )
        with outheis_mount(root, "disk", bench_config(10, "disk")) as m:
            progress("durability = disk")
            inbox = m.path("agents", "b0", "inbox")
            one = statistics.median(one_fd(inbox, s.writes // 5) for _ in range(s.runs))
            figs.append(Figure("disk_one_fd", "disk: one writer", "msg/s", one))
            four = statistics.median(concurrent([inbox] * 4, s.writes // 5) for _ in range(s.runs))
            figs.append(Figure("disk_four_writers", "disk: four writers, one inbox", "msg/s", four))
            # The kernel lets one direct-I/O write at a time into a file: writers
            # of one inbox take turns, writers of four inboxes share fsyncs.
            inboxes = [m.path("agents", f"b{i}", "inbox") for i in range(4)]
            spread = statistics.median(concurrent(inboxes, s.writes // 5) for _ in range(s.runs))
            figs.append(
                Figure("disk_four_inboxes", "disk: four writers, four inboxes", "msg/s", spread)
            )
        progress(f"log of {s.log_events:,} events")
        figs += log_figures(root, s.log_events)
        figs += vault_figures(root, s.quick, progress)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figs


def log_figures(root: Path, events: int) -> list[Figure]:
    """Start-up over a long log: without a checkpoint, and from one (bench.startup)."""
    from . import startup

    r = startup.measure(root, events)
    ready, peak = r["ready"], r["peak_mb"]
    copies = r["stream_bytes"] / max(1, r["log_bytes"])
    return [
        Figure(
            "log_first_ready",
            f"first mount, log of {events:,} events (full replay)",
            "s",
            r["first_ready"],
        ),
        Figure(
            "log_ready",
            "mount after a clean unmount (from its checkpoint)",
            "s",
            ready,
            target="<= 1 s",
            met=ready <= 1,
            note=f"{r['replayed']} events read; in the server {r['load_s'] + r['read_s']:.2f} s;"
            f" over an empty log {r['empty_ready']:.2f} s",
        ),
        Figure(
            "log_memory",
            "server memory (peak) after that mount",
            "MB",
            peak,
            target="<= 100 MB",
            met=peak <= 100,
        ),
        Figure(
            "log_copies",
            "agents' log and outbox files, bytes per byte of log",
            "x",
            copies,
            note=f"log {r['log_bytes'] / 1e6:.0f} MB, "
            f"checkpoints {r['checkpoint_bytes'] / 1e6:.1f} MB",
        ),
    ]


def vault_figures(root: Path, quick: bool, progress: Callable[[str], None]) -> list[Figure]:
    """The vault's rows, beside a passthrough of the same folder."""
    from . import vaultbench

    figs = []
    for row in vaultbench.measure(root, quick, progress, outheis_mount):
        ratio = row.ours / row.floor
        fig = Figure(row.key, row.what, row.unit, row.ours, row.floor, ratio)
        if row.target is not None:
            fig.target, fig.met = f">= {row.target}x floor", ratio >= row.target
        figs.append(fig)
    return figs


def _wait_running(m: Mount, name: str) -> None:
    deadline = time.monotonic() + 30
    while "state running" not in Path(m.path("agents", name, "ctl")).read_text():
        if time.monotonic() > deadline:
            raise RuntimeError(f"agent {name} did not start")
        time.sleep(0.05)


def idle_cpu(m: Mount, s: Settings) -> Figure:
    """Share of one core the server uses while readers wait on empty inboxes."""
    readers = []
    for i in range(s.idle_readers):
        name = f"idle{i}"
        os.mkdir(m.path("agents", name))
        readers.append(
            subprocess.Popen(["cat", m.path("agents", name, "inbox")], stdout=subprocess.DEVNULL)
        )
    try:
        time.sleep(1.0)
        c0, t0 = cpu_seconds(m.pid), time.monotonic()
        time.sleep(s.idle_seconds)
        share = (cpu_seconds(m.pid) - c0) / (time.monotonic() - t0)
    finally:
        for p in readers:
            p.kill()
        for p in readers:
            p.wait()
    return Figure(
        "idle_cpu",
        f"idle server, {s.idle_readers} blocked readers",
        "% core",
        share * 100,
        target="< 1 %",
        met=share < 0.01,
    )


def _version(dist: str) -> str:
    """An installed distribution's version (not imported: the bench runs apart)."""
    try:
        return dist_version(dist)
    except PackageNotFoundError:
        return "?"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "pyfuse3": _version("pyfuse3"),
        "load": os.getloadavg()[0],
        "redis": redisref.version(),  # None: not installed
    }


def render(figs: list[Figure], info: dict[str, Any], quick: bool) -> str:
    out = [
        f"outheisfs bench{' --quick' if quick else ''}: Linux {info['kernel']}, "
        f"{info['cpus']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"pyfuse3 {info['pyfuse3']}"
        + (f", redis-server {info['redis']}" if info["redis"] else "")
        + f", load {info['load']:.2f}",
        "",
        f"{'figure':48} {'measured':>14} {'floor':>12} {'ratio':>7}  target",
    ]
    for f in figs:
        if f.value is None:
            out.append(f"{f.what:48} {f.note}")
            continue
        value = f"{f.value:,.0f} {f.unit}" if f.value >= 100 else f"{f.value:.2f} {f.unit}"
        floor = (
            "" if f.floor is None else (f"{f.floor:,.0f}" if f.floor >= 100 else f"{f.floor:.3f}")
        )
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        verdict = "" if f.met is None else ("met" if f.met else "NOT met")
        line = f"{f.what:48} {value:>14} {floor:>12} {ratio:>7}  {f.target} {verdict}"
        out.append((line.rstrip() + ("  (" + f.note + ")" if f.note else "")).rstrip())
    return "\n".join(out)


def main(quick: bool, as_json: bool) -> int:
    s = Settings.make(quick)

    from ..progress import Progress

    line = Progress("bench")  # on a terminal only
    info = machine()
    try:
        figs = measure(s, line.show)
    finally:
        line.done()
    if as_json:
        print(json.dumps({"machine": info, "quick": quick, "figures": [asdict(f) for f in figs]}))
    else:
        print(render(figs, info, quick))
    return 0
