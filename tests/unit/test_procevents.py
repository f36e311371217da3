"""Labels follow descent through the kernel's fork, exec and exit events [SPEC §6].

Fed with the events the kernel sends, in the order it sends them (no socket)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import trio

from outheisfs import procevents
from outheisfs.access import Access
from outheisfs.config import Config
from outheisfs.dispatcher import Dispatcher
from outheisfs.names import NOBODY, OPERATOR
from outheisfs.procevents import ProcEvents

SERVER, AGENT, SHELL = 100, 200, 50


def fresh() -> ProcEvents:
    p = ProcEvents()
    p.close()  # no connector: events are fed by hand below
    p.labels[AGENT] = "a#0"
    return p


def test_children_and_grandchildren_carry_the_label() -> None:
    p = fresh()
    p._fork(AGENT, AGENT, 201, 201)
    p._fork(201, 201, 202, 202)  # double fork
    p._exit(201, 201, 0)  # the middle one exits: 202 is re-parented, keeps its label
    assert p.labels.get(202) == "a#0"
    p._fork(SHELL, SHELL, 300, 300)
    assert 300 not in p.labels


def test_threads_are_their_process() -> None:
    p = fresh()
    # The kernel names the process's parent (the server) as a new thread's parent.
    p._fork(SERVER, SERVER, 205, AGENT)
    assert p.labels.get(205) == "a#0"
    p._exit(205, AGENT, 0)
    assert 205 not in p.labels
    # ... and a thread of an unlabelled process stays unlabelled.
    p._fork(SHELL, SHELL, 301, 300)
    assert 301 not in p.labels


def test_exec_from_a_second_thread_keeps_the_label_and_drops_the_old_id() -> None:
    p = fresh()
    p._fork(SERVER, SERVER, 206, AGENT)  # a second thread
    p._exit(AGENT, AGENT, 0)  # exec: the leader goes first ...
    p._exec(AGENT, AGENT)  # ... and the thread takes over the process's pid
    assert p.labels.get(AGENT) == "a#0"
    assert 206 not in p.labels  # no exit event will ever come for the old id
    p._fork(SHELL, SHELL, 206, 206)  # so a stranger reusing it gets nothing
    assert 206 not in p.labels


def test_a_label_dies_with_its_process_and_a_reused_pid_starts_clean() -> None:
    p = fresh()
    p._fork(AGENT, AGENT, 210, 210)
    p._exit(210, 210, 9)
    assert 210 not in p.labels
    p._fork(SHELL, SHELL, 210, 210)
    assert 210 not in p.labels


def test_a_process_whose_leader_left_is_still_its_agent() -> None:
    p = fresh()
    p._fork(SERVER, SERVER, 207, AGENT)
    p._exit(AGENT, AGENT, 0)  # the main thread exits, the other lives on
    assert p.labels.get(207) == "a#0"
    p._fork(SERVER, SERVER, 208, AGENT)  # and may start more threads
    assert p.labels.get(208) == "a#0"


def test_a_child_of_the_server_that_it_did_not_start_is_no_one() -> None:
    p = fresh()
    p._server = SERVER
    p._fork(SERVER, SERVER, 220, 220)  # e.g. clone(CLONE_PARENT) from an agent's process
    assert p.labels.get(220) == "-"
    with p.spawning("b#0"):  # a process the server starts for an agent
        import threading

        tid = threading.get_native_id()
        p._fork(tid, SERVER, 221, 221)
    assert p.labels.get(221) == "b#0"


def test_memory_is_bounded_by_forgetting_only_the_dead() -> None:
    """Thousands of processes whose leader left before their threads: each is
    forgotten when its last thread ends, and a live one is never forgotten."""
    p = fresh()
    for i in range(10_000):
        pid, thread = 1000 + 2 * i, 1001 + 2 * i
        p._fork(AGENT, AGENT, pid, pid)
        p._fork(AGENT, AGENT, thread, pid)
        p._exit(pid, pid, 0)  # the leader leaves; its thread lives on
        p._exit(thread, pid, 0)  # ... and ends
    assert not p._left and not p._threads
    # A live one among many dead: it keeps its label for new threads and exec.
    p._fork(AGENT, AGENT, 500, 500)
    p._fork(AGENT, AGENT, 501, 500)
    p._exit(500, 500, 0)
    for i in range(10_000):
        pid, thread = 30_000 + 2 * i, 30_001 + 2 * i
        p._fork(AGENT, AGENT, pid, pid)
        p._fork(AGENT, AGENT, thread, pid)
        p._exit(pid, pid, 0)
        p._exit(thread, pid, 0)
    p._fork(AGENT, AGENT, 502, 500)  # a new thread of the live one
    assert p.labels.get(502) == "a#0"
    p._exec(500, 500)
    assert p.labels.get(500) == "a#0"


def test_only_the_kernel_is_believed() -> None:
    """A root process can send to the connector socket; what it sends is ignored."""
    import socket
    import struct

    p = ProcEvents()
    if not p.exact:
        p.close()
        return  # not root: there is no connector socket to forge to
    try:
        me = os.getpid()
        p.labels[me] = "spy#0"
        port = p._sock.getsockname()[0]  # type: ignore[union-attr]
        exit_event = struct.pack("IIQ", 0x80000000, 0, 0) + struct.pack("IIII", me, me, 0, 0)
        cn = struct.pack("IIIIHH", 1, 1, 0, 0, len(exit_event), 0) + exit_event
        forged = struct.pack("IHHII", 16 + len(cn), 3, 0, 0, 0) + cn
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11) as s:
            s.bind((0, 0))
            s.sendto(forged, (port, 0))
        deadline = time.monotonic() + 5
        while not p.forged and time.monotonic() < deadline:
            p.drain()
            time.sleep(0.01)
        assert p.forged == 1
        assert p.labels.get(me) == "spy#0"
    finally:
        p.close()


async def test_run_drains_at_most_once_a_batch_and_requests_see_every_fork(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = ProcEvents()
    if not p.exact:
        p.close()
        pytest.skip("the process-events connector needs root")
    drains: list[float] = []
    real = p.drain

    def counted() -> None:
        drains.append(trio.current_time())
        real()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(p.run)
            monkeypatch.setattr(p, "drain", counted)
            start = trio.current_time()
            for _ in range(15):  # forks and exits, each waking a server that drains at once
                await trio.run_process(["true"])
            elapsed = trio.current_time() - start
            assert len(drains) <= elapsed / procevents.BATCH + 2, "one drain per batch"
            # An attribution does not wait for the batch: it drains first.
            monkeypatch.setattr(p, "drain", real)
            p.labels[os.getpid()] = "a#0"
            child = subprocess.Popen(["sleep", "5"])
            try:
                assert p.label_of(child.pid) == "a#0", "its fork is seen at once"
            finally:
                child.kill()
                child.wait()
            nursery.cancel_scope.cancel()
    finally:
        p.close()


class Ctx:
    def __init__(self, pid: int) -> None:
        self.pid, self.uid, self.gid = pid, os.getuid(), os.getgid()


def test_a_thread_found_alive_is_not_asked_again_until_an_event_about_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    procs = ProcEvents()
    if not procs.exact:
        procs.close()
        pytest.skip("the process-events connector needs root")
    procs._server = -1  # this test's children are not agents' orphans
    d = Dispatcher(Config(), None)
    access = Access(d, procs)
    asked: list[int] = []
    real = os.kill

    def counted(pid: int, sig: int) -> None:
        if sig == 0:
            asked.append(pid)
        real(pid, sig)

    monkeypatch.setattr(os, "kill", counted)
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert access.who(Ctx(child.pid)) == OPERATOR
        assert access.who(Ctx(child.pid)) == OPERATOR
        assert asked == [child.pid], "alive: known once per thread"
        other = Ctx(child.pid)
        other.uid += 1000  # another uid: a stranger, whatever was known
        assert access.who(other).startswith("uid:")
        child.kill()
        child.wait()
        # Its exit is drained before the next attribution, and forgets it: gone now.
        deadline = time.monotonic() + 10
        while access.who(Ctx(child.pid)) != NOBODY:
            assert time.monotonic() < deadline, "the exit was not seen"
            time.sleep(0.01)
        assert child.pid not in procs.alive
    finally:
        child.kill()
        child.wait()
        procs.close()
