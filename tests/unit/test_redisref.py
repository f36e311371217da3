"""The RESP client of the bench's Redis reference row, against hand-written bytes."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from outheisfs.bench.redisref import (
    Client,
    Incomplete,
    ProtocolError,
    Reply,
    ReplyError,
    echo_roundtrips,
    encode,
    only_entry,
    parse,
)


def test_encode_is_an_array_of_bulk_strings() -> None:
    assert encode("PING") == b"*1\r\n$4\r\nPING\r\n"
    assert encode("XADD", "echo", "*", "body", b"a\r\nb", 7) == (
        b"*6\r\n$4\r\nXADD\r\n$4\r\necho\r\n$1\r\n*\r\n$4\r\nbody\r\n$4\r\na\r\nb\r\n$1\r\n7\r\n"
    )
    assert encode("SET", "k", "") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
    assert encode("GET", "é") == b"*2\r\n$3\r\nGET\r\n$2\r\n\xc3\xa9\r\n"


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"+OK\r\n", "OK"),
        (b":0\r\n", 0),
        (b":-42\r\n", -42),
        (b"$5\r\nhello\r\n", b"hello"),
        (b"$0\r\n\r\n", b""),
        (b"$4\r\na\r\nb\r\n", b"a\r\nb"),  # the length counts, not the line ends
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*0\r\n", []),
        (b"*3\r\n:1\r\n$1\r\nx\r\n$-1\r\n", [1, b"x", None]),
        (b"*2\r\n*1\r\n+a\r\n*0\r\n", [["a"], []]),
    ],
)
def test_parse_each_kind(data: bytes, value: Reply) -> None:
    assert parse(data) == (value, len(data))
    assert parse(b"junk" + data + b"+next\r\n", 4) == (value, 4 + len(data))


def test_parse_error_replies_are_values() -> None:
    err, end = parse(b"-ERR unknown command 'NOPE'\r\n")
    assert isinstance(err, ReplyError) and str(err) == "ERR unknown command 'NOPE'"
    assert end == 29
    both, _ = parse(b"*2\r\n:1\r\n-WRONGTYPE no\r\n")
    assert isinstance(both, list) and both[0] == 1
    assert isinstance(both[1], ReplyError) and str(both[1]) == "WRONGTYPE no"


def test_parse_cut_anywhere_is_incomplete() -> None:
    whole = b"*2\r\n$5\r\nhello\r\n*2\r\n:7\r\n$-1\r\n"
    assert parse(whole) == ([b"hello", [7, None]], len(whole))
    for cut in range(len(whole)):
        with pytest.raises(Incomplete):
            parse(whole[:cut])


def test_parse_refuses_what_is_not_resp() -> None:
    with pytest.raises(ProtocolError):
        parse(b"?what\r\n")
    with pytest.raises(ProtocolError):
        parse(b"$2\r\nabc\r\n")  # longer than its length


def test_client_reads_pipelined_replies_and_raises_errors() -> None:
    ours, server = socket.socketpair()
    with ours, server:
        c = Client(ours)
        server.sendall(b"+PONG\r\n$3\r\nabc\r\n-ERR no such key\r\n:5\r\n")
        assert c.call("PING") == "PONG"
        assert c.call("GET", "k") == b"abc"
        with pytest.raises(ReplyError, match="ERR no such key"):
            c.call("GET", "gone")
        assert c.call("XACK", "s", "g", "1-0") == 5
        sent = server.recv(1 << 16)
        assert sent.startswith(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        server.close()
        with pytest.raises(ConnectionError):
            c.call("PING")


def test_only_entry_takes_the_one_entry_of_a_read() -> None:
    reply: Reply = [[b"user", [[b"1-0", [b"body", b"hi"]]]]]
    assert only_entry(reply) == (b"1-0", b"hi")
    bad: list[Reply] = [None, [], [[b"user", []]], [[b"user", [[b"1-0", [b"other", b"hi"]]]]]]
    for wrong in bad:
        with pytest.raises(ProtocolError):
            only_entry(wrong)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
@pytest.mark.parametrize("aof", [True, False])
def test_echo_round_trips_through_a_private_server(tmp_path: Path, aof: bool) -> None:
    with echo_roundtrips(tmp_path / "redis", aof) as run:
        times = run(20)
    assert len(times) == 20 and all(0 < t < 10 for t in times)
    assert (tmp_path / "redis" / "appendonlydir").exists() == aof
    assert not (tmp_path / "redis" / "redis.sock").exists()  # the server is gone
