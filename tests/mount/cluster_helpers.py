"""Helpers of the cluster tests: a TCP proxy, and a host in a process of its own.

The proxy stands between a client and one server so that a test can cut the
client off the engine and let it back, on loopback only.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import trio

from outheisfs.cluster.local import free_ports

HOST_SCRIPT = Path(__file__).parent / "agents" / "cluster_host.py"


class Proxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target` until stopped; can start again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_ports(1)[0]
        self._scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def _pipe(self, a: trio.SocketStream, b: trio.SocketStream) -> None:
        try:
            while data := await a.receive_some(65536):
                await b.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                server = await trio.open_tcp_stream("127.0.0.1", self.target)
            except OSError:
                return
            async with server, trio.open_nursery() as n:
                n.start_soon(self._pipe, client, server)
                await self._pipe(server, client)
                n.cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            async with trio.open_nursery() as n:
                task_status.started()
                await n.start(trio.serve_listeners, self._handle, listeners)

    def stop(self) -> None:
        """Close the listener and every connection through it."""
        if self._scope is not None:
            self._scope.cancel()


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    f = {n: folder / f"{n}.pem" for n in ("ca", "ca-key", "server", "server-key", "client")}
    f["client-key"] = folder / "client-key.pem"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    days = ["-days", "2"]
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(f["ca-key"]),
        "-out", str(f["ca"]), "-subj", "/CN=test-ca", *days)  # fmt: skip
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(f[f"{who}-key"]),
            "-out", f"{who}.csr", "-subj", f"/CN={who}")  # fmt: skip
        extfile = folder / f"{who}.ext"
        extfile.write_text(ext + "\n")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", str(f["ca"]), "-CAkey", str(f["ca-key"]),
            "-CAcreateserial", "-out", str(f[who]), "-extfile", str(extfile), *days)  # fmt: skip
    return f


class ThreadProxy:
    """`Proxy` for tests without a trio loop: threads, on loopback; stop cuts every
    connection through it, start lets new ones through again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_ports(1)[0]
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(16)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
