"""`outheisfs ask NAME [BODY]`: send as the operator, wait for the reply to it, print it.

The reply is found in the root `log`, which holds every message: ask remembers
the log's size before it sends, learns the id the server gave its message from
the inbox's `user.outheisfs.sent` attribute, and follows the log from there for
the `message` event whose `reply_to` is that id. Then it takes exactly that
message out of the operator's mailbox with the ctl command `take ID`; every
other message there stays, unacknowledged and in order, so two asks at once,
or an ask beside a `cat agents/user/inbox`, each get their own.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

XATTR_PID = "user.outheisfs.pid"
XATTR_SENT = "user.outheisfs.sent"
ENVELOPE = ("id", "seq", "from", "to", "ts", "priority", "body", "reply_to", "attempt")
POLL = 0.01  # seconds between looks at the end of the log while waiting


class AskError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def line_of(text: str) -> bytes:
    """BODY as exactly one message line: a JSON object is an envelope, as in any
    write; text of several lines becomes one message whose body is that text."""
    if text.endswith("\n"):
        text = text[:-1]
    if "\n" in text or "\r" in text or not text.strip():
        text = json.dumps({"body": text}, separators=(",", ":"), ensure_ascii=False)
    return text.encode() + b"\n"


def send(mp: Path, name: str, line: bytes) -> str:
    """Write one message line to NAME's inbox; return the id the server gave it."""
    inbox = mp / "agents" / name / "inbox"
    try:
        fd = os.open(inbox, os.O_WRONLY)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise AskError(f"ask: no agent {name!r} in {mp}") from None
        raise AskError(f"ask: cannot open {inbox}: {e.strerror}") from None
    errors = mp / "agents" / "user" / "errors"  # why a write of the operator's was refused
    try:
        start = os.stat(errors).st_size
    except OSError:
        start = 0
    try:
        os.write(fd, line)
        return os.getxattr(fd, XATTR_SENT).decode().split()[0]
    except OSError as e:
        from .run import reasons  # only on this path: it needs the server's modules

        why = reasons(errors, start)
        said = f" ({why[-1]})" if why else ""
        raise AskError(f"ask: message to {name} refused: {e.strerror}{said}") from None
    finally:
        os.close(fd)


def wait_reply(log: int, offset: int, msg_id: str, deadline: float) -> dict[str, Any] | None:
    """Follow the log from `offset` for the first message replying to `msg_id`
    that is addressed to the operator."""
    needle = f'"reply_to":"{msg_id}"'.encode()
    rest = b""
    while True:
        if time.monotonic() >= deadline:
            return None
        chunk = os.pread(log, 1 << 20, offset)
        if not chunk:
            time.sleep(POLL)
            continue
        offset += len(chunk)
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for raw in lines:
            if needle not in raw:
                continue
            ev = json.loads(raw)
            reply = ev.get("type") == "message" and ev.get("reply_to") == msg_id
            if reply and ev.get("to") == "user":
                return dict(ev)


def take(mp: Path, msg_id: str) -> None:
    """Take the reply out of the operator's mailbox; if another reader was quicker,
    it is theirs now, and ask still prints it from the log."""
    fd = os.open(mp / "agents" / "user" / "ctl", os.O_WRONLY)
    try:
        os.write(fd, f"take {msg_id}\n".encode())
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise AskError(f"ask: cannot take the reply {msg_id}: {e.strerror}") from None
    finally:
        os.close(fd)


def ask(mp: Path, name: str, text: str, timeout: float) -> dict[str, Any]:
    """Send `text` to NAME as the operator; return the reply's envelope."""
    try:
        os.getxattr(mp, XATTR_PID)
    except OSError:
        raise AskError(
            f"{mp} is not an outheisfs mount (mount it with 'outheisfs mount')"
        ) from None
    log = os.open(mp / "log", os.O_RDONLY)
    try:
        start = os.fstat(log).st_size  # before sending: the reply comes after this
        msg_id = send(mp, name, line_of(text))
        reply = wait_reply(log, start, msg_id, time.monotonic() + timeout)
    finally:
        os.close(log)
    if reply is None:
        raise AskError(f"ask: no reply from {name} to {msg_id} within {timeout:g} s")
    take(mp, reply["id"])
    return {k: reply.get(k) for k in ENVELOPE}


def main(mp: Path, name: str, words: list[str], timeout: float, as_json: bool) -> int:
    import sys

    text = " ".join(words) if words else sys.stdin.read()
    reply = ask(mp, name, text, timeout)
    if as_json:
        print(json.dumps(reply, ensure_ascii=False))
    else:
        body = reply.get("body")
        print(body if isinstance(body, str) else json.dumps(body, ensure_ascii=False))
    return 0
