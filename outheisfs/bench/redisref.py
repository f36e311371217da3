"""The reference row of `outheisfs bench`: the echo round trip through Redis Streams.

Redis Streams (XADD, XREADGROUP, XACK) are what agent queues are often built on
today, so `outheisfs bench` sets the same round trip through them beside its own
when `redis-server` is installed. Everything runs on a private server: its own
folder, a unix socket and no TCP port, so a system Redis is neither used nor
touched. The client speaks RESP2 by hand (the few commands used need no more),
to keep the project's dependencies as they are.

The echo agent is a separate Python process, as in outheisfs's own figure:

    python -m outheisfs.bench.redisref SOCKET    (serves until killed)
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TypeAlias

# -- RESP2 ---------------------------------------------------------------------------


class ReplyError(Exception):
    """An error reply (`-ERR ...`): raised by `Client.call`, a value inside arrays."""


class ProtocolError(Exception):
    """Bytes that are not RESP, or a reply of an unexpected shape."""


class Incomplete(Exception):
    """The buffer ends before the reply does."""


# Simple strings are str, bulk strings bytes; a nil bulk string or array is None.
Reply: TypeAlias = "str | bytes | int | list[Reply] | ReplyError | None"


def encode(*args: bytes | str | int) -> bytes:
    """A command as Redis reads it: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def parse(buf: bytes, pos: int = 0) -> tuple[Reply, int]:
    """The reply that starts at `pos`, and where it ends; Incomplete if it is cut."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    kind, line, pos = buf[pos : pos + 1], buf[pos + 1 : end], end + 2
    if kind == b"+":
        return line.decode(), pos
    if kind == b"-":
        return ReplyError(line.decode()), pos
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise Incomplete
        if buf[pos + n : pos + n + 2] != b"\r\n":
            raise ProtocolError("bulk string longer than its length")
        return buf[pos : pos + n], pos + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, pos
        items: list[Reply] = []
        for _ in range(n):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    raise ProtocolError(f"unknown reply type {kind!r}")


class Client:
    """One connection; one command at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    @classmethod
    def unix(cls, path: str) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def call(self, *args: bytes | str | int) -> Reply:
        self.sock.sendall(encode(*args))
        while True:
            try:
                value, end = parse(self._buf)
                break
            except Incomplete:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("redis-server closed the connection") from None
                self._buf += data
        self._buf = self._buf[end:]
        if isinstance(value, ReplyError):
            raise value
        return value

    def close(self) -> None:
        self.sock.close()


def only_entry(reply: Reply) -> tuple[bytes, bytes]:
    """The id and body of the one entry of an `XREADGROUP ... COUNT 1` reply."""
    match reply:
        case [[bytes(), [[bytes() as eid, [b"body", bytes() as body]]]]]:
            return eid, body
    raise ProtocolError(f"not one stream entry with a body: {reply!r}")


# -- the echo agent ------------------------------------------------------------------


def echo_agent(path: str) -> None:
    """Take each message of stream `echo`, answer it on stream `user`, then ack it."""
    r = Client.unix(path)
    while True:
        read = ("XREADGROUP", "GROUP", "agents", "echo", "COUNT", 1, "BLOCK", 0)
        eid, body = only_entry(r.call(*read, "STREAMS", "echo", ">"))
        r.call("XADD", "user", "*", "body", body)
        r.call("XACK", "echo", "agents", eid)


# -- a private server, and the round trip through it --------------------------------


def version() -> str | None:
    """redis-server's version, or None when it is not installed."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip() or "?"


def _answers(sock: str) -> bool:
    try:
        c = Client.unix(sock)
    except OSError:
        return False
    try:
        return c.call("PING") == "PONG"
    except (OSError, ReplyError):  # gone, or still loading
        return False
    finally:
        c.close()


@contextmanager
def private_server(folder: Path, aof: bool) -> Iterator[str]:
    """A redis-server of our own in `folder`; yields its socket's path.

    aof: append every command to a file before replying (appendfsync no: written,
    not synced), as outheisfs's `process` durability does; else memory only.
    """
    folder.mkdir()
    sock = str(folder / "redis.sock")
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed")
    persist = ["--appendonly", "yes", "--appendfsync", "no"] if aof else ["--appendonly", "no"]
    cmd = [exe, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700"]
    cmd += ["--dir", str(folder), "--save", "", *persist, "--logfile", str(folder / "log")]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _answers(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server not ready after 30 s")
            time.sleep(0.01)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def echo_roundtrips(folder: Path, aof: bool) -> Iterator[Callable[[int], list[float]]]:
    """A private server with the echo agent running; yields `run(n)`: n round-trip times.

    One round trip: XADD to `echo`, XREADGROUP BLOCK on `user` until the answer is
    there, XACK it; the ack is timed as outheisfs's is (its next read acks).
    """
    body = b"a benchmark message of forty bytes...."
    read = ("XREADGROUP", "GROUP", "user", "user", "COUNT", 1, "BLOCK", 10_000)
    with private_server(folder, aof) as sock, closing(Client.unix(sock)) as r:

        def once() -> None:
            r.call("XADD", "echo", "*", "body", body)
            reply = r.call(*read, "STREAMS", "user", ">")
            if reply is None:
                raise RuntimeError("the Redis echo agent did not answer within 10 s")
            eid, _ = only_entry(reply)
            r.call("XACK", "user", "user", eid)

        def run(n: int) -> list[float]:
            times = []
            for _ in range(n):
                t = time.perf_counter()
                once()
                times.append(time.perf_counter() - t)
            return times

        r.call("XGROUP", "CREATE", "echo", "agents", "$", "MKSTREAM")
        r.call("XGROUP", "CREATE", "user", "user", "$", "MKSTREAM")
        agent = subprocess.Popen([sys.executable, "-m", "outheisfs.bench.redisref", sock])
        try:
            once()  # the agent has started when it answers (entries wait for it)
            yield run
        finally:
            agent.kill()
            agent.wait()


if __name__ == "__main__":
    try:
        echo_agent(sys.argv[1])
    except (KeyboardInterrupt, ConnectionError):  # ^C, or the server has gone
        pass
