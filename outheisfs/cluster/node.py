"""One host of a cluster: the event log on the stream, the local file as its cache.

`ClusterLog` is an `EventLog` whose `append` publishes instead of writing: the
dispatcher's `record` then applies nothing at once. Every event, this host's
and the others', is applied when it comes back from the stream, in the
stream's order (`Order.apply`), and written to the local `events.jsonl` with
the stream's seq: the state folder is a cache that a start replays before it
follows the stream from the cache's last seq + 1. Whoever waits on an action
(`durable`, `settled`) waits until its events are stored by the engine and
applied here; `settled` also says whether a `deliver` this task proposed won.

`joined` is a host's life around the mount: connect, claim the host name,
replay the cache, catch up with the stream, publish the `mount` event, report
hosts that are gone (`host-gone`), move agents when the log says so, and at
the end publish `umount` and give the name back.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from .. import events
from ..config import Config
from ..dispatcher import Dispatcher
from ..eventlog import EventLog, _streams, encode
from ..events import Event
from ..models import dumps, new_id, now
from .engine import Engine, EngineError, Stored, connect_options, open_engine
from .hosts import Hosts
from .order import Order, host_gone

log = logging.getLogger(__name__)
NOTES = {"error", "denied", "vault", "start", "exit", "restart", "failed", "umount"}
CONNECT_LIMIT = 10.0  # s: a mount that reaches no server gives up after this
REJECTED_KEPT = 100_000  # seqs of void events remembered for the tasks that wait on them


@dataclass(eq=False)
class Ticket:
    """One append on its way: published, then applied here."""

    batch: list[tuple[str, bytes]]
    delivers: bool
    done: trio.Event = field(default_factory=trio.Event)
    seqs: list[int] = field(default_factory=list)
    error: str | None = None
    lost: bool = False


class ClusterLog(EventLog):
    """The event log of a host in a cluster (see the module's docstring)."""

    def __init__(self, state: Path, engine: Engine, host: str, order: Order) -> None:
        super().__init__(state, "process")
        self.engine = engine
        self.host = host
        self.order = order
        self.d: Dispatcher | None = None
        self.nursery: trio.Nursery | None = None
        self.applied = 0  # the last seq applied here
        self._changed = trio.Event()
        self._last: dict[Any, Ticket] = {}  # trio task -> the last ticket it appended
        self._rejected: set[int] = set()
        self._rejected_order: deque[int] = deque()
        self.publishing = 0  # appends not yet stored and applied
        self._last_ts = "1970-01-01T00:00:00.000000Z"  # of the last event taken in

    # -- publishing ------------------------------------------------------------------

    def append(self, batch: Iterable[Event]) -> list[Event]:
        """Publish the events (in the background); nothing is applied now."""
        assert self.nursery is not None
        _, ts = now()
        out: list[tuple[str, bytes]] = []
        kinds: set[str] = set()
        for ev in batch:
            full: Event = {"ts": ts}
            full.update(ev)
            kind = full["type"]
            kinds.add(kind)
            if kind != "message":
                full.setdefault("host", self.host)  # who did it (host-gone: who went)
            mid = full["id"] if kind == "message" else new_id()
            out.append((mid, dumps(full).encode()))
        if not out or kinds == {"umount"}:
            # A host's `umount` is published by `joined` itself, last: after the
            # acks of its closing readers are stored, so that they count.
            return []
        ticket = Ticket(out, "deliver" in kinds)
        if not kinds <= NOTES:  # reports are not waited on
            self._last[trio.lowlevel.current_task()] = ticket
        self.publishing += 1
        self.nursery.start_soon(self._publish, ticket)
        return []

    async def _publish(self, ticket: Ticket) -> None:
        try:
            ticket.seqs = await self.engine.publish(ticket.batch)
            await self.wait_applied(max(ticket.seqs))
            ticket.lost = ticket.delivers and any(s in self._rejected for s in ticket.seqs)
        except EngineError as e:
            ticket.error = str(e)
            log.error("%s", e)
        except Exception as e:  # never the end of the mount: this write fails, EIO
            log.exception("publish failed")
            ticket.error = f"the event log's engine failed: {type(e).__name__}: {e}"
        finally:
            self.publishing -= 1
            ticket.done.set()

    async def last(self, ev: Event) -> None:
        """Publish `ev` once everything appended before is stored and applied (a
        host's `umount`, after the acks of its closing readers), and wait for it."""
        await self.drain()
        full: Event = {"ts": now()[1], **ev, "host": self.host}
        ticket = Ticket([(new_id(), dumps(full).encode())], False)
        self.publishing += 1
        await self._publish(ticket)

    async def drain(self) -> None:
        """Wait until everything appended so far is stored and applied (or failed)."""
        while self.publishing:
            await trio.sleep(0.01)

    @property
    def away(self) -> bool:
        """The engine is out of reach now (its connection is down)."""
        return not self.engine.nc.is_connected

    async def wait_applied(self, seq: int) -> None:
        while self.applied < seq:
            await self._changed.wait()

    async def settled(self) -> bool:
        """Wait until this task's last append is stored and applied here. False if
        a `deliver` in it came after another reader's (another host's) in the
        stream; OSError (EIO) if the engine did not store it within its limit."""
        ticket = self._last.pop(trio.lowlevel.current_task(), None)
        if ticket is None:
            return True
        await ticket.done.wait()
        if ticket.error is not None:
            raise OSError(errno.EIO, ticket.error)
        return not ticket.lost

    async def durable(self) -> None:
        await self.settled()

    # -- following ---------------------------------------------------------------------

    async def follow(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Apply every event of the stream after the cache's last one, in order."""
        async with self.engine.follow(self.seq + 1) as follower:
            task_status.started()
            while True:
                batch = await follower.next_batch()
                for stored in batch:
                    self._take_in(stored)
                self.applied = self.seq
                self._changed.set()
                self._changed = trio.Event()

    def _take_in(self, stored: Stored) -> None:
        assert self.d is not None
        ev: Event = {"seq": stored.seq}
        try:
            data = json.loads(stored.data)
            if not isinstance(data, dict) or not all(
                isinstance(data.get(k), str) for k in ("type", "ts")
            ):
                raise ValueError("not an event")
            data.pop("seq", None)
            ev.update(data)
        except ValueError:
            # The same on every host: the time of the event before it.
            why = events.error("/log", errno.EIO, "an unreadable event in the stream")
            ev = {"seq": stored.seq, "ts": self._last_ts, **why}
        self._last_ts = ev["ts"]
        raw = encode(ev)
        at = self._size
        self._write_all(raw)  # the cache: the same seq as the stream
        self._stream_write(_streams(ev), len(raw), at)
        self.seq = stored.seq
        self.mtime_ns = time.time_ns()
        try:
            ok = self.order.apply(self.d, ev)
        except Exception as e:  # an event no host could have made: passed over, alike
            log.error("event %d not applied: %s", stored.seq, e)
            ok = False
        if not ok:
            self._rejected.add(stored.seq)
            self._rejected_order.append(stored.seq)
            if len(self._rejected_order) > REJECTED_KEPT:
                self._rejected.discard(self._rejected_order.popleft())
            return
        for listener in self.d.listeners:
            listener(ev)

    def close(self) -> None:
        """Closed by `joined` once the stream is no longer followed."""

    def close_cache(self) -> None:
        super().close()


class Runs(Protocol):
    """What the node needs of the supervisor."""

    placed: Callable[[str], bool] | None

    def supervises(self, name: str) -> bool: ...
    async def start(self, name: str) -> None: ...
    async def stop(self, name: str) -> None: ...


class Node:
    """A host in the cluster while it is mounted."""

    def __init__(self, host: str, d: Dispatcher, clog: ClusterLog, hosts: Hosts) -> None:
        self.host = host
        self.d = d
        self.log = clog
        self.hosts = hosts
        self.order = clog.order
        self.supervisor: Runs | None = None

    def attach(self, supervisor: Runs) -> Callable[[str], str]:
        """The supervisor starts only the agents the log places on this host, and
        follows the log's moves. Returns where an agent runs (for ctl)."""
        self.supervisor = supervisor
        supervisor.placed = lambda name: self.order.runs_on.get(name) == self.host
        self.order.moved = self._moved
        return self.host_of

    def host_of(self, name: str) -> str:
        """Where agent NAME's processes run: a host, or `-` (none placed)."""
        return self.order.runs_on.get(name) or "-"

    def _moved(self, name: str, old: str | None, new: str | None) -> None:
        sup, nursery = self.supervisor, self.log.nursery
        if sup is None or nursery is None or not sup.supervises(name):
            return
        if new == self.host:
            nursery.start_soon(sup.start, name)
        elif old == self.host:
            nursery.start_soon(sup.stop, name)

    def report_gone(self, host: str) -> None:
        since = self.order.up.get(host)
        if since is not None and host != self.host:
            self.d.note(host_gone(host, since))

    async def watch(self) -> None:
        """Hosts gone by the heartbeats become `host-gone` events."""
        async for change in self.hosts.changes:
            if not change.alive:
                self.report_gone(change.host)


def _single(eg: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(eg)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return real[0] if len(real) == 1 and isinstance(real[0], Exception) else None


@asynccontextmanager
async def joined(
    config: Config,
    host: str,
    state: Path,
    mountpoint: Path,
    progress: Callable[[int, int], None] | None = None,
) -> AsyncIterator[Node]:
    """This host in the cluster, from its claim to its `umount` (see the module).

    Raises EngineError (HostNameInUse among them) before yielding if it cannot join.
    """
    try:
        async with _joined(config, host, state, mountpoint, progress) as node:
            yield node
    except BaseExceptionGroup as eg:
        single = _single(eg)
        if single is not None:
            raise single from None
        raise


@asynccontextmanager
async def _joined(
    config: Config,
    host: str,
    state: Path,
    mountpoint: Path,
    progress: Callable[[int, int], None] | None,
) -> AsyncIterator[Node]:
    cfg = config.cluster
    assert cfg is not None
    options = connect_options(cfg, config.home, name=f"outheisfs {host}")
    async with open_engine(
        options,
        cfg.stream,
        cfg.replicas,
        publish_timeout=cfg.write_timeout,
        connect_limit=CONNECT_LIMIT,
    ) as engine:
        hosts = Hosts(engine, host, cfg.host_timeout)
        order = Order()
        clog = ClusterLog(state, engine, host, order)
        d = Dispatcher(config, clog)
        clog.d = d
        try:
            async with trio.open_nursery() as nursery:
                clog.nursery = nursery
                await nursery.start(hosts.run)
                await _catch_up(clog, d, engine, progress)
                node = Node(host, d, clog, hosts)
                agents = {n: a.priority for n, a in config.agents.items()}
                d.record([events.mount(str(mountpoint), os.getpid(), "process", agents)])
                await clog.settled()
                for other in set(order.up) - hosts.alive():
                    node.report_gone(other)  # gone before this host started watching
                nursery.start_soon(node.watch)
                try:
                    yield node
                finally:
                    with trio.move_on_after(5, shield=True):
                        await clog.last(events.umount(str(mountpoint)))
                    hosts.stop()
                    nursery.cancel_scope.cancel()
        finally:
            clog.close_cache()


async def _catch_up(
    clog: ClusterLog,
    d: Dispatcher,
    engine: Engine,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Replay the cache, then follow the stream up to its end as of now."""

    def apply(ev: Event) -> None:
        clog._last_ts = ev["ts"]
        try:
            clog.order.apply(d, ev)
        except Exception as e:  # passed over when it came, passed over again
            log.error("event %d not applied: %s", ev["seq"], e)

    try:
        clog.open(apply, progress=progress)
    except OSError as e:
        raise EngineError(f"event log cache {clog.path}: {e.strerror}") from None
    d.install_config()
    clog.applied = clog.seq
    last = await engine.last_seq()
    if clog.seq > last:
        raise EngineError(
            f"the state folder's cache holds {clog.seq} events, the stream "
            f"{engine.stream!r} only {last}: another stream? (move {clog.path} away)"
        )
    assert clog.nursery is not None
    await clog.nursery.start(clog.follow)
    await clog.wait_applied(last)


async def replay(config: Config, until: int | None = None) -> Dispatcher:
    """The state as of the stream's end (or `until`), from the stream alone."""
    cfg = config.cluster
    assert cfg is not None
    order = Order()
    d = Dispatcher(config, None)
    async with (
        open_engine(connect_options(cfg, config.home), cfg.stream, cfg.replicas) as engine,
        engine.read_all(until) as stream,
    ):
        async for stored in stream:
            ev: Event = {"seq": stored.seq}
            try:
                ev.update(json.loads(stored.data))
                order.apply(d, ev)
            except (ValueError, KeyError, TypeError):
                d.seq = stored.seq
    return d
