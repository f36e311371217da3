"""How many instances a pool that sizes itself runs: the rule, apart from processes.

A pool (`instances = { min, max }`) grows by one while the oldest message in its
queue has waited longer than `scale_after` and fewer than `max` run, and shrinks
by one while an instance has waited idle on its inbox for `scale_idle` and more
than `min` run. Only an idle reader is stopped: it holds nothing, and the server
lets it take nothing more once it is chosen, so shrinking never redelivers.

Pure functions of the numbers they are given (time included), so that the
supervisor's loop is a few lines and the rule is tested without a clock.
"""

from __future__ import annotations

from collections.abc import Mapping


def decide(
    now: float,
    age: float | None,
    idle: Mapping[int, float],
    current: int,
    lo: int,
    hi: int,
    after: float = 1.0,
    idle_after: float = 30.0,
) -> int:
    """The number of instances wanted next.

    `age`: seconds the oldest queued message has waited (None: nothing queued);
    `idle`: instance -> since when (same clock as `now`) it waits idle on its inbox;
    `current`: how many are wanted now; `lo`, `hi`: the pool's bounds.
    One step at a time: the caller acts, then asks again."""
    if current < lo:
        return lo
    if current > hi:
        return hi
    if age is not None and age > after and current < hi:
        return current + 1
    if age is None and current > lo and pick(now, idle, idle_after) is not None:
        return current - 1
    return current


def pick(now: float, idle: Mapping[int, float], idle_after: float) -> int | None:
    """The instance to stop: of those idle for `idle_after` seconds at least, the
    one idle longest (the highest number of equals); None if there is none."""
    ready = [(since, -index) for index, since in idle.items() if now - since >= idle_after]
    if not ready:
        return None
    return -min(ready)[1]


def why_grow(age: float, after: float) -> str:
    return f"oldest queued message waited {age:.1f} s (scale_after {after:g} s)"


def why_shrink(now: float, since: float) -> str:
    return f"instance idle on its inbox for {now - since:.1f} s"
