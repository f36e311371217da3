"""`approvals`: the messages that wait at the gate, as the operator reads them.

Most readers (`cat`, `head`, `jq`, a script) get what is held now, one JSON line
per message in the order held (the line of its `held` event), and then, as an
inbox read does, wait at the end until the next message is held: a message
approved or rejected before the file was opened is not listed, so
`head -n1 approvals` is always something to decide.

GNU tail follows files by their size and offsets, which a list that shrinks
cannot give: a file that seems empty it reads to its end before it follows, and
one that shrank it reads again from the start. So `tail` (told apart by its
command name) reads the journal of every hold instead, the `approvals` stream
of the log, whose size only grows, and is told where it ends; `tail -f` then
shows each new hold as it comes.
"""

from __future__ import annotations

from typing import Any

from . import procinfo
from .models import Message, dumps

# The dispatcher, by the attributes used here (as in `gate`).
Dispatcher = Any

FOLLOWERS = {"tail"}  # programs that follow a file by its size and read to its end


def line(msg: Message) -> bytes:
    """The `held` event's line of a held message: it was logged right after the
    message, in the same append (same `ts`, the next `seq`)."""
    ev: dict[str, Any] = {
        "seq": msg.seq + 1,
        "ts": msg.ts,
        "type": "held",
        "agent": msg.to,
        "id": msg.id,
        "from": msg.sender,
        "to": msg.to,
        "priority": msg.priority,
        "body": msg.body,
        "reply_to": msg.reply_to,
    }
    if msg.extra and "topic" in msg.extra:
        ev["topic"] = msg.extra["topic"]
    return (dumps(ev) + "\n").encode()


def pending(d: Dispatcher, after: int) -> tuple[bytes, int]:
    """The lines of the messages held now whose `held` event came after seq
    `after`, in order, and the seq to ask after next time."""
    held = sorted(
        (m for a in d.agents.values() for m in a.held.values() if m.seq + 1 > after),
        key=lambda m: m.seq,
    )
    if not held:
        return b"", after
    return b"".join(line(m) for m in held), held[-1].seq + 1


def follows(pid: int) -> bool:
    """Whether the reading process follows files by size and offset (tail)."""
    return procinfo.command_name(pid) in FOLLOWERS
