"""Messages: what a writer may send (envelopes), what a reader gets.

Parsing sits on the hot path of every write, so lines that are plain text skip
pydantic; envelopes (JSON objects) are checked by the `Envelope` model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .config import PRIORITIES, Priority, valid_name
from .errors import BadInput
from .names import OPERATOR

RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}

# -- ids and timestamps ---------------------------------------------------------------

_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits -> two digits
_RAND = (1 << 80) - 1
_last_ms = 0
_last_rand = 0
_prefix = ("", 0)  # the first 22 digits of the last id, and the 110 bits they hold


def new_id() -> str:
    """A ULID: 48 bits of milliseconds, 80 random bits; monotonic within a millisecond.

    26 base32 digits, two per table lookup. Ids of one millisecond count up from
    a random start, so all but the last 20 bits (4 digits) rarely change: the 22
    digits before them are made only when they do.
    """
    global _last_ms, _last_rand, _prefix
    p = _PAIRS
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        ms = _last_ms
        rand = (_last_rand + 1) & _RAND
        if not rand:  # the random part overflowed: carry into the time
            ms = _last_ms = ms + 1
    else:
        rand = int.from_bytes(os.urandom(10), "big")
        _last_ms = ms
    _last_rand = rand
    high = (ms << 60) | (rand >> 20)  # 110 bits: 22 digits
    prefix, bits = _prefix
    if bits != high:
        prefix = "".join([p[(high >> s) & 1023] for s in range(100, -1, -10)])
        _prefix = (prefix, high)
    return prefix + p[(rand >> 10) & 1023] + p[rand & 1023]


def is_id(s: object) -> bool:
    return isinstance(s, str) and len(s) == 26 and all(c in _B32 for c in s)


_ts_sec = -1
_ts_prefix = ""
_ts_last = ("", 0.0)  # the last timestamp made, and what parse_ts gives for it


def now() -> tuple[float, str]:
    """Wall-clock time as (epoch seconds, ISO 8601 UTC with microseconds)."""
    global _ts_sec, _ts_prefix, _ts_last
    t = time.time()
    sec = int(t)
    if sec != _ts_sec:
        _ts_sec = sec
        _ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    us = int((t - sec) * 1e6)
    ts = f"{_ts_prefix}.{us:06d}Z"
    _ts_last = (ts, (sec * 1_000_000 + us) / 1_000_000)  # as datetime.timestamp() divides
    return t, ts


def parse_ts(ts: str) -> float:
    """Epoch seconds of a timestamp. The last one made or parsed is known: a live
    event's, and in a replay the events of one append share theirs."""
    global _ts_last
    last, t = _ts_last
    if ts != last:
        t = datetime.fromisoformat(ts).timestamp()
        _ts_last = (ts, t)
    return t


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 as is (one encoder: json.dumps builds one per call)."""
    return _ENCODER.encode(obj)


_FAST = msgspec.json.Encoder()
# msgspec writes the very bytes of `dumps` for str, int (any size), bool, None,
# and lists and str-keyed dicts of them; floats only in this range of magnitudes
# (beyond it the exponent is spelled differently, and NaN and infinities become null).
_FLOAT_LOW, _FLOAT_HIGH = 1e-4, 1e16


_PLAIN = frozenset({str, int, bool, type(None)})  # what msgspec writes as the encoder does


def _same_bytes(v: Any) -> bool:
    """Whether msgspec encodes `v` to the bytes of `dumps(v)`."""
    t = type(v)
    if t in _PLAIN:
        return True
    if t is dict:
        for k, x in v.items():
            if type(k) is not str or (type(x) not in _PLAIN and not _same_bytes(x)):
                return False
        return True
    if t is list:
        return all(type(x) in _PLAIN or _same_bytes(x) for x in v)
    if t is float:
        return bool(v == 0.0 or _FLOAT_LOW <= abs(v) < _FLOAT_HIGH)
    return False


def json_bytes(obj: Any) -> bytes:
    """`dumps(obj).encode()`: by msgspec, ten times quicker than the standard
    encoder, where it gives the same bytes; else by the standard encoder. Like
    it, raises UnicodeEncodeError for a lone surrogate."""
    if _same_bytes(obj):
        return _FAST.encode(obj)
    return dumps(obj).encode()


# -- a message in the system ---------------------------------------------------------

QUEUED, INFLIGHT, DELAYED, DEAD, HELD = 0, 1, 2, 3, 4
EXTRA = ("topic", "rejected")  # fields a message line has only when they apply


@dataclass(slots=True, eq=False)
class Message:
    """A message that is pending: queued or in flight. Acked ones are forgotten."""

    id: str
    seq: int
    sender: str
    to: str
    ts: str
    t: float
    priority: str
    body: Any
    reply_to: str | None
    delivered: int = 0  # deliveries so far; the next one is attempt delivered + 1
    state: int = QUEUED
    gen: int = 0  # bumped on every enqueue, so stale heap entries are recognised
    # Of the delivery in force (logged in its `deliver` event): who read it, and
    # until when it may be held without ack or progress (explicit acks; 0: forever).
    pid: int = 0
    instance: int | None = None
    deadline: float = 0.0
    due: float = 0.0  # nacked with a delay: not delivered before this time
    reason: str = ""  # a dead letter: why it died
    extra: dict[str, str] | None = None  # `topic`, `rejected`: see EXTRA

    def line(self) -> bytes:
        """The line a reader gets."""
        row = {
            "id": self.id,
            "seq": self.seq,
            "from": self.sender,
            "to": self.to,
            "ts": self.ts,
            "priority": self.priority,
            "body": self.body,
            "reply_to": self.reply_to,
            "attempt": self.delivered,
        }
        if self.extra:
            row.update(self.extra)
        return json_bytes(row) + b"\n"


# -- what writers send ---------------------------------------------------------------


class Envelope(BaseModel):
    """A line that is a JSON object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    body: Any
    priority: Priority | None = None
    reply_to: str | None = None
    to: str | list[str] | None = None

    @field_validator("reply_to")
    @classmethod
    def _reply_to(cls, v: str | None) -> str | None:
        if v is not None and not is_id(v):
            raise ValueError("must be a message id")
        return v

    @field_validator("to")
    @classmethod
    def _to(cls, v: str | list[str] | None) -> str | list[str] | None:
        names = [v] if isinstance(v, str) else (v or [])
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one agent")
        for name in names:
            if not valid_name(name) and name != OPERATOR:
                raise ValueError(f"{name!r} is not an agent name")
        return v


@dataclass(slots=True)
class Draft:
    """One parsed line, before the server gives it an id and a place in the log."""

    body: Any
    priority: str | None = None
    reply_to: str | None = None
    to: list[str] | None = None


_decode = msgspec.json.Decoder().decode
_FIELDS = frozenset(Envelope.model_fields)


def parse_line(line: bytes, outbox: bool) -> Draft:
    """Parse one line (without its newline) into a Draft; BadInput says why not."""
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        text = line.decode()
    except UnicodeDecodeError:
        raise BadInput("line is not UTF-8 text") from None
    if text.lstrip().startswith("{"):
        try:
            obj = _decode(line)  # json.loads' values, where msgspec parses the line
        except msgspec.DecodeError:
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
        if isinstance(obj, dict):
            return _simple_envelope(obj, outbox) or _envelope(obj, outbox)
    return Draft(body=text)


def parse_lines(lines: list[bytes], outbox: bool) -> list[Draft]:
    """`parse_line` of each line. Plain text lines, most of a big write, are
    checked as UTF-8 all at once and become Drafts directly; any line that may be
    an envelope (it holds "{") or ends in CR, and every line of a request that is
    not UTF-8 (to say which one), goes through `parse_line`."""
    if len(lines) < 2:
        return [parse_line(line, outbox) for line in lines]
    try:
        texts = b"\n".join(lines).decode().split("\n")  # lines hold no newline
    except UnicodeDecodeError:
        return [parse_line(line, outbox) for line in lines]
    return [
        parse_line(line, outbox) if "{" in text or text.endswith("\r") else Draft(body=text)
        for line, text in zip(lines, texts, strict=True)
    ]


def _simple_envelope(obj: dict[str, Any], outbox: bool) -> Draft | None:
    """The Draft of an envelope whose every field is plainly valid, as `Envelope`
    would accept it; None for anything else, which `_envelope` checks (and
    refuses with its reason). Most envelopes are a body and maybe a reply_to."""
    if "body" not in obj or not _FIELDS.issuperset(obj):
        return None
    priority = obj.get("priority")
    reply_to = obj.get("reply_to")
    to = obj.get("to")
    if priority is not None and (type(priority) is not str or priority not in RANK):
        return None
    if reply_to is not None and (type(reply_to) is not str or not is_id(reply_to)):
        return None
    if to is not None:
        if not outbox or type(to) is not str or not (valid_name(to) or to == OPERATOR):
            return None
        return Draft(body=obj["body"], priority=priority, reply_to=reply_to, to=[to])
    if not outbox and "to" in obj:
        return None
    return Draft(body=obj["body"], priority=priority, reply_to=reply_to)


def _envelope(obj: dict[str, Any], outbox: bool) -> Draft:
    if "body" not in obj:
        raise BadInput("envelope has no 'body'")
    if not outbox and "to" in obj:
        raise BadInput("'to' belongs on an outbox; an inbox already names its recipient")
    try:
        env = Envelope.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "envelope"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise BadInput(f"envelope field '{where}': {msg}") from None
    to = [env.to] if isinstance(env.to, str) else env.to
    return Draft(body=env.body, priority=env.priority, reply_to=env.reply_to, to=to)
