"""The code stays clean: ruff (lint and format) and mypy --strict pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check() -> None:
    r = run(str(BIN / "ruff"), "check", "outheisfs", "tests", "examples")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format() -> None:
    r = run(str(BIN / "ruff"), "format", "--check", "outheisfs", "tests", "examples")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict() -> None:
    r = run(str(BIN / "mypy"))
    assert r.returncode == 0, r.stdout + r.stderr
