"""Helpers for the fast tier: tests below FUSE, nothing mounted, no subprocesses.

Not a conftest: these are imported explicitly (`from .helpers import ...`).
"""

from __future__ import annotations

import json
import os
import types
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from outheisfs import dispatcher as dispatcher_mod
from outheisfs import eventlog as eventlog_mod
from outheisfs.config import AgentConfig, Config
from outheisfs.dispatcher import Dispatcher
from outheisfs.eventlog import EventLog
from outheisfs.models import Draft, Message

# -- configuration -------------------------------------------------------------------


def make_config(agents: dict[str, dict[str, Any]] | None = None, **top: Any) -> Config:
    """A Config with agents given as plain dicts of their keys."""
    return Config(
        agents={name: AgentConfig(**keys) for name, keys in (agents or {}).items()},
        **top,
    )


# -- a clock for the log's timestamps and the dispatcher's notion of now ------------


class Clock:
    """Fake wall-clock time, shared by the event log (`ts`) and the dispatcher (aging)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def now(self) -> tuple[float, str]:
        ts = datetime.fromtimestamp(self.t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return self.t, ts

    def time(self) -> float:
        return self.t

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Clock:
        monkeypatch.setattr(eventlog_mod, "now", self.now)
        monkeypatch.setattr(dispatcher_mod, "time", types.SimpleNamespace(time=self.time))
        return self


# -- a dispatcher on a real event log ------------------------------------------------


def open_dispatcher(state: Path, config: Config | None = None) -> tuple[Dispatcher, EventLog]:
    """Wire a Dispatcher to an EventLog in `state` the way mount.serve does."""
    config = config or make_config()
    log = EventLog(state, config.durability)
    d = Dispatcher(config, log)
    log.open(d.apply)
    d.install_config()
    return d, log


def replayed(state: Path, config: Config) -> Dispatcher:
    """A fresh Dispatcher rebuilt from the log alone, without writing anything."""
    d = Dispatcher(config, None)
    EventLog(state, readonly=True).open(d.apply)
    return d


def send(
    d: Dispatcher,
    sender: str,
    to: str | None,
    body: Any = "hi",
    priority: str | None = None,
    reply_to: str | None = None,
    targets: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Send one message: to an inbox (`to`), or through SENDER's outbox (`to=None`)."""
    events = d.plan(
        sender, [Draft(body=body, priority=priority, reply_to=reply_to, to=targets)], to
    )
    d.deliver(events)
    return events


def read_events(state: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = state / eventlog_mod.MAIN
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_bytes().splitlines()]
    return out if kind is None else [e for e in out if e["type"] == kind]


def snapshot(d: Dispatcher, at: float | None = None) -> dict[str, Any]:
    """Everything a replay must reproduce, as plain data."""

    def msg(m: Message) -> tuple[Any, ...]:
        return (m.id, m.seq, m.sender, m.to, m.priority, m.body, m.reply_to, m.delivered)

    agents = {}
    for name, a in d.agents.items():
        head = a.inbox.peek(at) if at is not None else None
        agents[name] = {
            "priority": a.priority,
            "queued": [msg(m) for m in a.inbox.messages()],
            "count": a.queued,
            "inflight": sorted(msg(m) for m in a.inflight.values()),
            "delivered": a.delivered,
            "dead": a.dead,
            "held": sorted(msg(m) for m in a.held.values()),
            "head": None if head is None else head.id,
        }
    return {"seq": d.seq, "agents": agents, "pending": sorted(d.messages)}


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its content (to prove nothing was written)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# -- the Operations object without a mount -------------------------------------------


@dataclass
class Ctx:
    """What pyfuse3 passes as the request context."""

    pid: int = field(default_factory=os.getpid)
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int = 0o022


class Token(list[tuple[bytes, Any, int]]):
    """Stands for a pyfuse3.ReaddirToken; `limit` entries are taken, then no more."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__()
        self.limit = limit


def fake_readdir_reply(token: Token, name: bytes, attr: Any, next_id: int) -> bool:
    if token.limit is not None and len(token) >= token.limit:
        return False
    token.append((name, attr, next_id))
    return True


@dataclass
class OpsEnv:
    """Dispatcher + EventLog + ProcEvents + Operations, wired as mount.serve wires them."""

    state: Path
    config: Config
    d: Dispatcher
    log: EventLog
    ops: Any
    ctx: Ctx

    async def ino(self, path: str) -> int:
        from outheisfs.tree import ROOT_INODE

        inode = ROOT_INODE
        for part in [p for p in path.split("/") if p]:
            inode = (await self.ops.lookup(inode, part.encode(), self.ctx)).st_ino
        return inode

    async def open(self, path: str, flags: int) -> int:
        fi = await self.ops.open(await self.ino(path), flags, self.ctx)
        return int(fi.fh)

    async def write(self, path: str, data: bytes, flags: int = os.O_WRONLY) -> int:
        """open, write, close: what `echo data > path` does."""
        fh = await self.open(path, flags)
        try:
            return int(await self.ops.write(fh, 0, data))
        finally:
            await self.ops.release(fh)

    async def read_all(self, path: str, chunk: int = 1 << 16) -> bytes:
        """A whole growing file, read at offsets until a read returns nothing."""
        fh = await self.open(path, os.O_RDONLY)
        out = b""
        try:
            while data := await self.ops.read(fh, len(out), chunk):
                out += data
        finally:
            await self.ops.release(fh)
        return out

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return read_events(self.state, kind)


def make_ops_env(state: Path, config: Config | None = None) -> OpsEnv:
    from outheisfs.ops import Operations
    from outheisfs.procevents import ProcEvents

    config = config or make_config({"echo": {}})
    d, log = open_dispatcher(state, config)
    ops = Operations(d, log, ProcEvents())
    return OpsEnv(state, config, d, log, ops, Ctx())


async def errno_of(request: Any) -> int | None:
    """The errno a handler call is refused with; None if it succeeds."""
    try:
        await request
    except pyfuse3.FUSEError as e:
        return int(e.errno)
    return None


async def until_parked(env: OpsEnv, n: int = 1) -> None:
    """Wait until `n` requests are parked (on an empty inbox or for room), all
    other tasks being blocked: a deterministic wait, not a sleep."""
    with trio.fail_after(5):
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if sum(env.ops.files.waiting.values()) >= n:
                return
            await trio.sleep(0.001)
