"""The event log as a JetStream stream: publish, follow in order, read it all.

The stream's sequence number is the event's `seq`. A publish carries a message
id (`Nats-Msg-Id`), so a publish retried after a lost acknowledgement is stored
once; it returns only with the engine's acknowledgement, which the engine gives
once `replicas` servers have stored the event (each fsyncs it first when its
config says `sync_interval: always`, as `local.py` and docs/cluster.md set it).
While the servers cannot be reached a publish keeps trying with the same ids
and fails with `EngineUnavailable` after `publish_timeout` (30 s); it never
reports stored what the engine did not acknowledge.

All nats-py calls run on the bridge's asyncio thread; the methods here are
called from trio.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from ..config import ClusterConfig
from .bridge import Bridge

log = logging.getLogger(__name__)
DUPLICATE_WINDOW = 120.0  # s: longer than any retry of one publish
ATTEMPT_TIMEOUT = 2.0  # s: one round of publishes waits this long for its acks
FETCH_BATCH = 1000  # events handed to trio at most per wake-up


class EngineError(Exception):
    """The engine refused or failed an operation (a clear one-line reason)."""


class EngineUnavailable(EngineError):
    """The servers could not be reached (or did not store) within the limit."""


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach the servers; TLS and credentials go to nats-py as they are."""

    servers: list[str]
    name: str = "outheisfs"
    credentials: str | None = None  # a NATS .creds file (JWT and nkey seed)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 2.0
    reconnect_wait: float = 0.25
    extra: dict[str, Any] = field(default_factory=dict)  # further nats.connect() options

    def tls(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "servers": self.servers,
            "name": self.name,
            "connect_timeout": self.connect_timeout,
            "reconnect_time_wait": self.reconnect_wait,
            "max_reconnect_attempts": -1,  # keep trying: the limit is the publish's
            "allow_reconnect": True,
            "error_cb": _quiet_error,
        }
        if self.credentials:
            kw["user_credentials"] = self.credentials
        tls = self.tls()
        if tls is not None:
            kw["tls"] = tls
        kw.update(self.extra)
        return kw


async def _quiet_error(e: Exception) -> None:
    # nats-py reports each failed (re)connect through this; without it, a traceback
    # per attempt on stderr. The engine's callers get one clear exception instead.
    log.debug("nats: %s: %s", type(e).__name__, e)


def connect_options(cfg: ClusterConfig, home: Path, name: str = "outheisfs") -> ConnectOptions:
    """The `[cluster]` table as connection options; file paths resolve against `home`."""

    def path(p: str | None) -> str | None:
        return None if p is None else str(home / Path(p).expanduser())

    return ConnectOptions(
        servers=list(cfg.servers),
        name=name,
        credentials=path(cfg.credentials),
        tls_ca=path(cfg.tls_ca),
        tls_cert=path(cfg.tls_cert),
        tls_key=path(cfg.tls_key),
    )


@dataclass(frozen=True, slots=True)
class Stored:
    """One event as the stream holds it."""

    seq: int
    msg_id: str | None
    data: bytes


def _stored(msg: Msg) -> Stored:
    mid = msg.headers.get("Nats-Msg-Id") if msg.headers else None
    return Stored(msg.metadata.sequence.stream, mid, msg.data)


class Engine:
    """One connection to the servers and the stream that is the event log."""

    def __init__(
        self, bridge: Bridge, nc: Client, stream: str, replicas: int, publish_timeout: float
    ) -> None:
        self.bridge = bridge
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=ATTEMPT_TIMEOUT)
        self.stream = stream
        self.subject = f"{stream}.events"
        self.replicas = replicas
        self.publish_timeout = publish_timeout
        self.servers: list[str] = []  # as configured, for messages

    # -- setting up ----------------------------------------------------------------------

    async def _ensure_stream(self) -> None:
        """Create the stream, or check and adapt it; retried while the cluster settles."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        while True:
            try:
                return await self._ensure_stream_once()
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError,
                nats.js.errors.BadRequestError,  # "no suitable peers": members still joining
            ) as e:
                if isinstance(e, nats.js.errors.BadRequestError) and e.err_code != 10005:
                    raise
                if loop.time() > deadline:
                    raise EngineUnavailable(
                        f"stream {self.stream!r}: JetStream did not answer within "
                        f"{self.publish_timeout:g} s"
                    ) from None
                await asyncio.sleep(0.2)

    async def _ensure_stream_once(self) -> None:
        cfg = api.StreamConfig(
            name=self.stream,
            subjects=[self.subject],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=DUPLICATE_WINDOW,
            discard=api.DiscardPolicy.NEW,  # never drop events to make room
            allow_direct=True,
        )
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(cfg)
            return
        have = info.config
        if have.subjects != [self.subject]:
            raise EngineError(
                f"stream {self.stream!r} exists with subjects {have.subjects}, "
                f"not [{self.subject!r}]: not an outheisfs event log"
            )
        if have.num_replicas != self.replicas or have.duplicate_window != DUPLICATE_WINDOW:
            await self.js.update_stream(cfg)

    # -- publishing ----------------------------------------------------------------------

    async def _publish(self, events: Sequence[tuple[str, bytes]]) -> list[int]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        seqs: list[int | None] = [None] * len(events)
        last: BaseException | None = None
        while True:
            todo = [i for i, s in enumerate(seqs) if s is None]
            if not todo:
                return [s for s in seqs if s is not None]
            left = deadline - loop.time()
            if left <= 0:
                break
            futs: dict[int, asyncio.Future[api.PubAck]] = {}
            try:
                for i in todo:  # in order, on one connection: stored in this order
                    mid, data = events[i]
                    futs[i] = await self.js.publish_async(
                        self.subject, data, headers={"Nats-Msg-Id": mid}
                    )
            except nats.errors.MaxPayloadError:
                raise EngineError(
                    f"an event is larger than the servers' max_payload "
                    f"({self.nc.max_payload} bytes): raise max_payload in their config"
                ) from None
            except (nats.errors.Error, OSError) as e:
                last = e
            if futs:
                await asyncio.wait(futs.values(), timeout=min(ATTEMPT_TIMEOUT, left))
            for i, fut in futs.items():
                if not fut.done():
                    fut.cancel()
                elif fut.exception() is not None:
                    last = fut.exception()
                else:
                    seqs[i] = fut.result().seq
            if any(s is None for s in seqs):
                await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
        raise EngineUnavailable(
            f"the event log (stream {self.stream!r} on {', '.join(self.servers)}) "
            f"did not store {sum(s is None for s in seqs)} of {len(events)} events "
            f"within {self.publish_timeout:g} s"
            + (f": {type(last).__name__}: {last}" if last else "")
        )

    async def publish(self, events: Sequence[tuple[str, bytes]]) -> list[int]:
        """Store each (message id, data); return their seqs once all are stored.

        Events of one call are sent in order on one connection and stored in that
        order, unless one had to be sent again: it is then stored after the others
        (the seqs returned say where each went). Raises EngineUnavailable after
        `publish_timeout`; some of the events may be stored even then.
        """
        if not events:
            return []
        return await self.bridge.call(self._publish, list(events))

    # -- reading ---------------------------------------------------------------------------

    async def last_seq(self) -> int:
        """The stream's last seq; retried while the servers elect a leader (no
        responders, timeouts), up to `publish_timeout`."""

        async def info() -> int:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.publish_timeout
            while True:
                try:
                    return (await self.js.stream_info(self.stream)).state.last_seq
                except (
                    nats.errors.NoRespondersError,
                    nats.errors.TimeoutError,
                    nats.js.errors.ServiceUnavailableError,
                ):
                    if loop.time() > deadline:
                        raise EngineUnavailable(
                            f"stream {self.stream!r}: JetStream did not answer within "
                            f"{self.publish_timeout:g} s"
                        ) from None
                    await asyncio.sleep(0.2)

        return await self.bridge.call(info)

    @asynccontextmanager
    async def read_all(self, until: int | None = None) -> AsyncIterator[Follower]:
        """Every event from seq 1 to `until` (else to the end as of now), in order.

        `async with engine.read_all() as events: async for ev in events: ...`
        (for `replay` on the stream): memory holds one batch, not the stream.
        """
        end = await self.last_seq() if until is None else until
        async with self.follow(1, until=end) as events:
            yield events

    @asynccontextmanager
    async def follow(self, from_seq: int = 1, until: int | None = None) -> AsyncIterator[Follower]:
        """Every event from `from_seq` on (to `until`), in order, as it is stored."""
        follower = Follower(self, max(1, from_seq), until)
        try:
            yield follower
        finally:
            with trio.CancelScope(shield=True):
                await self.bridge.call(follower.close)

    async def close(self) -> None:
        async def drain() -> None:
            if not self.nc.is_closed:
                await self.nc.close()

        await self.bridge.call(drain)


class Follower:
    """An ordered subscription from a seq on; its asyncio half runs on the bridge.

    nats-py's ordered consumer already re-creates itself after a gap; the seq of
    each event is checked here too: one seen before is skipped, a gap starts a
    new subscription at the first seq missing. Events wait in nats-py's buffer
    (bounded by JetStream flow control) until the trio side asks for them.
    """

    def __init__(self, engine: Engine, from_seq: int, until: int | None = None) -> None:
        self.engine = engine
        self.next_seq = from_seq
        self.until = until
        self._buffer: deque[Stored] = deque()
        self._sub: Any = None
        self._gap_at: int | None = None
        self.resubscribed = 0  # gaps seen: a new subscription from the first seq missing
        self.skipped = 0  # seqs not in the stream any more

    async def _subscribe(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                pass
            self._sub = None
        self._sub = await self.engine.js.subscribe(
            self.engine.subject,
            stream=self.engine.stream,
            ordered_consumer=True,
            idle_heartbeat=1.0,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=self.next_seq),
        )

    async def _take(self) -> list[Stored]:
        """Wait for the next events (at least one), in order."""
        while True:
            if self._sub is None:
                try:
                    await self._subscribe()
                except (nats.errors.Error, nats.js.errors.Error, OSError):
                    await asyncio.sleep(0.25)  # the servers are away: try again
                    continue
            sub = self._sub
            out: list[Stored] = []
            msg = await sub.next_msg(timeout=None)
            batch = [msg]
            while len(batch) < FETCH_BATCH and sub.pending_msgs > 0:
                batch.append(await sub.next_msg(timeout=None))
            for m in batch:
                if m.headers and m.headers.get("Status"):
                    continue  # a heartbeat or flow-control message nats-py let through
                ev = _stored(m)
                if ev.seq < self.next_seq:
                    continue
                if ev.seq > self.next_seq:
                    if self._gap_at == self.next_seq:
                        # Asked again from next_seq, the stream starts later: those
                        # events are not in it (removed by its limits or by hand).
                        self.skipped += ev.seq - self.next_seq
                        self.next_seq = ev.seq
                    else:
                        self._gap_at = self.next_seq
                        self.resubscribed += 1
                        await self.close()  # the loop subscribes again from next_seq
                        break
                self._gap_at = None
                out.append(ev)
                self.next_seq += 1
            if out:
                return out

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except (nats.errors.Error, nats.js.errors.Error):
                pass
            self._sub = None

    async def next_batch(self) -> list[Stored]:
        """From trio: the next events in seq order (waits for at least one).

        Past `until`: an empty list.
        """
        if self._buffer:
            out, self._buffer = list(self._buffer), deque()
            return out
        if self.until is not None and self.next_seq > self.until:
            return []
        out = await self.engine.bridge.call(self._take)
        if self.until is not None:
            out = [ev for ev in out if ev.seq <= self.until]
        return out

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> Stored:
        if not self._buffer:
            self._buffer = deque(await self.next_batch())
            if not self._buffer:
                raise StopAsyncIteration
        return self._buffer.popleft()


@asynccontextmanager
async def open_engine(
    options: ConnectOptions,
    stream: str,
    replicas: int,
    *,
    publish_timeout: float = 30.0,
    bridge: Bridge | None = None,
    connect_limit: float | None = None,
) -> AsyncIterator[Engine]:
    """Connect (within `connect_limit`, else `publish_timeout`), make sure the
    stream exists with `replicas`, and yield the engine."""
    own = bridge is None
    br = Bridge() if bridge is None else bridge
    try:

        async def connect() -> Client:
            # nats-py retries a first connection as long as later ones (for ever): bound it.
            try:
                return await asyncio.wait_for(
                    nats.connect(**options.kwargs()), connect_limit or publish_timeout
                )
            except (nats.errors.Error, OSError, TimeoutError) as e:
                raise EngineUnavailable(
                    f"cannot reach the NATS servers {', '.join(options.servers)}: "
                    f"{type(e).__name__}: {e}"
                ) from None

        nc = await br.call(connect)
        engine = Engine(br, nc, stream, replicas, publish_timeout)
        engine.servers = list(options.servers)
        try:
            try:
                await br.call(engine._ensure_stream)
            except nats.js.errors.Error as e:
                raise EngineError(f"stream {stream!r}: {e}") from None
            yield engine
        finally:
            with trio.CancelScope(shield=True):
                await engine.close()
    finally:
        if own:
            br.close()
