"""Owners grant access: read rights on a vault domain, given and taken back by its owner.

The owner of a vault domain knows who should read which part of it, so it may
give another agent read access to a path in its domain (ctl `grant AGENT PATH
r`) and take it back (`revoke AGENT PATH`); the operator may write both to any
ctl and then acts for the owner. Only `r` can be granted: the domain keeps its
one writer.

A grant is state of the dispatcher's state machine, like the rest: the
commands are checked here (`check`), logged as `grant` and `revoke` events, and
applied here (`apply`), so a replay gives the same grants. They live in one
field, `Dispatcher.granted` (grantee -> path -> owner). The grantee's view
(`Agent.grants`) holds each granted path as well: a grant changes it at once,
and whenever the view is set back to the config's (a process started, `bind`,
a mount) the grants in force are laid over the config's again (`base`). So a
grant lasts until it is revoked, across restarts of both agents and of the
server. No trio, no FUSE, no processes here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import events
from .errors import BadInput, NotFound, NotPermitted
from .events import Event
from .names import OPERATOR
from .views import HIDE, config_grants, normalize

# The dispatcher and its agents, by the attributes used here: `dispatcher` imports
# this module (its state machine applies these events), so not the other way.
Dispatcher = Any

EVENTS = {"grant", "revoke"}
COMMANDS = {"grant", "revoke"}
RIGHTS = "r"  # what may be granted: the domain keeps its one writer
Granted = dict[str, dict[str, str]]  # grantee -> path -> the owner who granted it


# -- the state machine -------------------------------------------------------------------


def apply(d: Dispatcher, ev: Event) -> None:
    """A `grant` or `revoke` event: the grants and the grantee's view change."""
    grantee, path = ev["to"], ev["path"]
    if ev["type"] == "grant":
        d.granted.setdefault(grantee, {})[path] = ev["agent"]
        agent = d.agents.get(grantee)
        if agent is not None:
            agent.grants[path] = _with_read(agent.grants.get(path))
    else:
        _take_back(d, grantee, path)


def _take_back(d: Dispatcher, grantee: str, path: str) -> None:
    """A grant ends: out of `granted`, and out of the grantee's view (where its
    config gives the path, the config's value stays)."""
    given = d.granted.get(grantee, {})
    if given.pop(path, None) is None:
        return
    if not given:
        del d.granted[grantee]
    agent = d.agents.get(grantee)
    if agent is not None:
        configured = config_grants(d.config, grantee).get(path)
        if configured is None:
            agent.grants.pop(path, None)
        else:
            agent.grants[path] = configured


def base(d: Dispatcher, name: str) -> dict[str, str]:
    """An agent's view as its config gives it, with the grants in force laid over."""
    grants = config_grants(d.config, name)
    for path in d.granted.get(name, {}):
        grants[path] = _with_read(grants.get(path))
    return grants


def forget(d: Dispatcher, name: str) -> None:
    """An agent is removed: the grants it held and the grants it gave go with it
    (an agent made later under the same name starts with none)."""
    d.granted.pop(name, None)
    for grantee, given in list(d.granted.items()):
        for path in [p for p, owner in given.items() if owner == name]:
            _take_back(d, grantee, path)


def prune(d: Dispatcher) -> None:
    """Grants whose giver no longer owns the path's domain in the config in force
    lapse (a config that moved a domain to another owner), and so do the grants of
    an agent that is gone."""
    for grantee, given in list(d.granted.items()):
        if grantee not in d.agents:
            del d.granted[grantee]
            continue
        for path in [p for p, owner in given.items() if owner_of(d.config, p) != owner]:
            _take_back(d, grantee, path)


def _with_read(perms: str | None) -> str:
    if perms is None or perms == HIDE:
        return RIGHTS
    return "".join(c for c in "rw" if c in perms or c in RIGHTS)


# -- checking a command ------------------------------------------------------------------


def owner_of(config: Any, path: str) -> str | None:
    """The owner of the vault domain a path lies in; None outside every domain."""
    parts = path.strip("/").split("/")
    if len(parts) < 2 or parts[0] != "vault":
        return None
    owner = config.vault.get(parts[1])
    return owner if isinstance(owner, str) else None


def domains(config: Any, owner: str) -> list[str]:
    return [f"/vault/{dom}" for dom, o in config.vault.items() if o == owner]


def check(d: Dispatcher, who: str, ctl_of: str, name: str, args: tuple[str, ...]) -> None:
    """Refuse `grant AGENT PATH PERMS` or `revoke AGENT PATH` written by `who` to
    CTL_OF's ctl, unless it is allowed. EINVAL for a malformed one, EPERM for one
    the writer may not give, ENOENT for an unknown agent or (revoke) grant."""
    if who not in (ctl_of, OPERATOR):
        raise NotPermitted(f"{name}: only {ctl_of} (for its own domain) and the operator")
    grantee, path = args[0], args[1]
    if not path.startswith("/") or "/../" in path + "/" or "/./" in path + "/":
        raise BadInput(f"{name}: {path!r} is not an absolute path in the mount")
    path = normalize(path)
    if name == "grant":
        perms = args[2]
        if perms not in ("r", "w", "rw"):
            raise BadInput(f"grant: permissions {perms!r}: only r can be granted")
        if perms != RIGHTS:
            raise NotPermitted(
                f"grant: only r can be granted, not {perms!r}: the domain keeps its one writer"
            )
    if grantee not in d.agents:
        raise NotFound(f"{name}: no agent {grantee!r}")
    owner = giver(d, who, ctl_of, name, grantee, path)
    if owner is None:  # the operator, for a path in no domain
        raise NotPermitted(
            f"{name}: {path} is in no vault domain (the operator's `unveil` gives any path)"
        )
    if owner_of(d.config, path) != owner and not (name == "revoke" and who == OPERATOR):
        mine = domains(d.config, owner)
        where = f"its domain is {', '.join(mine)}" if mine else "it owns no vault domain"
        raise NotPermitted(f"{name}: {path} is outside the domain of {owner} ({where})")
    if name == "revoke":
        if d.granted.get(grantee, {}).get(path) != owner:
            raise NotFound(f"revoke: {owner} has not granted {path} to {grantee}")
        return
    if grantee == OPERATOR:
        raise BadInput("grant: 'user' is the operator, who sees the whole tree")
    if grantee == owner:
        raise BadInput(f"grant: {owner} owns {path} already")


def giver(d: Dispatcher, who: str, ctl_of: str, name: str, grantee: str, path: str) -> str | None:
    """Who gives (or takes back) a grant written by `who` to CTL_OF's ctl: an agent
    gives from its own domains only; the operator acts for the owner of PATH's domain,
    whichever ctl it writes to, and takes back a grant whoever gave it."""
    if who != OPERATOR:
        return ctl_of
    if name == "revoke":
        given: str | None = d.granted.get(grantee, {}).get(path)
        if given is not None:
            return given
    return owner_of(d.config, path)


def event(d: Dispatcher, who: str, ctl_of: str, name: str, args: tuple[str, ...]) -> Event:
    """The event of a checked `grant` or `revoke` command written to CTL_OF's ctl."""
    grantee, path = args[0], normalize(args[1])
    owner = giver(d, who, ctl_of, name, grantee, path)
    assert owner is not None  # checked
    if name == "grant":
        return events.grant(owner, who, grantee, path, args[2])
    return events.revoke(owner, who, grantee, path)


# -- what ctl shows ----------------------------------------------------------------------


def status(
    d: Dispatcher, name: str, exists: Callable[[str], bool] = lambda path: True
) -> list[tuple[str, str]]:
    """ctl lines: each grant NAME holds (`unveil PATH r (granted by OWNER)`), then
    each grant NAME gave (`granted AGENT PATH r`)."""
    rows = []
    for path, owner in sorted(d.granted.get(name, {}).items()):
        missing = "" if exists(path) else " (missing)"
        rows.append(("unveil", f"{path} {RIGHTS} (granted by {owner}){missing}"))
    for grantee, given in sorted(d.granted.items()):
        for path, owner in sorted(given.items()):
            if owner == name:
                rows.append(("granted", f"{grantee} {path} {RIGHTS}"))
    return rows
