"""The event vocabulary: every type of event in the log, built in one place.

An event is a plain dict (that is what the log stores and replays); these
constructors are the only places where one is spelled out, so that a reader
finds each type's fields here and a typo is a NameError, not a silent new type.
The log adds `seq` and `ts` when it appends.
"""

from __future__ import annotations

import errno as errno_
from collections.abc import Mapping, Sequence
from typing import Any

from .names import SERVER
from .procinfo import describe

Event = dict[str, Any]


# -- messages --------------------------------------------------------------------------


def message(
    id: str,
    sender: str,
    to: str,
    priority: str,
    body: Any,
    reply_to: str | None,
    **extra: str,
) -> Event:
    """`extra`: `topic` (written to topics/NAME), `rejected` (a rejection notice)."""
    ev: Event = {
        "type": "message",
        "id": id,
        "from": sender,
        "to": to,
        "priority": priority,
        "body": body,
        "reply_to": reply_to,
        "attempt": 1,
    }
    return ev | extra if extra else ev


def held(msg: Event) -> Event:
    """A message event's message waits for the operator (the approval gate); the
    event repeats its envelope, so that `approvals` shows what is to be judged."""
    keep = ("id", "from", "to", "priority", "body", "reply_to", "topic")
    return {"type": "held", "agent": msg["to"]} | {k: msg[k] for k in keep if k in msg}


def approved(agent: str, id: str, who: str) -> Event:
    return {"type": "approved", "agent": agent, "id": id, "who": who}


def rejected(agent: str, id: str, who: str, reason: str, notice: str) -> Event:
    """`notice`: the id of the message that tells the sender."""
    return {
        "type": "rejected",
        "agent": agent,
        "id": id,
        "who": who,
        "reason": reason,
        "notice": notice,
    }


def deliver(agent: str, id: str, attempt: int) -> Event:
    return {"type": "deliver", "agent": agent, "id": id, "attempt": attempt}


def ack(agent: str, id: str, who: str) -> Event:
    return {"type": "ack", "agent": agent, "id": id, "who": who}


def redeliver(agent: str, id: str, attempt: int, reason: str) -> Event:
    return {"type": "redeliver", "agent": agent, "id": id, "attempt": attempt, "reason": reason}


def dead(agent: str, id: str, attempts: int, reason: str) -> Event:
    return {"type": "dead", "agent": agent, "id": id, "attempts": attempts, "reason": reason}


# -- agents and the operator -----------------------------------------------------------


def agent(op: str, name: str, who: str) -> Event:
    """op: create | remove."""
    return {"type": "agent", "op": op, "agent": name, "who": who}


def ctl(agent: str, who: str, command: str) -> Event:
    return {"type": "ctl", "agent": agent, "who": who, "command": command}


def grant(owner: str, who: str, to: str, path: str, perms: str) -> Event:
    """`owner` gives agent `to` the right `perms` on `path` (written by `who`)."""
    return {"type": "grant", "agent": owner, "who": who, "to": to, "path": path, "perms": perms}


def revoke(owner: str, who: str, to: str, path: str) -> Event:
    """`owner` takes back what it granted agent `to` on `path` (written by `who`)."""
    return {"type": "revoke", "agent": owner, "who": who, "to": to, "path": path}


def mount(mountpoint: str, pid: int, durability: str, agents: Mapping[str, str]) -> Event:
    return {
        "type": "mount",
        "mountpoint": mountpoint,
        "pid": pid,
        "durability": durability,
        "agents": dict(agents),
    }


def umount(mountpoint: str) -> Event:
    return {"type": "umount", "mountpoint": mountpoint}


def reload(
    who: str,
    config: str,
    changes: Mapping[str, Sequence[str]],
    agents: Mapping[str, str],
) -> Event:
    """`changes`: added, changed, resized, removed, kept (removed but holding
    messages), remount (top-level keys that wait for the next mount)."""
    return {
        "type": "reload",
        "who": who,
        "config": config,
        **{k: list(v) for k, v in changes.items()},
        "agents": dict(agents),
    }


def scale(agent: str, was: int, instances: int, instance: int, reason: str) -> Event:
    """A pool that sizes itself started or stopped `instance`: `was` -> `instances`."""
    return {
        "type": "scale",
        "agent": agent,
        "was": was,
        "instances": instances,
        "instance": instance,
        "reason": reason,
    }


# -- processes -------------------------------------------------------------------------


def start(agent: str, pid: int, instance: int) -> Event:
    return {"type": "start", "agent": agent, "pid": pid, "instance": instance}


def exit(agent: str, pid: int, instance: int, status: int) -> Event:
    """`status` as wait(2) gives it: the event says `code` or `signal`."""
    return {"type": "exit", "agent": agent, "pid": pid, "instance": instance, **describe(status)}


def restart(agent: str, instance: int, delay: float, restarts: int) -> Event:
    return {
        "type": "restart",
        "agent": agent,
        "instance": instance,
        "delay": delay,
        "restarts": restarts,
    }


def failed(agent: str, restarts: int, max_restarts: int, window: float) -> Event:
    return {
        "type": "failed",
        "agent": agent,
        "restarts": restarts,
        "max_restarts": max_restarts,
        "window": window,
    }


# -- refusals and reports --------------------------------------------------------------


def error(where: str, code: int | str, why: str, who: str = SERVER) -> Event:
    """A refusal or a failure: `code` an errno number or its name."""
    name = code if isinstance(code, str) else errno_.errorcode.get(code, str(code))
    return {"type": "error", "who": who, "where": where, "errno": name, "why": why}


def denied(
    who: str, op: str, path: str, why: str, unlogged: int = 0, code: str = "EACCES"
) -> Event:
    """A path used beyond the caller's view or rights; `unlogged`: how many
    refusals before this one were left out by the rate limit; `code`: ENOENT
    (hidden) or EACCES (seen, beyond its rights)."""
    ev: Event = {"type": "denied", "who": who, "op": op, "path": path, "why": why}
    ev["errno"] = code
    if unlogged:
        ev["unlogged"] = unlogged
    return ev


def vault(who: str, op: str, path: str, **more: str) -> Event:
    return {"type": "vault", "who": who, "op": op, "path": path, **more}
