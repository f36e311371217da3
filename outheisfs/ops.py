"""The FUSE operations: the tree of SPEC §4 served with pyfuse3.

This module only translates: requests into dispatcher calls, domain errors into
errno (through `errors`), and waiting into parked tasks that watch their caller
for signals. Rights are decided at open and carried by the open file.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from . import ctl, procinfo
from .dispatcher import USER, Dispatcher
from .errors import (
    BadInput,
    Busy,
    Hidden,
    Interrupted,
    NoRight,
    NotFound,
    NotLogged,
    NotPermitted,
    OutheisError,
    OverLimit,
    WouldBlock,
)
from .eventlog import Event, EventLog
from .lines import LineBuffer
from .models import Message, parse_line
from .operators import Operators, is_stranger, stranger
from .parking import Parking
from .procevents import ProcEvents
from .supervisor import Supervisor
from .tree import AGENTS_INODE, ROOT_INODE, VAULT_INODE, Kind, Node, Tree
from .vault import Store
from .vaultops import VaultOps
from .views import NOBODY, View

log = logging.getLogger(__name__)

CLOSE_GRACE = 0.5  # seconds a reader that closed may still fail its message
DENIED_BURST, DENIED_RATE = 1000.0, 100.0  # `denied` events per agent: burst, then per second
QUIET = {errno.EINTR}  # a refusal that is normal, not an `error` event
XATTR_PID = b"user.outheisfs.pid"

P = ParamSpec("P")
R = TypeVar("R")


def handler(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Let only FUSEError out of a handler: anything else would end the mount."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OutheisError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


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
    snapshot: bytes | None = None  # ctl: status as of open
    poll: Any = None
    dropped: bool = False  # writer killed by a signal: its unterminated line is void
    counted: int = 0  # bytes of its unterminated line counted against `max_unfinished`
    # Lines of one open file are sent in the order written, even when a flush
    # comes while a write waits for room.
    sending: trio.Lock = field(default_factory=trio.Lock)

    @property
    def path(self) -> str:
        return path_of(self.node)


def path_of(node: Node) -> str:
    kind = node.row.kind
    if kind is Kind.ROOT:
        return "/"
    if node.agent is None:
        return "/" + node.row.name
    if kind is Kind.AGENT:
        return f"/agents/{node.agent}"
    return f"/agents/{node.agent}/{node.row.name}"


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, dispatcher: Dispatcher, log_: EventLog, procs: ProcEvents) -> None:
        super().__init__()
        self.d = dispatcher
        self.log = log_
        self.procs = procs
        self.supervisor: Supervisor | None = None
        self.tree = Tree()
        for name in dispatcher.agents:
            self.tree.add_agent(name)
        self.handles: dict[int, Handle] = {}
        # What each agent holds of the server now (the operator is not counted):
        self.waiting: dict[str, int] = {}  # requests parked
        self.unfinished: dict[str, int] = {}  # bytes of unterminated lines
        self.dirs: dict[int, tuple[int, str]] = {}  # open folders: fh -> (inode, who)
        self._denied: dict[str, tuple[float, float, int]] = {}  # who -> (tokens, when, unlogged)
        self.store = Store(log_.state / "vault", VAULT_INODE)
        for domain in dispatcher.config.vault:
            (self.store.root / domain).mkdir(exist_ok=True)
        self.vault = VaultOps(self, self.store)
        self._next_fh = 1
        self.nursery: trio.Nursery | None = None
        self.parking = Parking()
        self.settling: set[Message] = set()
        self.uid = os.getuid()
        self.operators = Operators.resolve(dispatcher.config.operators)
        self.gid = os.getgid()
        self.started_ns = time.time_ns()

    # -- identity -----------------------------------------------------------------------

    def who(self, ctx: pyfuse3.RequestContext) -> str:
        """The agent a request acts for: the label of the calling process, given
        to it (or an ancestor) by the supervisor or `outheisfs run`. A process that
        is no agent's is the operator; a request that cannot be attributed (pid 0,
        a process already gone) is NOBODY, with the least rights [SPEC §6]. A
        process of a uid that is not admitted as the operator is a stranger."""
        if not ctx.pid:
            return NOBODY
        label = self.procs.label_of(ctx.pid)
        if label is not None:
            return label.split("#", 1)[0]
        if not self.operators.admits(ctx.uid, ctx.gid, ctx.pid):
            return stranger(ctx.uid)
        try:
            os.kill(ctx.pid, 0)
        except ProcessLookupError:
            return NOBODY
        except PermissionError:
            pass
        return USER

    def _in_vault(self, inode: int) -> bool:
        return inode == VAULT_INODE or self.store.holds(inode)

    # -- views [SPEC §6] ----------------------------------------------------------------

    def _perms(self, who: str, node: Node) -> str | None:
        """What `who` may do with `node`: None if it is hidden, else a subset of
        "rw" ("" for a folder it may only walk through)."""
        if who == USER:
            return "rw"
        agent = self.d.agents.get(who)
        if agent is None:
            return View(NOBODY, {}).perms(path_of(node))
        return View(who, agent.grants).perms(path_of(node))

    def _visible(self, who: str, node: Node, op: str) -> str:
        """The perms of a node the caller may see; Hidden (ENOENT, `denied`) if not."""
        perms = self._perms(who, node)
        if perms is None and is_stranger(who):
            raise self._refuse(who, path_of(node), op, "not an operator of this mount")
        if perms is None:
            e = Hidden(f"not in the view of {who}")
            self._error(who, path_of(node), e, op)
            raise e
        return perms

    def _refuse(self, who: str, where: str, op: str, why: str) -> NoRight:
        """A visible path used beyond the caller's rights: EACCES, `denied`."""
        e = NoRight(why)
        self._error(who, where, e, op)
        return e

    def _error(self, who: str, where: str, e: OutheisError, op: str = "write") -> None:
        if e.recorded:
            return
        e.recorded = True
        if isinstance(e, (Hidden, NoRight)):
            # An agent looping on refusals must not fill the disk: past a burst,
            # at most DENIED_RATE events a second each; the next one logged says
            # how many were left out.
            now = time.monotonic()
            tokens, last, dropped = self._denied.get(who, (DENIED_BURST, now, 0))
            tokens = min(DENIED_BURST, tokens + (now - last) * DENIED_RATE)
            if tokens < 1:
                self._denied[who] = (tokens, now, dropped + 1)
                return
            ev: Event = {"type": "denied", "who": who, "op": op, "path": where, "why": e.reason}
            if dropped:
                ev["unlogged"] = dropped
            self._denied[who] = (tokens - 1, now, 0)
            self.d.note(ev)
            return
        if e.errno not in QUIET:
            self.d.note(
                {
                    "type": "error",
                    "who": who,
                    "where": where,
                    "errno": errno.errorcode.get(e.errno, str(e.errno)),
                    "why": e.reason,
                }
            )

    # -- nodes and attributes -----------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.tree.node(inode)
        if node is None or (node.agent is not None and node.agent not in self.d.agents):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _size(self, node: Node) -> int:
        kind = node.row.kind
        if kind is Kind.ROOT_LOG:
            return self.log.size()
        if kind is Kind.LOG:
            return self.log.size(f"{node.agent}.log")
        if kind is Kind.OUTBOX:
            return self.log.size(f"{node.agent}.outbox")
        if kind in (Kind.CTL, Kind.ROOT_CTL):
            return len(self._status(node))
        return 0

    def _status(self, node: Node) -> bytes:
        """What a ctl file reads as now. An agent bound by `run` shows the
        processes that act as it: the bound one and its descendants, while they run."""
        agents = [self.d.agents[node.agent]] if node.agent else list(self.d.agents.values())
        for a in agents:
            if a.bound:
                a.bound = self.procs.members({a.name})
        if node.agent:
            return ctl.agent_status(agents[0]).encode()
        return ctl.root_status(self.d).encode()

    def _attrs(self, node: Node, perms: str = "rw") -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        # Nothing is cached: sizes grow, agents come and go, and the view will
        # differ per caller [SPEC §6].
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = node.row.st_mode
        if perms != "rw":  # an agent's view: the mode shows what it may do
            keep = 0o550 if node.row.is_dir else 0o440 * ("r" in perms) | 0o220 * ("w" in perms)
            a.st_mode &= ~0o777 | keep
        a.st_nlink = 2 if node.row.is_dir else 1
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_rdev = 0
        a.st_size = self._size(node)
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        mtime = self.log.mtime_ns if node.row.kind in _GROWING else self.started_ns
        a.st_atime_ns = mtime
        a.st_ctime_ns = mtime
        a.st_mtime_ns = mtime
        return a

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self._in_vault(parent_inode) and name not in (b".", b".."):
            return await self.vault.lookup(parent_inode, name, self.who(ctx))
        parent = self._node(parent_inode)
        if name == b".":
            return await self.getattr(parent_inode, ctx)
        inode = self.tree.lookup(parent, name.decode(errors="replace"))
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self._node(inode)
        who = self.who(ctx)
        if who == USER:
            return self._attrs(node)
        return self._attrs(node, self._visible(who, node, "lookup"))

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.store.holds(inode):
            return await self.vault.getattr(inode, self.who(ctx))
        node = self._node(inode)
        who = self.who(ctx)
        if who == USER:
            return self._attrs(node)
        return self._attrs(node, self._visible(who, node, "stat"))

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if self.store.holds(inode):
            return await self.vault.setattr(inode, attr, fields, fh, self.who(ctx))
        node = self._node(inode)
        who = self.who(ctx)
        if who != USER and "w" not in self._visible(who, node, "setattr"):
            raise self._refuse(who, path_of(node), "setattr", f"{who} may not change this file")
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and not (node.row.writable and attr.st_size == 0):
            # Truncating to zero is what O_TRUNC asks of the message files
            # (`echo x > inbox`); it changes nothing. Logs never shrink.
            raise pyfuse3.FUSEError(errno.EACCES if node.row.is_dir is False else errno.EISDIR)
        return self._attrs(node)

    @handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        who = self.who(ctx)
        if self.store.holds(inode):
            bits = (await self.vault.getattr(inode, who)).st_mode
            return not (
                (mode & os.R_OK and not bits & 0o444)
                or (mode & os.W_OK and not bits & 0o222)
                or (mode & os.X_OK and not bits & 0o111)
            )
        node = self._node(inode)
        bits = self._attrs(node, self._visible(who, node, "access")).st_mode
        if mode & os.R_OK and not bits & 0o444:
            return False
        if mode & os.W_OK and not bits & 0o222:
            return False
        return not (mode & os.X_OK and not node.row.is_dir)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 64
        s.f_files = 0  # a count of agents would tell an agent how many it cannot see
        return s

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE and name == XATTR_PID:
            return str(os.getpid()).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [XATTR_PID] if inode == ROOT_INODE else []

    # -- directories --------------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        who = self.who(ctx)
        if self.store.holds(inode):
            self.vault.see(who, self.store.path(inode), "readdir")
        else:
            node = self._node(inode)
            if not node.row.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if who != USER:
                self._visible(who, node, "readdir")
        fh = self._next_fh
        self._next_fh += 1
        self.dirs[fh] = (inode, who)  # readdir has no caller: the listing is decided here
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode, who = self.dirs[fh]
        if self._in_vault(inode):
            listing = self.vault.listing(inode, who)
            for i, (raw, attrs) in enumerate(listing[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, raw, attrs, i):
                    break
            return
        node = self._node(inode)
        entries = self.tree.children(node, list(self.d.agents))
        for i, (name, child_inode) in enumerate(entries[start_id:], start_id + 1):
            child = self.tree.node(child_inode)
            if child is None:
                continue
            perms = self._perms(who, child)
            if perms is None:
                continue  # hidden: absent from the listing
            if not pyfuse3.readdir_reply(token, name.encode(), self._attrs(child, perms), i):
                break

    @handler
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self._in_vault(parent_inode):
            return await self.vault.mkdir(parent_inode, name, mode, self.who(ctx))
        parent = self._node(parent_inode)
        who = self.who(ctx)
        where = f"{path_of(parent).rstrip('/')}/{name.decode(errors='replace')}"
        if who != USER:
            self._visible(who, parent, "mkdir")
            raise self._refuse(who, where, "mkdir", "only the operator creates agents")
        try:
            if parent.inode != AGENTS_INODE:
                raise NotPermitted("only agents/ takes new folders")
            agent = self.d.mkdir(name.decode(errors="replace"), who)
        except OutheisError as e:
            self._error(who, where, e)
            raise
        return self._attrs(self._node(self.tree.add_agent(agent.name)))

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._in_vault(parent_inode):
            return await self.vault.rmdir(parent_inode, name, self.who(ctx))
        parent = self._node(parent_inode)
        who = self.who(ctx)
        text = name.decode(errors="replace")
        where = f"{path_of(parent).rstrip('/')}/{text}"
        if who != USER:
            self._visible(who, parent, "rmdir")
            raise self._refuse(who, where, "rmdir", "only the operator removes agents")
        try:
            if parent.inode != AGENTS_INODE:
                raise NotPermitted("only agents can be removed")
            agent = self.d.agent(text)
            if self.procs.of_agent(text):
                raise Busy(f"agent {text!r} has running processes")
            if agent.config is not None and agent.config.command:
                raise Busy(f"agent {text!r} is supervised (it has a command in the config)")
            self.d.rmdir(text, who)
        except OutheisError as e:
            self._error(who, where, e)
            raise
        self.tree.remove_agent(text)

    def _fixed(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext, op: str) -> None:
        """The tree's names are fixed: for an agent, a visible folder is EACCES."""
        parent = self._node(parent_inode)
        who = self.who(ctx)
        if who != USER:
            self._visible(who, parent, op)
            where = f"{path_of(parent).rstrip('/')}/{name.decode(errors='replace')}"
            raise self._refuse(who, where, op, f"{op}: names in the tree are fixed")

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if self._in_vault(parent_inode):
            return await self.vault.create(parent_inode, name, mode, flags, self.who(ctx))
        self._fixed(parent_inode, name, ctx, "create")
        raise pyfuse3.FUSEError(errno.EACCES)

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self._in_vault(parent_inode):
            return await self.vault.mknod(parent_inode, name, mode, self.who(ctx))
        self._fixed(parent_inode, name, ctx, "mknod")
        raise pyfuse3.FUSEError(errno.EACCES)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._in_vault(parent_inode):
            return await self.vault.unlink(parent_inode, name, self.who(ctx))
        self._fixed(parent_inode, name, ctx, "unlink")
        raise pyfuse3.FUSEError(errno.EPERM)

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_in, new_in = self._in_vault(parent_inode_old), self._in_vault(parent_inode_new)
        if old_in and new_in:
            who = self.who(ctx)
            return await self.vault.rename(
                parent_inode_old, name_old, parent_inode_new, name_new, flags, who
            )
        if old_in or new_in:
            raise pyfuse3.FUSEError(errno.EXDEV)
        self._fixed(parent_inode_old, name_old, ctx, "rename")
        self._fixed(parent_inode_new, name_new, ctx, "rename")
        raise pyfuse3.FUSEError(errno.EPERM)

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self.store.holds(inode) and self._in_vault(new_parent_inode):
            return await self.vault.link(inode, new_parent_inode, new_name, self.who(ctx))
        if self.store.holds(inode) or self._in_vault(new_parent_inode):
            raise pyfuse3.FUSEError(errno.EXDEV)
        self._fixed(new_parent_inode, new_name, ctx, "link")
        raise pyfuse3.FUSEError(errno.EPERM)

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self._in_vault(parent_inode):
            return await self.vault.symlink(parent_inode, name, target, self.who(ctx))
        self._fixed(parent_inode, name, ctx, "symlink")
        raise pyfuse3.FUSEError(errno.EPERM)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self.store.holds(inode):
            return await self.vault.readlink(inode, self.who(ctx))
        raise pyfuse3.FUSEError(errno.EINVAL)

    # -- files --------------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.store.holds(inode):
            return await self.vault.open(inode, flags, self.who(ctx))
        node = self._node(inode)
        row = node.row
        if row.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        acc = flags & os.O_ACCMODE
        read = acc in (os.O_RDONLY, os.O_RDWR)
        write = acc in (os.O_WRONLY, os.O_RDWR)
        who = self.who(ctx)
        if who == USER:
            if (read and not row.readable) or (write and not row.writable):
                raise pyfuse3.FUSEError(errno.EACCES)
        else:  # decided here, carried by the open file
            perms = self._visible(who, node, "open")
            if (read and "r" not in perms) or (write and "w" not in perms):
                verb = "read and write" if read and write else "read" if read else "write"
                raise self._refuse(who, path_of(node), "open", f"{who} may not {verb} this file")
        h = Handle(
            node=node,
            who=who,
            tid=ctx.pid,
            read=read,
            write=write,
            nonblock=bool(flags & os.O_NONBLOCK),
            lines=LineBuffer(self.d.config.max_message),
        )
        if read and row.kind in (Kind.CTL, Kind.ROOT_CTL):
            h.snapshot = self._status(node)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        return pyfuse3.FileInfo(fh=fh, direct_io=row.direct_io, keep_cache=False)

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        vf = self.store.files.get(fh)
        if vf is not None:
            return self.vault.read(vf, off, size)
        h = self._handle(fh)
        kind = h.node.row.kind
        if kind is Kind.INBOX:
            return await self._read_inbox(h, size)
        if h.snapshot is not None:
            return h.snapshot[off : off + size]
        stream = _STREAMS[kind]
        return self.log.read(None if stream is None else stream.format(h.node.agent), off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        vf = self.store.files.get(fh)
        if vf is not None:
            return self.vault.write(vf, off, buf)
        h = self._handle(fh)
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
            self._error(h.who, h.path, e)
            raise
        finally:
            self._recount(h)
        return len(buf)

    def _check_unfinished(self, h: Handle) -> None:
        """Refuse a write after which the writer's agent would hold more than
        `max_unfinished` bytes of unterminated lines (the operator may)."""
        grown = len(h.lines.partial) - h.counted
        if grown > 0 and h.who != USER:
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
            if h.node.row.kind is Kind.CTL:
                await self._run_ctl(h, lines)
            else:
                await self._send(h, lines)
        except OSError as e:
            # The log refused (a full disk): a refusal like any other, so that the
            # rest of a refused line is dropped with it, never sent at close.
            why = f"event log not written: {e.strerror or e}"
            raise NotLogged(why, e.errno or errno.EIO) from e
        finally:
            h.sending.release()

    @handler
    async def flush(self, fh: int) -> None:
        h = self.handles.get(fh)
        if h is None or not (h.msg is not None or h.lines.partial):
            return
        try:
            await self._flush(h)
        finally:
            self._recount(h)

    async def _flush(self, h: Handle) -> None:
        st = self._opener_stat(h)
        if st is not None and st.exiting:
            # The opener is exiting: its status is final and tells how [FUSE notes].
            code = st.exit_code
            if h.msg is not None:
                self._settle_now(h, code)
            if h.lines.partial and procinfo.killed_by_signal(code):
                h.lines.reset()
                h.dropped = True
        elif h.lines.partial and st is not None and self._opener_holds(h):
            # A copy was closed while the opener still has the file open for
            # writing: bash's `printf ... >&3` closes a dup of fd 3, a child that
            # inherited the file exits. The line may go on; it waits.
            return
        if h.lines.partial:
            rest = h.lines.take_rest()
            try:
                await self._write_lines(h, [rest])
            except OutheisError as e:
                self._error(h.who, h.path, e)
                raise

    @handler
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            self.vault.release(fh)
            return
        self._forget_poll(h)
        rest = h.lines.take_rest()
        self._recount(h)
        if rest and not h.dropped:
            try:
                await self._write_lines(h, [rest])
            except OutheisError as e:
                self._error(h.who, h.path, e)
        if h.msg is not None:
            msg, h.msg = h.msg, None
            if self.nursery is None or not h.pid:
                self.d.ack(msg, h.who)
            else:
                self.settling.add(msg)
                self.nursery.start_soon(self._settle_later, msg, h.who, h.pid, h.start)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        vf = self.store.files.get(fh)
        if vf is not None:
            self.vault.fsync(vf)

    @handler
    async def poll(self, inode: int, fh: int, poll_handle: Any, ctx: pyfuse3.RequestContext) -> int:
        h = self._handle(fh)
        kind = h.node.row.kind
        mask = 0
        if kind is Kind.INBOX:
            agent = self.d.agents.get(cast(str, h.node.agent))
            if agent is None:
                return select.POLLERR
            if h.read and (h.rest or agent.queued):
                mask |= select.POLLIN | select.POLLRDNORM
            if h.write and agent.queued < self.d.config.max_queue:
                mask |= select.POLLOUT | select.POLLWRNORM
            if poll_handle is not None:
                self._forget_poll(h)
                h.poll = poll_handle
                agent.pollers.add(poll_handle)
            return mask
        if h.read:
            mask |= select.POLLIN | select.POLLRDNORM
        if h.write:
            mask |= select.POLLOUT | select.POLLWRNORM
        return mask

    def _forget_poll(self, h: Handle) -> None:
        if h.poll is not None and h.node.agent in self.d.agents:
            self.d.agents[h.node.agent].pollers.discard(h.poll)
        h.poll = None

    # -- inbox reading ------------------------------------------------------------------

    async def _read_inbox(self, h: Handle, size: int) -> bytes:
        if h.rest:
            chunk, h.rest = h.rest[:size], h.rest[size:]
            return chunk
        if h.msg is not None:  # the next read acknowledges the previous message
            self.d.ack(h.msg, h.who)
            h.msg = None
        name = cast(str, h.node.agent)
        if not h.pid:
            self._learn_opener(h)
        while True:
            agent = self.d.agents.get(name)
            if agent is None:
                raise NotFound(f"agent {name} was removed")
            msg = self.d.take(name, h)
            if msg is not None:
                break
            if h.nonblock:
                raise WouldBlock("inbox is empty")
            await self._park(agent.arrived, h)
        await self.log.durable()
        h.msg = msg
        line = msg.line()
        h.rest = line[size:]
        return line[:size]

    async def _park(self, lot: trio.lowlevel.ParkingLot, h: Handle) -> None:
        """Wait to be woken through `lot`; give up with EINTR when the caller has a
        signal pending, so that the signal can act (pyfuse3 has no interrupts).
        An agent has at most `max_waiting` requests parked at once: each holds
        one of the server's request workers."""
        if h.who != USER:
            limit = self.d.config.max_waiting
            if self.waiting.get(h.who, 0) >= limit:
                e = OverLimit(f"{h.who} has {limit} requests waiting already (max_waiting)")
                self._error(h.who, h.path, e)
                raise e
        _count(self.waiting, h.who, 1)
        try:
            woken = await self.parking.park(lot, h.tid, *([h.pid] if h.pid else []))
        finally:
            _count(self.waiting, h.who, -1)
        if not woken:
            raise Interrupted("signal pending")

    def _learn_opener(self, h: Handle) -> None:
        h.pid = procinfo.tgid(h.tid)
        st = procinfo.stat(h.pid)
        h.start = st.start if st else 0

    def _opener_holds(self, h: Handle) -> bool:
        """Whether the opener may still hold a copy of this open file: it has more
        descriptors open for writing on the file than its other open files of it
        (each of which has one at least). /proc cannot tell which open file a
        descriptor belongs to, so this counts."""
        opener = h.pid or procinfo.tgid(h.tid)
        others = sum(
            1
            for o in self.handles.values()
            if o is not h
            and o.write
            and o.node.inode == h.node.inode
            and (o.pid or procinfo.tgid(o.tid)) == opener
        )
        return procinfo.writers_of(opener, h.node.inode, h.path) > others

    def _opener_stat(self, h: Handle) -> procinfo.Stat | None:
        st = procinfo.stat(h.tid)
        if st is None and h.pid:
            st = procinfo.stat(h.pid)
            if st is not None and st.start != h.start:
                return None
        return st

    def _settle_now(self, h: Handle, exit_code: int) -> None:
        msg, h.msg, h.rest = h.msg, None, b""
        assert msg is not None
        if procinfo.abnormal(exit_code):
            self.d.retry(msg, f"reader {describe_exit(exit_code)}")
        else:
            self.d.ack(msg, h.who)

    async def _settle_later(self, msg: Message, who: str, pid: int, start: int) -> None:
        """A reader closed its inbox while alive: the message counts as handled
        unless the process now fails (exits non-zero or is killed) within the grace."""
        try:
            code = await self.procs.wait(pid, start, CLOSE_GRACE)
        finally:
            self.settling.discard(msg)
        try:
            if code is not None and procinfo.abnormal(code):
                self.d.retry(msg, f"reader {describe_exit(code)} after closing")
            else:
                self.d.ack(msg, who)
        except OSError as e:  # the log refused (a full disk): it stays in flight
            log.error("message %s stays in flight: %s", msg.id, e)

    def settle_all(self) -> None:
        """At shutdown: closed files' messages count as handled."""
        for msg in list(self.settling):
            try:
                self.d.ack(msg, USER)
            except OSError as e:  # a full disk: it stays in flight, back at the next mount
                log.error("message %s stays in flight: %s", msg.id, e)
        self.settling.clear()

    # -- sending ------------------------------------------------------------------------

    async def _send(self, h: Handle, lines: list[bytes]) -> None:
        outbox = h.node.row.kind is Kind.OUTBOX
        owner = cast(str, h.node.agent)
        if outbox and h.who not in (owner, USER):
            raise NotPermitted(f"only {owner} and the operator send through this outbox")
        drafts = [parse_line(line, outbox) for line in lines]
        sender = owner if outbox else h.who
        held = self._held_by_writer(h, owner) if outbox else ()
        events = self.d.plan(sender, drafts, None if outbox else owner, held)
        if outbox and h.who != USER:
            self._check_routes(owner, events)
        while (full := self.d.full(events)) is not None:
            if h.nonblock:
                raise WouldBlock(f"inbox of {full.name} is full")
            await self._park(full.room, h)
        try:
            self.d.deliver(events)
        except UnicodeEncodeError:  # a "\ud800" escape in JSON: nothing was logged
            raise BadInput("body holds a lone surrogate: not Unicode text") from None
        await self.log.durable()

    def _check_routes(self, owner: str, events: list[Event]) -> None:
        """Sending through an outbox obeys the sender's send rights; a reply to a
        message it holds goes back to that message's sender whatever they are."""
        agent = self.d.agents[owner]
        view = View(owner, agent.grants)
        for ev in events:
            to = ev["to"]
            if view.may_send(to):
                continue
            held = agent.inflight.get(ev["reply_to"]) if ev["reply_to"] else None
            if held is not None and held.sender == to:
                continue
            e = NoRight(f"{owner} may not send to {to} (not in its send list)")
            self._error(owner, f"/agents/{to}/inbox", e, "send")
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
        if not h.pid:
            self._learn_opener(h)
        pid = h.pid
        for _ in range(16):
            if pid in holders:
                return tuple(holders[pid])
            st = procinfo.stat(pid)
            if st is None or st.ppid <= 1:
                return ()
            pid = st.ppid
        return ()

    # -- ctl ----------------------------------------------------------------------------

    async def _run_ctl(self, h: Handle, lines: list[bytes]) -> None:
        name = cast(str, h.node.agent)
        try:
            commands = [ctl.parse(line.decode()) for line in lines if line.strip()]
        except UnicodeDecodeError:
            raise BadInput("command is not UTF-8 text") from None
        for cmd in commands:  # all or nothing: every command is checked first
            self._check_ctl(h, name, cmd)
        for cmd in commands:
            await self._ctl_command(h, name, cmd)

    def _check_ctl(self, h: Handle, name: str, cmd: ctl.Command) -> None:
        who = h.who
        if cmd.name in ctl.OPERATOR and who != USER:
            raise NotPermitted(f"{cmd.name}: only the operator may do this")
        if cmd.name in ctl.SUPERVISOR:
            assert self.supervisor is not None
            self.supervisor._runner(name)  # an agent without a command: EINVAL
        elif cmd.name == "bind" and name == USER:
            raise BadInput("bind: 'user' is the operator, not an agent to run as")
        elif cmd.name == "unveil" and name == USER:
            raise BadInput("unveil: 'user' is the operator, who sees the whole tree")
        elif cmd.name == "unveil":
            if who == name:
                try:
                    View(name, self.d.agents[name].grants).narrowed(*cmd.args)
                except ValueError as e:
                    raise NotPermitted(f"unveil: {e}") from None
            elif who != USER:
                raise NotPermitted("unveil: only the agent itself (to narrow) and the operator")
        elif cmd.name == "ack":
            if who not in (name, USER):
                raise NotPermitted(f"only {name} and the operator acknowledge its messages")
            if cmd.args and cmd.args[0] not in self.d.agents[name].inflight:
                raise BadInput(f"ack: {cmd.args[0]} is not in flight for {name}")

    async def _ctl_command(self, h: Handle, name: str, cmd: ctl.Command) -> None:
        who = h.who
        if cmd.name == "bind":
            if not h.pid:
                self._learn_opener(h)
            self.d.record([{"type": "ctl", "agent": name, "who": who, "command": f"bind {h.pid}"}])
            self.procs.label(h.pid, name)
            self.d.agents[name].bound.add(h.pid)
            return
        self.d.record([{"type": "ctl", "agent": name, "who": who, "command": str(cmd)}])
        if cmd.name in ctl.SUPERVISOR:
            assert self.supervisor is not None
            await getattr(self.supervisor, cmd.name)(name)
        elif cmd.name == "ack":
            one = cmd.args[0] if cmd.args else None
            if one is not None and one not in self.d.agents[name].inflight:
                return  # acknowledged by an earlier command of the same write
            for hd in self.handles.values():
                if hd.msg is not None and hd.node.agent == name and one in (None, hd.msg.id):
                    hd.msg, hd.rest = None, b""
            self.d.ack_all(name, who, one)


_STREAMS: dict[Kind, str | None] = {
    Kind.ROOT_LOG: None,
    Kind.LOG: "{}.log",
    Kind.OUTBOX: "{}.outbox",
}
_GROWING = {Kind.ROOT_LOG, Kind.LOG, Kind.OUTBOX}


def _count(table: dict[str, int], who: str, delta: int) -> None:
    n = table.get(who, 0) + delta
    if n:
        table[who] = n
    else:
        table.pop(who, None)


def describe_exit(code: int) -> str:
    if code & 0x7F:
        return f"killed by signal {code & 0x7F}"
    return f"exited with status {code >> 8}"
