"""Parked requests, and the signals that must end them.

pyfuse3 has no FUSE interrupts: a process whose request the server holds cannot
die, even from SIGKILL, until the server answers. So every request that waits
(a read on an empty inbox, a write to a full one) is registered here, and one
task looks at all their callers' pending signals every POLL seconds; a caller
with a signal pending has its wait cancelled, and answers EINTR.

A caller is watched through its thread's /proc files (`Watch`), opened once per
open file and re-read with `pread`: they stay bound to that thread, whatever
later reuses its tid. A thread asleep (state S in `stat`) in the kernel's
interruptible wait for our answer has no signal that would interrupt it: such a
signal wakes it, and it then waits in state D. A look therefore reads, cheapest
first: `schedstat` (how long and how often the thread ran): unchanged since the
thread was last seen asleep, it has not run, so it sleeps still; else `stat`
for its state; only for a thread not asleep, `status` for the pending masks.
One task for all waiters keeps an idle server idle: a hundred blocked readers
cost ten wake-ups a second and one `pread` of a few bytes each.
"""

from __future__ import annotations

import os

import trio

POLL = 0.1  # seconds between looks; a signal acts within about this
ASLEEP = b"S"  # a thread's state in /proc/TID/stat while it waits, interruptibly


class Watch:
    """One thread's /proc `schedstat`, `stat` and `status`, opened once: the first
    of `tids` that can be opened (the opening thread, else its process's main
    thread)."""

    __slots__ = ("asleep", "lost", "sched", "stat", "status")

    def __init__(self, tids: tuple[int, ...]) -> None:
        self.sched: int | None = None
        self.stat: int | None = None
        self.status: int | None = None
        self.asleep = b""  # its schedstat when it was last seen asleep
        self.lost = True  # no thread to watch, or it is gone
        for tid in tids:
            try:
                folder = os.open(f"/proc/{tid}", os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                # All through one folder descriptor: the same thread, even if the
                # tid were reused meanwhile.
                self.stat = os.open("stat", os.O_RDONLY, dir_fd=folder)
                self.status = os.open("status", os.O_RDONLY, dir_fd=folder)
                try:
                    self.sched = os.open("schedstat", os.O_RDONLY, dir_fd=folder)
                except OSError:  # a kernel without scheduler statistics
                    self.sched = None
                self.lost = False
                return
            except OSError:
                self.close()
            finally:
                os.close(folder)

    def signalled(self) -> bool:
        """True if the thread has an unblocked signal pending, or is gone."""
        if self.lost or self.stat is None or self.status is None:
            return True
        try:
            mark = b""
            if self.sched is not None:
                # Its run time and times run: unchanged since it was seen asleep,
                # it has not run since, so it sleeps still and nothing woke it.
                mark = os.pread(self.sched, 128, 0)
                if mark and mark == self.asleep:
                    return False
            data = os.pread(self.stat, 512, 0)
            at = data.rfind(b") ")  # the name may hold anything, ")" included
            if at >= 0 and data[at + 2 : at + 3] == ASLEEP:
                self.asleep = mark
                return False
            self.asleep = b""
            data = os.pread(self.status, 4096, 0)
        except OSError:
            self.lost = True
            return True
        return pending(data) in (None, True)

    def close(self) -> None:
        for fd in (self.sched, self.stat, self.status):
            if fd is not None:
                os.close(fd)
        self.sched = self.stat = self.status = None
        self.lost = True


class Waiter:
    """One parked request: its cancel scope and the watch on its caller."""

    def __init__(self, tids: tuple[int, ...] = (), watch: Watch | None = None) -> None:
        self.scope = trio.CancelScope()
        self.owned = watch is None
        self.watch = Watch(tids) if watch is None else watch

    def signalled(self) -> bool:
        """True if the caller has an unblocked signal pending, or is gone."""
        return self.watch.signalled()

    def close(self) -> None:
        if self.owned:
            self.watch.close()


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

    async def park(
        self, lot: trio.lowlevel.ParkingLot, *tids: int, watch: Watch | None = None
    ) -> bool:
        """Wait on `lot`. False if the caller got a signal (or is gone) first.
        The caller is `watch` if given (kept by the open file), else the first
        of `tids` that exists, watched for this wait only."""
        w = Waiter(tids, watch)
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
