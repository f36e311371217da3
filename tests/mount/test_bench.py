"""`outheisfs bench --quick --json` runs and reports every figure [SPEC §9].

Performance itself is read from the benchmark's output, not asserted here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from pytest import approx

from outheisfs.bench import REDIS, interleave, render, roundtrip_figures

from .conftest import PY

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
    assert set(figs) >= EXPECTED | REFERENCE
    installed = shutil.which("redis-server") is not None
    assert bool(out["machine"]["redis"]) == installed
    for key, f in figs.items():
        if key in REFERENCE and not installed:
            assert f["value"] is None and f["ratio"] is None, key
            assert f["note"] == "redis-server not installed", key
            continue
        assert f["value"] > 0, key
        if key in FLOORED | REFERENCE:
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
