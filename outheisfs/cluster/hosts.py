"""Who is alive, outside the log: host-name leases and heartbeats.

- **The claim.** A host name is a key in the key-value bucket `STREAM-hosts`,
  whose entries expire `host_timeout` after their last write. A host creates its
  key (refused while another live host holds it: `HostNameInUse`) and rewrites
  it every `host_timeout / 4`, each time on the condition that it is still the
  revision it wrote last; if the lease expired meanwhile (the host was cut off)
  or another host took the name, the rewrite fails: `HostClaimLost`.
- **Liveness.** Each host publishes a heartbeat on `STREAM.hosts.NAME` every
  `host_timeout / 4` and watches everyone's. A host not heard from for
  `host_timeout` (on this host's clock) is reported gone; heard again, it is
  reported back. What follows from a host's death is for the log to decide:
  this module only reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import trio
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KeyValue

from ..config import HOST_RE
from .engine import Engine, EngineError, EngineUnavailable

CLAIM_WAIT = 10.0  # seconds a claim waits for a bucket that has no leader yet


def valid_host(name: str) -> bool:
    return len(name) <= 64 and HOST_RE.fullmatch(name) is not None


def default_host() -> str:
    return socket.gethostname() or "localhost"


class HostNameInUse(EngineError):
    pass


class HostClaimLost(EngineError):
    pass


@dataclass(frozen=True)
class Change:
    host: str
    alive: bool  # False: gone (no word for host_timeout); True: heard (again)


class Hosts:
    """This host's claim and heartbeat, and what it knows of the others' liveness.

    A service: `await nursery.start(hosts.run)` returns once the name is claimed
    (or raises HostNameInUse); `changes` then yields a `Change` for each host that
    comes or goes; `alive()` is the current set.
    """

    def __init__(self, engine: Engine, name: str, host_timeout: float) -> None:
        if not valid_host(name):
            raise EngineError(f"host name {name!r} must match {HOST_RE.pattern}")
        self.engine = engine
        self.name = name
        self.host_timeout = host_timeout
        self.period = host_timeout / 4
        self.bucket = f"{engine.stream}-hosts"
        self.subject = f"{engine.stream}.hosts"
        self.last_seen: dict[str, float] = {}
        self.gone: set[str] = set()
        self._send, self.changes = trio.open_memory_channel[Change](1000)
        self._kv: KeyValue | None = None
        self._rev = 0
        self._nonce = secrets.token_hex(8)  # tells this claim from any other of the name
        self._sub: Any = None
        self._scope = trio.CancelScope()
        self._lost: HostClaimLost | None = None

    # -- asyncio half ------------------------------------------------------------------

    async def _open_bucket(self) -> list[str]:
        # While the servers elect a leader, JetStream requests find no responder or
        # time out: try again for a while.
        deadline = time.monotonic() + CLAIM_WAIT
        while True:
            try:
                return await self._open_bucket_once()
            except (
                nats.errors.NoRespondersError,
                nats.errors.TimeoutError,
                nats.js.errors.ServiceUnavailableError,
                nats.js.errors.NoStreamResponseError,
            ):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _open_bucket_once(self) -> list[str]:
        js = self.engine.js
        cfg = api.KeyValueConfig(
            bucket=self.bucket,
            history=1,
            ttl=self.host_timeout,
            replicas=self.engine.replicas,
            storage=api.StorageType.FILE,
        )
        try:
            self._kv = await js.key_value(self.bucket)
            info = await js.stream_info(f"KV_{self.bucket}")
            if info.config.max_age != self.host_timeout:
                info.config.max_age = self.host_timeout
                await js.update_stream(info.config)
        except nats.js.errors.BucketNotFoundError:
            self._kv = await js.create_key_value(cfg)
        try:
            return [k for k in await self._kv.keys() if k != self.name]
        except nats.js.errors.NoKeysError:
            return []

    def _value(self) -> bytes:
        return json.dumps(
            {"host": self.name, "claim": self._nonce, "pid": os.getpid(), "ts": time.time()}
        ).encode()

    async def _claim(self) -> None:
        assert self._kv is not None
        # A bucket just made has no leader for a moment: its first writes find no
        # responder. Retry for a while; a retried create that finds the key holding
        # this claim's own token was stored by an earlier try whose answer was lost.
        deadline = time.monotonic() + CLAIM_WAIT
        while True:
            try:
                self._rev = await self._kv.create(self.name, self._value())
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                if await self._holds_own_claim():
                    return
                break
            except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        raise HostNameInUse(
            f"host name {self.name!r} is in use on stream {self.engine.stream!r} by a "
            f"live host (a host that stopped frees it after {self.host_timeout:g} s)"
        )

    async def _holds_own_claim(self) -> bool:
        assert self._kv is not None
        try:
            entry = await self._kv.get(self.name)
        except nats.js.errors.KeyNotFoundError:
            return False
        try:
            mine = json.loads(entry.value or b"{}").get("claim") == self._nonce
        except ValueError:
            return False
        if mine and entry.revision is not None:
            self._rev = entry.revision
        return bool(mine)

    async def _refresh(self) -> None:
        assert self._kv is not None
        try:
            self._rev = await self._kv.update(self.name, self._value(), last=self._rev)
            return
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        # An earlier rewrite whose answer was lost may have been stored: still ours?
        try:
            entry = await self._kv.get(self.name)
            mine = entry.value is not None and json.loads(entry.value)["claim"] == self._nonce
        except (nats.js.errors.KeyNotFoundError, ValueError, KeyError, TypeError):
            mine = False
        if mine and entry.revision is not None:
            try:
                self._rev = await self._kv.update(self.name, self._value(), last=entry.revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
        raise HostClaimLost(
            f"host name {self.name!r}: the lease lapsed (no word for "
            f"{self.host_timeout:g} s) or another host took it"
        )

    async def _release(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                pass
        if self._kv is not None and self._rev:
            try:
                await self._kv.delete(self.name, last=self._rev)
            except (nats.errors.Error, nats.js.errors.Error):
                pass  # not ours any more, or unreachable: the lease expires by itself

    async def _beat(self) -> None:
        await self.engine.nc.publish(f"{self.subject}.{self.name}", b"")

    async def _watch(self, token: trio.lowlevel.TrioToken) -> None:
        prefix = len(self.subject) + 1

        async def seen(msg: Msg) -> None:
            token.run_sync_soon(self._seen, msg.subject[prefix:])

        self._sub = await self.engine.nc.subscribe(f"{self.subject}.>", cb=seen)

    # -- trio half ---------------------------------------------------------------------

    def _seen(self, host: str) -> None:
        if host == self.name:
            return
        self.last_seen[host] = trio.current_time()
        if host in self.gone:
            self.gone.discard(host)
            self._report(Change(host, True))

    def _report(self, change: Change) -> None:
        try:
            self._send.send_nowait(change)
        except trio.WouldBlock:  # nobody reads changes: alive() still tells
            pass

    def alive(self) -> set[str]:
        now = trio.current_time()
        others = {h for h, t in self.last_seen.items() if now - t < self.host_timeout}
        return others | {self.name}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        call = self.engine.bridge.call
        known = await call(self._open_bucket)
        await call(self._claim)
        try:
            now = trio.current_time()
            for host in known:  # they hold a lease: alive within host_timeout
                self.last_seen[host] = now
                self._report(Change(host, True))
            await call(self._watch, trio.lowlevel.current_trio_token())
            await call(self._beat)
            task_status.started()
            with self._scope:
                async with trio.open_nursery() as n:
                    n.start_soon(self._keep_claim)  # may wait on the servers, so apart
                    await self._watch_gone()
            if self._lost is not None:
                raise self._lost
        finally:
            with trio.CancelScope(shield=True):
                await call(self._release)

    async def _keep_claim(self) -> None:
        while True:
            await trio.sleep(self.period)
            try:
                await self.engine.bridge.call(self._beat)
                await self.engine.bridge.call(self._refresh)
            except HostClaimLost as e:
                self._lost = e  # `run` raises it, alone
                self._scope.cancel()
                return
            except (EngineUnavailable, nats.errors.Error, OSError):
                pass  # unreachable now: try again next period

    async def _watch_gone(self) -> None:
        while True:
            await trio.sleep(self.host_timeout / 8)
            now = trio.current_time()
            for host, t in self.last_seen.items():
                if host not in self.gone and now - t >= self.host_timeout:
                    self.gone.add(host)
                    self._report(Change(host, False))

    def stop(self) -> None:
        """End `run` and give the name back (it is free at once)."""
        self._scope.cancel()
