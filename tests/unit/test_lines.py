"""Cutting writes into lines [SPEC §4.2]: data after the last newline waits for the rest."""

from __future__ import annotations

import errno

import pytest

from outheisfs.errors import Interrupted, NotLogged, OutheisError, TooBig, WouldBlock
from outheisfs.lines import LineBuffer


def feed_all(buf: LineBuffer, chunks: list[bytes]) -> tuple[list[bytes], list[OutheisError]]:
    """Feed chunks as ops.write does: a refused chunk is reported back with failed()."""
    lines: list[bytes] = []
    errors: list[OutheisError] = []
    for chunk in chunks:
        try:
            lines += buf.feed(chunk)
        except OutheisError as e:
            buf.failed(e)
            errors.append(e)
    return lines, errors


def test_several_lines_per_feed() -> None:
    buf = LineBuffer(100)
    assert buf.feed(b"a\nbb\nccc\n") == [b"a", b"bb", b"ccc"]
    assert buf.take_rest() == b""


def test_partial_last_line_kept() -> None:
    buf = LineBuffer(100)
    assert buf.feed(b"one\ntw") == [b"one"]
    assert buf.feed(b"o") == []
    assert buf.feed(b"\nthree\nfo") == [b"two", b"three"]
    assert buf.take_rest() == b"fo"
    assert buf.take_rest() == b"", "taken once"


def test_byte_at_a_time() -> None:
    buf = LineBuffer(100)
    out: list[bytes] = []
    for byte in b"ab\n\ncd\n":
        out += buf.feed(bytes([byte]))
    assert out == [b"ab", b"", b"cd"]


def test_empty_feed() -> None:
    buf = LineBuffer(100)
    assert buf.feed(b"") == []
    assert buf.feed(b"x") == []
    assert buf.feed(b"") == []
    assert buf.take_rest() == b"x"


def test_crlf_left_for_the_parser() -> None:
    # The line keeps its \r; parse_line strips it.
    assert LineBuffer(100).feed(b"a\r\nb\r\n") == [b"a\r", b"b\r"]


def test_limit_is_inclusive() -> None:
    buf = LineBuffer(10)
    assert buf.feed(b"x" * 10 + b"\n") == [b"x" * 10]
    with pytest.raises(TooBig):
        LineBuffer(10).feed(b"x" * 11 + b"\n")


def test_too_long_unterminated_line() -> None:
    with pytest.raises(TooBig):
        LineBuffer(10).feed(b"x" * 11)


def test_too_long_line_refuses_the_whole_request() -> None:
    buf = LineBuffer(10)
    lines, errors = feed_all(buf, [b"ok\n" + b"x" * 20 + b"\nalso\n"])
    assert lines == [] and len(errors) == 1 and isinstance(errors[0], TooBig)
    # That request began at a line start, so a write(2) that the kernel cut there
    # failed as a whole: the writer's next bytes begin a new line.
    assert buf.feed(b"fine\n") == [b"fine"]


def test_rest_of_a_too_long_line_is_never_a_new_line() -> None:
    buf = LineBuffer(10)
    lines, errors = feed_all(
        buf,
        [
            b"head\n" + b"a" * 8,  # a line begins
            b"b" * 8,  # over the limit: refused
            b"ccc\n",  # the rest of that line, as a writer retrying a short write sends it
            b"ddd\n",
        ],
    )
    assert lines[:1] == [b"head"]
    assert errors and isinstance(errors[0], TooBig)
    for line in lines:
        assert not line.startswith((b"a", b"b", b"c")), f"part of the refused line taken: {line!r}"
    assert buf.take_rest() == b""


def test_too_long_across_requests_then_newline_in_same_request() -> None:
    buf = LineBuffer(10)
    lines, errors = feed_all(buf, [b"a" * 6, b"b" * 6 + b"\nnext\n"])
    assert len(errors) == 1 and isinstance(errors[0], TooBig)
    assert all(not line.startswith(b"a") for line in lines)
    assert buf.take_rest() == b""


@pytest.mark.parametrize("err", [WouldBlock("full"), Interrupted("signal")])
def test_not_now_keeps_the_partial_line(err: OutheisError) -> None:
    # A full inbox (EAGAIN) or a signal (EINTR): the writer sends the same bytes again.
    buf = LineBuffer(100)
    assert buf.feed(b"he") == []
    assert buf.feed(b"llo\nwor") == [b"hello"]
    buf.failed(err)
    assert buf.feed(b"llo\nwor") == [b"hello"]
    assert buf.take_rest() == b"wor"


def test_reset_drops_partial() -> None:
    buf = LineBuffer(100)
    buf.feed(b"abc")
    buf.reset()
    assert buf.take_rest() == b""
    assert buf.feed(b"x\n") == [b"x"]


def test_refused_by_the_log_mid_line_keeps_its_errno_for_the_rest() -> None:
    # A full disk refuses a request that continued a line: the rest of that line,
    # sent again by the writer, is refused with the same errno, never taken.
    buf = LineBuffer(100)
    assert buf.feed(b"begun") == []
    assert buf.feed(b" and ended\n") == [b"begun and ended"]
    buf.failed(NotLogged("event log not written: No space left on device", errno.ENOSPC))
    with pytest.raises(NotLogged) as e:
        buf.feed(b" and ended\n")
    assert e.value.errno == errno.ENOSPC
    assert buf.take_rest() == b""
