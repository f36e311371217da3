"""Parked requests watch their callers' signals (pyfuse3 has no interrupts)."""

from __future__ import annotations

import subprocess

import trio
import trio.testing

from outheisfs.parking import Parking, Waiter, pending

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
