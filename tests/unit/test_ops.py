"""The pyfuse3 Operations called directly, without mounting (S3QL style) [SPEC §4].

The request context is a fake whose pid is this test process: the server looks
at the caller through /proc, and this process is alive, normal and not signalled.
"""

from __future__ import annotations

import errno
import json
import os
import select
import stat
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from outheisfs import openfile
from outheisfs.parking import Waiter, Watch
from outheisfs.tree import AGENTS_INODE, ROOT_INODE

from .helpers import (
    OpsEnv,
    Token,
    errno_of,
    fake_readdir_reply,
    make_config,
    make_ops_env,
    replayed,
    until_parked,
)

RD, WR, RW, NB = os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_NONBLOCK


@pytest.fixture(autouse=True)
def _readdir_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "readdir_reply", fake_readdir_reply)


def make_env(state: Path, envs: list[OpsEnv], **top: Any) -> OpsEnv:
    e = make_ops_env(state, make_config({"echo": {}, "notes": {}}, **top))
    envs.append(e)
    return e


@pytest.fixture
def envs() -> Iterator[list[OpsEnv]]:
    made: list[OpsEnv] = []
    yield made
    for e in made:
        e.log.close()
        e.ops.procs.close()


@pytest.fixture
def env(tmp_path: Path, envs: list[OpsEnv]) -> OpsEnv:
    return make_env(tmp_path, envs)


async def listing(env: OpsEnv, path: str) -> list[str]:
    fh = await env.ops.opendir(await env.ino(path), env.ctx)
    token = Token()
    await env.ops.readdir(fh, 0, token)
    await env.ops.releasedir(fh)
    return [name.decode() for name, _, _ in token]


async def read_msg(env: OpsEnv, fh: int, size: int = 1 << 16) -> dict[str, Any]:
    data = await env.ops.read(fh, 0, size)
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    obj: dict[str, Any] = json.loads(data)
    return obj


def last_error(env: OpsEnv) -> dict[str, Any]:
    errors = env.events("error")
    assert errors, "an error event was logged"
    return errors[-1]


# -- the tree ------------------------------------------------------------------------


async def test_root_listing_and_lookup(env: OpsEnv) -> None:
    assert await listing(env, "/") == ["ctl", "log", "agents", "vault"]
    for name in ("ctl", "log", "agents", "vault"):
        a = await env.ops.lookup(ROOT_INODE, name.encode(), env.ctx)
        b = await env.ops.getattr(a.st_ino, env.ctx)
        assert a.st_ino == b.st_ino and a.st_mode == b.st_mode
    assert await errno_of(env.ops.lookup(ROOT_INODE, b"nope", env.ctx)) == errno.ENOENT
    assert await errno_of(env.ops.getattr(999_999, env.ctx)) == errno.ENOENT


async def test_agents_listing(env: OpsEnv) -> None:
    assert sorted(await listing(env, "agents")) == ["echo", "notes", "user"]
    for name in ("echo", "notes", "user"):
        assert sorted(await listing(env, f"agents/{name}")) == [
            "ctl",
            "dead",
            "errors",
            "inbox",
            "log",
            "outbox",
            "output",
        ]
    assert await errno_of(env.ino("agents/nobody")) == errno.ENOENT
    assert await errno_of(env.ino("agents/echo/nope")) == errno.ENOENT


async def test_readdir_resumes(env: OpsEnv) -> None:
    fh = await env.ops.opendir(await env.ino("agents/echo"), env.ctx)
    first = Token(limit=2)
    await env.ops.readdir(fh, 0, first)
    assert len(first) == 2
    rest = Token()
    await env.ops.readdir(fh, first[-1][2], rest)
    names = [n for n, _, _ in first] + [n for n, _, _ in rest]
    assert sorted(names) == [
        b"ctl",
        b"dead",
        b"errors",
        b"inbox",
        b"log",
        b"outbox",
        b"output",
    ]
    for name, attr, _ in first + rest:
        looked = await env.ops.lookup(await env.ino("agents/echo"), name, env.ctx)
        assert looked.st_ino == attr.st_ino


async def test_modes(env: OpsEnv) -> None:
    async def mode(path: str) -> int:
        return int((await env.ops.getattr(await env.ino(path), env.ctx)).st_mode)

    for d in ("/", "agents", "vault", "agents/echo", "agents/user"):
        assert stat.S_ISDIR(await mode(d)), d
    # Files that cannot be written have no write bit [SPEC §4].
    for f in ("log", "agents/echo/log"):
        m = await mode(f)
        assert stat.S_ISREG(m) and m & 0o444 and not m & 0o222, f
    # The root ctl takes `reload` from the operator.
    for f in ("ctl", "agents/echo/inbox", "agents/echo/outbox", "agents/echo/ctl"):
        m = await mode(f)
        assert stat.S_ISREG(m) and m & 0o444 and m & 0o222, f


async def test_open_access_modes(env: OpsEnv) -> None:
    for path in ("log", "agents/echo/log"):
        ino = await env.ino(path)
        for flags in (WR, RW):
            assert await errno_of(env.ops.open(ino, flags, env.ctx)) == errno.EACCES, path
        fi = await env.ops.open(ino, RD, env.ctx)
        await env.ops.release(fi.fh)
    ino = await env.ino("agents/echo")
    assert await errno_of(env.ops.open(ino, RD, env.ctx)) == errno.EISDIR


async def test_no_new_files(env: OpsEnv) -> None:
    ino = await env.ino("agents/echo")
    code = await errno_of(env.ops.create(ino, b"new", 0o644, WR | os.O_CREAT, env.ctx))
    assert code in (errno.EACCES, errno.EPERM)
    assert await errno_of(env.ops.unlink(ino, b"inbox", env.ctx)) in (errno.EACCES, errno.EPERM)


# -- sending and reading -------------------------------------------------------------


async def test_write_then_read(env: OpsEnv) -> None:
    data = b"hello\n"
    assert await env.write("agents/echo/inbox", data) == len(data)
    assert env.d.agents["echo"].queued == 1
    fh = await env.open("agents/echo/inbox", RD)
    msg = await read_msg(env, fh)
    assert list(msg) == ["id", "seq", "from", "to", "ts", "priority", "body", "reply_to", "attempt"]
    assert (msg["from"], msg["to"], msg["body"], msg["attempt"]) == ("user", "echo", "hello", 1)
    assert msg["reply_to"] is None
    logged = env.events("message")[0]
    assert (logged["id"], logged["seq"]) == (msg["id"], msg["seq"])
    assert env.d.agents["echo"].queued == 0 and len(env.d.agents["echo"].inflight) == 1
    await env.ops.release(fh)
    assert env.d.agents["echo"].inflight == {}, "closing acknowledges"


async def test_one_message_per_read(env: OpsEnv) -> None:
    await env.write("agents/echo/inbox", b'one\n{"body": {"n": 2}}\nthree\n')
    fh = await env.open("agents/echo/inbox", RD | NB)
    bodies = []
    for _ in range(3):
        bodies.append((await read_msg(env, fh))["body"])
    assert bodies == ["one", {"n": 2}, "three"]
    # The next read acknowledged the previous message: only the last is in flight.
    assert len(env.d.agents["echo"].inflight) == 1
    assert len(env.events("ack")) == 2
    assert await errno_of(env.ops.read(fh, 0, 4096)) == errno.EAGAIN
    await env.ops.release(fh)
    assert env.d.agents["echo"].inflight == {}


@pytest.mark.parametrize("size", [1, 7, 50])
async def test_small_reads_get_the_rest(env: OpsEnv, size: int) -> None:
    await env.write("agents/echo/inbox", b"first message\nsecond\n")
    fh = await env.open("agents/echo/inbox", RD)
    lines: list[bytes] = []
    buf = b""
    while len(lines) < 2:
        chunk = await env.ops.read(fh, len(buf), size)
        assert 0 < len(chunk) <= size
        assert chunk.count(b"\n") <= 1 and (b"\n" not in chunk or chunk.endswith(b"\n"))
        buf += chunk
        if buf.endswith(b"\n"):
            lines.append(buf)
            buf = b""
    assert [json.loads(line)["body"] for line in lines] == ["first message", "second"]
    await env.ops.release(fh)


async def test_nonblock_read_empty(env: OpsEnv) -> None:
    fh = await env.open("agents/echo/inbox", RD | NB)
    assert await errno_of(env.ops.read(fh, 0, 4096)) == errno.EAGAIN
    await env.ops.release(fh)


async def test_blocked_reader_woken_by_writer(env: OpsEnv) -> None:
    fh = await env.open("agents/echo/inbox", RD)
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await env.ops.read(fh, 0, 4096))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await until_parked(env)
            assert got == [], "an empty inbox blocks the reader"
            await env.write("agents/echo/inbox", b"wake up\n")
    assert json.loads(got[0])["body"] == "wake up"
    await env.ops.release(fh)


async def test_bad_envelope_refuses_the_whole_write(env: OpsEnv) -> None:
    fh = await env.open("agents/echo/inbox", WR)
    code = await errno_of(env.ops.write(fh, 0, b'good\n{"body": 1, "bogus": 2}\n'))
    assert code == errno.EINVAL
    assert env.d.agents["echo"].queued == 0
    assert env.events("message") == []
    err = last_error(env)
    assert err["who"] == "user"
    assert err["where"] == "/agents/echo/inbox"
    assert "bogus" in err["why"]
    # The open file still works for the next write.
    assert await env.ops.write(fh, 0, b"later\n") == 6
    await env.ops.release(fh)
    assert env.d.agents["echo"].queued == 1


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b'{"priority": "normal"}\n', "body"),
        (b'{"body": 1, "to": "notes"}\n', "to"),
        (b'{"body": 1, "priority": "urgent"}\n', "priority"),
        (b'{"body": 1, "reply_to": "nope"}\n', "reply_to"),
        (b"\xff\xfe\n", "UTF-8"),
    ],
)
async def test_bad_lines_einval(env: OpsEnv, data: bytes, why: str) -> None:
    code = await errno_of(env.write("agents/echo/inbox", data))
    assert code == errno.EINVAL
    assert env.d.agents["echo"].queued == 0
    err = last_error(env)
    assert err["where"] == "/agents/echo/inbox" and why in err["why"]


async def test_message_size_limit(tmp_path: Path, envs: list[OpsEnv]) -> None:
    env = make_env(tmp_path, envs, max_message=64)
    assert await env.write("agents/echo/inbox", b"x" * 64 + b"\n") == 65
    code = await errno_of(env.write("agents/echo/inbox", b"ok\n" + b"y" * 65 + b"\n"))
    assert code == errno.EMSGSIZE
    assert env.d.agents["echo"].queued == 1, "nothing of the refused write"
    assert last_error(env)["where"] == "/agents/echo/inbox"
    # Too long before its newline arrives, and across several requests.
    fh = await env.open("agents/echo/inbox", WR)
    assert await env.ops.write(fh, 0, b"z" * 40) == 40
    assert await errno_of(env.ops.write(fh, 40, b"z" * 40)) == errno.EMSGSIZE
    try:
        await env.ops.write(fh, 80, b"zzz-tail\n")
    except pyfuse3.FUSEError:
        pass
    await env.ops.release(fh)
    bodies = [e["body"] for e in env.events("message")]
    assert bodies == ["x" * 64], "no part of the long line became a message"


async def test_full_inbox_nonblock(tmp_path: Path, envs: list[OpsEnv]) -> None:
    env = make_env(tmp_path, envs, max_queue=2)
    await env.write("agents/echo/inbox", b"1\n2\n")
    fh = await env.open("agents/echo/inbox", WR | NB)
    assert await errno_of(env.ops.write(fh, 0, b"3\n")) == errno.EAGAIN
    assert env.d.agents["echo"].queued == 2
    # Room frees up when a message is taken; the same write then succeeds.
    rfh = await env.open("agents/echo/inbox", RD)
    assert (await read_msg(env, rfh))["body"] == "1"
    assert await env.ops.write(fh, 0, b"3\n") == 2
    await env.ops.release(fh)
    assert [e["body"] for e in env.events("message")] == ["1", "2", "3"]
    await env.ops.release(rfh)


async def test_full_inbox_blocks_writer(tmp_path: Path, envs: list[OpsEnv]) -> None:
    env = make_env(tmp_path, envs, max_queue=1)
    await env.write("agents/echo/inbox", b"1\n")
    wfh = await env.open("agents/echo/inbox", WR)
    done: list[int] = []

    async def writer() -> None:
        done.append(await env.ops.write(wfh, 0, b"2\n"))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await until_parked(env)
            assert done == [], "a full inbox blocks the writer"
            rfh = await env.open("agents/echo/inbox", RD)
            assert (await read_msg(env, rfh))["body"] == "1"
    assert done == [2]
    await env.ops.release(wfh)
    await env.ops.release(rfh)
    assert [e["body"] for e in env.events("message")] == ["1", "2"]


async def test_unknown_recipient_enoent(env: OpsEnv) -> None:
    code = await errno_of(env.write("agents/echo/outbox", b'{"body": 1, "to": "nobody"}\n'))
    assert code == errno.ENOENT
    assert env.events("message") == []
    assert last_error(env)["where"] == "/agents/echo/outbox"


async def test_outbox_send_and_read(env: OpsEnv) -> None:
    await env.write("agents/echo/outbox", b'{"body": "hi", "to": ["notes", "user"]}\n')
    fh = await env.open("agents/notes/inbox", RD)
    msg = await read_msg(env, fh)
    assert (msg["from"], msg["to"], msg["body"]) == ("echo", "notes", "hi")
    await env.ops.release(fh)
    out = await env.read_all("agents/echo/outbox")
    sent = [json.loads(line) for line in out.splitlines()]
    assert [(e["type"], e["from"], e["to"]) for e in sent] == [
        ("message", "echo", "notes"),
        ("message", "echo", "user"),
    ]
    attr = await env.ops.getattr(await env.ino("agents/echo/outbox"), env.ctx)
    assert attr.st_size == len(out)


async def test_reply_through_outbox(env: OpsEnv) -> None:
    assert await errno_of(env.write("agents/echo/outbox", b"pong\n")) == errno.EINVAL
    await env.write("agents/echo/inbox", b"ping\n")
    rfh = await env.open("agents/echo/inbox", RD)
    ping = await read_msg(env, rfh)
    await env.write("agents/echo/outbox", b"pong\n")
    fh = await env.open("agents/user/inbox", RD)
    pong = await read_msg(env, fh)
    assert (pong["from"], pong["to"], pong["body"]) == ("echo", "user", "pong")
    assert pong["reply_to"] == ping["id"]
    await env.ops.release(fh)
    await env.ops.release(rfh)


async def test_flush_sends_unterminated_line(env: OpsEnv) -> None:
    fh = await env.open("agents/echo/inbox", WR)
    assert await env.ops.write(fh, 0, b"first\npar") == 9
    assert await env.ops.write(fh, 9, b"tial") == 4
    assert env.d.agents["echo"].queued == 1
    await env.ops.flush(fh)
    assert env.d.agents["echo"].queued == 2
    await env.ops.release(fh)
    assert env.d.agents["echo"].queued == 2, "sent once"
    assert [e["body"] for e in env.events("message")] == ["first", "partial"]


async def test_release_sends_unterminated_line(env: OpsEnv) -> None:
    fh = await env.open("agents/echo/inbox", WR)
    await env.ops.write(fh, 0, b"no newline")
    await env.ops.release(fh)
    assert [e["body"] for e in env.events("message")] == ["no newline"]


# -- growing files -------------------------------------------------------------------


async def test_root_log_reads_at_offsets(env: OpsEnv) -> None:
    for i in range(5):
        await env.write("agents/echo/inbox", f"m{i}\n".encode())
    data = (env.state / "events.jsonl").read_bytes()
    attr = await env.ops.getattr(await env.ino("log"), env.ctx)
    assert attr.st_size == len(data)
    fh = await env.open("log", RD)
    for off in range(0, len(data) + 20, 33):
        assert await env.ops.read(fh, off, 50) == data[off : off + 50]
    assert await env.ops.read(fh, len(data), 100) == b""
    await env.ops.release(fh)
    assert await env.read_all("log") == data


async def test_agent_log_holds_its_events(env: OpsEnv) -> None:
    await env.write("agents/echo/inbox", b"for echo\n")
    await env.write("agents/notes/inbox", b"for notes\n")
    fh = await env.open("agents/echo/inbox", RD)
    await read_msg(env, fh)
    await env.ops.release(fh)
    echo = [json.loads(line) for line in (await env.read_all("agents/echo/log")).splitlines()]
    assert [e["type"] for e in echo] == ["message", "deliver", "ack"]
    assert echo[0]["body"] == "for echo"
    notes = [json.loads(line) for line in (await env.read_all("agents/notes/log")).splitlines()]
    assert [(e["type"], e["body"]) for e in notes] == [("message", "for notes")]
    attr = await env.ops.getattr(await env.ino("agents/notes/log"), env.ctx)
    assert attr.st_size == len(await env.read_all("agents/notes/log"))


# -- ctl -----------------------------------------------------------------------------


def parse_status(data: bytes) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in data.decode().splitlines())


async def test_ctl_priority(env: OpsEnv) -> None:
    assert parse_status(await env.read_all("agents/echo/ctl"))["priority"] == "normal"
    data = b"priority background\n"
    assert await env.write("agents/echo/ctl", data) == len(data)
    s = parse_status(await env.read_all("agents/echo/ctl"))
    assert s["priority"] == "background" and s["name"] == "echo"
    root = (await env.read_all("ctl")).decode().splitlines()
    assert "echo external - background 0" in root
    ev = env.events("ctl")[-1]
    assert (ev["agent"], ev["who"], ev["command"]) == ("echo", "user", "priority background")
    # The change survives a restart: it is in the log.
    assert replayed(env.state, env.config).agents["echo"].priority == "background"


@pytest.mark.parametrize("line", [b"bogus\n", b"priority urgent\n", b"priority\n"])
async def test_ctl_bad_command(env: OpsEnv, line: bytes) -> None:
    assert await errno_of(env.write("agents/echo/ctl", line)) == errno.EINVAL
    err = last_error(env)
    assert err["where"] == "/agents/echo/ctl" and err["who"] == "user"
    assert line.split()[0].decode() in err["why"] or "usage" in err["why"]
    assert parse_status(await env.read_all("agents/echo/ctl"))["priority"] == "normal"


async def test_ctl_ack(env: OpsEnv) -> None:
    await env.write("agents/echo/inbox", b"a\n")
    fh = await env.open("agents/echo/inbox", RD)
    await read_msg(env, fh)
    assert parse_status(await env.read_all("agents/echo/ctl"))["inflight"] == "1"
    await env.write("agents/echo/ctl", b"ack\n")
    s = parse_status(await env.read_all("agents/echo/ctl"))
    assert (s["inflight"], s["queued"]) == ("0", "0")
    await env.ops.release(fh)
    assert len(env.events("ack")) == 1


async def test_root_ctl(env: OpsEnv) -> None:
    await env.write("agents/notes/inbox", b"a\nb\n")
    rows = [line.split() for line in (await env.read_all("ctl")).decode().splitlines()]
    assert sorted(r[0] for r in rows) == ["echo", "notes", "user"]
    assert all(len(r) == 5 for r in rows)
    assert {r[0]: r[4] for r in rows}["notes"] == "2"


# -- agents come and go --------------------------------------------------------------


async def test_mkdir_rmdir(env: OpsEnv) -> None:
    attr = await env.ops.mkdir(AGENTS_INODE, b"helper", 0o755, env.ctx)
    assert stat.S_ISDIR(attr.st_mode)
    assert attr.st_ino == await env.ino("agents/helper")
    assert "helper" in await listing(env, "agents")
    await env.write("agents/helper/inbox", b"job\n")
    code = await errno_of(env.ops.rmdir(AGENTS_INODE, b"helper", env.ctx))
    assert code == errno.ENOTEMPTY
    fh = await env.open("agents/helper/inbox", RD)
    await read_msg(env, fh)
    await env.ops.release(fh)
    await env.ops.rmdir(AGENTS_INODE, b"helper", env.ctx)
    assert "helper" not in await listing(env, "agents")
    assert await errno_of(env.ino("agents/helper")) == errno.ENOENT
    assert await errno_of(env.ops.getattr(attr.st_ino, env.ctx)) == errno.ENOENT
    code = await errno_of(env.ops.rmdir(AGENTS_INODE, b"helper", env.ctx))
    assert code == errno.ENOENT
    assert [e["op"] for e in env.events("agent")] == ["create", "remove"]


async def test_mkdir_errors(env: OpsEnv) -> None:
    for name in (b"echo", b"user"):
        assert await errno_of(env.ops.mkdir(AGENTS_INODE, name, 0o755, env.ctx)) == errno.EEXIST
    for name in (b"Bad", b"-x", b"x" * 65, b"a b"):
        code = await errno_of(env.ops.mkdir(AGENTS_INODE, name, 0o755, env.ctx))
        assert code == errno.EINVAL, name
    code = await errno_of(env.ops.mkdir(ROOT_INODE, b"other", 0o755, env.ctx))
    assert code in (errno.EPERM, errno.EACCES)
    assert sorted(await listing(env, "agents")) == ["echo", "notes", "user"]


async def test_user_cannot_be_removed(env: OpsEnv) -> None:
    await errno_of(env.ops.rmdir(AGENTS_INODE, b"user", env.ctx))
    assert "user" in await listing(env, "agents")


async def test_removed_agent_open_file(env: OpsEnv) -> None:
    await env.ops.mkdir(AGENTS_INODE, b"temp", 0o755, env.ctx)
    ino = await env.ino("agents/temp/inbox")
    await env.ops.rmdir(AGENTS_INODE, b"temp", env.ctx)
    assert await errno_of(env.ops.open(ino, WR, env.ctx)) == errno.ENOENT


# -- details that shell tools rely on ------------------------------------------------


def fields(**set_: bool) -> Any:
    names = ("atime", "ctime", "gid", "mode", "mtime", "size", "uid")
    return types.SimpleNamespace(**{f"update_{n}": set_.get(n, False) for n in names})


async def test_truncate_to_zero(env: OpsEnv) -> None:
    # `echo x > inbox` opens with O_TRUNC: harmless on message files, refused on logs.
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 0
    for path in ("agents/echo/inbox", "agents/echo/outbox", "agents/echo/ctl"):
        await env.ops.setattr(await env.ino(path), attr, fields(size=True), None, env.ctx)
    await env.write("agents/echo/inbox", b"kept\n")
    await env.ops.setattr(
        await env.ino("agents/echo/inbox"), attr, fields(size=True), None, env.ctx
    )
    assert env.d.agents["echo"].queued == 1
    size = len(await env.read_all("log"))
    for path in ("log", "agents/echo/log"):
        ino = await env.ino(path)
        code = await errno_of(env.ops.setattr(ino, attr, fields(size=True), None, env.ctx))
        assert code in (errno.EACCES, errno.EPERM), path
    assert len(await env.read_all("log")) == size


class PollHandle:
    def __init__(self) -> None:
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


async def test_poll_inbox(env: OpsEnv) -> None:
    fh = await env.open("agents/echo/inbox", RD | NB)
    ino = await env.ino("agents/echo/inbox")
    ph = PollHandle()
    assert not await env.ops.poll(ino, fh, ph, env.ctx) & select.POLLIN
    await env.write("agents/echo/inbox", b"x\n")
    assert ph.notified >= 1, "a waiting poller is told when a message arrives"
    assert await env.ops.poll(ino, fh, None, env.ctx) & select.POLLIN
    await read_msg(env, fh)
    assert not await env.ops.poll(ino, fh, None, env.ctx) & select.POLLIN
    await env.ops.release(fh)


async def test_competing_consumers(env: OpsEnv) -> None:
    a = await env.open("agents/echo/inbox", RD | NB)
    b = await env.open("agents/echo/inbox", RD | NB)
    await env.write("agents/echo/inbox", b"only one\n")
    assert (await read_msg(env, a))["body"] == "only one"
    assert await errno_of(env.ops.read(b, 0, 4096)) == errno.EAGAIN
    await env.write("agents/echo/inbox", b"next\n")
    assert (await read_msg(env, b))["body"] == "next"
    assert len(env.d.agents["echo"].inflight) == 2
    await env.ops.release(a)
    await env.ops.release(b)
    assert env.d.agents["echo"].inflight == {}


async def test_an_open_file_opens_its_watch_once(
    env: OpsEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Watch] = []

    class Counted(Watch):
        def __init__(self, tids: tuple[int, ...]) -> None:
            super().__init__(tids)
            made.append(self)

    monkeypatch.setattr(openfile, "Watch", Counted)
    fh = await env.open("agents/echo/inbox", RD)
    got: list[dict[str, Any]] = []

    async def reader() -> None:
        got.append(await read_msg(env, fh))

    async with trio.open_nursery() as nursery:
        for n in range(3):  # three waits on one open file
            nursery.start_soon(reader)
            await until_parked(env)
            await env.write("agents/echo/inbox", b"%d\n" % n)
            await trio.testing.wait_all_tasks_blocked()
    assert [m["body"] for m in got] == ["0", "1", "2"]
    assert len(made) == 1, "the opener's /proc files are opened once per open file"
    watch = made[0]
    assert not watch.lost
    await env.ops.release(fh)
    assert watch.lost and watch.stat is None, "closed with the open file"


async def test_blocked_reader_interrupted(env: OpsEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    fh = await env.open("agents/echo/inbox", RD)
    codes: list[int | None] = []

    async def reader() -> None:
        codes.append(await errno_of(env.ops.read(fh, 0, 4096)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(env.ops.files.parking.run)
        nursery.start_soon(reader)
        await until_parked(env)
        with monkeypatch.context() as m:
            m.setattr(Waiter, "signalled", lambda self: True)
            with trio.fail_after(0.2):  # promptly [SPEC §4.3]
                while not codes:
                    await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    assert codes == [errno.EINTR]
    await env.write("agents/echo/inbox", b"still here\n")
    assert env.d.agents["echo"].queued == 1, "the interrupted reader took nothing"
    assert env.events("deliver") == []
    await env.ops.release(fh)


async def test_blocked_writer_interrupted(
    tmp_path: Path, envs: list[OpsEnv], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path, envs, max_queue=1)
    await env.write("agents/echo/inbox", b"1\n")
    fh = await env.open("agents/echo/inbox", WR)
    assert await env.ops.write(fh, 0, b"2") == 1
    codes: list[int | None] = []

    async def writer() -> None:
        codes.append(await errno_of(env.ops.write(fh, 1, b"\n")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(env.ops.files.parking.run)
        nursery.start_soon(writer)
        await until_parked(env)
        assert codes == [], "a full inbox blocks the writer"
        with monkeypatch.context() as m:
            m.setattr(Waiter, "signalled", lambda self: True)
            with trio.fail_after(0.2):  # promptly [SPEC §4.3]
                while not codes:
                    await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    assert codes == [errno.EINTR]
    assert [e["body"] for e in env.events("message")] == ["1"]
    # Once there is room the writer sends the same bytes again: the line arrives once.
    rfh = await env.open("agents/echo/inbox", RD)
    await read_msg(env, rfh)
    assert await env.ops.write(fh, 1, b"\n") == 1
    await env.ops.release(fh)
    await env.ops.release(rfh)
    assert [e["body"] for e in env.events("message")] == ["1", "2"]


async def test_disk_durability_fsyncs_before_write_returns(
    tmp_path: Path, envs: list[OpsEnv], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path, envs, durability="disk")
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    await env.write("agents/echo/inbox", b"safe\n")
    assert calls, "a write returns after fsync [SPEC §8]"


# -- what one agent may hold of the server -------------------------------------------


async def test_an_agent_has_at_most_max_waiting_requests_parked(
    tmp_path: Path, envs: list[OpsEnv]
) -> None:
    env = make_env(tmp_path, envs, max_waiting=2)
    env.ops.procs.labels[os.getpid()] = "echo"  # this process acts as echo
    fhs = [await env.open("agents/echo/inbox", RD) for _ in range(3)]
    got: list[bytes] = []

    async def reader(fh: int) -> None:
        got.append(await env.ops.read(fh, 0, 4096))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(env.ops.files.parking.run)
        nursery.start_soon(reader, fhs[0])
        nursery.start_soon(reader, fhs[1])
        await until_parked(env, 2)
        assert env.ops.files.waiting == {"echo": 2}
        assert await errno_of(env.ops.read(fhs[2], 0, 4096)) == errno.ENOBUFS
        assert last_error(env)["errno"] == "ENOBUFS" and "max_waiting" in last_error(env)["why"]
        assert env.events("deliver") == [], "the refused read took nothing"
        del env.ops.procs.labels[os.getpid()]  # the operator sends; it is not limited
        await env.write("agents/echo/inbox", b"one\ntwo\n")
        with trio.fail_after(2):
            while len(got) < 2:
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    assert sorted(json.loads(x)["body"] for x in got) == ["one", "two"]
    assert env.ops.files.waiting == {}
    for fh in fhs:
        await env.ops.release(fh)


async def test_an_agent_holds_at_most_max_unfinished_bytes_of_unterminated_lines(
    tmp_path: Path, envs: list[OpsEnv]
) -> None:
    env = make_env(tmp_path, envs, max_message=64, max_unfinished=100)
    env.ops.procs.labels[os.getpid()] = "echo"
    a, b = [await env.open("agents/echo/outbox", WR) for _ in range(2)]
    assert await env.ops.write(a, 0, b"x" * 60) == 60
    assert env.ops.files.unfinished == {"echo": 60}
    assert await errno_of(env.ops.write(b, 0, b"y" * 50)) == errno.ENOBUFS
    assert last_error(env)["errno"] == "ENOBUFS" and "max 100" in last_error(env)["why"]
    assert env.ops.files.unfinished == {"echo": 60}, "the refused bytes are not kept"
    await env.ops.release(a)  # its line goes (and is refused: nothing in flight to answer)
    assert env.ops.files.unfinished == {}
    assert await env.ops.write(b, 0, b"y" * 50) == 50
    await env.ops.release(b)
    del env.ops.procs.labels[os.getpid()]
    # The operator's files are not counted against any limit.
    c, d = [await env.open("agents/echo/inbox", WR) for _ in range(2)]
    assert await env.ops.write(c, 0, b"x" * 60) == 60
    assert await env.ops.write(d, 0, b"y" * 60) == 60
    await env.ops.release(c)
    await env.ops.release(d)
    assert [m.body for m in env.d.agents["echo"].inbox.messages()] == ["x" * 60, "y" * 60]


async def test_a_flush_while_a_write_waits_counts_the_line_once(
    tmp_path: Path, envs: list[OpsEnv]
) -> None:
    env = make_ops_env(
        tmp_path, make_config({"echo": {"send": ["notes"]}, "notes": {}}, max_queue=1)
    )
    envs.append(env)
    await env.write("agents/notes/inbox", b"filler\n")  # full
    env.ops.procs.labels[os.getpid()] = "echo"
    fh = await env.open("agents/notes/inbox", WR)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(env.ops.files.parking.run)
        nursery.start_soon(env.ops.write, fh, 0, b"line1\npartial")  # waits for room
        await until_parked(env)
        assert env.ops.files.unfinished == {"echo": 7}
        nursery.start_soon(env.ops.flush, fh)  # a copy closed: the line goes too
        await trio.testing.wait_all_tasks_blocked()  # the flush waits for the write
        del env.ops.procs.labels[os.getpid()]
        rd = await env.open("agents/notes/inbox", RD)
        bodies: list[str] = []
        with trio.fail_after(2):
            while len(bodies) < 3:
                bodies.append(json.loads(await env.ops.read(rd, 0, 4096))["body"])
        nursery.cancel_scope.cancel()
    assert bodies == ["filler", "line1", "partial"]
    assert env.ops.files.unfinished == {}, "counted once, released once"
    await env.ops.release(fh)
    await env.ops.release(rd)
    assert env.ops.files.unfinished == {}


async def test_a_lone_surrogate_in_a_body_is_einval_with_an_event(env: OpsEnv) -> None:
    line = b'{"body": "\\ud800"}\n'
    assert await errno_of(env.write("agents/echo/inbox", line)) == errno.EINVAL
    assert "surrogate" in last_error(env)["why"]
    assert env.events("message") == [] and env.d.agents["echo"].queued == 0
