"""Parked requests, and the signals that must end them.

pyfuse3 has no FUSE interrupts: a process whose request the server holds cannot
die, even from SIGKILL, until the server answers. So every request that waits
(a read on an empty inbox, a write to a full one) is registered here, and one
task looks at all their callers' pending signals every POLL seconds; a caller
with a signal pending has its wait cancelled, and answers EINTR.

One task for all waiters keeps an idle server idle: a hundred blocked readers
cost ten wake-ups a second and one `pread` of /proc/TID/status each, on a file
opened once per wait (it stays bound to that thread, whatever reuses the tid).
"""

from __future__ import annotations

import os

import trio

POLL = 0.1  # seconds between looks; a signal acts within about this


class Waiter:
    def __init__(self, tids: tuple[int, ...]) -> None:
        self.scope = trio.CancelScope()
        self.fd: int | None = None
        for tid in tids:  # the opening thread, else its process's main thread
            try:
                self.fd = os.open(f"/proc/{tid}/status", os.O_RDONLY)
                return
            except OSError:
                continue

    def signalled(self) -> bool:
        """True if the thread has an unblocked signal pending, or is gone."""
        if self.fd is None:
            return True
        try:
            data = os.pread(self.fd, 4096, 0)
        except OSError:
            return True
        return pending(data) in (None, True)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def pending(status: bytes) -> bool | None:
    """From /proc/TID/status text: an unblocked signal pending? None if unreadable."""
    values = []
    for key in (b"\nSigPnd:", b"\nShdPnd:", b"\nSigBlk:"):
        at = status.find(key)
        if at < 0:
            return None
        start = at + len(key)
        end = status.find(b"\n", start)
        values.append(int(status[start : end if end >= 0 else None], 16))
    pnd, shd, blk = values
    return bool((pnd | shd) & ~blk)


class Parking:
    def __init__(self) -> None:
        self._waiters: set[Waiter] = set()
        self._someone = trio.Event()
        self.looks = 0  # times `run` has looked at the waiters' signals

    def statistics(self) -> tuple[int, int]:
        """(requests parked now, looks so far)."""
        return len(self._waiters), self.looks

    async def run(self) -> None:
        while True:
            if not self._waiters:
                await self._someone.wait()
                self._someone = trio.Event()
            await trio.sleep(POLL)
            self.looks += 1
            for w in list(self._waiters):
                if w.signalled():
                    w.scope.cancel()

    async def park(self, lot: trio.lowlevel.ParkingLot, *tids: int) -> bool:
        """Wait on `lot`. False if the caller got a signal (or is gone) first."""
        w = Waiter(tids)
        try:
            if w.signalled():
                return False
            self._waiters.add(w)
            self._someone.set()
            with w.scope:
                await lot.park()
            return not w.scope.cancelled_caught
        finally:
            self._waiters.discard(w)
            w.close()
