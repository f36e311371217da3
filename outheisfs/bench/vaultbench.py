"""The vault's rows of `outheisfs bench`, beside a passthrough of the same folder.

outheisfs is mounted with one vault domain; `passthrough.py` serves its state
folder at a second mountpoint, so that the same backing files are reached by
paths of the same depth (MP/vault/bench/... on both). The same drivers run on
both, in turn, each run in a folder of its own; the medians are reported with
their ratio to the passthrough's. The bench process is the operator, so these
rows measure the vault with the cheapest view; what an agent's view adds is in
docs/performance.md.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20
CONFIG = '[agents.owner]\n[vault]\nbench = "owner"\n'


@dataclass
class VaultSettings:
    runs: int
    files: int  # create/stat/unlink and rename, per run
    listing: int  # entries of the folder listed
    mib: int  # MiB written and read in 1 MiB requests, per run

    @classmethod
    def make(cls, quick: bool) -> VaultSettings:
        if quick:
            return cls(3, 300, 10_000, 16)
        return cls(5, 2000, 10_000, 64)


# -- drivers: the same code drives the passthrough and the vault ----------------------


def create_stat_unlink(d: str, n: int) -> float:
    """Files/s: create (open O_CREAT, close), stat, unlink, one file at a time."""
    names = [os.path.join(d, f"f{i}") for i in range(n)]
    t = time.perf_counter()
    for name in names:
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
        os.stat(name)
        os.unlink(name)
    return n / (time.perf_counter() - t)


def renames(d: str, n: int) -> float:
    """Renames/s of one file back and forth in one folder."""
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    os.close(os.open(a, os.O_CREAT | os.O_WRONLY, 0o644))
    t = time.perf_counter()
    for i in range(n):
        if i % 2:
            os.rename(b, a)
        else:
            os.rename(a, b)
    return n / (time.perf_counter() - t)


def list_folder(d: str) -> float:
    """Entries/s of one listing with each entry's type, as `ls -f` or `find` read it."""
    t = time.perf_counter()
    with os.scandir(d) as it:
        n = sum(1 for e in it if e.is_file(follow_symlinks=False))
    return n / (time.perf_counter() - t)


def seq_write(path: str, mib: int) -> float:
    """MiB/s written in 1 MiB writes, fsync excluded."""
    block = os.urandom(MIB)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    t = time.perf_counter()
    for _ in range(mib):
        os.write(fd, block)
    dt = time.perf_counter() - t
    os.close(fd)
    return mib / dt


def seq_read(path: str) -> float:
    """MiB/s read in 1 MiB reads (the open drops the page cache of the file)."""
    fd = os.open(path, os.O_RDONLY)
    n = 0
    t = time.perf_counter()
    while chunk := os.read(fd, MIB):
        n += len(chunk)
    dt = time.perf_counter() - t
    os.close(fd)
    return n / MIB / dt


# -- mounts -----------------------------------------------------------------------------


@contextmanager
def passthrough_mount(backing: Path, mp: Path) -> Iterator[Path]:
    mp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "outheisfs.bench.passthrough", str(backing), str(mp)]
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mp):
            if proc.poll() is not None:
                raise RuntimeError(f"passthrough exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mp} not mounted after 30 s")
            time.sleep(0.01)
        yield mp
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)


class Sides:
    """Fresh folders, one per run, under the vault and the passthrough: the same
    backing folder seen through both."""

    def __init__(self, vault: Path, floor: Path) -> None:
        self.vault, self.floor = vault, floor
        self.n = 0

    def fresh(self) -> tuple[str, str]:
        self.n += 1
        v, f = self.vault / f"v{self.n}", self.floor / f"f{self.n}"
        v.mkdir()
        f.mkdir()
        return str(v), str(f)


def alternate(
    runs: int, floor: Callable[[], float], ours: Callable[[], float]
) -> tuple[float, float]:
    fs, os_ = [], []
    for _ in range(runs):
        fs.append(floor())
        os_.append(ours())
    return statistics.median(fs), statistics.median(os_)


@dataclass
class Row:
    key: str
    what: str
    unit: str
    ours: float
    floor: float
    target: float | None  # the ratio to reach; None: shown, not a goal


AGENT_DRIVER = """
import sys
from outheisfs.bench.vaultbench import create_stat_unlink, list_folder
what, d, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
print(create_stat_unlink(d, n) if what == "files" else list_folder(d))
"""


def as_agent(mp: Path, agent: str, what: str, d: str, n: int) -> float:
    """A driver run by a process acting as `agent` (its figure only, not its start)."""
    cmd = [sys.executable, "-m", "outheisfs", "run", agent, "--mount", str(mp), "--",
           sys.executable, "-c", AGENT_DRIVER, what, d, str(n)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(r.stdout)


MountFn = Callable[[Path, str, str, Path], AbstractContextManager[Any]]


def measure(
    root: Path, quick: bool, progress: Callable[[str], None], outheis_mount: MountFn
) -> list[Row]:
    """The rows; `outheis_mount(root, name, config, state)` mounts outheisfs (the
    bench's own, passed in: this module sits below the bench)."""
    s = VaultSettings.make(quick)
    rows = []
    state = root / "vault.state"
    with outheis_mount(root, "vaultfs", CONFIG, state) as m:
        backing = state / "vault" / "bench"
        with passthrough_mount(state, root / "passthrough") as pt:
            sides = Sides(m.mp / "vault" / "bench", pt / "vault" / "bench")

            def pair(fn: Callable[[str], float]) -> tuple[float, float]:
                dirs: list[tuple[str, str]] = []

                def floor() -> float:
                    dirs.append(sides.fresh())
                    return fn(dirs[-1][1])

                return alternate(s.runs, floor, lambda: fn(dirs[-1][0]))

            progress(f"vault 1/5 create, stat, unlink ({s.files:,} files)")
            f, o = pair(lambda d: create_stat_unlink(d, s.files))
            rows.append(Row("vault_create_stat_unlink", "vault: create, stat, unlink",
                            "files/s", o, f, 0.8))  # fmt: skip
            progress(f"vault 2/5 rename ({s.files:,} times)")
            f, o = pair(lambda d: renames(d, s.files))
            rows.append(Row("vault_rename", "vault: rename", "renames/s", o, f, 0.8))
            progress(f"vault 3/5 listing of {s.listing:,} entries")
            big = backing / "listing"
            big.mkdir()
            for i in range(s.listing):
                (big / f"entry{i:05d}").touch()
            listing = m.mp / "vault" / "bench" / "listing"
            f, o = alternate(
                s.runs,
                lambda: list_folder(str(pt / "vault" / "bench" / "listing")),
                lambda: list_folder(str(listing)),
            )
            what = f"vault: listing of {s.listing:,} entries"
            rows.append(Row("vault_readdir", what, "entries/s", o, f, 0.8))
            progress(f"vault 4/5 sequential write and read, {s.mib} MiB in 1 MiB requests")
            fw, ow = pair(lambda d: seq_write(os.path.join(d, "big"), s.mib))
            rows.append(Row("vault_seq_write", "vault: sequential write, 1 MiB writes",
                            "MiB/s", ow, fw, 0.9))  # fmt: skip

            def write_read(d: str) -> float:
                seq_write(os.path.join(d, "big"), s.mib)
                return seq_read(os.path.join(d, "big"))

            fr, or_ = pair(write_read)
            rows.append(Row("vault_seq_read", "vault: sequential read, 1 MiB reads",
                            "MiB/s", or_, fr, 0.9))  # fmt: skip
            # What a view costs: the domain's owner agent against the operator,
            # whose view needs no check.
            progress("vault 5/5 the same as the domain's owner agent")
            user_dirs: list[str] = []

            def operator() -> float:
                user_dirs.append(sides.fresh()[0])
                return create_stat_unlink(user_dirs[-1], s.files)

            u, a = alternate(
                s.runs, operator, lambda: as_agent(m.mp, "owner", "files", user_dirs[-1], s.files)
            )
            rows.append(Row("vault_agent_create_stat_unlink",
                            "vault as agent: create, stat, unlink (op.)",
                            "files/s", a, u, None))  # fmt: skip
            u, a = alternate(
                s.runs,
                lambda: list_folder(str(listing)),
                lambda: as_agent(m.mp, "owner", "list", str(listing), 0),
            )
            rows.append(Row("vault_agent_readdir",
                            "vault as agent: listing (floor: operator)",
                            "entries/s", a, u, None))  # fmt: skip
    return rows
