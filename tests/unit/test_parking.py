"""Parked requests watch their callers' signals (pyfuse3 has no interrupts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from outheisfs.parking import Parking, Waiter, Watch, pending

STATUS = b"Name:\tcat\nSigQ:\t0/1\nSigPnd:\t%s\nShdPnd:\t%s\nSigBlk:\t%s\nSigIgn:\t0\n"


def status(pnd: int, shd: int, blk: int) -> bytes:
    return STATUS % (b"%016x" % pnd, b"%016x" % shd, b"%016x" % blk)


def test_pending_reads_thread_and_shared_masks_minus_blocked() -> None:
    sigint = 1 << 1  # bit n-1 is signal n
    assert pending(status(0, 0, 0)) is False
    assert pending(status(sigint, 0, 0)) is True
    assert pending(status(0, sigint, 0)) is True
    assert pending(status(0, sigint, sigint)) is False
    assert pending(b"Name:\tcat\n") is None


def test_a_gone_thread_counts_as_signalled() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    w = Waiter((p.pid,))
    assert w.signalled()
    w.close()


def test_a_running_process_without_signals_is_not_signalled() -> None:
    p = subprocess.Popen(["sleep", "5"])
    try:
        w = Waiter((p.pid,))
        assert not w.signalled()
        w.close()
    finally:
        p.kill()
        p.wait()


async def test_park_returns_true_when_woken_and_false_when_signalled() -> None:
    parking = Parking()
    lot = trio.lowlevel.ParkingLot()
    p = subprocess.Popen(["sleep", "5"])
    results: list[bool] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parking.run)

            async def park() -> None:
                results.append(await parking.park(lot, p.pid))

            nursery.start_soon(park)
            await trio.testing.wait_all_tasks_blocked()
            looked = parking.statistics()[1]
            with trio.fail_after(5):
                while parking.statistics()[1] < looked + 3:
                    await trio.sleep(0.01)
            assert results == []  # waits, also across several looks
            lot.unpark_all()
            await trio.testing.wait_all_tasks_blocked()
            assert results == [True]
            nursery.start_soon(park)
            await trio.testing.wait_all_tasks_blocked()
            assert parking.statistics()[0] == 1
            p.kill()  # gone: the wait ends within a look or two
            p.wait()
            with trio.fail_after(0.5):
                while len(results) < 2:
                    await trio.sleep(0.01)
            assert results == [True, False]
            nursery.cancel_scope.cancel()
    finally:
        p.kill()
        p.wait()


def state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return chr(data[data.rfind(b") ") + 2])


def wait_state(pid: int, state: str) -> None:
    deadline = time.monotonic() + 10
    while state_of(pid) != state:
        assert time.monotonic() < deadline, f"process {pid} never reached state {state}"
        time.sleep(0.01)


def test_a_thread_asleep_since_the_last_look_costs_one_short_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = subprocess.Popen(["sleep", "5"])
    try:
        wait_state(p.pid, "S")
        watch = Watch((p.pid,))
        reads: list[int] = []
        real = os.pread

        def counting(fd: int, n: int, offset: int) -> bytes:
            reads.append(fd)
            return real(fd, n, offset)

        monkeypatch.setattr(os, "pread", counting)
        assert not watch.signalled()
        assert reads == [watch.sched, watch.stat], "asleep: its pending masks are not read"
        reads.clear()
        assert not watch.signalled()
        assert reads == [watch.sched], "it has not run since: asleep still"
        watch.close()
    finally:
        p.kill()
        p.wait()


def test_a_thread_that_ran_since_the_last_look_is_looked_at_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code = "import time\nwhile True: time.sleep(0.002)"
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_state(p.pid, "S")
        watch = Watch((p.pid,))
        assert not watch.signalled()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{p.pid}/schedstat").read_bytes() == watch.asleep:  # until it ran
            assert time.monotonic() < deadline
            time.sleep(0.005)
        reads: list[int] = []
        real = os.pread

        def counting(fd: int, n: int, offset: int) -> bytes:
            reads.append(fd)
            return real(fd, n, offset)

        monkeypatch.setattr(os, "pread", counting)
        watch.signalled()
        assert reads[:2] == [watch.sched, watch.stat]
        watch.close()
    finally:
        p.kill()
        p.wait()


def test_a_thread_not_asleep_has_its_pending_masks_read() -> None:
    p = subprocess.Popen(["sleep", "5"])
    try:
        os.kill(p.pid, signal.SIGSTOP)
        wait_state(p.pid, "T")
        watch = Watch((p.pid,))
        assert not watch.signalled(), "stopped, nothing pending"
        os.kill(p.pid, signal.SIGTERM)  # stays pending while the process is stopped
        assert watch.signalled()
        watch.close()
    finally:
        p.kill()
        p.wait()


def test_a_watch_stays_bound_to_its_thread() -> None:
    p = subprocess.Popen(["sleep", "5"])
    watch = Watch((p.pid,))
    assert not watch.lost
    p.kill()
    p.wait()
    assert watch.signalled() and watch.lost, "gone: whatever takes its pid later"
    watch.close()
