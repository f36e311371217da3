"""Work whose cost an agent controls, done off the event loop, one at a time per agent.

The server serves every caller from one event loop. A request whose cost grows
with something its caller controls (a close makes the server count the closer's
descriptors in /proc: thousands, if it made thousands of copies) must not hold
that loop: it runs on a worker thread, and an agent's such requests take turns
(`turn`), so that a flood of them queues behind its own agent only and uses one
thread at most. Everyone else's requests go on meanwhile.

Turns are kept only while someone holds or waits for one: no table grows with
the names that ever asked.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

T = TypeVar("T")


class OffLoop:
    def __init__(self) -> None:
        self._turns: dict[str, trio.Lock] = {}
        # Each agent has one thread at most (its turn), so threads are bounded by
        # the agents busy at once; a shared bound would let agents stall the operator.
        self._threads = trio.CapacityLimiter(math.inf)

    @asynccontextmanager
    async def turn(self, who: str) -> AsyncIterator[None]:
        """Wait for `who`'s turn (first come, first served), and hold it."""
        lock = self._turns.get(who)
        if lock is None:
            lock = self._turns[who] = trio.Lock()
        try:
            async with lock:
                yield
        finally:
            # trio's Lock hands itself to the next waiter: unlocked means no one waits.
            if not lock.locked() and self._turns.get(who) is lock:
                del self._turns[who]

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on a worker thread; the event loop serves others meanwhile."""
        return await trio.to_thread.run_sync(fn, limiter=self._threads)

    def busy(self) -> int:
        """How many agents hold or wait for a turn now (for tests)."""
        return len(self._turns)
