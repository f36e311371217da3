"""Which supervised instances wait idle on their inbox, and which may take no more.

The open files (`openfile`) note each read that waits on an empty inbox, by the
reader's instance; the supervisor asks which instances are idle, and since
when, to shrink a pool (`scaling`). An instance chosen to stop is `retire`d
first: from then on its reads take no message and wait until its signal ends
them, so stopping it never takes a message from anyone. No trio, no processes.
"""

from __future__ import annotations

import time

Key = tuple[str, int]  # (agent, instance)


class Readers:
    def __init__(self) -> None:
        self._waiting: dict[Key, tuple[int, float]] = {}  # -> (reads waiting, since)
        self._retired: set[Key] = set()

    def wait(self, name: str, instance: int) -> None:
        """A read of the instance waits on an empty inbox from now."""
        key = (name, instance)
        n, since = self._waiting.get(key, (0, time.monotonic()))
        self._waiting[key] = (n + 1, since)

    def done(self, name: str, instance: int) -> None:
        """A waiting read of the instance has ended (woken, interrupted)."""
        key = (name, instance)
        n, since = self._waiting.get(key, (1, 0.0))
        if n <= 1:
            self._waiting.pop(key, None)
        else:
            self._waiting[key] = (n - 1, since)

    def idle(self, name: str) -> dict[int, float]:
        """Instance -> since when (time.monotonic) it waits on its empty inbox."""
        return {
            i: since
            for (n, i), (_, since) in self._waiting.items()
            if n == name and (n, i) not in self._retired
        }

    def retire(self, name: str, instance: int) -> bool:
        """Let the instance take no more messages, if it waits idle now."""
        key = (name, instance)
        if key not in self._waiting:
            return False
        self._retired.add(key)
        return True

    def retired(self, name: str, instance: int | None) -> bool:
        return instance is not None and (name, instance) in self._retired

    def forget(self, name: str, instance: int) -> None:
        """The instance's process is gone (or a new one starts under its number)."""
        self._retired.discard((name, instance))
