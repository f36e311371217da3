"""Checkpoints: the dispatcher's state as of one seq, kept beside the log.

Start-up would otherwise replay the whole log. A checkpoint holds everything
`Dispatcher.apply` has built up to event SEQ (agents, queues, in-flight
messages, dead letters, reply rights, narrowed grants, ...), so a start loads
the newest good one and replays only the events after it. The log stays the
source of truth: a checkpoint is derived, checked (a SHA-256 of its body, the
seq and the exact bytes of the event it ends with, the shape of the state) and
skipped when anything does not match; without one, the whole log is replayed
as before.

Layout, in the state folder:

    checkpoints/000000012345.ckpt   one JSON header line, then the state (pickle)

The header says which event the state ends with (`seq`, the byte `offset` just
after it in `events.jsonl`, and that line's SHA-256 `last`), the sizes of the
stream files when it was taken, and the `shape`. A file is written whole under a
temporary name, fsynced and renamed: a crash leaves either the old set or the
new one, never a half checkpoint under a real name.

The state is taken generically: every attribute of the dispatcher except the
ones that are not state (`TRANSIENT`), pickled with the objects they share (a
queued message is in `messages` and in its inbox's heap: one object after a
load too). Adding state to the dispatcher needs nothing here; adding a new
class to it means listing it in `CLASSES` (loading admits only those, so a
checkpoint can never make the server run code). The shape (the attribute
names of the dispatcher and of each class) is in the header: a checkpoint
written by code with other fields is not loaded, and the log is replayed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .config import AgentConfig, Config
from .dispatcher import Agent, Dispatcher
from .eventlog import EventLog, Start, first_seq
from .inbox import Inbox
from .models import Message

log = logging.getLogger(__name__)

FORMAT = 1  # raise when the meaning of a field changes without its name changing
FOLDER = "checkpoints"
SUFFIX = ".ckpt"
KEEP = 2  # the newest checkpoints kept (and the one a bounded log starts from)
TRANSIENT = frozenset({"config", "log", "listeners", "topics"})  # not state: the config's
# The classes a checkpoint may hold, and how to make an empty one (for the shape).
CLASSES: dict[type, Callable[[], object]] = {
    Agent: lambda: Agent("x", None, "normal", Inbox(1.0)),
    Message: lambda: Message("x", 0, "x", "x", "", 0.0, "normal", None, None),
    Inbox: lambda: Inbox(1.0),
}
_ALLOWED = {(c.__module__, c.__qualname__): c for c in CLASSES}


def _attributes(obj: object) -> list[str]:
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    return sorted(vars(obj))


def shape() -> str:
    """What a state must look like to be loaded by this code."""
    fresh = Dispatcher(Config(), None)
    parts = [f"format {FORMAT}", f"python {sys.version_info[0]}.{sys.version_info[1]}"]
    parts.append("Dispatcher: " + ",".join(sorted(set(vars(fresh)) - TRANSIENT)))
    for cls, make in CLASSES.items():
        parts.append(f"{cls.__qualname__}: " + ",".join(_attributes(make())))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# -- the state, in and out -------------------------------------------------------------


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> str | None:
        # An agent's settings come from the config in force at load, not the file.
        if isinstance(obj, AgentConfig | Config):
            return "config"
        return None


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        cls = _ALLOWED.get((module, name))
        if cls is None:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not a class a checkpoint may hold (checkpoint.CLASSES)"
            )
        return cls

    def persistent_load(self, pid: Any) -> Any:
        if pid != "config":
            raise pickle.UnpicklingError(f"unknown reference {pid!r}")
        return None


def state_of(d: Dispatcher) -> dict[str, Any]:
    """The dispatcher's state: every attribute that is not a connection to the outside."""
    return {k: v for k, v in vars(d).items() if k not in TRANSIENT}


def dumps(d: Dispatcher) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=5).dump(state_of(d))
    return buf.getvalue()


def loads(
    body: bytes, config: Config, elog: EventLog | None = None, fill: bool = False
) -> Dispatcher:
    """A dispatcher with the state of `body`, under `config`: each agent's settings
    are the config's, as after a replay (`install_config` follows as usual)."""
    state = _Unpickler(io.BytesIO(body)).load()
    if not isinstance(state, dict):
        raise pickle.UnpicklingError("not a dispatcher's state")
    d = Dispatcher(config, elog)
    vars(d).update(state)  # attributes added since the checkpoint keep a fresh one's values
    if fill:
        _fill(state, set())
    for name, agent in d.agents.items():
        agent.config = config.agents.get(name)
        agent.inbox.aging = config.aging
    return d


def _fill(obj: Any, seen: set[int]) -> None:
    """Give fields added to a class since a checkpoint was written their defaults."""
    if id(obj) in seen or isinstance(obj, str | bytes | int | float | None):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for v in obj.values():
            _fill(v, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            _fill(v, seen)
    elif type(obj) in CLASSES:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                if not hasattr(obj, f.name):
                    if f.default is not dataclasses.MISSING:
                        setattr(obj, f.name, f.default)
                    elif f.default_factory is not dataclasses.MISSING:
                        setattr(obj, f.name, f.default_factory())
                    else:
                        raise ValueError(f"{type(obj).__name__}.{f.name} has no default")
                _fill(getattr(obj, f.name), seen)
        else:
            for v in vars(obj).values():
                _fill(v, seen)


# -- files -----------------------------------------------------------------------------


@dataclass
class Header:
    seq: int  # the last event the state holds
    offset: int  # where the next event starts in events.jsonl
    last: str  # SHA-256 of the line of event `seq`
    ts: str  # that event's time
    streams: dict[str, int] | None  # stream files' sizes then (None: not all complete)
    shape: str = ""
    sha256: str = ""
    size: int = 0
    format: int = FORMAT

    def line(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), separators=(",", ":")) + "\n").encode()


def digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def name_of(seq: int) -> str:
    return f"{seq:012d}{SUFFIX}"


def listing(state: Path) -> list[tuple[int, Path]]:
    """The checkpoint files of a state folder, newest first (by their names)."""
    folder = state / FOLDER
    out = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for n in names:
        stem = n.removesuffix(SUFFIX)
        if n.endswith(SUFFIX) and stem.isdigit():
            out.append((int(stem), folder / n))
    return sorted(out, reverse=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(state: Path, header: Header, body: bytes) -> Path:
    """Write a checkpoint atomically: a temporary file, fsync, rename, fsync the folder."""
    folder = state / FOLDER
    folder.mkdir(exist_ok=True)
    header.shape = shape()
    header.sha256 = digest(body)
    header.size = len(body)
    final = folder / name_of(header.seq)
    tmp = folder / f".{final.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        data = memoryview(header.line() + body)
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, final)
    _fsync_dir(folder)
    return final


def read(path: Path, strict: bool = True) -> tuple[Header, bytes]:
    """A checkpoint's header and body, checked against each other and (if `strict`)
    this code's shape; ValueError (or OSError) says why it cannot be used."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
        body = f.read()
    if not first.endswith(b"\n"):
        raise ValueError("no header line")
    fields = json.loads(first)
    if not isinstance(fields, dict):
        raise ValueError("header is not an object")
    header = Header(**fields)
    if header.format != FORMAT or (strict and header.shape != shape()):
        raise ValueError("written by code with another shape of state")
    if header.size != len(body) or header.sha256 != digest(body):
        raise ValueError("body does not match its checksum")
    return header, body


def rewrite(path: Path, header: Header, body: bytes) -> None:
    """Replace a checkpoint's header (its offsets after `retain` cut the log)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        data = memoryview(header.line() + body)
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def prune(state: Path, keep: set[int]) -> None:
    """Remove checkpoints but the newest KEEP and those in `keep` (the one a
    log cut by `retain` begins after), and leftover temporaries."""
    found = listing(state)
    for seq, path in found[KEEP:]:
        if seq not in keep:
            path.unlink(missing_ok=True)
    folder = state / FOLDER
    try:
        for n in os.listdir(folder):
            if n.startswith(".") and n.endswith(".tmp"):
                (folder / n).unlink(missing_ok=True)
    except OSError:
        pass


def restore(
    state: Path, config: Config, elog: EventLog, until: int | None = None
) -> tuple[Dispatcher, Start | None]:
    """A dispatcher with the newest usable checkpoint's state (at most `until`),
    and where the log's replay goes on; without one, an empty dispatcher and None
    (the whole log is replayed). Checkpoints that do not check out are skipped."""
    owner = None if elog.readonly else elog
    found = listing(state)
    for seq, path, strict in [(s, p, True) for s, p in found] + _upgradable(elog, found):
        if until is not None and seq > until:
            continue
        try:
            header, body = read(path, strict)
            if header.seq != seq:
                raise ValueError(f"holds seq {header.seq}, not {seq}")
            if not elog.verify(header.seq, header.offset, header.last):
                if owner is not None:  # of a log that is gone: never of use again
                    path.unlink(missing_ok=True)
                raise ValueError("does not match the event log (ahead of it, or of another log)")
            d = loads(body, config, owner, fill=not strict)
        except (OSError, ValueError, TypeError, KeyError, EOFError, AttributeError) as e:
            log.warning("checkpoint %s not used: %s", path.name, e)
            continue
        except pickle.UnpicklingError as e:
            log.warning("checkpoint %s not used: %s", path.name, e)
            continue
        if not strict:
            log.warning("checkpoint %s written by other code: loaded with defaults", path.name)
        return d, Start(header.seq, header.offset, header.streams)
    return Dispatcher(config, owner), None


def _upgradable(elog: EventLog, found: list[tuple[int, Path]]) -> list[tuple[int, Path, bool]]:
    """When `retain` cut the log, the events before it exist only in checkpoints: one
    written by code with other fields is then loaded all the same, fields added
    since taking their defaults. With the whole log, a full replay is exact."""
    try:
        fd = os.open(elog.path, os.O_RDONLY)
    except OSError:
        return []
    try:
        first = first_seq(fd)
    finally:
        os.close(fd)
    if first == 1:
        return []
    return [(s, p, False) for s, p in found if s >= first - 1]


# -- the running server's checkpoints --------------------------------------------------


class Checkpoints:
    """Writes a checkpoint every `every` events while the server runs, and one at
    its clean stop. The state is pickled on the caller's thread (it must not
    change meanwhile); the file is written in a worker thread."""

    def __init__(self, d: Dispatcher, elog: EventLog, state: Path, every: int) -> None:
        self.d = d
        self.elog = elog
        self.state = state
        self.every = every
        self.last = d.seq  # the newest checkpoint's seq (or where this server started)
        self.keep = {elog.first - 1}  # a log cut by `retain` begins after this one
        self.written = 0
        self.interval = 1.0  # seconds between looks at how far the log has grown

    def take(self) -> tuple[Header, bytes] | None:
        """Header and body for the state as it is now, or None if the log cannot say
        where it stands (a failed write left it broken)."""
        mark = self.elog.mark()
        if mark is None:
            return None
        offset, line, ts, streams = mark
        if self.d.seq != self.elog.seq:
            return None
        header = Header(self.d.seq, offset, digest(line), ts, streams)
        return header, dumps(self.d)

    def _store(self, header: Header, body: bytes) -> None:
        self.elog.sync()  # the log holds at least what the checkpoint says it covers
        write(self.state, header, body)
        prune(self.state, self.keep)

    def write_now(self) -> bool:
        """Write a checkpoint of the state now (at a clean stop). Never raises."""
        try:
            taken = self.take()
            if taken is None or taken[0].seq == 0:
                return False
            self._store(*taken)
        except Exception as e:  # a full disk: the next start replays more, nothing else
            log.error("checkpoint not written: %s", e)
            return False
        self.last = taken[0].seq
        self.written += 1
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            if self.d.seq - self.last < self.every:
                continue
            t = time.monotonic()
            try:
                taken = self.take()
                if taken is None:
                    continue
                await trio.to_thread.run_sync(self._store, *taken)
            except Exception as e:
                log.error("checkpoint not written: %s", e)
                self.last = self.d.seq  # try again after as many events, not every second
                continue
            self.last = taken[0].seq
            self.written += 1
            log.info("checkpoint at seq %d in %.3f s", self.last, time.monotonic() - t)
