"""One agent's queue: three priority classes, FIFO within each, with aging.

A message that has waited `aging` seconds competes as if one class higher, two
classes after twice that, so background work reaches the front eventually even
under a steady stream of interactive messages.
"""

from __future__ import annotations

import heapq

from .models import QUEUED, RANK, Message

Entry = tuple[int, int, Message]  # (seq, gen, message)


class Inbox:
    def __init__(self, aging: float) -> None:
        self.aging = aging
        self._heaps: tuple[list[Entry], list[Entry], list[Entry]] = ([], [], [])
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, msg: Message) -> None:
        msg.gen += 1
        msg.state = QUEUED
        heapq.heappush(self._heaps[RANK.get(msg.priority, 1)], (msg.seq, msg.gen, msg))
        self._count += 1

    def _head(self, heap: list[Entry]) -> Message | None:
        while heap:
            _, gen, msg = heap[0]
            if msg.gen == gen and msg.state == QUEUED:
                return msg
            heapq.heappop(heap)  # taken or re-queued since: a stale entry
        return None

    def peek(self, now: float) -> Message | None:
        """The message to serve next at time `now`, without taking it."""
        best: Message | None = None
        best_key = (9, 0)
        for rank, heap in enumerate(self._heaps):
            msg = self._head(heap)
            if msg is None:
                continue
            key = (max(0, rank - int(max(0.0, now - msg.t) // self.aging)), msg.seq)
            if key < best_key:
                best, best_key = msg, key
        return best

    def oldest(self) -> Message | None:
        """The queued message that was sent first (the lowest seq), if any."""
        heads = [m for m in map(self._head, self._heaps) if m is not None]
        return min(heads, key=lambda m: m.seq) if heads else None

    def taken(self, msg: Message) -> None:
        """`msg` left the queue (delivered or dead); its heap entry goes stale.
        Stale entries at the head go now: a replay takes messages without
        peeking, and the heap must not keep every message the log ever held."""
        msg.gen += 1
        self._count -= 1
        self._head(self._heaps[RANK.get(msg.priority, 1)])

    def messages(self) -> list[Message]:
        """Queued messages in serving order at the moment (for replay output)."""
        out = [m for heap in self._heaps for (_, g, m) in heap if m.gen == g and m.state == QUEUED]
        return sorted(out, key=lambda m: (RANK.get(m.priority, 1), m.seq))
