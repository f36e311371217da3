"""Process events: who descends from whom, and how processes end.

Linux's process-events connector (netlink, root only) reports every fork and
exit on the machine, in order, before the new process can run. From it this
service keeps:

- labels: which agent a process (or thread) acts as. A process started for an
  agent is labelled when it is forked; every process it forks afterwards gets
  the same label, whatever it does later (exec, setsid, double fork, being
  re-parented). A label dies with its process, so a reused pid starts unlabelled.
- recent exits with their status, also of processes that are not our children:
  a reader that closes its inbox and then fails must get its message back.

Requests are attributed after a non-blocking drain of the socket, so a fork the
kernel reported before the child's first request is always seen. Without the
connector (not root) labels fall back to walking /proc parents, which loses
processes re-parented away from their agent; docs/design.md lists the limits.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from . import procinfo
from .names import UNKNOWN

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
KEEP = 5.0  # seconds an exit is remembered, for watchers that ask late
BATCH = 0.2  # seconds between drains by `run`: every fork and exit of the machine wakes it
RCVBUF = 64 << 20
SO_RCVBUFFORCE = 33  # not in the socket module


class ProcEvents:
    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._recent: dict[int, tuple[int, float]] = {}  # tgid -> (exit status, when)
        self._waiters: dict[int, trio.Event] = {}
        self.labels: dict[int, str] = {}  # tid or tgid -> agent name
        self._threads: dict[int, set[int]] = {}  # tgid -> its labelled threads (not tgid)
        self._left: dict[int, str] = {}  # tgid -> label, of a leader thread that exited
        self._server = os.getpid()
        self._spawning: dict[int, str] = {}  # forking thread id -> label for its children
        self._lock = threading.Lock()  # _spawning is written from worker threads
        self.lost = 0  # times the kernel dropped events (ENOBUFS)
        # Threads found to be no agent's and alive, with their uid and gid then: an
        # entry holds until an event about that thread (or a lost one) is drained.
        self.alive: dict[int, tuple[int, int]] = {}
        self.forged = 0  # messages ignored because a process, not the kernel, sent them
        self._connect()

    @property
    def exact(self) -> bool:
        """True when the kernel reports forks and exits (else: /proc fallback)."""
        return self._sock is not None

    def _connect(self) -> None:
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
            try:  # root may pass the rmem_max cap: an agent's fork storm must not fill it
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.bind((0, CN_IDX_PROC))
            op = struct.pack("I", PROC_CN_MCAST_LISTEN)
            cn = struct.pack("IIIIHH", CN_IDX_PROC, 1, 0, 0, len(op), 0) + op
            s.send(struct.pack("IHHII", 16 + len(cn), 3, 0, 0, 0) + cn)
            s.setblocking(False)
            self._sock = s
        except OSError:
            self._sock = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        sock = self._sock
        if sock is None:
            await trio.sleep_forever()
        assert sock is not None
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                self.drain()
                # The socket holds what comes meanwhile (its buffer is large), and
                # every attribution and exit check drains it first: waking for each
                # fork and exit of other programs would only cost an idle server.
                await trio.sleep(BATCH)
        finally:
            self._sock = None
            sock.close()

    def drain(self) -> None:
        """Take in every event the kernel has queued so far."""
        while self._sock is not None:
            try:
                data, (sender, _groups) = self._sock.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: the kernel dropped events
                self.lost += 1
                self.alive.clear()
                return
            if sender == 0:
                self._parse(data)
            else:
                # Any root process may send to this socket or to the connector's
                # group: a forged exit would unlabel it (making it the operator),
                # a forged fork would lend it another agent's label. Only the
                # kernel's port is 0, and no process can send from it.
                self.forged += 1

    def _parse(self, data: bytes) -> None:
        # nlmsghdr (16) + cn_msg (20) + proc_event header (16) + event data
        if len(data) < 36 + 16 + 16:
            return
        what = struct.unpack_from("I", data, 36)[0]
        if what == PROC_EVENT_FORK:
            self._fork(*struct.unpack_from("IIII", data, 52))
        elif what == PROC_EVENT_EXEC:
            self._exec(*struct.unpack_from("II", data, 52))
        elif what == PROC_EVENT_EXIT:
            self._exit(*struct.unpack_from("III", data, 52))

    def _fork(self, ppid: int, ptgid: int, cpid: int, ctgid: int) -> None:
        self.alive.pop(cpid, None)  # a tid reused
        if cpid != ctgid:
            # A new thread. The kernel names the process's parent as its parent;
            # the thread is its process, whoever that is.
            label = self.labels.get(ctgid) or self._left.get(ctgid)
            if label is not None:
                self.labels[cpid] = label
                self._threads.setdefault(ctgid, set()).add(cpid)
            return
        # A new process: its pid may be a number an old process left behind.
        self._left.pop(cpid, None)
        self._threads.pop(cpid, None)
        label = self.labels.get(ppid) or self.labels.get(ptgid)
        if label is None and self._spawning:
            with self._lock:
                label = self._spawning.get(ppid)
        if label is None and ptgid == self._server:
            # The server starts processes only for agents (labelled above); any
            # other child of it descends from an orphan it adopted: some agent's.
            label = UNKNOWN
        if label is not None:
            self.labels[cpid] = label
        else:
            self.labels.pop(cpid, None)

    def _exec(self, pid: int, tgid: int) -> None:
        # A thread that execs takes over the process's pid, and its old thread id
        # ends without an exit event: carry the label over, forget the old ids.
        label = self.labels.get(tgid) or self._left.pop(tgid, None)
        self.alive.pop(pid, None)
        self.alive.pop(tgid, None)
        for tid in self._threads.pop(tgid, set()):
            self.labels.pop(tid, None)
        if label is not None:
            self.labels[tgid] = label

    def _exit(self, pid: int, tgid: int, code: int) -> None:
        self.alive.pop(pid, None)
        label = self.labels.pop(pid, None)
        if pid != tgid:
            threads = self._threads.get(tgid)
            if threads is not None:
                threads.discard(pid)
                if not threads:
                    # The last labelled thread: forget the process. Memory is
                    # bounded by forgetting only the dead, never by forgetting
                    # a label that a live thread still needs.
                    del self._threads[tgid]
                    self._left.pop(tgid, None)
            return  # a thread; the process ends with its leader
        if label is not None and self._threads.get(tgid):
            # The leader thread is gone but others may live on (and one may exec).
            self._left[tgid] = label
        now = time.monotonic()
        self._recent[tgid] = (code, now)
        ev = self._waiters.pop(tgid, None)
        if ev is not None:
            ev.set()
        if len(self._recent) > 4096:
            self._recent = {k: v for k, v in self._recent.items() if now - v[1] < KEEP}

    # -- labels -----------------------------------------------------------------------

    @contextmanager
    def spawning(self, label: str) -> Iterator[None]:
        """Label every process the current thread forks while inside."""
        tid = threading.get_native_id()
        with self._lock:
            self._spawning[tid] = label
        try:
            yield
        finally:
            with self._lock:
                self._spawning.pop(tid, None)

    def label(self, pid: int, label: str, since: float | None = None) -> None:
        """Label a live process (and its thread group). `since`: when it was
        started; an exit reported since then means it is gone, and a label set
        now would outlive it and pass to whoever gets the pid next."""
        self.drain()
        hit = self._recent.get(pid)
        if since is not None and hit is not None and hit[1] >= since:
            return
        st = procinfo.stat(pid)
        if st is None or st.state in ("Z", "X"):
            return
        tgid = procinfo.tgid(pid)
        self.labels[pid] = label
        self.labels[tgid] = label
        self.alive.pop(pid, None)
        self.alive.pop(tgid, None)
        self.drain()  # an exit reported meanwhile removes the label again

    def label_of(self, tid: int) -> str | None:
        """The agent thread `tid` acts as, or None (not an agent's process)."""
        self.drain()
        label = self.labels.get(tid)
        if label is not None or (self._sock is not None and not self.lost):
            return label
        # No connector, or it dropped events: walk up the parents. An orphan
        # re-parented to the server (the agents' subreaper) is some agent's
        # descendant, but whose is unknown: the least rights.
        server = os.getpid()
        seen = 0
        pid = tid
        while pid > 1 and seen < 64:
            st = procinfo.stat(pid)
            if st is None:
                return None
            pid = st.ppid
            if pid == server and self._sock is not None:
                return UNKNOWN
            label = self.labels.get(pid)
            if label is not None:
                return label
            seen += 1
        return None

    def of_agent(self, name: str) -> set[int]:
        """Every running process of agent `name` (labels `name` and `name#i`)."""
        self.drain()
        labels = {lab for lab in self.labels.values() if lab.split("#", 1)[0] == name}
        return self.members(labels)

    def members(self, labels: set[str]) -> set[int]:
        """Every running process (thread group) that carries one of `labels`."""
        self.drain()
        out = set()
        for pid, lab in list(self.labels.items()):
            if lab in labels and procinfo.tgid(pid) == pid:
                st = procinfo.stat(pid)
                if st is not None and st.state not in ("Z", "X"):
                    out.add(pid)
        return out

    # -- exits ------------------------------------------------------------------------

    def exited(self, pid: int, start: int) -> int | None:
        """Exit status of process `pid` (started at `start`) if it has ended
        (0 if it is gone without a known status); None if it still runs."""
        self.drain()
        hit = self._recent.get(pid)
        if hit is not None and time.monotonic() - hit[1] < KEEP:
            return hit[0]
        st = procinfo.stat(pid)
        if st is None or st.start != start:
            self.drain()
            return self._recent.get(pid, (0, 0.0))[0]
        if st.state in ("Z", "X"):
            return st.exit_code
        return None

    async def wait(self, pid: int, start: int, timeout: float) -> int | None:
        """Exit status of process `pid` (started at `start`) if it ends within
        `timeout` (or ended lately); None if it is still running then."""
        deadline = trio.current_time() + timeout
        while True:
            code = self.exited(pid, start)
            if code is not None:
                return code
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                return None
            if self._sock is None:
                await trio.sleep(min(0.02, remaining))
                continue
            ev = self._waiters.setdefault(pid, trio.Event())
            with trio.move_on_after(min(remaining, 0.05)):
                await ev.wait()
