"""Which names the kernel holds, so that one refused lookup is one `denied` event.

The kernel keeps each name it was given (by a lookup or a listing) and, since
its entry timeout is 0, asks again before each use: a LOOKUP that revalidates
it. When that LOOKUP is refused, the kernel drops the name and at once sends a
second, fresh LOOKUP of the same name, refused too: one attempt by the caller,
two refusals. So a refused lookup of a name the kernel holds is held back: the
fresh lookup that follows (same caller, same path) is the one logged. If none
comes within HOLD seconds (the kernel had dropped the name on its own), the
held one is logged then: nothing is left out, only the double.
"""

from __future__ import annotations

HOLD = 0.2  # seconds a held-back refusal waits for the fresh lookup
LIMIT = 1 << 16  # names remembered; past that the memory starts again (a double at worst)


class Dentries:
    def __init__(self) -> None:
        self._held_by_kernel: set[str] = set()
        self.pending: dict[tuple[str, str], tuple[str, str]] = {}  # (who, path) -> (op, why)

    def shown(self, path: str) -> None:
        """The kernel was given `path` as an existing name."""
        if len(self._held_by_kernel) >= LIMIT:
            self._held_by_kernel.clear()
        self._held_by_kernel.add(path)

    def refused(self, who: str, path: str, held: tuple[str, str]) -> bool:
        """A lookup of `path` by `who` was refused. True if its event is held back
        (a revalidation: a fresh lookup will follow); False to log it now."""
        if self.pending.pop((who, path), None) is not None:
            return False  # the fresh lookup after a held one: this one is logged
        if path in self._held_by_kernel:
            self._held_by_kernel.discard(path)  # the kernel drops it now
            self.pending[(who, path)] = held
            return True
        return False

    def overdue(self, who: str, path: str) -> tuple[str, str] | None:
        """After HOLD: the held refusal (op, why) if no fresh lookup came, to log now."""
        return self.pending.pop((who, path), None)
