"""Learn how processes end, also those that are not our children.

A reader that closes its inbox and then exits with a non-zero status (a Python
agent whose exception unwinds through `with open(inbox)`) has not handled its
message, so the message must come back [SPEC §4.3]. Only the parent can wait(2)
for an exit status; Linux's process-events connector (netlink, root only)
reports every process's exit with its code, which is what this service uses.
Without it (not root), it falls back to polling /proc while a process is
watched; a process reaped between two polls then counts as a normal exit.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import trio

from . import procinfo

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXIT = 0x80000000
KEEP = 5.0  # seconds an exit is remembered, for watchers that ask late


class ExitWatch:
    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._recent: dict[int, tuple[int, float]] = {}  # tgid -> (exit code, when)
        self._waiters: dict[int, trio.Event] = {}

    @property
    def exact(self) -> bool:
        return self._sock is not None

    def _connect(self) -> None:
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
            s.bind((0, CN_IDX_PROC))
            op = struct.pack("I", PROC_CN_MCAST_LISTEN)
            cn = struct.pack("IIIIHH", CN_IDX_PROC, 1, 0, 0, len(op), 0) + op
            s.send(struct.pack("IHHII", 16 + len(cn), 3, 0, 0, 0) + cn)
            s.setblocking(False)
            self._sock = s
        except OSError:
            self._sock = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._connect()
        task_status.started()
        if self._sock is None:
            await trio.sleep_forever()
        sock = self._sock
        assert sock is not None
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                self._drain()
        finally:
            self._sock = None
            sock.close()

    def _drain(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: events were dropped; go on
                return
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        # nlmsghdr (16) + cn_msg (20) + proc_event header (16) + exit event
        if len(data) < 36 + 16 + 16:
            return
        what = struct.unpack_from("I", data, 36)[0]
        if what != PROC_EVENT_EXIT:
            return
        pid, tgid, code, _sig = struct.unpack_from("IIII", data, 52)
        if pid != tgid:
            return  # a thread; the process ends with its leader
        now = time.monotonic()
        self._recent[tgid] = (code, now)
        ev = self._waiters.pop(tgid, None)
        if ev is not None:
            ev.set()
        if len(self._recent) > 4096:
            self._recent = {k: v for k, v in self._recent.items() if now - v[1] < KEEP}

    async def wait(self, pid: int, start: int, timeout: float) -> int | None:
        """Exit status of process `pid` (started at `start`) if it ends within
        `timeout` (or ended lately); None if it is still running then."""
        deadline = trio.current_time() + timeout
        while True:
            self._drain()
            hit = self._recent.get(pid)
            if hit is not None and time.monotonic() - hit[1] < KEEP:
                return hit[0]
            st = procinfo.stat(pid)
            if st is None or st.start != start:
                self._drain()
                return self._recent.get(pid, (0, 0.0))[0]
            if st.state in ("Z", "X"):
                return st.exit_code
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                return None
            if self._sock is None:
                await trio.sleep(min(0.02, remaining))
                continue
            ev = self._waiters.setdefault(pid, trio.Event())
            with trio.move_on_after(min(remaining, 0.05)):
                await ev.wait()


__all__ = ["ExitWatch", "os"]
