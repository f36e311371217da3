"""Workflows that survive real use: explicit acks, ack_wait, dead letters, reply rights.

This is part of the dispatcher's state machine, kept apart: the events it adds
(`nack`, `progress`, `requeue`, `purge`) are applied here, and the operations
that decide them are plain functions of the dispatcher and of `now` (the
caller's clock, so that tests drive time). A timer is a decision logged as an
event (`redeliver` with reason `ack_wait`), never a change outside the log:
a replay gives the same in-flight set, the same deadlines, the same dead letters.
No trio, no FUSE, no processes here.
"""

from __future__ import annotations

from typing import Any, TypeVar

from .errors import BadInput, NoRight, Stale
from .events import Event
from .models import DELAYED, QUEUED, Message, dumps

# The dispatcher and its agents, by the attributes used here: `dispatcher` imports
# this module (its state machine applies these events), so not the other way.
Dispatcher = Any
Agent = Any

EVENTS = {"nack", "progress", "requeue", "purge"}
RECEIVED = 100_000  # reply rights remembered: the last this many deliveries
TAKEN_BACK = 10_000  # messages ack_wait took back, remembered for ESTALE
K = TypeVar("K")
V = TypeVar("V")


def remember(table: dict[K, Any], key: K, value: Any, limit: int, merge: bool = False) -> None:
    """Insert into a table bounded by insertion order (the same after a replay)."""
    if merge and key in table:
        table[key] |= value
        return
    table[key] = value
    if len(table) > limit:
        del table[next(iter(table))]


def explicit(agent: Agent) -> bool:
    return agent.config is not None and agent.config.ack == "explicit"


# -- the state machine -------------------------------------------------------------------


def apply(d: Dispatcher, ev: Event) -> None:
    kind = ev["type"]
    agent = d.agents.get(ev["agent"])
    if agent is None:
        return
    if kind == "nack":
        msg = agent.inflight.pop(ev["id"])
        due = ev.get("due", 0.0)
        if due:
            msg.due = due
            msg.state = DELAYED
            msg.gen += 1
            agent.delayed[msg.id] = msg
        else:
            agent.inbox.push(msg)
    elif kind == "progress":
        agent.inflight[ev["id"]].deadline = ev["deadline"]
    elif kind == "requeue":
        msg = agent.dead_letters.pop(ev["id"])
        msg.delivered = 0
        msg.reason = ""
        msg.state = QUEUED
        d.messages[msg.id] = msg
        agent.inbox.push(msg)
    elif kind == "purge":
        agent.dead_letters.pop(ev["id"], None)


def due(agent: Agent, now: float) -> Message | None:
    """A nacked message whose delay has passed (the earliest), if any."""
    if not agent.delayed:
        return None
    msg = min(agent.delayed.values(), key=lambda m: (m.due, m.seq))
    return msg if msg.due <= now else None


# -- decisions -----------------------------------------------------------------------------


def reply_target(d: Dispatcher, sender: str, msg_id: str) -> str:
    """Whom a reply to `msg_id` goes to: the sender of a message `sender` was
    delivered. The right comes from the logged delivery."""
    agent = d.agent(sender)
    held: Message | None = agent.inflight.get(msg_id)
    if held is not None:
        return held.sender
    got: tuple[str, str] | None = d.received.get(msg_id)
    if got is None or got[0] != sender:
        raise NoRight(f"{msg_id} is not a message {sender} received")
    return got[1]


def may_reply(d: Dispatcher, sender: str, to: str, reply_to: str | None) -> bool:
    """Whether a message to `to` is a reply to one `sender` received from `to`."""
    if reply_to is None:
        return False
    try:
        return reply_target(d, sender, reply_to) == to
    except (NoRight, BadInput):
        return False


def held(d: Dispatcher, name: str, msg_id: str, instance: int | None, by_agent: bool) -> Message:
    """The in-flight message an `ack`/`nack`/`term`/`progress` names. ESTALE when
    ack_wait took it back from the acker (or it died since); EINVAL when unknown."""
    agent = d.agent(name)
    msg: Message | None = agent.inflight.get(msg_id)
    lost = d.taken_back.get(msg_id)
    if (
        by_agent
        and lost is not None
        and (msg is None or (instance in lost and msg.instance != instance))
    ):
        raise Stale(f"{msg_id} was taken back after ack_wait; it is no longer {name}'s to ack")
    if msg is None:
        if msg_id in agent.dead_letters and explicit(agent):
            raise Stale(f"{msg_id} is a dead letter now")
        raise BadInput(f"{msg_id} is not in flight for {name}")
    return msg


def nack(d: Dispatcher, msg: Message, who: str, delay: float, now: float) -> None:
    """Deliver again, now or after `delay` seconds; a nack spends an attempt."""
    if msg.delivered >= d.config.max_attempts:
        bury(d, msg, f"nacked at attempt {msg.delivered} of {d.config.max_attempts}", who)
        return
    ev: Event = {"type": "nack", "agent": msg.to, "id": msg.id, "who": who}
    if delay > 0:
        ev["due"] = round(now + delay, 6)
    d.record([ev])


def bury(d: Dispatcher, msg: Message, reason: str, who: str | None = None) -> None:
    ev: Event = {
        "type": "dead",
        "agent": msg.to,
        "id": msg.id,
        "attempts": msg.delivered,
        "reason": reason,
    }
    if who is not None:
        ev["who"] = who
    d.record([ev])


def progress(d: Dispatcher, msg: Message, who: str, now: float) -> None:
    agent = d.agents[msg.to]
    wait = agent.config.ack_wait if agent.config is not None else 0.0
    deadline = round(now + wait, 6) if wait else 0.0
    ev = {"type": "progress", "agent": msg.to, "id": msg.id, "who": who, "deadline": deadline}
    d.record([ev])


def next_timer(d: Dispatcher) -> float | None:
    """The earliest ack_wait deadline or nack delay, as wall-clock time."""
    best: float | None = None
    for agent in d.agents.values():
        if agent.delayed:
            t = min(m.due for m in agent.delayed.values())
            best = t if best is None else min(best, t)
        if explicit(agent):
            for m in agent.inflight.values():
                if m.deadline and (best is None or m.deadline < best):
                    best = m.deadline
    return best


def expire(d: Dispatcher, now: float) -> list[Agent]:
    """Take back what was held past its deadline (a `redeliver` saying `ack_wait`);
    return the agents whose readers should look again (a nack's delay passed)."""
    wake: list[Agent] = []
    for agent in list(d.agents.values()):
        if explicit(agent):
            for m in [m for m in agent.inflight.values() if m.deadline and m.deadline <= now]:
                d.retry(m, "ack_wait")
        if due(agent, now) is not None:
            wake.append(agent)
    return wake


def requeue(d: Dispatcher, name: str, msg_id: str | None, who: str) -> int:
    agent = d.agent(name)
    ids = _dead_ids(agent, msg_id)
    d.record({"type": "requeue", "agent": name, "id": i, "who": who} for i in ids)
    return len(ids)


def purge(d: Dispatcher, name: str, msg_id: str | None, who: str) -> int:
    agent = d.agent(name)
    ids = _dead_ids(agent, msg_id)
    d.record({"type": "purge", "agent": name, "id": i, "who": who} for i in ids)
    return len(ids)


def _dead_ids(agent: Agent, msg_id: str | None) -> list[str]:
    if msg_id is None:
        return list(agent.dead_letters)
    if msg_id not in agent.dead_letters:
        raise BadInput(f"{msg_id} is not a dead letter of {agent.name}")
    return [msg_id]


def dead_lines(agent: Agent) -> bytes:
    """`agents/NAME/dead`: one JSON line per dead letter, oldest first."""
    out = []
    for m in sorted(agent.dead_letters.values(), key=lambda m: m.seq):
        row = {
            "id": m.id,
            "seq": m.seq,
            "from": m.sender,
            "to": m.to,
            "ts": m.ts,
            "priority": m.priority,
            "body": m.body,
            "reply_to": m.reply_to,
            "attempts": m.delivered,
            "reason": m.reason,
        }
        out.append(dumps(row) + "\n")
    return "".join(out).encode()
