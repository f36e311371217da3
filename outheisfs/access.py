"""Who a request acts for, what that caller may see and do, and its refusals.

The caller is an agent (the label of its process, given to it or an ancestor by
the supervisor or `outheisfs run`), the operator (any other process of a uid
admitted as the operator: see `operators`), a stranger (a process of any other
uid: it may stat the root and nothing else), or NOBODY (a request that cannot be
attributed: the least rights). What an agent
may do with a path is its view (`views`); this module asks it, and turns a
refusal into the errno the caller sees and an event in the log: `denied` for a
path outside the view (ENOENT) or used beyond the rights (EACCES), `error` for
the rest. `denied` events are rate-limited per agent, so that an agent looping
on refusals cannot fill the disk, and a lookup the kernel asks twice (see
`dentries`) is one event.

Nothing here knows FUSE: the request context is anything with a `pid`.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import Protocol

from . import events
from .dentries import HOLD, Dentries
from .dispatcher import Dispatcher
from .errors import Hidden, NoRight, OutheisError, OverLimit
from .names import NOBODY, OPERATOR
from .operators import Operators, is_stranger, stranger
from .procevents import ProcEvents
from .views import View

DENIED_BURST, DENIED_RATE = 1000.0, 100.0  # `denied` events per agent: burst, then per second
QUIET = {errno.EINTR}  # a refusal that is normal, not an `error` event


class Caller(Protocol):
    """What is known of the process behind a request (pyfuse3's RequestContext)."""

    @property
    def pid(self) -> int: ...

    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...


class Access:
    def __init__(self, d: Dispatcher, procs: ProcEvents) -> None:
        self.d = d
        self.procs = procs
        self.operators = Operators.resolve(d.config.operators)
        self._denied: dict[
            str, tuple[float, float, int]
        ] = {}  # "type who" -> (tokens, when, unlogged)
        self.dentries = Dentries()  # names the kernel holds: a refused lookup is logged once
        # Calls a function after a delay; set by the server, which runs the event
        # loop. Without it a refused lookup is logged at once.
        self.later: Callable[[float, Callable[[], None]], None] | None = None

    # -- identity -------------------------------------------------------------------------

    def who(self, ctx: Caller) -> str:
        """The agent a request acts for: the label of the calling process, given
        to it (or an ancestor) by the supervisor or `outheisfs run`. A process that
        is no agent's is the operator; a request that cannot be attributed (pid 0,
        a process already gone) is NOBODY, with the least rights. A
        process of a uid that is not admitted as the operator is a stranger."""
        if not ctx.pid:
            return NOBODY
        label = self.procs.label_of(ctx.pid)
        if label is not None:
            return label.split("#", 1)[0]
        if not self.operators.admits(ctx.uid, ctx.gid, ctx.pid):
            return stranger(ctx.uid)
        # Alive? Known once per thread: until the kernel reports an event about it
        # (an exit, a fork or exec that reuses its tid; drained just above), it is.
        procs = self.procs
        if procs.alive.get(ctx.pid) == (ctx.uid, ctx.gid):
            return OPERATOR
        try:
            os.kill(ctx.pid, 0)
        except ProcessLookupError:
            return NOBODY
        except PermissionError:
            pass
        if procs.exact and not procs.lost:
            procs.alive[ctx.pid] = (ctx.uid, ctx.gid)
        return OPERATOR

    # -- views ----------------------------------------------------------------------------

    def perms(self, who: str, path: str) -> str | None:
        """What `who` may do with `path`: None if it is hidden, else a subset of
        "rw" ("" for a folder it may only walk through)."""
        if who == OPERATOR:
            return "rw"
        agent = self.d.agents.get(who)
        if agent is None:
            return View(NOBODY, {}).perms(path)
        return View(who, agent.grants).perms(path)

    def perms_now(self, who: str) -> Callable[[str], str | None]:
        """`perms` of `who` as its grants are now: a pure function of the path,
        which a worker thread may call while the loop changes the grants."""
        if who == OPERATOR:
            return lambda path: "rw"
        agent = self.d.agents.get(who)
        view = View(NOBODY, {}) if agent is None else View(who, dict(agent.grants))
        return view.perms

    def visible(self, who: str, path: str, op: str) -> str:
        """The perms of a path the caller may see; Hidden (ENOENT, `denied`) if not."""
        perms = self.perms(who, path)
        if perms is None and is_stranger(who):
            raise self.refuse(who, path, op, "not an operator of this mount")
        if perms is None:
            e = Hidden(f"not in the view of {who}")
            self.report(who, path, e, op)
            raise e
        return perms

    def granted_below(self, who: str, path: str) -> bool:
        """Whether the caller has a grant strictly below `path`."""
        if who == OPERATOR:
            return False
        agent = self.d.agents.get(who)
        top = path.rstrip("/") + "/"
        return agent is not None and any(g.startswith(top) for g in agent.grants)

    # -- refusals -------------------------------------------------------------------------

    def refuse(self, who: str, where: str, op: str, why: str) -> NoRight:
        """A visible path used beyond the caller's rights: EACCES, `denied`."""
        e = NoRight(why)
        self.report(who, where, e, op)
        return e

    def report(self, who: str, where: str, e: OutheisError, op: str = "write") -> None:
        """Record a refusal once: `denied` (rate-limited) or `error` (unless QUIET)."""
        if e.recorded:
            return
        e.recorded = True
        if isinstance(e, (Hidden, NoRight)):
            held = op == "lookup" and self.later is not None
            if held and self.dentries.refused(who, where, (op, e.reason)):
                assert self.later is not None
                self.later(HOLD, lambda: self._overdue(who, where, e))
                return
            ev = events.denied(who, op, where, e.reason, 0, errno.errorcode.get(e.errno, "EIO"))
        elif e.errno in QUIET:
            return
        else:
            ev = events.error(where, e.errno, e.reason, who)
        self._limited(who, e, ev)

    def _limited(self, who: str, e: OutheisError, ev: events.Event) -> None:
        # An agent looping on refusals (or on requests past its limits) must not
        # fill the disk: past a burst, at most DENIED_RATE events a second of each
        # type; the next one logged says how many were left out.
        if isinstance(e, (Hidden, NoRight, OverLimit)):
            key = f"{ev['type']} {who}"
            now = time.monotonic()
            tokens, last, dropped = self._denied.get(key, (DENIED_BURST, now, 0))
            tokens = min(DENIED_BURST, tokens + (now - last) * DENIED_RATE)
            if tokens < 1:
                self._denied[key] = (tokens, now, dropped + 1)
                return
            self._denied[key] = (tokens - 1, now, 0)
            if dropped:
                ev["unlogged"] = dropped
        self.d.note(ev)

    def _overdue(self, who: str, where: str, e: OutheisError) -> None:
        """A held-back refusal of a lookup that no fresh lookup followed: logged now."""
        held = self.dentries.overdue(who, where)
        if held is not None:
            op, why = held
            code = errno.errorcode.get(e.errno, "EIO")
            self._limited(who, e, events.denied(who, op, where, why, 0, code))
