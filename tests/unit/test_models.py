"""Messages: parsing what writers send, ids, and the line a reader gets [SPEC §4.1, §4.2]."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outheisfs.errors import BadInput
from outheisfs.models import (
    Draft,
    Message,
    _envelope,
    _simple_envelope,
    dumps,
    is_id,
    json_bytes,
    new_id,
    now,
    parse_line,
    parse_lines,
    parse_ts,
)

FIELDS = ["id", "seq", "from", "to", "ts", "priority", "body", "reply_to", "attempt"]


def bad(line: bytes, outbox: bool = False) -> str:
    with pytest.raises(BadInput) as e:
        parse_line(line, outbox)
    return e.value.reason


# -- plain text ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "body"),
    [
        (b"hello", "hello"),
        (b"hello world  ", "hello world  "),
        ("grüße ☃".encode(), "grüße ☃"),
        (b"{bad json", "{bad json"),
        (b'{"body": 1', '{"body": 1'),
        (b"[1, 2]", "[1, 2]"),
        (b'"quoted"', '"quoted"'),
        (b"42", "42"),
        (b"null", "null"),
        (b"tab\there", "tab\there"),
    ],
)
def test_plain_text_is_the_body(line: bytes, body: str) -> None:
    for outbox in (False, True):
        d = parse_line(line, outbox)
        assert d == Draft(body=body)


def test_crlf_line_end_is_stripped() -> None:
    assert parse_line(b"hello\r", False).body == "hello"
    d = parse_line(b'{"body": "x", "priority": "background"}\r', False)
    assert (d.body, d.priority) == ("x", "background")


def test_empty_line_is_an_empty_plain_text_body() -> None:
    # SPEC §4.2: each line is one message; any line that is not a JSON object
    # is a plain-text body, the empty line included.
    assert parse_line(b"", False).body == ""
    assert parse_line(b"\r", False).body == ""
    assert parse_line(b"   ", False).body == "   "


def test_not_utf8_refused() -> None:
    assert "UTF-8" in bad(b"caf\xe9")
    bad(b"\xff\xfe")
    bad(b'{"body": "\xff"}')


# -- envelopes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [None, 0, 1.5, "text", "", [1, "a"], {"nested": {"x": [None]}}, True]
)
def test_envelope_body_any_json(body: object) -> None:
    line = json.dumps({"body": body}).encode()
    d = parse_line(line, False)
    assert d.body == body and type(d.body) is type(body)
    assert d.priority is None and d.reply_to is None and d.to is None


def test_envelope_requires_body() -> None:
    assert "body" in bad(b'{"priority": "normal"}')
    bad(b"{}")
    bad(b'{"text": "hi"}')


@pytest.mark.parametrize("prio", ["interactive", "normal", "background"])
def test_envelope_priority(prio: str) -> None:
    assert parse_line(json.dumps({"body": 1, "priority": prio}).encode(), False).priority == prio


@pytest.mark.parametrize("prio", ["urgent", "", 1, "Normal"])
def test_envelope_bad_priority(prio: object) -> None:
    assert "priority" in bad(json.dumps({"body": 1, "priority": prio}).encode())


def test_envelope_reply_to_must_be_an_id() -> None:
    mid = new_id()
    assert parse_line(json.dumps({"body": 1, "reply_to": mid}).encode(), True).reply_to == mid
    assert parse_line(b'{"body": 1, "reply_to": null}', True).reply_to is None
    for wrong in ["abc", mid.lower(), mid + "0", 12, ""]:
        assert "reply_to" in bad(json.dumps({"body": 1, "reply_to": wrong}).encode())


def test_envelope_to_only_on_outbox() -> None:
    line = b'{"body": "x", "to": "echo"}'
    assert "to" in bad(line, outbox=False)
    assert parse_line(line, outbox=True).to == ["echo"]
    d = parse_line(b'{"body": "x", "to": ["a", "user", "b.c"]}', True)
    assert d.to == ["a", "user", "b.c"]


@pytest.mark.parametrize("to", [[], "Bad", ["ok", "no way"], 3, ""])
def test_envelope_bad_to(to: object) -> None:
    assert "to" in bad(json.dumps({"body": 1, "to": to}).encode(), outbox=True)


@pytest.mark.parametrize("field", ["from", "id", "seq", "attempt", "ts", "bogus"])
def test_envelope_unknown_field_named(field: str) -> None:
    for outbox in (False, True):
        reason = bad(json.dumps({"body": 1, field: "user"}).encode(), outbox)
        assert field in reason


def test_envelope_with_leading_space_and_crlf() -> None:
    d = parse_line(b'  {"body": {"k": 1}, "priority": "interactive"}\r', False)
    assert d.body == {"k": 1} and d.priority == "interactive"


# -- ids and timestamps --------------------------------------------------------------


def test_new_id_unique_and_sorted() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids), "ids sort in the order they were made"
    assert all(is_id(i) for i in ids[:100])


def test_new_id_holds_its_millisecond() -> None:
    digits = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    for _ in range(100):
        before = time.time_ns() // 1_000_000
        mid = new_id()
        after = time.time_ns() // 1_000_000
        n = 0
        for c in mid:
            n = n * 32 + digits.index(c)
        assert before <= n >> 80 <= after
        time.sleep(0.0005)


def test_new_ids_of_one_millisecond_count_up() -> None:
    digits = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

    def number(mid: str) -> int:
        n = 0
        for c in mid:
            n = n * 32 + digits.index(c)
        return n

    ids = [number(new_id()) for _ in range(5000)]
    same = [(a, b) for a, b in itertools.pairwise(ids) if a >> 80 == b >> 80]
    assert len(same) > 1000
    assert all((b - a) % (1 << 80) == 1 for a, b in same)


def test_new_id_sorted_across_milliseconds() -> None:
    ids = []
    for _ in range(5):
        ids += [new_id() for _ in range(50)]
        time.sleep(0.002)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_is_id() -> None:
    assert is_id(new_id())
    assert not is_id("x" * 26)
    assert not is_id(None)
    assert not is_id(new_id()[:-1])


def test_now_is_iso_utc_with_microseconds() -> None:
    t, ts = now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ts)
    assert abs(parse_ts(ts) - t) < 1e-5
    assert abs(t - time.time()) < 5


def test_parse_ts_of_the_last_timestamp_is_what_parsing_gives() -> None:
    for _ in range(2000):
        _, ts = now()
        assert parse_ts(ts) == datetime.fromisoformat(ts).timestamp()
    assert parse_ts("2026-01-01T00:00:00.000001Z") == 1767225600.000001


# -- what a reader gets --------------------------------------------------------------


def test_message_line() -> None:
    mid, rid = new_id(), new_id()
    m = Message(
        id=mid,
        seq=17,
        sender="user",
        to="echo",
        ts="2026-11-26T19:30:00.123456Z",
        t=0.0,
        priority="normal",
        body={"text": "two\nlines", "snow": "☃"},
        reply_to=rid,
        delivered=2,
    )
    line = m.line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = json.loads(line)
    assert list(obj) == FIELDS
    assert obj == {
        "id": mid,
        "seq": 17,
        "from": "user",
        "to": "echo",
        "ts": "2026-11-26T19:30:00.123456Z",
        "priority": "normal",
        "body": {"text": "two\nlines", "snow": "☃"},
        "reply_to": rid,
        "attempt": 2,
    }
    assert "☃".encode() in line  # UTF-8, readable by people


def test_message_line_plain_body() -> None:
    m = Message(new_id(), 1, "a", "b", "2026-01-01T00:00:00.000000Z", 0.0, "background", "x", None)
    m.delivered = 1
    obj = json.loads(m.line())
    assert obj["body"] == "x" and obj["reply_to"] is None and obj["attempt"] == 1


# -- JSON bytes: msgspec where it writes what the standard encoder writes ------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),  # lone surrogates included
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _outcome(fn: Callable[[], bytes]) -> bytes | type[Exception]:
    try:
        return fn()
    except Exception as e:
        return type(e)


@settings(max_examples=500, deadline=None)
@given(JSON_VALUES)
def test_json_bytes_are_the_standard_encoders(value: Any) -> None:
    assert _outcome(lambda: json_bytes(value)) == _outcome(lambda: dumps(value).encode())


@pytest.mark.parametrize(
    "value",
    [1e-4, 9.99e-5, 1e16, 9999999999999998.0, -1e-4, 0.0, -0.0, 5e-324, 1.7976931348623157e308],
)
def test_json_bytes_of_floats_at_the_edges(value: float) -> None:
    assert json_bytes({"x": [value]}) == dumps({"x": [value]}).encode()


ENVELOPE_VALUES = (
    st.none()
    | st.sampled_from(["interactive", "normal", "Normal", "", "user", "bob", "Bad Name", "a" * 70])
    | st.sampled_from(["01ARZ3NDEKTSV4RRFFQ69G5FAW", "01ARZ3NDEKTSV4RRFFQ69G5FAU!", "0" * 26])
    | st.integers()
    | st.lists(st.sampled_from(["bob", "user", "Bad"]), max_size=2)
    | st.text(max_size=5)
)


@settings(max_examples=1000, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["body", "priority", "reply_to", "to", "extra"]), ENVELOPE_VALUES
    ),
    st.booleans(),
)
def test_simple_envelopes_are_what_the_model_accepts(obj: dict[str, Any], outbox: bool) -> None:
    quick = _simple_envelope(obj, outbox)
    if quick is not None:
        assert quick == _envelope(obj, outbox)


def _parsed(fn: Callable[[], list[Draft]]) -> list[Draft] | tuple[str, str]:
    try:
        return fn()
    except BadInput as e:
        return ("BadInput", e.reason)


LINE_PARTS = st.sampled_from(
    [
        *[b"plain", b" ", b"{", b"}", b'{"body": 1}', b'{"body": "x", "to": "bob"}', b"\r"],
        *[b"\xff", b"\xc3\xa9", b"\xc3", b'{"body": 2, "extra": 0}', b"[1]", b'\t{"body": null}'],
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.lists(LINE_PARTS, max_size=4).map(b"".join), max_size=6), st.booleans())
def test_parse_lines_is_parse_line_of_each(lines: list[bytes], outbox: bool) -> None:
    one_by_one = _parsed(lambda: [parse_line(line, outbox) for line in lines])
    assert _parsed(lambda: parse_lines(lines, outbox)) == one_by_one
