"""`outheisfs reload` and SIGHUP: the config read again, and only the difference applied.

`diff` compares two configs (pure): agents added, changed (restarted with the new
settings), resized (only `instances`, `scale_after` or `scale_idle` differ: the
pool grows or shrinks, nothing restarts), removed (stopped; one that still holds
messages stays as a mailbox without a process), and the top-level keys that only a
mount can change (`MOUNT_ONLY`: they keep their old values until then).

`Reloader.reload` applies it: stop what goes or changes, log the `reload` event
and take the new config in the dispatcher, hand the new values to the parts of
the server that hold them, start what is new or changed, resize what is resized.
A config that does not load changes nothing. Unchanged agents are not touched:
same processes, same queue, and what ctl changed at run time stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import events, sandbox
from .access import Access
from .config import Config, load_config
from .dispatcher import Dispatcher
from .errors import BadInput, ConfigError, NotLogged
from .operators import Operators
from .output import Output
from .procstate import Processes
from .supervisor import Supervisor
from .tree import Tree
from .vault import Store
from .vaultops import VaultOps
from .views import config_grants

# Top-level keys that take effect at the next mount only.
MOUNT_ONLY = ("durability", "confine", "cluster")
# Agent keys that change how many instances run, and nothing else.
SIZE_KEYS = ("instances", "scale_after", "scale_idle")


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    remount: list[str] = field(default_factory=list)

    def fields(self, kept: list[str]) -> dict[str, list[str]]:
        """The lists a `reload` event carries (`kept`: removed agents that hold
        messages and stay as mailboxes)."""
        return {
            "added": self.added,
            "changed": self.changed,
            "resized": self.resized,
            "removed": self.removed,
            "kept": kept,
            "remount": self.remount,
        }


def diff(old: Config, new: Config) -> Changes:
    """What differs between the config in force and a new one, agent by agent."""
    ch = Changes()
    for name, b in new.agents.items():
        a = old.agents.get(name)
        if a is None:
            ch.added.append(name)
        elif config_grants(old, name) != config_grants(new, name):
            ch.changed.append(name)  # its vault domains changed
        elif a == b:
            continue
        elif a.model_copy(update={k: getattr(b, k) for k in SIZE_KEYS}) == b:
            ch.resized.append(name)
        else:
            ch.changed.append(name)
    ch.removed = [name for name in old.agents if name not in new.agents]
    ch.remount = [k for k in MOUNT_ONLY if getattr(old, k) != getattr(new, k)]
    return ch


def effective(old: Config, new: Config) -> Config:
    """The new config as it is in force until the next mount."""
    return new.model_copy(update={k: getattr(old, k) for k in MOUNT_ONLY})


@dataclass
class Parts:
    """What of the server holds values of the config, besides the dispatcher."""

    supervisor: Supervisor
    table: Processes
    tree: Tree
    store: Store
    vault: VaultOps
    access: Access
    output: Output


class Reloader:
    def __init__(self, d: Dispatcher, parts: Parts, state: Path, config_file: Path | None) -> None:
        self.d = d
        self.parts = parts
        self.state = state
        # The file the mount read; None: `outheis.toml` here, when it appears.
        self.config_file = config_file
        self.cwd = Path.cwd()
        self._lock = trio.Lock()

    def read(self) -> Config:
        """The config as it is on disk now; BadInput (EINVAL) with its one line if bad."""
        try:
            if self.config_file is not None:
                config = load_config(self.config_file)
            elif (self.cwd / "outheis.toml").exists():
                config = load_config(self.cwd / "outheis.toml")
            else:
                config = Config(home=self.cwd)
            sandbox.check(config, self.state)
        except (ConfigError, sandbox.ConfineError) as e:
            raise BadInput(f"reload: {e}") from None
        return config

    async def reload(self, who: str) -> events.Event:
        """Read the config again and apply the difference; return the `reload` event."""
        async with self._lock:
            return await self._reload(who)

    async def _reload(self, who: str) -> events.Event:
        old = self.d.config
        new = effective(old, self.read())
        ch = diff(old, new)
        sup = self.parts.supervisor
        going = [n for n in ch.removed + ch.changed if sup.supervises(n)]
        ran = [n for n in going if sup.runners[n].wanted]
        async with trio.open_nursery() as nursery:
            for name in going:
                nursery.start_soon(sup.stop, name)
        kept = [n for n in ch.removed if n in self.d.agents and _pending(self.d, n)]
        source = self.config_file or self.cwd / "outheis.toml"
        agents = {n: a.priority for n, a in new.agents.items()}
        ev = events.reload(who, str(source), ch.fields(kept), agents)
        try:
            self.d.reconfigure(new, ev)
        except OSError as e:  # not logged: nothing changed; what was stopped runs again
            for name in ran:
                await sup.start(name)
            raise NotLogged(f"reload: event log not written: {e.strerror}", e.errno or 5) from e
        self._hand_on(new, ch)
        for name in ch.removed:
            sup.install(name, None)
        for name in ch.changed + ch.added:
            ac = new.agents[name]
            sup.install(name, ac)
            if ac.command:
                await sup.start(name)
        for name in ch.resized:
            sup.reconfigure(name, new.agents[name])
            if sup.supervises(name):
                await sup.instances(name)
        return ev

    def _hand_on(self, new: Config, ch: Changes) -> None:
        """The new values to the parts of the server that keep their own copy."""
        p = self.parts
        p.table.config = new
        p.output.max_bytes = new.output_max
        p.supervisor.grace = new.stop_grace
        p.access.operators = Operators.resolve(new.operators)
        p.vault.owners = dict(new.vault)
        for domain in new.vault:
            (p.store.root / domain).mkdir(exist_ok=True)
        for agent in self.d.agents.values():
            agent.inbox.aging = new.aging
        for name in ch.added:
            p.tree.add_agent(name)
        for name in ch.removed:
            if name not in self.d.agents:
                p.tree.remove_agent(name)


def _pending(d: Dispatcher, name: str) -> bool:
    agent = d.agents[name]
    return bool(agent.queued or agent.inflight or agent.delayed)
