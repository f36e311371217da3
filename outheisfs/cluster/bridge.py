"""An asyncio event loop in its own thread, called from trio.

nats-py is an asyncio library and outheisfs runs on trio. The client lives on
a private asyncio loop in a daemon thread; trio tasks hand it coroutines and
wait for their results without holding a worker thread: the asyncio future's
completion wakes the trio task through the trio token (`run_sync_soon`). The
choice and its cost are in docs/design.md ("Cluster engine").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")


class Bridge:
    """Runs coroutines on a private asyncio loop; `await bridge.call(fn, ...)` from trio."""

    def __init__(self, name: str = "outheisfs-nats") -> None:
        # Not asyncio.new_event_loop(): its policy may be replaced process-wide (trio-asyncio).
        self.loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        # Let what was cancelled at close run its cleanups, then close the loop.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
        """Start `fn(*args)` on the loop; usable from any thread."""

        async def run() -> T:
            return await fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` on the asyncio loop and return its result to this trio task.

        A trio cancellation cancels the asyncio task (what it had done stays done).
        """
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        fut = self.submit(fn, *args)

        def done(_: concurrent.futures.Future[T]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.Value(None))

        fut.add_done_callback(done)

        def abort(_: Any) -> trio.lowlevel.Abort:
            fut.cancel()  # the done callback then reschedules us
            return trio.lowlevel.Abort.FAILED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if fut.cancelled():  # only by our abort: the cancellation is still pending
            await trio.lowlevel.checkpoint()
        return fut.result()

    def close(self) -> None:
        """Stop the loop and its thread (tasks still on it are cancelled)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
