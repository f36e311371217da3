"""`outheisfs bench --quick --json` runs and reports every figure [SPEC §9].

Performance itself is read from the benchmark's output, not asserted here."""

from __future__ import annotations

import json
import os
import pstats
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from pytest import approx

from outheisfs.bench import (
    BESIDE_REDIS,
    REDIS,
    beside_redis,
    hops,
    interleave,
    render,
    roundtrip_figures,
)

from .conftest import PY, Server

FLOORED = {"one_fd", "open_write_close", "big_write", "roundtrip_p50", "roundtrip_p99"}
FLOORED |= {"explicit_roundtrip_p50", "explicit_roundtrip_p99"}
# The vault beside a passthrough of the same backing folder.
FLOORED |= {
    "vault_create_stat_unlink",
    "vault_rename",
    "vault_readdir",
    "vault_seq_write",
    "vault_seq_read",
}
EXPECTED = FLOORED | {
    "idle_cpu",
    "agents_one_fd",
    "agents_open_write_close",
    "vault_agent_create_stat_unlink",
    "vault_agent_readdir",
    "disk_one_fd",
    "disk_four_writers",
    "disk_four_inboxes",
    "log_first_ready",
    "log_ready",
    "log_memory",
    "log_copies",
}
# The Redis Streams reference rows: measured where redis-server is installed.
REFERENCE = {f"{key}_p{p}" for key in REDIS for p in (50, 99)}
# outheisfs's round trip over Redis's, measured in the same run, with targets.
VS_REDIS = {f"roundtrip_vs_redis_p{p}" for p in BESIDE_REDIS}


def mounts_below(top: Path) -> set[str]:
    with open("/proc/self/mounts") as m:
        return {p for line in m if (p := line.split()[1]).startswith(f"{top}/")}


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary folder of its own with a short path (unix sockets live in it)."""
    top = Path(tempfile.mkdtemp(prefix="ob-"))
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_bench_quick_json_reports_every_figure(short_tmp: Path) -> None:
    # Its own temporary folder: other benches may be running on this machine.
    r = subprocess.run(
        [PY, "-m", "outheisfs", "bench", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TMPDIR": str(short_tmp)},
    )
    assert r.returncode == 0, r.stderr
    assert mounts_below(short_tmp) == set(), "the bench left a mount behind"
    out = json.loads(r.stdout)
    assert out["quick"] is True
    assert out["machine"]["cpus"] >= 1 and out["machine"]["kernel"]
    figs = {f["key"]: f for f in out["figures"]}
    assert set(figs) >= EXPECTED | REFERENCE | VS_REDIS
    installed = shutil.which("redis-server") is not None
    assert bool(out["machine"]["redis"]) == installed
    for key, f in figs.items():
        if key in REFERENCE | VS_REDIS and not installed:
            assert f["value"] is None and f["ratio"] is None, key
            assert f["note"] == "redis-server not installed", key
            continue
        assert f["value"] > 0, key
        if key in FLOORED | REFERENCE | VS_REDIS:
            assert f["floor"] > 0, key
            assert abs(f["ratio"] - f["value"] / f["floor"]) < 1e-6 * f["ratio"], key
        if key in REFERENCE:
            assert f["floor"] == figs["roundtrip_p50"]["floor"], key  # the same floor write
            assert f["target"] == "" and f["met"] is None, key  # a reference, not a goal
        if f["target"]:
            assert isinstance(f["met"], bool), key
    assert figs["roundtrip_p50"]["value"] <= figs["roundtrip_p99"]["value"]
    assert "x the auto-ack round trip" in figs["explicit_roundtrip_p50"]["note"]
    if installed:
        assert figs["redis_roundtrip_p50"]["value"] <= figs["redis_roundtrip_p99"]["value"]
        for p in BESIDE_REDIS:
            vs = figs[f"roundtrip_vs_redis_p{p}"]
            assert vs["value"] == approx(figs[f"roundtrip_p{p}"]["value"]), p
            assert vs["floor"] == approx(figs[f"redis_roundtrip_p{p}"]["value"]), p
            assert isinstance(vs["met"], bool), p


def test_the_round_trip_beside_redis_is_a_ratio_of_percentiles() -> None:
    ours = [k * 1e-4 for k in range(1, 101)]  # 0.1 ms .. 10 ms
    redis = [k * 1e-5 for k in range(1, 101)]
    p50, p99 = beside_redis(ours, redis)
    assert (p50.value, p50.floor, p50.ratio) == approx((5.1, 0.51, 10.0))
    assert (p99.value, p99.floor) == approx((10.0, 1.0))
    assert p50.met is False and p50.target == "<= 1.5x Redis"
    assert beside_redis(redis, redis)[0].met is True
    absent = beside_redis(ours, None)
    assert [f.value for f in absent] == [None, None]
    assert absent[0].note == "redis-server not installed"


def test_a_row_not_measured_says_why() -> None:
    figs = roundtrip_figures("redis_roundtrip", "via Redis p{p}", None, 0.03e-3, note="absent")
    assert [asdict(f)["value"] for f in figs] == [None, None]
    assert [f.key for f in figs] == ["redis_roundtrip_p50", "redis_roundtrip_p99"]
    info = {"kernel": "6", "cpus": 2, "cpu": "x", "python": "3", "pyfuse3": "3", "load": 0.0}
    text = render(figs, {**info, "redis": None}, quick=True)
    assert text.splitlines()[-2:] == [
        f"{'via Redis p50':48} absent",
        f"{'via Redis p99':48} absent",
    ]
    assert "redis-server" not in text.splitlines()[0]


def test_round_trip_figures_are_percentiles_beside_one_floor_write() -> None:
    times = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    p50, p99 = roundtrip_figures("roundtrip", "rt p{p}", times, 0.01, targets=True)
    assert (p50.what, p50.value, p50.floor) == ("rt p50", 51.0, 10.0)
    assert p50.ratio == approx(5.1)
    assert (p50.target, p50.met) == ("<= 6.0x floor", True)
    assert (p99.value, p99.met) == (100.0, True)
    assert p99.ratio == approx(10.0)
    plain = roundtrip_figures("redis_roundtrip", "r p{p}", times, 0.01)
    assert [(f.target, f.met) for f in plain] == [("", None), ("", None)]


def test_interleave_takes_blocks_in_turn() -> None:
    calls: list[tuple[str, int]] = []

    def sampler(name: str) -> Callable[[int], list[float]]:
        def run(n: int) -> list[float]:
            calls.append((name, n))
            return [1.0] * n

        return run

    out = interleave(3, 10, {"a": sampler("a"), "b": sampler("b")})
    assert calls == [("a", 4), ("b", 4), ("a", 3), ("b", 3), ("a", 3), ("b", 3)]
    assert len(out["a"]) == len(out["b"]) == 10


def test_the_passthrough_floor_serves_its_folder_as_it_is(tmp_path: Path) -> None:
    from outheisfs.bench.vaultbench import (
        create_stat_unlink,
        list_folder,
        passthrough_mount,
        renames,
    )

    backing = tmp_path / "backing"
    (backing / "d").mkdir(parents=True)
    (backing / "d" / "old").write_text("old")
    with passthrough_mount(backing, tmp_path / "pt") as pt:
        assert (pt / "d" / "old").read_text() == "old"
        (pt / "d" / "new").write_text("new")
        os.rename(pt / "d" / "new", pt / "d" / "moved")
        assert sorted(os.listdir(pt / "d")) == ["moved", "old"]
        assert create_stat_unlink(str(pt / "d"), 20) > 0
        assert renames(str(pt / "d"), 20) > 0
        assert list_folder(str(pt / "d")) > 0
        assert os.statvfs(pt).f_blocks == os.statvfs(backing).f_blocks
    assert (backing / "d" / "moved").read_text() == "new"
    assert not os.path.ismount(tmp_path / "pt")


def test_hops_cut_a_round_trip_into_stamped_hops(short_tmp: Path) -> None:
    r = subprocess.run(
        [PY, "-m", "outheisfs.bench.hops", "40"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(short_tmp)},
    )
    assert r.returncode == 0, r.stderr
    assert mounts_below(short_tmp) == set(), "the hop timing left a mount behind"
    assert "echo round trip, median of" in r.stdout
    for name in hops.HOPS:
        assert name in r.stdout, name
    assert "of which in the server" in r.stdout


def test_hops_match_the_server_stamps_to_each_round_trip() -> None:
    # One round trip at 1000 ns steps, and stamps of requests of other round trips
    # (echo's next read, still waiting) that must not be taken for this one's.
    t = [1000 * k for k in range(13)]
    driver = [(t[0], t[3], t[12], {"got": t[6], "sends": t[7]})]
    stamps: list[list[Any]] = [
        ["write", 1, t[1], 0, t[2]],  # into echo's inbox
        ["read", 2, t[0] - 500, t[3] + 100, t[5]],  # echo's read, woken
        ["write", 3, t[8], 0, t[9]],  # echo's outbox
        ["read", 4, t[4], t[10], t[11]],  # the driver's read
        ["read", 2, t[9] + 50, 0, 10**9],  # echo's next read: answered much later
    ]
    r = hops.breakdown(driver, stamps)
    assert r["round_trips"] == 1 and r["total_us"] == approx(12.0)
    got = list(r["hops_us"].values())
    assert got == approx([1.0, 1.0, 1.1, 1.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert r["server_us"] == approx(1.0 + 1.1 + 1.9 + 1.0 + 1.0 + 1.0)
    assert r["waited"] == (1.0, 1.0)


def test_the_server_writes_its_profile_when_asked(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = tmp_path / "server.prof"
    monkeypatch.setenv("OUTHEISFS_PROFILE", str(out))
    server.mount()
    server.send("user", "profiled")
    assert server.umount().returncode == 0
    stats = pstats.Stats(str(out))
    handlers = {(Path(f).name, name) for f, _, name in stats.stats}  # type: ignore[attr-defined]
    assert ("ops.py", "write") in handlers, "the write handler ran under the profiler"
