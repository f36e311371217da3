"""The whole message flow against a model of it [SPEC §4.2, §4.3, §4.5, §5].

Hypothesis writes random programs for the server, run on the Operations
handlers below FUSE (as test_ops does): writes of plain lines, envelopes good
and bad, random bytes, cut anywhere into partial lines, through inboxes and
outboxes; reads, acks by the next read, by close and through ctl; readers and
writers that die by a signal or exit non-zero; ctl commands good and bad;
agents made and removed; server crashes and clean restarts.

A small in-memory model says what each step must do. After every step the
server's queues, in-flight messages and dead letters equal the model's, every
refused write raised the model's errno and logged one `error` event, and every
message read is the model's next one. At the end, the log is replayed whole
(twice) and up to the end of every step, and each replay must give the state the
live server had then; each agent's `log` file must hold the events that concern it.

OUTHEISFS_SOAK=N runs N times as many programs.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outheisfs.config import Config, valid_name
from outheisfs.dispatcher import Dispatcher
from outheisfs.eventlog import EventLog, concerned, streams_of
from outheisfs.models import is_id
from outheisfs.mount import recover
from outheisfs.ops import Operations
from outheisfs.procevents import ProcEvents
from outheisfs.procinfo import PF_EXITING, Stat
from outheisfs.tree import AGENTS_INODE, ROOT_INODE

from .helpers import Ctx, errno_of, make_config, read_events, snapshot

SOAK = int(os.environ.get("OUTHEISFS_SOAK", "0"))
CONFIGS = {  # by max_attempts: with 1, the first failure buries a message
    n: make_config(
        {"a": {}, "b": {"priority": "background"}},
        max_queue=4,
        max_attempts=n,
        aging=1e6,  # no aging: the order is priority class, then arrival
    )
    for n in (1, 2)
}
RANK = {"interactive": 0, "normal": 1, "background": 2}
KILLED, EXIT3, EXIT0 = 9, 3 << 8, 0
NAMES = ("a", "b", "c", "user")

# -- the model -----------------------------------------------------------------------


@dataclass
class M:
    order: int  # arrival: the queue's order within a class
    sender: str
    to: str
    priority: str
    body: Any
    reply_to: str | None
    attempt: int = 0
    id: str | None = None  # learned when it is read


@dataclass
class Writer:
    fh: int
    agent: str
    outbox: bool
    partial: bytes = b""
    refused: int | None = None  # the errno every later write gets


@dataclass
class Reader:
    fh: int
    agent: str
    held: M | None = None


class Refused(Exception):
    def __init__(self, err: int) -> None:
        self.err = err


@dataclass
class Model:
    config: Config
    agents: set[str] = field(default_factory=lambda: {"a", "b", "user"})
    priority: dict[str, str] = field(default_factory=dict)
    queues: dict[str, list[M]] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # errno names, as logged
    sent: list[tuple[str, str, Any]] = field(default_factory=list)  # every message, in order
    seen_ids: list[str] = field(default_factory=list)
    writers: list[Writer] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)
    arrivals: int = 0

    def __post_init__(self) -> None:
        self.reset_priorities()

    def reset_priorities(self) -> None:
        for name, ac in self.config.agents.items():
            self.priority[name] = ac.priority
        self.priority.setdefault("user", "normal")

    def queue(self, name: str) -> list[M]:
        return self.queues.setdefault(name, [])

    def inflight(self, name: str) -> list[M]:
        return [r.held for r in self.readers if r.held is not None and r.held.to == name]

    def pending(self, name: str) -> int:
        return len(self.queue(name)) + len(self.inflight(name))

    def head(self, name: str) -> M | None:
        q = self.queue(name)
        return min(q, key=lambda m: (RANK[m.priority], m.order)) if q else None

    def retry(self, m: M) -> None:
        """A holder died abnormally: queue it again, or bury it."""
        if m.attempt >= self.config.max_attempts:
            self.dead[m.to] = self.dead.get(m.to, 0) + 1
        else:
            self.queue(m.to).append(m)

    # -- what a write of lines must do -----------------------------------------------

    def parse(self, line: bytes, outbox: bool) -> dict[str, Any]:
        """A line as the model reads it: {"body": ...} plus the envelope's fields."""
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode()
        except UnicodeDecodeError:
            raise Refused(errno.EINVAL) from None
        if not text.lstrip().startswith("{"):
            return {"body": text}
        try:
            obj = json.loads(text)
        except ValueError:
            return {"body": text}
        if not isinstance(obj, dict):
            return {"body": text}
        if "body" not in obj or (not outbox and "to" in obj):
            raise Refused(errno.EINVAL)
        if set(obj) - {"body", "priority", "reply_to", "to"}:
            raise Refused(errno.EINVAL)
        if obj.get("priority") is not None and obj["priority"] not in RANK:
            raise Refused(errno.EINVAL)
        if obj.get("reply_to") is not None and not (
            isinstance(obj["reply_to"], str) and is_id(obj["reply_to"])
        ):
            raise Refused(errno.EINVAL)
        to = obj.get("to")
        if to is not None:
            names = [to] if isinstance(to, str) else to
            if not isinstance(names, list) or not names:
                raise Refused(errno.EINVAL)
            if not all(isinstance(n, str) and (valid_name(n) or n == "user") for n in names):
                raise Refused(errno.EINVAL)
            obj["to"] = names
        return obj

    def send(self, w: Writer, lines: list[bytes], nonblock: bool = True) -> None:
        """Every line of one request, all or nothing, as the server must take them."""
        drafts = [self.parse(line, w.outbox) for line in lines]
        sender = w.agent if w.outbox else "user"
        if sender not in self.agents:
            raise Refused(errno.ENOENT)
        planned: list[M] = []
        for d in drafts:
            reply_to = d.get("reply_to")
            if d.get("to") is not None:
                targets = d["to"]
            elif not w.outbox:
                targets = [w.agent]
            else:  # a reply to the one message the sender holds
                held = self.inflight(sender)
                if len(held) != 1:
                    raise Refused(errno.EINVAL)
                targets, reply_to = [held[0].sender], held[0].id
            for to in targets:
                if to not in self.agents:
                    raise Refused(errno.ENOENT)
                prio = d.get("priority") or self.priority[sender]
                planned.append(M(0, sender, to, prio, d["body"], reply_to))
        counts: dict[str, int] = {}
        for m in planned:
            counts[m.to] = counts.get(m.to, 0) + 1
        if any(n > self.config.max_queue for n in counts.values()):
            raise Refused(errno.EMSGSIZE)
        if any(len(self.queue(to)) + n > self.config.max_queue for to, n in counts.items()):
            raise Refused(errno.EAGAIN)
        for m in planned:
            self.arrivals += 1
            m.order = self.arrivals
            self.queue(m.to).append(m)
            self.sent.append((m.sender, m.to, m.body))

    def write(self, w: Writer, data: bytes) -> int | None:
        """A write request on an open inbox or outbox: None, or the errno refused."""
        if w.refused is not None:
            self.errors.append(errno.errorcode[w.refused])
            return w.refused
        before = w.partial
        if b"\n" not in data:
            w.partial += data
            return None
        lines = (w.partial + data).split(b"\n")
        w.partial = lines.pop()
        try:
            self.send(w, lines)
        except Refused as e:
            self.errors.append(errno.errorcode[e.err])
            if e.err == errno.EAGAIN:
                w.partial = before
            else:
                if before:
                    w.refused = e.err
                w.partial = b""
            return e.err
        return None

    def close_writer(self, w: Writer, exit_code: int | None) -> int | None:
        """flush and release; exit_code is set when the writer is exiting."""
        self.writers.remove(w)
        if exit_code is not None and exit_code & 0x7F:
            return None  # killed: its unterminated line is void
        if not w.partial:
            return None
        rest, w.partial = w.partial, b""
        try:
            self.send(w, [rest])
        except Refused as e:
            self.errors.append(errno.errorcode[e.err])
            return e.err
        return None


# -- the program -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


@st.composite
def envelopes(draw: st.DrawFn, good: str = "") -> bytes:
    """An envelope good for an "inbox" or an "outbox", or with any mix of fields."""
    absent = object()
    fields = {
        "body": [json_values, absent],
        "priority": [absent, "interactive", "normal", "background", None, "urgent", 3],
        "to": [absent, "a", "b", ["a", "b"], "c", "user", "Bad Name", [], ["b", "b"], 7],
        "reply_to": [absent, None, "not-an-id"],
        "extra": [absent, 1],
    }
    obj: dict[str, Any] = {}
    for key, choices in fields.items():
        if good:
            choices = {
                "priority": choices[:4],
                "to": choices[1:4] if good == "outbox" else choices[:1],
            }.get(key, choices[:1])
        v = draw(st.sampled_from(choices))
        if isinstance(v, st.SearchStrategy):
            v = draw(v)
        if v is not absent:
            obj[key] = v
    return json.dumps(dict(draw(st.permutations(list(obj.items()))))).encode()


plain = st.binary(max_size=10).map(lambda b: b.replace(b"{", b"").replace(b"\n", b""))
texts = st.text(max_size=10).map(lambda t: t.replace("\n", "").encode())
lines = st.one_of(
    texts,
    texts,
    texts,
    envelopes("inbox"),
    envelopes("outbox"),
    envelopes(),
    plain,
    st.sampled_from([b"", b" {not json", b"[1, 2]", b"\xff\xfe", b"line\r"]),
)


@st.composite
def writes(draw: st.DrawFn) -> bytes:
    """Some whole lines, maybe a cut-off one at the end or the start."""
    data = b"".join(line + b"\n" for line in draw(st.lists(lines, min_size=1, max_size=3)))
    head = draw(st.sampled_from([b"", b"", b"", b"rest of a line\n"]))
    return head + data + draw(st.sampled_from([b"", b"", b"", b"to be cont", b'{"body":']))


COMMANDS = ["ack", "ack HELD", "ack SEEN", "ack nope", "priority interactive"]
COMMANDS += ["priority background", "priority urgent", "unveil /vault r", "bogus", " "]

writer = st.tuples(st.sampled_from(NAMES), st.sampled_from([False, False, True]))  # True: outbox
exits = st.sampled_from([None, KILLED, EXIT3, EXIT0])  # None: closed by a live process
STEPS: dict[str, tuple[int, st.SearchStrategy[tuple[Any, ...]]]] = {  # kind: (weight, args)
    "write": (8, st.tuples(st.integers(0, 9), writes(), writer)),
    "read": (
        4,
        st.tuples(st.integers(0, 9), st.sampled_from([1 << 16, 7]), st.sampled_from(NAMES)),
    ),
    "close_writer": (2, st.tuples(st.integers(0, 9), exits)),
    "close_reader": (3, st.tuples(st.integers(0, 9), exits)),
    "open_writer": (1, st.tuples(writer)),
    "open_reader": (1, st.tuples(st.sampled_from(NAMES))),
    "ctl": (
        2,
        st.tuples(
            st.sampled_from(("a", "b", "user")),
            st.lists(st.sampled_from(COMMANDS), min_size=1, max_size=2),
        ),
    ),
    "mkdir": (1, st.tuples(st.sampled_from(("c", "c", "a", "user", "Bad")))),
    "rmdir": (1, st.tuples(st.sampled_from(("c", "c", "a", "user")))),
    "restart": (1, st.tuples(st.booleans())),
    "read_log": (1, st.tuples(st.sampled_from(NAMES))),
}
steps = st.sampled_from([k for k, (w, _) in STEPS.items() for _ in range(w)]).flatmap(
    lambda k: st.tuples(st.just(k), STEPS[k][1]).map(lambda t: (t[0], *t[1]))
)


# -- running a program on the server and the model ------------------------------------


class Server:
    """The handlers of one server life, started from the state folder as a mount is."""

    def __init__(self, state: Path, config: Config) -> None:
        self.state = state
        self.d: Dispatcher
        self.log: EventLog
        self.d, self.log = recover(config, state, "process", Path("/nowhere"))
        self.procs = ProcEvents()
        self.ops = Operations(self.d, self.log, self.procs)
        self.ctx: Any = Ctx()  # stands for a pyfuse3 RequestContext

    async def open(self, path: str, flags: int) -> int:
        inode = ROOT_INODE
        for part in path.split("/"):
            inode = (await self.ops.lookup(inode, part.encode(), self.ctx)).st_ino
        return int((await self.ops.open(inode, flags, self.ctx)).fh)

    async def close(self, fh: int, exit_code: int | None) -> int | None:
        """What the kernel does at close: flush, then release. With exit_code,
        the opener is exiting with that status."""
        if exit_code is not None:
            exiting = Stat("R", 1, 0, PF_EXITING, exit_code)
            setattr(self.ops.files, "_opener_stat", lambda h: exiting)  # noqa: B010
        try:
            err = await errno_of(self.ops.flush(fh))
        finally:
            if exit_code is not None:
                delattr(self.ops.files, "_opener_stat")
        await self.ops.release(fh)
        return err

    def crash(self) -> None:
        """SIGKILL: what is in the files stays, nothing else is done."""
        os.close(self.log._fd)
        for fd in self.log._streams.values():
            os.close(fd)
        self.procs.close()

    async def stop(self) -> None:
        for fh in list(self.ops.files.handles):
            await self.close(fh, None)
        self.log.close()
        self.procs.close()


def queued(d: Dispatcher, name: str) -> list[tuple[Any, ...]]:
    return [(m.sender, m.priority, m.body, m.delivered) for m in d.agents[name].inbox.messages()]


def expected(m: Model, name: str) -> list[tuple[Any, ...]]:
    order = sorted(m.queue(name), key=lambda x: (RANK[x.priority], x.order))
    return [(x.sender, x.priority, x.body, x.attempt) for x in order]


def check(server: Server, model: Model) -> None:
    d = server.d
    assert set(d.agents) == model.agents
    for name in model.agents:
        assert queued(d, name) == expected(model, name), name
        assert sorted(d.agents[name].inflight) == sorted(str(x.id) for x in model.inflight(name))
        assert d.agents[name].dead == model.dead.get(name, 0)
    assert [e["errno"] for e in read_events(server.state, "error")] == model.errors
    # What the server counts against the writers' limits is what their files hold.
    held = sum(len(w.partial) for w in model.writers)
    assert server.ops.files.unfinished == ({"user": held} if held else {})
    assert server.ops.files.waiting == {}


async def step(server: Server, model: Model, op: tuple[Any, ...]) -> Server:
    kind = op[0]
    # Writes and reads go to a file open on the path they name, opened if none is.
    if kind == "write" and not [w for w in model.writers if (w.agent, w.outbox) == op[3]]:
        server = await step(server, model, ("open_writer", op[3]))
    if kind == "read" and not [r for r in model.readers if r.agent == op[3]]:
        server = await step(server, model, ("open_reader", op[3]))
    if kind == "open_writer":
        name, outbox = op[1]
        path = f"agents/{name}/{'outbox' if outbox else 'inbox'}"
        try:
            fh = await server.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except pyfuse3.FUSEError as e:
            assert name not in model.agents and e.errno == errno.ENOENT
            return server
        assert name in model.agents
        model.writers.append(Writer(fh, name, outbox))
    elif kind == "write" and (ws := [w for w in model.writers if (w.agent, w.outbox) == op[3]]):
        w = ws[op[1] % len(ws)]
        want = model.write(w, op[2])
        got = await errno_of(server.ops.write(w.fh, 0, op[2]))
        assert got == want, (op, got, want)
    elif kind == "close_writer" and model.writers:
        w = model.writers[op[1] % len(model.writers)]
        want = model.close_writer(w, op[2])
        assert await server.close(w.fh, op[2]) == want
    elif kind == "open_reader":
        try:
            fh = await server.open(f"agents/{op[1]}/inbox", os.O_RDONLY | os.O_NONBLOCK)
        except pyfuse3.FUSEError as e:
            assert op[1] not in model.agents and e.errno == errno.ENOENT
            return server
        model.readers.append(Reader(fh, op[1]))
    elif kind == "read" and (rs := [r for r in model.readers if r.agent == op[3]]):
        await read(server, model, rs[op[1] % len(rs)], op[2])
    elif kind == "close_reader" and model.readers:
        rs = [r for r in model.readers if r.held] or model.readers  # mostly one that holds
        r = rs[op[1] % len(rs)]
        held, r.held = r.held, None
        model.readers.remove(r)
        if held is not None and op[2] is not None and op[2] != EXIT0:
            model.retry(held)
        assert await server.close(r.fh, op[2]) is None
    elif kind == "ctl":
        if op[1] not in model.agents:
            with_err = await errno_of(server.open(f"agents/{op[1]}/ctl", os.O_WRONLY))
            assert with_err == errno.ENOENT
            return server
        await ctl(server, model, op[1], op[2])
    elif kind == "mkdir":
        want = None
        if not valid_name(op[1]):
            want = errno.EINVAL
        elif op[1] in model.agents:
            want = errno.EEXIST
        else:
            model.agents.add(op[1])
            model.priority[op[1]] = "normal"
        if want:
            model.errors.append(errno.errorcode[want])
        got = await errno_of(server.ops.mkdir(AGENTS_INODE, op[1].encode(), 0o755, server.ctx))
        assert got == want
    elif kind == "rmdir":
        name = op[1]
        want = None
        if name not in model.agents:
            want = errno.ENOENT
        elif name == "user":
            want = errno.EBUSY
        elif model.pending(name):
            want = errno.ENOTEMPTY
        else:
            model.agents.discard(name)
            model.queues.pop(name, None)
            model.dead.pop(name, None)
        if want:
            model.errors.append(errno.errorcode[want])
        got = await errno_of(server.ops.rmdir(AGENTS_INODE, name.encode(), server.ctx))
        assert got == want
    elif kind == "restart":
        server = await restart(server, model, clean=op[1])
    elif kind == "read_log" and op[1] in model.agents:
        await check_log(server, op[1])
    return server


async def read(server: Server, model: Model, r: Reader, size: int) -> None:
    if r.held is not None:  # the next read acknowledges the one before
        r.held = None
    if r.agent not in model.agents:
        assert await errno_of(server.ops.read(r.fh, 0, size)) == errno.ENOENT
        return
    m = model.head(r.agent)
    if m is None:
        assert await errno_of(server.ops.read(r.fh, 0, size)) == errno.EAGAIN
        return
    model.queue(r.agent).remove(m)
    m.attempt += 1
    data = b""
    while not data.endswith(b"\n"):
        chunk = await server.ops.read(r.fh, 0, size)
        assert 0 < len(chunk) <= size
        data += chunk
    got = json.loads(data)
    assert data.count(b"\n") == 1
    want = {"from": m.sender, "to": m.to, "priority": m.priority, "body": m.body}
    want |= {"reply_to": m.reply_to, "attempt": m.attempt}
    assert {k: got[k] for k in want} == want
    if m.id is None:
        m.id = got["id"]
        model.seen_ids.append(m.id)
    assert got["id"] == m.id
    r.held = m


async def ctl(server: Server, model: Model, name: str, commands: list[str]) -> None:
    held = [str(x.id) for x in model.inflight(name)]
    words = {"HELD": held[0] if held else "nope", "SEEN": (model.seen_ids or ["nope"])[0]}
    text = [" ".join(words.get(w, w) for w in c.split(" ")) for c in commands]
    # The model of ctl: every command is checked first, then all are done.
    want = None
    for c in text:
        parts = c.split()
        if not parts:
            continue
        ok = (
            parts == ["ack"]
            or (parts[0] == "ack" and len(parts) == 2 and parts[1] in held)
            or (parts[0] == "priority" and parts[1:] in (["interactive"], ["background"]))
            or (parts == ["unveil", "/vault", "r"] and name != "user")
        )
        if not ok:
            want = errno.EINVAL
            break
    if want is None:
        for c in text:
            parts = c.split()
            if parts[:1] == ["ack"]:
                for r in model.readers:
                    if r.held and r.held.to == name and parts[1:] in ([], [r.held.id]):
                        r.held = None
            elif parts[:1] == ["priority"]:
                model.priority[name] = parts[1]
    else:
        model.errors.append(errno.errorcode[want])
    fh = await server.open(f"agents/{name}/ctl", os.O_WRONLY)
    data = "".join(c + "\n" for c in text).encode()
    got = await errno_of(server.ops.write(fh, 0, data))
    await server.ops.release(fh)
    assert got == want, (text, got)


async def restart(server: Server, model: Model, clean: bool) -> Server:
    if clean:
        for w in list(model.writers):
            assert await server.close(w.fh, None) == model.close_writer(w, None)
        for r in model.readers:
            r.held = None  # closed by a live process: handled
        await server.stop()
    else:
        server.crash()
    inflight = sorted((r.held for r in model.readers if r.held), key=lambda m: m.order)
    model.writers.clear()
    model.readers.clear()
    new = Server(server.state, model.config)
    for m in inflight:  # queued again, or dead
        model.retry(m)
    model.agents |= set(model.config.agents)
    model.reset_priorities()
    return new


async def run_program(state: Path, program: list[tuple[Any, ...]], max_attempts: int) -> None:
    model = Model(CONFIGS[max_attempts])
    server = Server(state, model.config)
    states: list[tuple[int, dict[str, Any]]] = [(server.d.seq, snapshot(server.d))]
    try:
        for op in program:
            server = await step(server, model, op)
            check(server, model)
            states.append((server.d.seq, snapshot(server.d)))
        assert [(e["from"], e["to"], e["body"]) for e in read_events(state, "message")] == (
            model.sent
        )
        for name in server.d.agents:
            await check_log(server, name)
    finally:
        await server.stop()
    check_replays(state, model.config, states)


async def check_log(server: Server, name: str) -> None:
    """NAME's log file holds exactly the events that concern it, even after
    crashes cut its buffered lines (they are caught up at start)."""
    fh = await server.open(f"agents/{name}/log", os.O_RDONLY)
    data = b""
    while chunk := await server.ops.read(fh, len(data), 1 << 16):
        data += chunk
    await server.ops.release(fh)
    want = [e for e in read_events(server.state) if f"{name}.log" in streams_of(e)]
    assert [json.loads(x) for x in data.splitlines()] == want
    assert all(name in concerned(e) for e in want)


def check_replays(state: Path, config: Config, states: list[tuple[int, dict[str, Any]]]) -> None:
    def replay(until: int | None = None) -> dict[str, Any]:
        d = Dispatcher(config, None)
        EventLog(state, readonly=True).open(d.apply, until)
        return snapshot(d)

    assert replay() == replay()  # deterministic
    for seq, live in states:
        assert replay(seq) == live, seq


@settings(
    max_examples=150 * (SOAK or 1),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(steps, min_size=20, max_size=60), st.sampled_from(sorted(CONFIGS)))
def test_the_server_does_what_the_model_says(
    program: list[tuple[Any, ...]], max_attempts: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(run_program, Path(tmp), program, max_attempts)


# -- explicit acks, nack with delay, term, ack_wait and dead letters [SPEC §15] -----------
#
# The dispatcher's state machine driven directly, with a fake clock for deadlines,
# against a reference model of one explicit-ack agent `w` read by two instances.


@dataclass
class XM:
    """One message in the reference model of explicit acks."""

    seq: int
    delivered: int = 0
    where: str = "queued"  # queued | delayed | inflight | dead
    due: float = 0.0
    deadline: float = 0.0
    instance: int | None = None
    reason: str = ""


XSTEPS = st.one_of(
    st.tuples(st.just("send")),
    st.tuples(st.just("take"), st.integers(0, 1)),
    st.tuples(st.just("ack"), st.integers(0, 4)),
    st.tuples(st.just("nack"), st.integers(0, 4), st.sampled_from([0.0, 1.0, 4.0])),
    st.tuples(st.just("term"), st.integers(0, 4)),
    st.tuples(st.just("progress"), st.integers(0, 4)),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 2.0, 5.0, 6.0])),
    st.tuples(st.just("crash"), st.integers(0, 1)),
    st.tuples(st.just("requeue"), st.integers(-1, 3)),
    st.tuples(st.just("purge"), st.integers(-1, 3)),
    st.tuples(st.just("late_ack"), st.integers(0, 1)),
)


def xsnapshot(d: Dispatcher) -> dict[str, Any]:
    a = d.agents["w"]
    return {
        "base": snapshot(d),
        "inflight": sorted((m.id, m.deadline, m.instance, m.pid) for m in a.inflight.values()),
        "delayed": sorted((m.id, m.due, m.delivered) for m in a.delayed.values()),
        "dead": sorted((m.id, m.delivered, m.reason) for m in a.dead_letters.values()),
        "received": sorted(d.received.items()),
        "taken_back": sorted((k, sorted(v, key=str)) for k, v in d.taken_back.items()),
    }


def run_explicit(state: Path, program: list[tuple[Any, ...]], ack_wait: float) -> None:
    from outheisfs import flows
    from outheisfs.errors import Stale

    from .helpers import open_dispatcher, send

    config = make_config(
        {"w": {"ack": "explicit", "max_inflight": 3, "ack_wait": ack_wait}},
        max_attempts=3,
        aging=1e6,
    )
    d, log = open_dispatcher(state, config)
    clock = 1_900_000_000.0
    model: dict[str, XM] = {}  # by body
    ids: dict[str, str] = {}  # body -> id
    states: list[tuple[int, dict[str, Any]]] = []
    n = 0

    def where(kind: str) -> list[str]:
        return sorted((b for b, m in model.items() if m.where == kind), key=lambda b: model[b].seq)

    def fail(m: XM, reason: str) -> None:  # what retry does with a counted failure
        if m.delivered >= 3:
            m.where, m.reason = "dead", reason
        else:
            m.where = "queued"
        m.deadline, m.instance = 0.0, None

    def by_id(body: str) -> Any:
        return d.messages.get(ids[body]) or d.agents["w"].dead_letters.get(ids[body])

    try:
        for op in program:
            held = where("inflight")
            if op[0] == "send":
                body = f"m{n}"
                n += 1
                (ev,) = send(d, "user", "w", body)
                ids[body] = ev["id"]
                model[body] = XM(seq=d.messages[ev["id"]].seq)
            elif op[0] == "take":
                if len(held) >= 3:
                    continue  # max_inflight: the read would wait
                due = [b for b in where("delayed") if model[b].due <= clock]
                due.sort(key=lambda b: (model[b].due, model[b].seq))
                queued = where("queued")
                want = due[0] if due else (queued[0] if queued else None)
                msg = d.take("w", pid=100 + op[1], instance=op[1], now=clock)
                assert (msg.body if msg else None) == want
                if want is not None:
                    m = model[want]
                    m.delivered += 1
                    m.where, m.instance = "inflight", op[1]
                    m.deadline = round(clock + ack_wait, 6) if ack_wait else 0.0
                    assert msg is not None and msg.delivered == m.delivered
            elif op[0] in ("ack", "nack", "term", "progress") and held:
                body = held[op[1] % len(held)]
                m = model[body]
                msg = flows.held(d, "w", ids[body], m.instance, True)
                if op[0] == "ack":
                    d.ack_all("w", "w", ids[body])
                    del model[body]
                elif op[0] == "nack":
                    flows.nack(d, msg, "w", op[2], clock)
                    if m.delivered >= 3:
                        m.where, m.reason = "dead", f"nacked at attempt {m.delivered} of 3"
                    elif op[2]:
                        m.where, m.due = "delayed", round(clock + op[2], 6)
                    else:
                        m.where = "queued"
                    m.deadline, m.instance = 0.0, None
                elif op[0] == "term":
                    flows.bury(d, msg, "term: bad", "w")
                    m.where, m.reason, m.instance = "dead", "term: bad", None
                else:
                    flows.progress(d, msg, "w", clock)
                    m.deadline = round(clock + ack_wait, 6) if ack_wait else 0.0
            elif op[0] == "tick":
                clock += op[1]
                flows.expire(d, clock)
                for body in held:
                    m = model[body]
                    if m.deadline and m.deadline <= clock:
                        fail(m, "ack_wait")
            elif op[0] == "crash":
                for msg in list(d.agents["w"].inflight.values()):
                    if msg.instance == op[1]:
                        d.retry(msg, "reader killed by signal 9", attempt=msg.delivered)
                for body in held:
                    if model[body].instance == op[1]:
                        fail(model[body], "reader killed by signal 9")
            elif op[0] in ("requeue", "purge"):
                dead = where("dead")
                if op[1] >= 0 and not dead:
                    continue
                one = None if op[1] < 0 else dead[op[1] % len(dead)]
                getattr(flows, op[0])(d, "w", None if one is None else ids[one], "user")
                for body in dead if one is None else [one]:
                    if op[0] == "purge":
                        del model[body]
                    else:
                        model[body].where, model[body].delivered = "queued", 0
                        model[body].reason = ""
            elif op[0] == "late_ack":
                # An ack by an instance that ack_wait took a message from: ESTALE.
                for body, i in ids.items():
                    lost = d.taken_back.get(i)
                    gone = model.get(body)
                    if lost and op[1] in lost and (gone is None or gone.instance != op[1]):
                        with pytest.raises(Stale):
                            flows.held(d, "w", i, op[1], True)
            # The dispatcher's state is the model's.
            a = d.agents["w"]
            for kind, table in (("inflight", a.inflight), ("delayed", a.delayed)):
                assert sorted(m.body for m in table.values()) == sorted(where(kind)), kind
            assert [m.body for m in a.inbox.messages()] == where("queued")
            assert {m.body: (m.delivered, m.reason) for m in a.dead_letters.values()} == {
                b: (model[b].delivered, model[b].reason) for b in where("dead")
            }
            for msg in a.inflight.values():
                m = model[msg.body]
                assert (msg.delivered, msg.deadline, msg.instance) == (
                    m.delivered,
                    m.deadline,
                    m.instance,
                )
            for msg in a.delayed.values():
                assert msg.due == model[msg.body].due
            assert flows.next_timer(d) == min(
                [m.deadline for m in model.values() if m.where == "inflight" and m.deadline]
                + [m.due for m in model.values() if m.where == "delayed"],
                default=None,
            )
            states.append((d.seq, xsnapshot(d)))
        assert all(by_id(b) is not None for b in model)
    finally:
        log.close()
    # A replay, whole or up to any step, gives the same state: in-flight set,
    # deadlines, delays, dead letters, reply rights.
    for seq, live in states:
        r = Dispatcher(config, None)
        EventLog(state, readonly=True).open(r.apply, seq)
        assert xsnapshot(r) == live, seq


@settings(
    max_examples=100 * (SOAK or 1),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(XSTEPS, min_size=10, max_size=60), st.sampled_from([0.0, 5.0]))
def test_explicit_acks_do_what_the_model_says(
    program: list[tuple[Any, ...]], ack_wait: float
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_explicit(Path(tmp), program, ack_wait)
