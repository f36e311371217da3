"""The approval gate: messages that wait for the operator's yes, as factotum's
`confirm` makes a key wait for the user's.

This is part of the dispatcher's state machine, kept apart (as `flows` is): a
message to an agent whose `approve` lists its sender (or "*") is logged as
usual and, in the same append, a `held` event takes it out of the queue. It
waits in the agent's `held` table, ordinary dispatcher state, so a replay (or a
checkpoint of the state) keeps it. The operator writes `approve ID` or
`reject ID REASON` to the root `ctl`: `approved` puts it in the queue as if just
sent (behind what was sent while it waited, with a fresh age); `rejected` drops
it and sends its sender a notice (a message with `rejected` and the reason,
replying to it). No trio, no FUSE here.
"""

from __future__ import annotations

from typing import Any

from . import events
from .errors import BadInput, NotFound, NotPermitted
from .events import Event
from .models import HELD, is_id, new_id, parse_ts
from .names import OPERATOR

# The dispatcher and its agents, by the attributes used here (as in `flows`).
Dispatcher = Any

EVENTS = {"held", "approved", "rejected"}
USAGE = {"approve": "approve ID", "reject": "reject ID REASON"}


def gated(d: Dispatcher, sender: str, to: str) -> bool:
    """Whether a message from `sender` to `to` waits for the operator."""
    agent = d.agents.get(to)
    ac = agent.config if agent is not None else None
    return ac is not None and bool(ac.approve) and ac.gated(sender)


def in_use(d: Dispatcher) -> bool:
    """Whether the gate means anything: an agent has `approve`, or a message waits."""
    return any(a.held or (a.config is not None and a.config.approve) for a in d.agents.values())


def hold(d: Dispatcher, planned: list[Event]) -> list[Event]:
    """`planned` message events, each followed by its `held` event if gated."""
    out: list[Event] = []
    for ev in planned:
        out.append(ev)
        if gated(d, ev["from"], ev["to"]):
            out.append(events.held(ev))
    return out


# -- the state machine -------------------------------------------------------------------


def apply(d: Dispatcher, ev: Event) -> None:
    kind = ev["type"]
    agent = d.agents.get(ev["agent"])
    if agent is None:
        return
    if kind == "held":
        msg = d.messages.get(ev["id"])
        if msg is None:
            return
        agent.inbox.taken(msg)
        msg.state = HELD
        agent.held[msg.id] = msg
    elif kind == "approved":
        msg = agent.held.pop(ev["id"], None)
        if msg is not None:  # as if just sent: its place (and seq) in the queue, its age
            msg.seq = ev["seq"]
            msg.t = parse_ts(ev["ts"])
            agent.inbox.push(msg)
    elif kind == "rejected" and agent.held.pop(ev["id"], None) is not None:
        d.messages.pop(ev["id"], None)


# -- the operator's decisions (root ctl) -------------------------------------------------


def parse(line: str) -> tuple[str, str, str]:
    """`approve ID` or `reject ID REASON` -> (command, id, reason)."""
    words = line.split()
    if not words or words[0] not in USAGE:
        name = words[0] if words else ""
        raise BadInput(f"unknown command {name!r} for the root ctl; known: approve, reject")
    name = words[0]
    if len(words) < 2 or (name == "approve" and len(words) != 2):
        raise BadInput(f"usage: {USAGE[name]}")
    if name == "reject" and len(words) < 3:
        raise BadInput(f"reject: say why; usage: {USAGE[name]}")
    if not is_id(words[1]):
        raise BadInput(f"{words[1]!r} is not a message id; usage: {USAGE[name]}")
    return name, words[1], " ".join(words[2:])


def find(d: Dispatcher, msg_id: str) -> Any:
    """The agent holding message `msg_id` at the gate; NotFound if none does."""
    for agent in d.agents.values():
        if msg_id in agent.held:
            return agent
    raise NotFound(f"{msg_id} is not a message waiting for approval")


def run(d: Dispatcher, who: str, lines: list[bytes]) -> None:
    """Commands written to the root ctl: checked all first, then carried out."""
    if who != OPERATOR:
        raise NotPermitted("only the operator approves or rejects messages")
    try:
        commands = [parse(line.decode()) for line in lines if line.strip()]
    except UnicodeDecodeError:
        raise BadInput("command is not UTF-8 text") from None
    seen: set[str] = set()
    for _, msg_id, _ in commands:
        find(d, msg_id)
        if msg_id in seen:
            raise BadInput(f"{msg_id} is decided twice in one write")
        seen.add(msg_id)
    for name, msg_id, reason in commands:
        if name == "approve":
            approve(d, msg_id, who)
        else:
            reject(d, msg_id, reason, who)


def approve(d: Dispatcher, msg_id: str, who: str) -> None:
    agent = find(d, msg_id)
    d.record([events.approved(agent.name, msg_id, who)])


def reject(d: Dispatcher, msg_id: str, reason: str, who: str) -> None:
    """Drop the held message; its sender gets a notice replying to it: from the
    operator, with `rejected` (the reason) and a body that says what was refused."""
    agent = find(d, msg_id)
    msg = agent.held[msg_id]
    notice = new_id()
    body = {"rejected": msg_id, "to": msg.to, "reason": reason, "body": msg.body}
    ev = events.message(notice, who, msg.sender, msg.priority, body, msg_id, rejected=reason)
    d.record([events.rejected(agent.name, msg_id, who, reason, notice), ev])
