"""What each agent's processes are doing: kept by the supervisor and `bind`.

This is not the log's state (the dispatcher's): it tells what runs now, which a
replay cannot know. The supervisor writes the state, pids and restarts of the
agents it runs; a `bind` (from `outheisfs run`) adds the processes bound to an
agent; the ctl files show it all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config

STATES = ("external", "stopped", "starting", "running", "failed")


@dataclass(eq=False)
class ProcState:
    state: str = "external"  # external: no command, its processes are not ours to run
    pids: list[int] = field(default_factory=list)  # supervised processes
    restarts: int = 0
    bound: set[int] = field(default_factory=set)  # processes bound by `outheisfs run`
    next_start: str = ""  # failed: when the supervisor starts it again (cooldown)

    def live_pids(self) -> list[int]:
        """Supervised processes, or else the processes bound by `outheisfs run`."""
        return self.pids or sorted(self.bound)


class Processes:
    """The ProcState of every agent, made on first use from the config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._of: dict[str, ProcState] = {}

    def of(self, name: str) -> ProcState:
        p = self._of.get(name)
        if p is None:
            ac = self.config.agents.get(name)
            p = self._of[name] = ProcState("stopped" if ac and ac.command else "external")
        return p
