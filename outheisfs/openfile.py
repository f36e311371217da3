"""An open agent file: its handle, reads and writes, and how its close settles.

Rights and identity are decided at open and carried by the handle. What a read
or a write does follows the tree's row (`tree.Read`, `tree.Write`):

- a queue (inbox) read takes the next message, parking the request while the
  inbox is empty; the message stays in flight until the next read, the close,
  or the reader's end says how it went (see `release` and the close grace);
- a stream read is a range of an event-log stream; a status read is the ctl
  text as of open;
- a send (inbox, outbox) cuts the bytes into lines, sends each whole line as a
  message, parking while a recipient's inbox is full; a command write (ctl)
  hands the lines to `ctl.Commands`.

Waiting lives here, not in the dispatcher: the dispatcher tells of each event it
applies, and a new message wakes the requests parked on its inbox, a taken one
the writers parked for room. Nothing here knows FUSE: requests come from `ops`,
refusals leave as `OutheisError`.
"""

from __future__ import annotations

import errno
import itertools
import logging
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import trio

from . import approvals, flows, procinfo
from .access import Access
from .ctl import Commands
from .dispatcher import Agent, Dispatcher
from .errors import (
    BadInput,
    Interrupted,
    NoRight,
    NotFound,
    NotLogged,
    NotPermitted,
    OutheisError,
    OverLimit,
    WouldBlock,
)
from .eventlog import EventLog
from .events import Event
from .lines import LineBuffer
from .models import INFLIGHT, Message, parse_lines
from .names import OPERATOR
from .offloop import OffLoop
from .output import Output
from .parking import Parking, Watch
from .procevents import ProcEvents
from .readers import Readers
from .tree import Kind, Node, Read, Write
from .views import View

log = logging.getLogger(__name__)

CLOSE_GRACE = 0.5  # seconds a reader that closed may still fail its message
TIMER_TICK = 0.25  # seconds between looks at ack_wait deadlines and nack delays
APPROVALS = "/approvals"  # its waiters and pollers, beside the agents' (no name has "/")
READABLE = select.POLLIN | select.POLLRDNORM
WRITABLE = select.POLLOUT | select.POLLWRNORM


class PollHandle(Protocol):
    """What the kernel gave to be told when a polled file changes (pyfuse3's)."""

    def notify(self) -> None: ...


@dataclass(eq=False)
class Handle:
    """One open file, with the rights and identity decided at open."""

    node: Node
    who: str  # the agent the opener acts as ("user" for the operator)
    tid: int  # the opening thread, watched for signals and for how it ends
    read: bool
    write: bool
    nonblock: bool
    lines: LineBuffer
    pid: int = 0  # the opener's process and its start time, learned when needed
    start: int = 0
    msg: Message | None = None  # inbox: the message this file holds in flight
    rest: bytes = b""  # inbox: what the reader's buffer did not take of it
    # inbox, explicit acks: what was read through it (and at which attempt); the
    # reader's abnormal death gives these back, closing does not.
    taken: list[tuple[Message, int]] = field(default_factory=list)
    instance: int | None = None  # inbox: the reader's supervised instance (-1: none)
    snapshot: bytes | None = None  # ctl: status as of open
    poll: PollHandle | None = None
    dropped: bool = False  # writer killed by a signal: its unterminated line is void
    counted: int = 0  # bytes of its unterminated line counted against `max_unfinished`
    sent: tuple[str, ...] = ()  # ids of the messages of its last write, see `sent_by`
    # approvals: the lines it has shown (held messages), the last hold's seq in them,
    # and whether its reader follows by size (tail: the journal instead)
    view: bytes = b""
    seen: int = 0
    shown: int = 0  # how far it was read
    follows: bool = False
    watch: Watch | None = None  # the opener's /proc files, opened at its first wait
    # Lines of one open file are sent in the order written, even when a flush
    # comes while a write waits for room.
    sending: trio.Lock = field(default_factory=trio.Lock)
    # flush: the last count of the opener's copies, begun at tick `holds_at`
    # (see `OpenFiles._opener_holds`).
    holds_at: int = 0
    holds: bool = False

    @property
    def path(self) -> str:
        return self.node.path


@dataclass(frozen=True, slots=True)
class Settling:
    """A message whose reader closed while alive: handled unless it now fails."""

    who: str
    pid: int
    start: int


class OpenFiles:
    """Every open agent file of the mount, and the requests waiting on them."""

    def __init__(
        self,
        d: Dispatcher,
        log_: EventLog,
        access: Access,
        procs: ProcEvents,
        commands: Commands,
        fhs: Iterator[int],
    ) -> None:
        self.d = d
        self.log = log_
        self.access = access
        self.procs = procs
        self.commands = commands
        self.fhs = fhs  # file handle numbers, shared with the vault's open files
        self.output = Output(log_.state / "output", d.config.output_max)  # agents' stdout, stderr
        self.handles: dict[int, Handle] = {}
        # What each agent holds of the server now (the operator is not counted):
        self.waiting: dict[str, int] = {}  # requests parked
        self.unfinished: dict[str, int] = {}  # bytes of unterminated lines
        self.parking = Parking()
        self.readers = Readers()  # instances waiting idle on their inbox (pools that shrink)
        self.offloop = OffLoop()  # counting a closer's descriptors, per agent
        self._ticks = itertools.count(1)
        self.nursery: trio.Nursery | None = None  # where settlements wait out the grace
        self.settling: dict[Message, Settling] = {}
        # Woken when a message arrives / when room frees up, per agent.
        self._arrived: dict[str, trio.lowlevel.ParkingLot] = {}
        self._room: dict[str, trio.lowlevel.ParkingLot] = {}
        self._pollers: dict[str, set[PollHandle]] = {}
        d.listeners.append(self._applied)

    async def timers(self) -> None:
        await _timers_loop(self)

    # -- wake-ups -------------------------------------------------------------------------

    def _applied(self, ev: Event) -> None:
        kind = ev["type"]
        if kind == "message":
            self._wake_readers(ev["to"])
        elif kind == "held":  # readers of `approvals` waiting at its end
            self._wake_readers(APPROVALS)
        elif kind in ("redeliver", "requeue", "nack", "ack", "dead", "approved"):
            # A message back in the queue, or room under max_inflight.
            self._wake_readers(ev["agent"])
        elif kind == "deliver":
            lot = self._room.get(ev["agent"])
            if lot:
                lot.unpark_all()
        elif kind == "agent" and ev["op"] == "remove":
            for table in (self._arrived, self._room, self._pollers):
                table.pop(ev["agent"], None)

    def _wake_readers(self, name: str) -> None:
        lot = self._arrived.get(name)
        if lot:  # most writes find no reader waiting
            lot.unpark_all()
        pollers = self._pollers.pop(name, None)
        if pollers:
            for handle in pollers:
                handle.notify()

    # -- open, read, write ----------------------------------------------------------------

    def open(self, node: Node, who: str, tid: int, read: bool, write: bool, nonblock: bool) -> int:
        h = Handle(
            node=node,
            who=who,
            tid=tid,
            read=read,
            write=write,
            nonblock=nonblock,
            lines=LineBuffer(self.d.config.max_message),
        )
        if read and node.row.read is Read.STATUS:
            h.snapshot = self._status(node)
        fh = next(self.fhs)
        self.handles[fh] = h
        return fh

    def size(self, node: Node) -> int:
        """What stat shows as the file's size."""
        row = node.row
        if row.read is Read.STREAM:
            return self.log.size(row.stream_of(node.agent))
        if row.read is Read.STATUS:
            return len(self._status(node))
        if row.read is Read.OUTPUT:
            return self.output.size(node.agent or "")
        return 0

    def _status(self, node: Node) -> bytes:
        if node.row.kind is Kind.DEAD:
            return flows.dead_lines(self.d.agents[str(node.agent)])
        return self.commands.status(node.agent)

    async def read(self, h: Handle, off: int, size: int) -> bytes:
        row = h.node.row
        if row.read is Read.QUEUE:
            return await self._read_inbox(h, size)
        if h.snapshot is not None:
            return h.snapshot[off : off + size]
        if row.read is Read.OUTPUT:
            return self.output.read(h.node.agent or "", off, size)
        if row.kind is Kind.APPROVALS:
            return await self._read_approvals(h, off, size)
        return self.log.read(row.stream_of(h.node.agent), off, size)

    async def _read_approvals(self, h: Handle, off: int, size: int) -> bytes:
        """What is held now and, at the end, the next hold, waited for as an inbox
        read waits (EAGAIN with O_NONBLOCK); tail reads the journal (`approvals`)."""
        if not h.pid:
            self._learn_opener(h)
            h.follows = approvals.follows(h.pid)
        if h.follows:
            return self.log.read(h.node.row.stream, off, size)
        while off >= len(h.view):
            more, h.seen = approvals.pending(self.d, h.seen)
            h.view += more
            if off < len(h.view):
                break
            if off > len(h.view):
                return b""
            if h.nonblock:
                raise WouldBlock("nothing else waits for approval")
            await self._park(_lot(self._arrived, APPROVALS), h)
        chunk = h.view[off : off + size]
        h.shown = max(h.shown, off + len(chunk))
        return chunk

    async def write(self, h: Handle, buf: bytes) -> int:
        try:
            lines = h.lines.feed(buf)
            self._check_unfinished(h)
            self._recount(h)
            if h.lines.partial and not h.pid:
                # How the writer ends decides the fate of this line; if the opening
                # thread is gone by then, its process tells (see `flush`).
                self._learn_opener(h)
            if lines:
                await self._write_lines(h, lines)
        except OutheisError as e:
            h.lines.failed(e)
            self.access.report(h.who, h.path, e)
            raise
        finally:
            self._recount(h)
        return len(buf)

    def _check_unfinished(self, h: Handle) -> None:
        """Refuse a write after which the writer's agent would hold more than
        `max_unfinished` bytes of unterminated lines (the operator may)."""
        grown = len(h.lines.partial) - h.counted
        if grown > 0 and h.who != OPERATOR:
            total = self.unfinished.get(h.who, 0) + grown
            limit = self.d.config.max_unfinished
            if total > limit:
                why = f"{h.who} would hold {total} bytes of unfinished lines (max {limit})"
                raise OverLimit(why)

    def _recount(self, h: Handle) -> None:
        """Count the handle's unterminated line as it is now. Requests on one open
        file may overlap (a flush while a write waits), so each one counts the
        difference from what was counted last, never from what it saw first."""
        n = len(h.lines.partial)
        if n != h.counted:
            _count(self.unfinished, h.who, n - h.counted)
            h.counted = n

    async def _write_lines(self, h: Handle, lines: list[bytes]) -> None:
        try:
            h.sending.acquire_nowait()  # no scheduling point when no one holds it
        except trio.WouldBlock:
            await h.sending.acquire()
        try:
            if h.node.row.write is Write.COMMAND:
                await self.commands.run(
                    h.who, h.node.agent, lines, lambda: self._opener(h), self._drop_held
                )
                await self.log.settled()
            else:
                await self._send(h, lines)
        except OSError as e:
            # The log refused (a full disk): a refusal like any other, so that the
            # rest of a refused line is dropped with it, never sent at close.
            why = f"event log not written: {e.strerror or e}"
            raise NotLogged(why, e.errno or errno.EIO) from e
        finally:
            h.sending.release()

    # -- flush and close ------------------------------------------------------------------

    async def flush(self, h: Handle) -> None:
        """A descriptor of the open file was closed (the file may stay open)."""
        if not (h.msg is not None or h.lines.partial or h.taken):
            return
        try:
            await self._flush(h)
        finally:
            self._recount(h)

    async def _flush(self, h: Handle) -> None:
        st = self._opener_stat(h)
        if h.lines.partial and st is not None and not st.exiting:
            if await self._opener_holds(h):
                # A copy was closed while the opener still has the file open for
                # writing: bash's `printf ... >&3` closes a dup of fd 3, a child
                # that inherited the file exits. The line may go on; it waits.
                return
            st = self._opener_stat(h)  # it may have begun to exit while counted
        if st is not None and st.exiting:
            # The opener is exiting: its status is final and tells how
            # (docs/design.md, "Who closes").
            code = st.exit_code
            if h.msg is not None:
                self._settle_now(h, code)
            if h.taken:
                self._give_back(h, code)
            if h.lines.partial and procinfo.killed_by_signal(code):
                h.lines.reset()
                h.dropped = True
        if h.lines.partial:
            rest = h.lines.take_rest()
            try:
                await self._write_lines(h, [rest])
            except OutheisError as e:
                self.access.report(h.who, h.path, e)
                raise

    async def release(self, fh: int) -> None:
        """The open file's last descriptor is gone: send an unterminated last line
        (unless its writer was killed), and settle the message it holds."""
        h = self.handles.pop(fh)
        self._forget_poll(h)
        if h.watch is not None:
            h.watch.close()
            h.watch = None
        rest = h.lines.take_rest()
        self._recount(h)
        if rest and not h.dropped:
            try:
                await self._write_lines(h, [rest])
            except OutheisError as e:
                self.access.report(h.who, h.path, e)
        if h.msg is not None:
            msg, h.msg = h.msg, None
            if self.nursery is None or not h.pid:
                self.d.ack(msg, h.who)
            else:
                self.settling[msg] = Settling(h.who, h.pid, h.start)
                self.nursery.start_soon(self._settle_later, msg)

    # -- poll -----------------------------------------------------------------------------

    def poll(self, h: Handle, poll_handle: PollHandle | None) -> int:
        """The poll mask of the open file now; `poll_handle` is told of a change."""
        mask = 0
        if h.node.row.read is Read.QUEUE:
            name = str(h.node.agent)
            agent = self.d.agents.get(name)
            if agent is None:
                return select.POLLERR
            if h.read and (h.rest or agent.queued or flows.due(agent, time.time())):
                mask |= READABLE
            if h.write and agent.queued < self.d.config.max_queue:
                mask |= WRITABLE
            if poll_handle is not None:
                self._forget_poll(h)
                h.poll = poll_handle
                self._pollers.setdefault(name, set()).add(poll_handle)
            return mask
        if h.node.row.kind is Kind.APPROVALS and not h.follows:
            ready = h.shown < len(h.view) or approvals.pending(self.d, h.seen)[0]
            if poll_handle is not None:
                self._forget_poll(h)
                h.poll = poll_handle
                self._pollers.setdefault(APPROVALS, set()).add(poll_handle)
            return READABLE if ready else 0
        if h.read:
            mask |= READABLE
        if h.write:
            mask |= WRITABLE
        return mask

    def _forget_poll(self, h: Handle) -> None:
        if h.poll is not None:
            key = APPROVALS if h.node.row.kind is Kind.APPROVALS else h.node.agent
            self._pollers.get(key or "", set()).discard(h.poll)
        h.poll = None

    # -- inbox reading --------------------------------------------------------------------

    async def _read_inbox(self, h: Handle, size: int) -> bytes:
        if h.rest:
            chunk, h.rest = h.rest[:size], h.rest[size:]
            return chunk
        if h.msg is not None:  # the next read acknowledges the previous message
            self.d.ack(h.msg, h.who)
            h.msg = None
        name = str(h.node.agent)
        if not h.pid:
            self._learn_opener(h)
        if h.instance is None:
            index = self.commands.instance(h.pid, name)
            h.instance = -1 if index is None else index
        instance = h.instance if h.instance >= 0 else None
        while True:
            agent = self.d.agents.get(name)
            if agent is None:
                raise NotFound(f"agent {name} was removed")
            explicit = flows.explicit(agent)
            cap = agent.config.max_inflight if agent.config is not None else 0
            if explicit and len(agent.inflight) >= cap:
                if h.nonblock:
                    raise WouldBlock(f"{name} holds {cap} messages unacked (max_inflight)")
                await self._park(_lot(self._arrived, name), h)
                continue
            if self.readers.retired(name, instance):
                # Chosen to stop while idle: it takes nothing more; its signal ends this.
                await self._park(trio.lowlevel.ParkingLot(), h)
                continue
            msg = self.d.take(name, h.pid, instance)
            if msg is not None and await self.log.settled():
                break  # (in a cluster: unless another reader's delivery came first)
            if msg is not None:
                continue
            if h.nonblock:
                raise WouldBlock("inbox is empty")
            if instance is None:
                await self._park(_lot(self._arrived, name), h)
                continue
            self.readers.wait(name, instance)
            try:
                await self._park(_lot(self._arrived, name), h)
            finally:
                self.readers.done(name, instance)
        await self.log.durable()
        if explicit:  # reading acks nothing; the holder acks by id
            h.taken = [(m, a) for m, a in h.taken if m.state == INFLIGHT and m.delivered == a]
            h.taken.append((msg, msg.delivered))
            line = msg.line()
            h.rest = line[size:]
            return line[:size]
        h.msg = msg
        line = msg.line()
        h.rest = line[size:]
        return line[:size]

    async def _park(self, lot: trio.lowlevel.ParkingLot, h: Handle) -> None:
        """Wait to be woken through `lot`; give up with EINTR when the caller has a
        signal pending, so that the signal can act (pyfuse3 has no interrupts).
        An agent has at most `max_waiting` requests parked at once: each holds
        one of the server's request workers."""
        if h.who != OPERATOR:
            limit = self.d.config.max_waiting
            if self.waiting.get(h.who, 0) >= limit:
                e = OverLimit(f"{h.who} has {limit} requests waiting already (max_waiting)")
                self.access.report(h.who, h.path, e)
                raise e
        watch = h.watch
        if watch is None or watch.lost:  # first wait, or the watched thread is gone
            if watch is not None:
                watch.close()
            watch = h.watch = Watch((h.tid, h.pid) if h.pid else (h.tid,))
        _count(self.waiting, h.who, 1)
        try:
            woken = await self.parking.park(lot, watch=watch)
        finally:
            _count(self.waiting, h.who, -1)
        if not woken:
            raise Interrupted("signal pending")

    # -- the opener -----------------------------------------------------------------------

    def _learn_opener(self, h: Handle) -> None:
        h.pid = procinfo.tgid(h.tid)
        st = procinfo.stat(h.pid)
        h.start = st.start if st else 0

    def _opener(self, h: Handle) -> int:
        if not h.pid:
            self._learn_opener(h)
        return h.pid

    async def _opener_holds(self, h: Handle) -> bool:
        """Whether the opener may still hold a copy of this open file: it has more
        descriptors open for writing on the file than its other open files of it
        (each of which has one at least). /proc cannot tell which open file a
        descriptor belongs to, so this counts.

        The count costs in proportion to the opener's descriptors, which it
        controls: it runs on a worker thread, one at a time per agent. A close
        whose count has not begun when an earlier one ends is answered by the
        next count (the kernel takes a descriptor away before it tells of its
        close, so a count begun later sees this close too): thousands of closes
        at once make two counts, not thousands."""
        asked = next(self._ticks)
        async with self.offloop.turn(h.who):
            if h.holds_at > asked:
                return h.holds
            h.holds_at = next(self._ticks)
            handles = list(self.handles.values())
            h.holds = await self.offloop.run(lambda: _copies_held(h, handles))
            return h.holds

    def _opener_stat(self, h: Handle) -> procinfo.Stat | None:
        st = procinfo.stat(h.tid)
        if st is None and h.pid:
            st = procinfo.stat(h.pid)
            if st is not None and st.start != h.start:
                return None
        return st

    # -- settling a message whose reader closed -------------------------------------------

    def _stopped(self, pid: int, label: str | None = None) -> bool:
        """Whether the supervisor itself is stopping the process `pid` (or `label`)."""
        sup = self.commands.supervisor
        if label is None and pid:
            label = self.procs.label_of(pid)
        return sup is not None and sup.stopping_label(label)

    def _settle_now(self, h: Handle, exit_code: int) -> None:
        msg, h.msg, h.rest = h.msg, None, b""
        assert msg is not None
        if procinfo.abnormal(exit_code):
            stopped = self._stopped(h.pid)
            why = "stopped by the supervisor" if stopped else procinfo.explain(exit_code)
            self.d.retry(msg, f"reader {why}", counted=not stopped)
        else:
            self.d.ack(msg, h.who)

    def _give_back(self, h: Handle, exit_code: int) -> None:
        """Explicit acks: the reader died abnormally; what it read and holds unacked
        is delivered again, an attempt spent (none if the supervisor stopped it)."""
        taken, h.taken, h.rest = h.taken, [], b""
        if not procinfo.abnormal(exit_code):
            return
        stopped = self._stopped(h.pid)
        why = "stopped by the supervisor" if stopped else procinfo.explain(exit_code)
        for msg, attempt in taken:
            self.d.retry(msg, f"reader {why}", counted=not stopped, attempt=attempt)

    async def _settle_later(self, msg: Message) -> None:
        """A reader closed its inbox while alive: the message counts as handled
        unless the process now fails (exits non-zero or is killed) within the grace.
        If the server stops first, `settle_all` decides (the entry stays)."""
        s = self.settling.get(msg)
        if s is None:
            return  # settled already
        label = self.procs.label_of(s.pid)
        code = await self.procs.wait(s.pid, s.start, CLOSE_GRACE)
        if self.settling.pop(msg, None) is not None:
            self._settle(msg, s, code, " after closing", label)

    def _settle(
        self, msg: Message, s: Settling, code: int | None, when: str, label: str | None = None
    ) -> None:
        try:
            if code is not None and procinfo.abnormal(code):
                stopped = self._stopped(s.pid, label)
                why = "stopped by the supervisor" if stopped else procinfo.explain(code)
                self.d.retry(msg, f"reader {why}{when}", counted=not stopped)
            else:
                self.d.ack(msg, s.who)
        except OSError as e:  # the log refused (a full disk): it stays in flight
            log.error("message %s stays in flight: %s", msg.id, e)

    def settle_all(self) -> None:
        """At a clean stop, before its `umount` event: the messages of readers that
        closed within the grace count as handled, unless the reader is known to
        have failed already."""
        for msg, s in list(self.settling.items()):
            del self.settling[msg]
            self._settle(msg, s, self.procs.exited(s.pid, s.start), " after closing")

    # -- sending --------------------------------------------------------------------------

    async def _send(self, h: Handle, lines: list[bytes]) -> None:
        outbox = h.node.row.kind is Kind.OUTBOX
        owner = str(h.node.agent)
        if outbox and h.who not in (owner, OPERATOR):
            raise NotPermitted(f"only {owner} and the operator send through this outbox")
        drafts = parse_lines(lines, outbox)
        sender = owner if outbox else h.who
        held = self._held_by_writer(h, owner) if outbox else ()
        if h.node.topic is not None:  # topics/NAME: its list and rules pick the inboxes
            planned = self.d.plan(sender, drafts, None, topic=h.node.topic)
        else:
            planned = self.d.plan(sender, drafts, None if outbox else owner, held)
        if outbox and h.who != OPERATOR:
            self._check_routes(owner, planned)
        while (full := self.d.full(planned)) is not None:
            if h.nonblock:
                raise WouldBlock(f"inbox of {full.name} is full")
            await self._park(_lot(self._room, full.name), h)
        if h.nonblock and self.log.away:
            raise WouldBlock("the event log's engine is out of reach")
        try:
            self.d.deliver(planned)
        except UnicodeEncodeError:  # a "\ud800" escape in JSON: nothing was logged
            raise BadInput("body holds a lone surrogate: not Unicode text") from None
        h.sent = tuple(ev["id"] for ev in planned if ev["type"] == "message")
        await self.log.durable()

    def sent_by(self, inode: int, tid: int) -> bytes | None:
        """The ids of the last write of the caller's own open file of this inbox or
        outbox (its `user.outheisfs.sent`): how a program learns the ids the server
        gave its messages. None if the caller has no such file."""
        pid = procinfo.tgid(tid)
        for h in reversed(list(self.handles.values())):
            if h.node.inode == inode and h.sent and (h.tid == tid or h.pid == pid):
                return " ".join(h.sent).encode()
        return None

    def _check_routes(self, owner: str, planned: list[Event]) -> None:
        """Sending through an outbox obeys the sender's send rights; a reply to a
        message it holds goes back to that message's sender whatever they are."""
        agent: Agent = self.d.agents[owner]
        view = View(owner, agent.grants)
        for ev in planned:
            to = ev["to"]
            if view.may_send(to):
                continue
            if flows.may_reply(self.d, owner, to, ev["reply_to"]):
                continue
            e = NoRight(f"{owner} may not send to {to} (not in its send list)")
            self.access.report(owner, f"/agents/{to}/inbox", e, "send")
            raise e

    def _held_by_writer(self, h: Handle, owner: str) -> tuple[str, ...]:
        """Messages held in flight by the writing process or its nearest ancestor
        holding any: with several instances, a reply without `to` answers the
        message its own process took (`jq ... > outbox` writes from a child)."""
        holders: dict[int, list[str]] = {}
        for hd in self.handles.values():
            if hd.msg is not None and hd.node.agent == owner and hd.pid:
                holders.setdefault(hd.pid, []).append(hd.msg.id)
        if not holders:
            return ()
        pid = self._opener(h)
        for _ in range(16):
            if pid in holders:
                return tuple(holders[pid])
            st = procinfo.stat(pid)
            if st is None or st.ppid <= 1:
                return ()
            pid = st.ppid
        return ()

    def _drop_held(self, name: str, msg_id: str | None) -> None:
        """Messages acknowledged through ctl: the open files holding them forget them."""
        for hd in self.handles.values():
            if hd.msg is not None and hd.node.agent == name and msg_id in (None, hd.msg.id):
                hd.msg, hd.rest = None, b""


def _copies_held(h: Handle, handles: list[Handle]) -> bool:
    """See `OpenFiles._opener_holds`; reads /proc, so off the event loop."""
    opener = h.pid or procinfo.tgid(h.tid)
    others = sum(
        1
        for o in handles
        if o is not h
        and o.write
        and o.node.inode == h.node.inode
        and (o.pid or procinfo.tgid(o.tid)) == opener
    )
    return procinfo.writers_of(opener, h.node.inode, h.path, others + 1) > others


async def _timers_loop(files: OpenFiles) -> None:
    """ack_wait deadlines and nack delays: when one passes, the decision is logged
    (`redeliver` saying ack_wait) and readers look again."""
    while True:
        t = flows.next_timer(files.d)
        now = time.time()
        await trio.sleep(TIMER_TICK if t is None else min(TIMER_TICK, max(0.0, t - now)))
        try:
            for agent in flows.expire(files.d, time.time()):
                files._wake_readers(agent.name)
        except OSError as e:  # the log refused: try again at the next tick
            log.error("timers: %s", e)
        except Exception:  # a timer must never end the mount
            log.exception("timers")


def _lot(lots: dict[str, trio.lowlevel.ParkingLot], name: str) -> trio.lowlevel.ParkingLot:
    lot = lots.get(name)
    if lot is None:
        lot = lots[name] = trio.lowlevel.ParkingLot()
    return lot


def _count(table: dict[str, int], who: str, delta: int) -> None:
    n = table.get(who, 0) + delta
    if n:
        table[who] = n
    else:
        table.pop(who, None)
