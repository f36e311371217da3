"""Real-mount tests: `outheisfs` runs as a subprocess, never in-process.

Every test in this folder gets the `mount` marker from here, so that
`pytest -m "not mount"` is the fast tier (tests/unit). Every server started
here is stopped and unmounted afterwards, whatever the test did to it
(`outheisfs umount`, then `fusermount3 -u -z`, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PY = sys.executable
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder `mount` (a conftest sees the whole session's items)."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.mount)


def outheisfs(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "outheisfs", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def sh(
    script: str, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a bash script the way a user would type it."""
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def wait_for(pred: Any, timeout: float = 5.0, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {pred}")
        time.sleep(interval)


def parked(pid: int) -> bool:
    """The process is asleep in a request to the mount (the server holds it)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state in ("S", "D") and wchan not in ("", "0")


def read_nonblock(server: Server, name: str) -> bytes | None:
    """What one non-blocking read of NAME's inbox gives; None if it is empty (EAGAIN)."""
    fd = os.open(server.agent(name, "inbox"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, 1 << 21)
    except BlockingIOError:
        return None
    finally:
        os.close(fd)


def read_one(server: Server, name: str) -> dict[str, Any]:
    """Take one message the way users do: `head -n1 inbox`, which acks by exiting 0."""
    r = sh(f"head -n1 {server.agent(name, 'inbox')}", timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def take(server: Server, name: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Read `n` messages from one open inbox, waiting with poll; closing acks them."""
    out: list[dict[str, Any]] = []
    fd = os.open(server.agent(name, "inbox"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(out)} of {n} messages for {name} in {timeout} s")
            if not poller.poll(left * 1000):
                continue
            try:
                out.append(json.loads(os.read(fd, 1 << 21)))
            except BlockingIOError:
                continue
    finally:
        os.close(fd)
    return out


class Server:
    """One outheisfs mount in a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mp = root / "mnt"
        self.state = root / "state"
        self.config: Path | None = None
        self.mp.mkdir(exist_ok=True)
        self.pids: list[int] = []

    def write_config(self, text: str) -> Path:
        self.config = self.root / "outheis.toml"
        self.config.write_text(text)
        return self.config

    def mount(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        args = ["mount", str(self.mp), "--state", str(self.state), *extra]
        if self.config is not None:
            args += ["--config", str(self.config)]
        r = outheisfs(*args, cwd=self.root)
        if check:
            assert r.returncode == 0, r.stderr
            self.pids.append(self.pid)
        return r

    @property
    def pid(self) -> int:
        return int(os.getxattr(self.mp, "user.outheisfs.pid"))

    def umount(self) -> subprocess.CompletedProcess[str]:
        return outheisfs("umount", str(self.mp), cwd=self.root)

    def p(self, *parts: str) -> Path:
        return self.mp.joinpath(*parts)

    def agent(self, name: str, file: str) -> Path:
        return self.mp / "agents" / name / file

    def send(self, to: str, text: str) -> None:
        with open(self.agent(to, "inbox"), "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        """The event log, read from the state folder (works mounted or not)."""
        path = self.state / "events.jsonl"
        out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [e for e in out if type_ is None or e["type"] == type_]

    def status(self, name: str) -> dict[str, str]:
        text = self.agent(name, "ctl").read_text()
        return dict(line.split(" ", 1) for line in text.splitlines())

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        pid = self.pids[-1]
        wait_for(lambda: not _alive(pid), timeout=10)

    def cleanup(self) -> None:
        if os.path.ismount(self.mp) or _stale(self.mp):
            try:
                self.umount()
            except subprocess.TimeoutExpired:
                pass
        if os.path.ismount(self.mp) or _stale(self.mp):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mp)], capture_output=True)
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _stale(mp: Path) -> bool:
    try:
        os.stat(mp)
        return False
    except OSError:
        return True


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.fail("FUSE is not usable here: install fuse3 (see README)")
    s = Server(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture
def mounted(server: Server) -> Server:
    """A server mounted with agents `echo` and `worker` (no processes)."""
    server.write_config(
        """
[agents.echo]
[agents.worker]
priority = "background"
"""
    )
    server.mount()
    return server
