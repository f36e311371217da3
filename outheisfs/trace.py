"""`outheisfs trace ID`: the life of one message and of the messages that reply to it.

One pass over the log, as a stream: a reply always comes after what it replies
to, so the set of messages to follow only grows as the log is read. A line is
decoded only if it names one of them; memory grows with the trace, never with
the log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

Event = dict[str, Any]
_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")  # a message id: a ULID in Crockford's base32


def is_id(s: str) -> bool:
    return _ID.fullmatch(s) is not None


def parse_ts(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


@dataclass
class Traced:
    """One message of the trace: its events and the messages replying to it."""

    id: str
    message: Event | None = None
    events: list[Event] = field(default_factory=list)
    replies: list[Traced] = field(default_factory=list)


def follow(lines: Iterable[bytes], root_id: str) -> Traced | None:
    """Read log lines once; the root message with its events and reply tree, or
    None if the log has no message `root_id`."""
    root = Traced(root_id)
    known: dict[str, Traced] = {root_id: root}
    needles: list[tuple[bytes, Traced]] = [(root_id.encode(), root)]
    for raw in lines:
        hit = False
        for needle, _ in needles:
            if needle in raw:
                hit = True
                break
        if not hit:
            continue
        try:
            ev = json.loads(raw)
        except ValueError:
            continue  # a torn last line
        if not isinstance(ev, dict):
            continue
        if ev.get("type") == "message":
            own = known.get(ev.get("id"))  # type: ignore[arg-type]
            if own is not None and own.message is None:
                own.message = ev
                own.events.append(ev)
                continue
            parent = known.get(ev.get("reply_to"))  # type: ignore[arg-type]
            if parent is not None and parent.message is not None:
                child = Traced(ev["id"], ev, [ev])
                parent.replies.append(child)
                known[child.id] = child
                needles.append((child.id.encode(), child))
            continue
        owner = known.get(ev.get("id"))  # type: ignore[arg-type]
        if owner is not None and owner.message is not None:
            owner.events.append(ev)
    return root if root.message is not None else None


def _t(ev: Event, t0: float) -> float:
    return round(parse_ts(ev["ts"]) - t0, 6)


def as_json(node: Traced, t0: float | None = None) -> dict[str, Any]:
    assert node.message is not None
    if t0 is None:
        t0 = parse_ts(node.message["ts"])
    m = node.message
    return {
        "id": node.id,
        "from": m.get("from"),
        "to": m.get("to"),
        "reply_to": m.get("reply_to"),
        "body": m.get("body"),
        "events": [{"t": _t(ev, t0), **ev} for ev in node.events],
        "replies": [as_json(r, t0) for r in node.replies],
    }


def _short(v: Any, width: int = 60) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= width else s[: width - 3] + "..."


_SHOWN = {"seq", "ts", "type", "id", "agent"}


def _detail(ev: Event) -> str:
    kind = ev["type"]
    if kind == "message":
        via = f" via topics/{ev['topic']}" if ev.get("topic") else ""
        return f"{ev.get('from')} -> {ev.get('to')} ({ev.get('priority')}){via}"
    if kind == "deliver":
        return f"to {ev.get('agent')}, attempt {ev.get('attempt')}"
    if kind == "ack":
        return f"by {ev.get('who')}"
    if kind == "redeliver":
        return f"attempt {ev.get('attempt')} next: {ev.get('reason')}"
    if kind == "dead":
        return f"after {ev.get('attempts')} attempts: {ev.get('reason')}"
    if kind == "held":
        return f"for {ev.get('agent')}: waits for the operator's approval"
    if kind == "approved":
        return f"by {ev.get('who')}: queued for {ev.get('agent')}"
    if kind == "rejected":
        return f"by {ev.get('who')}: {ev.get('reason')} (notice {ev.get('notice')})"
    rest = {k: v for k, v in ev.items() if k not in _SHOWN}
    return " ".join(f"{k}={_short(v, 40)}" for k, v in rest.items())


def render(node: Traced, t0: float | None = None, depth: int = 0) -> list[str]:
    """Text lines: the message, its events with times from the first, its replies
    indented below it."""
    assert node.message is not None
    if t0 is None:
        t0 = parse_ts(node.message["ts"])
    m = node.message
    pad = "  " * depth
    head = "reply " if depth else ""
    out = [f"{pad}{head}{node.id} {m.get('from')} -> {m.get('to')}: {_short(m.get('body'))}"]
    for ev in node.events:
        out.append(
            f"{pad}  {_t(ev, t0):+10.6f} s  seq {ev['seq']:<8} {ev['type']:<9} {_detail(ev)}"
        )
    for r in node.replies:
        out.extend(render(r, t0, depth + 1))
    return out
