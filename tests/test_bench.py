"""`outheisfs bench --quick --json` runs and reports every figure [SPEC §9].

Performance itself is read from the benchmark's output, not asserted here."""

from __future__ import annotations

import json

from .conftest import outheisfs

FLOORED = {"one_fd", "open_write_close", "big_write", "roundtrip_p50", "roundtrip_p99"}
EXPECTED = FLOORED | {
    "idle_cpu",
    "agents_one_fd",
    "agents_open_write_close",
    "disk_one_fd",
    "disk_four_writers",
    "log_ready",
    "log_memory",
}


def test_bench_quick_json_reports_every_figure() -> None:
    r = outheisfs("bench", "--quick", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["quick"] is True
    assert out["machine"]["cpus"] >= 1 and out["machine"]["kernel"]
    figs = {f["key"]: f for f in out["figures"]}
    assert set(figs) >= EXPECTED
    for key, f in figs.items():
        assert f["value"] > 0, key
        if key in FLOORED:
            assert f["floor"] > 0, key
            assert abs(f["ratio"] - f["value"] / f["floor"]) < 1e-6 * f["ratio"], key
        if f["target"]:
            assert isinstance(f["met"], bool), key


def test_bench_leaves_nothing_mounted() -> None:
    with open("/proc/self/mounts") as m:
        assert "outheisfs-bench-" not in m.read()
