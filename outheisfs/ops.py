"""The pyfuse3 adapter: one handler per FUSE request, and nothing else.

Each handler finds the node or the open file a request is about, asks `access`
who the caller is and what it may do, and hands the work to its owner: the
open agent files (`openfile`), the vault (`vaultops`), the dispatcher (agents
come and go). What leaves a handler is `FUSEError(errno)` only: domain errors
become their errno (`errors`), anything unexpected is logged and becomes EIO
(`handler`), so that no request can end the mount.

Rights are decided at lookup and open, and carried by the open file; nothing is
cached by the kernel (entry and attribute timeouts are 0), since the view, and
so the answer, differs per caller.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from . import gate
from .access import Access
from .ctl import Commands
from .dispatcher import Dispatcher
from .errors import Busy, NotPermitted, OutheisError
from .eventlog import EventLog
from .names import OPERATOR, XATTR_PID, XATTR_POLICY, XATTR_SENT
from .openfile import Handle, OpenFiles
from .procevents import ProcEvents
from .procstate import Processes
from .tree import (
    AGENT_ROWS,
    AGENTS_INODE,
    ROOT_INODE,
    ROOT_ROWS,
    VAULT_INODE,
    Kind,
    Node,
    Row,
    Tree,
)
from .vault import Store
from .vaultops import VaultOps

log = logging.getLogger(__name__)
FILE_NAMES = {row.name for row in AGENT_ROWS}
ROOT_NAMES = {row.name for row in ROOT_ROWS}

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


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        dispatcher: Dispatcher,
        log_: EventLog,
        procs: ProcEvents,
        table: Processes | None = None,
    ) -> None:
        super().__init__()
        self.d = dispatcher
        self.log = log_
        self.procs = procs
        self.table = table or Processes(dispatcher.config)
        self.tree = Tree()
        for name in dispatcher.agents:
            self.tree.add_agent(name)
        self.tree.set_topics(list(dispatcher.topics))
        self.rights = Access(dispatcher, procs)
        self.commands = Commands(dispatcher, procs, self.table, log_.state)
        self.commands.exists = self._exists  # ctl marks grants of paths not there (missing)
        fhs = itertools.count(1)  # one numbering for agent files, folders and vault files
        self.files = OpenFiles(dispatcher, log_, self.rights, procs, self.commands, fhs)
        self.store = Store(log_.state / "vault", VAULT_INODE)
        for domain in dispatcher.config.vault:
            (self.store.root / domain).mkdir(exist_ok=True)
        self.vault = VaultOps(
            dispatcher, dispatcher.config, self.rights, self.store, fhs, self.files.offloop
        )
        self._fhs = fhs
        self.dirs: dict[int, tuple[int, str]] = {}  # open folders: fh -> (inode, who)
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.started_ns = time.time_ns()

    def who(self, ctx: pyfuse3.RequestContext) -> str:
        """The agent a request acts for (see `access.Access.who`)."""
        return self.rights.who(ctx)

    # -- nodes and attributes -----------------------------------------------------------

    def _in_vault(self, inode: int) -> bool:
        return inode == VAULT_INODE or self.store.holds(inode)

    def _node(self, inode: int) -> Node:
        node = self.tree.node(inode)
        if node is None or (node.agent is not None and node.agent not in self.d.agents):
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not self._present(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _present(self, node: Node) -> bool:
        """`topics/` is there when the config has topics, `approvals` when an agent
        has a gate or a message waits at one (held under an older config)."""
        kind = node.row.kind
        if kind is Kind.TOPICS:
            return bool(self.d.topics)
        if kind is Kind.APPROVALS:
            return gate.in_use(self.d)
        return True

    def _writable(self, row: Row) -> bool:
        """Whether the file takes writes at all (who may write is decided at open)."""
        return row.writable

    def _handle(self, fh: int) -> Handle:
        h = self.files.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    def _exists(self, path: str) -> bool:
        """Whether a path of a grant names something in the tree now."""
        parts = path.strip("/").split("/")
        if parts[0] == "vault":
            # Only ctl's "(missing)" mark depends on it: a plain lstat of the backing path.
            return os.path.lexists(self.store.root.joinpath(*parts[1:]))
        if parts[0] == "topics" and len(parts) == 2:
            return parts[1] in self.d.topics
        if parts[0] == "agents" and len(parts) > 1:
            if parts[1] != "*" and parts[1] not in self.d.agents:
                return False
            return len(parts) == 2 or (len(parts) == 3 and parts[2] in FILE_NAMES)
        return len(parts) == 1 and (parts[0] in ROOT_NAMES or not parts[0])

    def _visible(self, who: str, node: Node, op: str) -> str:
        """The caller's perms on a node it may see ("rw" for the operator)."""
        return "rw" if who == OPERATOR else self.rights.visible(who, node.path, op)

    def _attrs(self, node: Node, perms: str = "rw") -> pyfuse3.EntryAttributes:
        row = node.row
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        # Nothing is cached: sizes grow, agents come and go, and the view will
        # differ per caller.
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = row.st_mode
        if not self._writable(row):
            a.st_mode &= ~0o222
        if perms != "rw":  # an agent's view: the mode shows what it may do
            keep = 0o550 if row.is_dir else 0o440 * ("r" in perms) | 0o220 * ("w" in perms)
            a.st_mode &= ~0o777 | keep
        a.st_nlink = 2 if row.is_dir else 1
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_rdev = 0
        a.st_size = self.files.size(node)
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        mtime = self.log.mtime_ns if row.growing else self.started_ns
        a.st_atime_ns = mtime
        a.st_ctime_ns = mtime
        a.st_mtime_ns = mtime
        return a

    # -- names and attributes -----------------------------------------------------------

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Look up `name` in a folder and return its attributes. ENOENT if there
        is no such entry, or if it is outside the caller's view (`denied`)."""
        if self._in_vault(parent_inode) and name not in (b".", b".."):
            return await self.vault.lookup(parent_inode, name, self.who(ctx))
        parent = self._node(parent_inode)
        if name == b".":
            return await self.getattr(parent_inode, ctx)
        if parent.row.kind is Kind.TOPICS:  # the config's topics (a reload may change them)
            self.tree.set_topics(list(self.d.topics))
        inode = self.tree.lookup(parent, name.decode(errors="replace"))
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self._node(inode)
        perms = self._visible(self.who(ctx), node, "lookup")
        self.rights.dentries.shown(node.path)
        return self._attrs(node, perms)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """The attributes of an inode, as the caller sees them: an agent's mode
        bits show what its view allows. ENOENT outside the view."""
        if self.store.holds(inode):
            return await self.vault.getattr(inode, self.who(ctx))
        node = self._node(inode)
        return self._attrs(node, self._visible(self.who(ctx), node, "stat"))

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Change attributes; return the new ones. In the tree only a truncation
        to 0 of a writable file is taken (O_TRUNC), and it changes nothing; mode
        and owner are EPERM, other sizes EACCES."""
        if self.store.holds(inode):
            return await self.vault.setattr(inode, attr, fields, fh, self.who(ctx))
        node = self._node(inode)
        who = self.who(ctx)
        if "w" not in self._visible(who, node, "setattr"):
            raise self.rights.refuse(who, node.path, "setattr", f"{who} may not change this file")
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and not (node.row.writable and attr.st_size == 0):
            # Truncating to zero is what O_TRUNC asks of the message files
            # (`echo x > inbox`); it changes nothing. Logs never shrink.
            raise pyfuse3.FUSEError(errno.EACCES if node.row.is_dir is False else errno.EISDIR)
        return self._attrs(node)

    @handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Whether the caller may use the inode as `mode` (R_OK, W_OK, X_OK) asks,
        judged as `open` (or opendir, exec) would judge it: in the tree from the mode
        bits it would see, in the vault by `VaultOps.access`."""
        who = self.who(ctx)
        if self.store.holds(inode):
            return await self.vault.access(inode, mode, who)
        node = self._node(inode)
        bits = self._attrs(node, self.rights.visible(who, node.path, "access")).st_mode
        if mode & os.R_OK and not bits & 0o444:
            return False
        if mode & os.W_OK and not bits & 0o222:
            return False
        return not (mode & os.X_OK and not node.row.is_dir)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """The figures of the vault's backing filesystem (so `df` and free-space
        checks work), and the longest name the vault accepts."""
        return self.vault.statfs()

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """The root's XATTR_PID is the server's pid (for `outheisfs umount`); an
        inbox's or outbox's XATTR_SENT the ids of the caller's last write to it
        (for `outheisfs ask`); every other attribute is ENODATA."""
        if inode == ROOT_INODE and name == XATTR_PID:
            return str(os.getpid()).encode()
        if name == XATTR_SENT:
            sent = self.files.sent_by(inode, ctx.pid)
            if sent is not None:
                return sent
        if inode == ROOT_INODE and name == XATTR_POLICY:
            # What `outheisfs run` applies to itself once bound: the caller's own rights.
            who = self.who(ctx)
            if who == OPERATOR or who not in self.d.agents:
                raise pyfuse3.FUSEError(errno.ENODATA)
            return self.commands.policy(who).to_json()
        raise pyfuse3.FUSEError(errno.ENODATA)

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        """The names of the inode's extended attributes."""
        return [XATTR_PID] if inode == ROOT_INODE else []

    # -- folders ------------------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Open a folder for listing; return its handle. The caller's view is
        decided here: `readdir` is not told who asks."""
        who = self.who(ctx)
        if self._in_vault(inode):
            fh = next(self._fhs)
            self.vault.opendir(fh, inode, who)
        else:
            node = self._node(inode)
            if not node.row.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            self._visible(who, node, "readdir")
            fh = next(self._fhs)
        self.dirs[fh] = (inode, who)
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List entries after `start_id` with `readdir_reply` until it returns
        False; an entry outside the opener's view is absent."""
        inode, who = self.dirs[fh]
        if self._in_vault(inode):
            return await self.vault.readdir(fh, start_id, who, token)
        node = self._node(inode)
        if node.row.kind is Kind.TOPICS:
            self.tree.set_topics(list(self.d.topics))
        entries = self.tree.children(node, list(self.d.agents))
        for i, (name, child_inode) in enumerate(entries[start_id:], start_id + 1):
            child = self.tree.node(child_inode)
            if child is None or not self._present(child):
                continue
            perms = self.rights.perms(who, child.path)
            if perms is None:
                continue  # hidden: absent from the listing
            self.rights.dentries.shown(child.path)  # a listing gives the kernel names too
            if not pyfuse3.readdir_reply(token, name.encode(), self._attrs(child, perms), i):
                break

    @handler
    async def releasedir(self, fh: int) -> None:
        """The folder handle is closed."""
        self.dirs.pop(fh, None)
        self.vault.releasedir(fh)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """The kernel dropped its references: vault inodes let their files go."""
        for inode, n in inode_list:
            if self.store.holds(inode):
                try:
                    self.vault.forget(inode, n)
                except Exception:  # forget must never raise
                    log.exception("forget %d", inode)

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Make a folder; return its attributes. In `agents/` the operator makes a
        new agent; anywhere else in the tree, and for agents, it is refused."""
        if self._in_vault(parent_inode):
            return await self.vault.mkdir(parent_inode, name, mode, self.who(ctx))
        parent = self._node(parent_inode)
        who = self.who(ctx)
        where = f"{parent.path.rstrip('/')}/{name.decode(errors='replace')}"
        if who != OPERATOR:
            self.rights.visible(who, parent.path, "mkdir")
            raise self.rights.refuse(who, where, "mkdir", "only the operator creates agents")
        try:
            if parent.inode != AGENTS_INODE:
                raise NotPermitted("only agents/ takes new folders")
            made = name.decode(errors="replace")
            self.d.mkdir(made, who)
        except OutheisError as e:
            self.rights.report(who, where, e)
            raise
        await self.log.settled()  # in a cluster: applied once back from the stream
        return self._attrs(self._node(self.tree.add_agent(made)))

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Remove a folder. In `agents/` the operator removes an agent that has no
        process, no command in the config and no pending message."""
        if self._in_vault(parent_inode):
            return await self.vault.rmdir(parent_inode, name, self.who(ctx))
        parent = self._node(parent_inode)
        who = self.who(ctx)
        text = name.decode(errors="replace")
        where = f"{parent.path.rstrip('/')}/{text}"
        if who != OPERATOR:
            self.rights.visible(who, parent.path, "rmdir")
            raise self.rights.refuse(who, where, "rmdir", "only the operator removes agents")
        try:
            if parent.inode != AGENTS_INODE:
                raise NotPermitted("only agents can be removed")
            agent = self.d.agent(text)
            if self.procs.of_agent(text) or self.table.of(text).pids:
                raise Busy(f"agent {text!r} has running processes")
            if agent.config is not None and agent.config.command:
                raise Busy(f"agent {text!r} is supervised (it has a command in the config)")
            self.d.rmdir(text, who)
        except OutheisError as e:
            self.rights.report(who, where, e)
            raise
        self.tree.remove_agent(text)

    # -- names that are fixed in the tree -----------------------------------------------

    def _fixed(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext, op: str) -> None:
        """The tree's names are fixed: for an agent, a visible folder is EACCES."""
        parent = self._node(parent_inode)
        who = self.who(ctx)
        if who != OPERATOR:
            self.rights.visible(who, parent.path, op)
            where = f"{parent.path.rstrip('/')}/{name.decode(errors='replace')}"
            raise self.rights.refuse(who, where, op, f"{op}: names in the tree are fixed")

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Make and open a file (vault only); in the tree EACCES."""
        if self._in_vault(parent_inode):
            return await self.vault.create(parent_inode, name, mode, flags, self.who(ctx))
        self._fixed(parent_inode, name, ctx, "create")
        raise pyfuse3.FUSEError(errno.EACCES)

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Make a regular file (vault only); in the tree EACCES."""
        if self._in_vault(parent_inode):
            return await self.vault.mknod(parent_inode, name, mode, self.who(ctx))
        self._fixed(parent_inode, name, ctx, "mknod")
        raise pyfuse3.FUSEError(errno.EACCES)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Remove a name (vault only); in the tree EPERM."""
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
        """Rename within the vault; across its edge EXDEV; in the tree EPERM."""
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
        """A hard link within the vault; across its edge EXDEV; in the tree EPERM."""
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
        """A symlink (vault only); in the tree EPERM."""
        if self._in_vault(parent_inode):
            return await self.vault.symlink(parent_inode, name, target, self.who(ctx))
        self._fixed(parent_inode, name, ctx, "symlink")
        raise pyfuse3.FUSEError(errno.EPERM)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        """A symlink's target (vault only); EINVAL for the tree's files."""
        if self.store.holds(inode):
            return await self.vault.readlink(inode, self.who(ctx))
        raise pyfuse3.FUSEError(errno.EINVAL)

    # -- open files ---------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open a file; return its handle. The caller's rights are decided here
        and carried by the open file: ENOENT outside the view, EACCES beyond it
        (both `denied`). The tree's files are direct I/O: never cached."""
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
        if who == OPERATOR:
            if (read and not row.readable) or (write and not self._writable(row)):
                raise pyfuse3.FUSEError(errno.EACCES)
        else:
            perms = self.rights.visible(who, node.path, "open")
            if (read and "r" not in perms) or (write and "w" not in perms):
                verb = "read and write" if read and write else "read" if read else "write"
                raise self.rights.refuse(who, node.path, "open", f"{who} may not {verb} this file")
        nonblock = bool(flags & os.O_NONBLOCK)
        fh = self.files.open(node, who, ctx.pid, read, write, nonblock)
        return pyfuse3.FileInfo(fh=fh, direct_io=row.direct_io, keep_cache=False)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """At most `size` bytes at `off`. An inbox ignores `off`: each read takes
        (part of) the next message, waiting while there is none (EAGAIN with
        O_NONBLOCK, EINTR when the caller gets a signal)."""
        vf = self.store.files.get(fh)
        if vf is not None:
            return self.vault.read(vf, off, size)
        return await self.files.read(self._handle(fh), off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Take `buf`; return how many bytes were taken (all, or an error). Whole
        lines are sent (or run, on ctl) before the write returns; a refused line
        is refused whole: nothing of it is sent."""
        vf = self.store.files.get(fh)
        if vf is not None:
            return self.vault.write(vf, off, buf)
        return await self.files.write(self._handle(fh), buf)

    @handler
    async def flush(self, fh: int) -> None:
        """A descriptor of the open file was closed (dup'd copies may remain). If
        the closer is exiting, how it exits settles a message it holds and the
        fate of an unterminated line."""
        h = self.files.handles.get(fh)
        if h is not None:
            await self.files.flush(h)

    @handler
    async def release(self, fh: int) -> None:
        """The open file is gone: its unterminated line is sent, and the message it
        holds settles (acked, unless the reader fails within the close grace)."""
        if fh in self.files.handles:
            await self.files.release(fh)
        else:
            self.vault.release(fh)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Vault files reach the disk; the tree's writes are durable when they return."""
        vf = self.store.files.get(fh)
        if vf is not None:
            self.vault.fsync(vf)

    @handler
    async def poll(self, inode: int, fh: int, poll_handle: Any, ctx: pyfuse3.RequestContext) -> int:
        """The file's poll mask now; the kernel is told through `poll_handle`
        when an inbox changes (a message arrives, room frees up)."""
        return self.files.poll(self._handle(fh), poll_handle)
