"""Pools that size themselves: the service that applies `scaling`'s rule.

Every SCALE_TICK seconds, for each agent with `instances = { min, max }` that runs,
it asks `scaling.decide` with the age of the oldest queued message and the
instances that wait idle on the inbox, and takes at most one step through the
supervisor (`grow`, `shrink`), each a logged `scale` event.
"""

from __future__ import annotations

import logging
import time

import trio

from . import scaling
from .dispatcher import Dispatcher
from .supervisor import Supervisor

log = logging.getLogger(__name__)
SCALE_TICK = 0.2  # seconds between looks at the pools


class Pools:
    def __init__(self, d: Dispatcher, supervisor: Supervisor) -> None:
        self.d = d
        self.supervisor = supervisor

    async def run(self) -> None:
        sup = self.supervisor
        while not sup.shutting_down:
            await trio.sleep(SCALE_TICK)
            for name, runner in list(sup.runners.items()):
                if runner.config.pool and runner.wanted and runner.proc.state == "running":
                    try:
                        await self.step(name)
                    except OSError as e:  # the log refused: not done, try again later
                        log.warning("%s: pool not sized: %s", name, e)

    async def step(self, name: str) -> None:
        """One step of NAME's pool, if one is due."""
        sup = self.supervisor
        agent = self.d.agents.get(name)
        runner = sup.runners.get(name)
        if agent is None or runner is None or sup.shutting_down:
            return
        ac = runner.config
        now = time.monotonic()
        oldest = agent.inbox.oldest()
        age = None if oldest is None else max(0.0, time.time() - oldest.t)
        idle = sup.idle(name)
        current = agent.instances
        want = scaling.decide(now, age, idle, current, ac.floor, ac.ceiling, ac.after, ac.idle)
        if want > current:
            why = scaling.why_grow(age or 0.0, ac.after) if current >= ac.floor else "below min"
            await sup.grow(name, want, why)
        elif want < current:
            victim = scaling.pick(now, idle, ac.idle)
            if victim is not None:
                sup.shrink(name, victim, want, scaling.why_shrink(now, idle[victim]))
