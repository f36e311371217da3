"""Topics and approvals in the tree, below FUSE: presence, modes, a write that
fans out, a read of approvals that waits for a hold [SPEC §12]."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import select
import stat
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from outheisfs.config import TopicConfig
from outheisfs.tree import ROOT_INODE

from .helpers import (
    OpsEnv,
    Token,
    errno_of,
    fake_readdir_reply,
    make_config,
    make_ops_env,
    until_parked,
)

RD, WR, NB = os.O_RDONLY, os.O_WRONLY, os.O_NONBLOCK
TOPICS = {
    "desk": TopicConfig.model_validate(
        {"deliver": ["echo"], "rule": [{"match": {"body.n": {"gt": 1}}, "deliver": ["gated"]}]}
    )
}


@pytest.fixture(autouse=True)
def _readdir_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "readdir_reply", fake_readdir_reply)


@pytest.fixture
def envs() -> Iterator[list[OpsEnv]]:
    made: list[OpsEnv] = []
    yield made
    for e in made:
        e.log.close()
        e.ops.procs.close()


def make(state: Path, envs: list[OpsEnv], gate: bool = True, topics: bool = True) -> OpsEnv:
    agents: dict[str, dict[str, object]] = {"echo": {}, "gated": {"approve": ["*"] if gate else []}}
    e = make_ops_env(state, make_config(agents, topics=TOPICS if topics else {}))
    envs.append(e)
    return e


async def listing(env: OpsEnv, path: str) -> list[str]:
    fh = await env.ops.opendir(await env.ino(path), env.ctx)
    token = Token()
    await env.ops.readdir(fh, 0, token)
    await env.ops.releasedir(fh)
    return [name.decode() for name, _, _ in token]


async def mode(env: OpsEnv, path: str) -> int:
    return int((await env.ops.getattr(await env.ino(path), env.ctx)).st_mode)


async def test_topics_and_approvals_appear_only_when_configured(
    tmp_path: Path, envs: list[OpsEnv]
) -> None:
    plain = make(tmp_path / "a", envs, gate=False, topics=False)
    assert await listing(plain, "/") == ["ctl", "log", "agents", "vault"]
    for name in (b"topics", b"approvals"):
        assert await errno_of(plain.ops.lookup(ROOT_INODE, name, plain.ctx)) == errno.ENOENT
    assert await mode(plain, "ctl") & 0o777 == 0o660  # the operator's reload, gate or not
    fh = await plain.open("ctl", WR)  # approve without a gate: nothing waits there
    assert await errno_of(plain.ops.write(fh, 0, b"approve 01J0000000000000000000000A\n")) == (
        errno.ENOENT
    )
    await plain.ops.release(fh)
    env = make(tmp_path / "b", envs)
    assert await listing(env, "/") == ["ctl", "log", "agents", "vault", "topics", "approvals"]
    assert await listing(env, "topics") == ["desk"]
    assert stat.S_ISDIR(await mode(env, "topics"))
    assert await mode(env, "topics/desk") & 0o777 == 0o220
    assert await mode(env, "approvals") & 0o777 == 0o440
    assert await mode(env, "ctl") & 0o777 == 0o660
    ino = await env.ino("topics/desk")
    assert await errno_of(env.ops.open(ino, RD, env.ctx)) == errno.EACCES


async def test_a_topic_write_fans_out_and_approvals_wait(
    tmp_path: Path, envs: list[OpsEnv]
) -> None:
    env = make(tmp_path, envs)
    got: list[bytes] = []

    async def reader() -> None:
        fh = await env.open("approvals", RD)
        try:
            got.append(await env.ops.read(fh, 0, 1 << 16))
        finally:
            await env.ops.release(fh)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await until_parked(env)
        assert not got
        await env.write("topics/desk", b'{"body":{"n":2}}\n{"body":{"n":0}}\n')
    held = json.loads(got[0])
    assert held["type"] == "held" and held["to"] == "gated" and held["topic"] == "desk"
    assert env.d.agents["echo"].queued == 2 and env.d.agents["gated"].queued == 0
    # at the end, with O_NONBLOCK: EAGAIN
    fh = await env.open("approvals", RD | NB)
    size = len(await env.ops.read(fh, 0, 1 << 16))
    assert await errno_of(env.ops.read(fh, size, 1 << 16)) == errno.EAGAIN
    await env.ops.release(fh)
    # approve through the root ctl
    await env.write("ctl", f"approve {held['id']}\n".encode())
    assert env.d.agents["gated"].queued == 1
    assert [e["id"] for e in env.events("approved")] == [held["id"]]
    # nothing takes it: ENOENT, an error event, nothing queued
    env.d.topics["desk"] = dataclasses.replace(env.d.topics["desk"], deliver=())
    before = len(env.events("message"))
    assert await errno_of(env.write("topics/desk", b'{"body":{"n":0}}\n')) == errno.ENOENT
    assert len(env.events("message")) == before
    assert env.events("error")[-1]["where"] == "/topics/desk"


async def test_topics_follow_the_config_in_force(tmp_path: Path, envs: list[OpsEnv]) -> None:
    """A new config (as a reload installs it) shows its topics; a topic gone is ENOENT."""
    env = make(tmp_path, envs)
    old = await env.ino("topics/desk")
    topics = {"alerts": TopicConfig.model_validate({"deliver": ["echo"]})}
    env.d.config = make_config({"echo": {}, "gated": {}}, topics=topics)
    env.d.install_config()
    assert await listing(env, "topics") == ["alerts"]
    assert await errno_of(env.ino("topics/desk")) == errno.ENOENT
    assert await errno_of(env.ops.getattr(old, env.ctx)) == errno.ENOENT
    await env.write("topics/alerts", b"fire\n")
    assert env.d.agents["echo"].queued == 1


class PollHandle:
    def __init__(self) -> None:
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


async def test_poll_approvals(tmp_path: Path, envs: list[OpsEnv]) -> None:
    env = make(tmp_path, envs)
    fh = await env.open("approvals", RD | NB)
    ino = await env.ino("approvals")
    ph = PollHandle()
    assert not await env.ops.poll(ino, fh, ph, env.ctx) & select.POLLIN
    await env.write("agents/gated/inbox", b"pay\n")
    assert ph.notified == 1, "a waiting poller is told when a message is held"
    assert await env.ops.poll(ino, fh, None, env.ctx) & select.POLLIN
    line = await env.ops.read(fh, 0, 1 << 16)
    assert json.loads(line)["body"] == "pay"
    assert not await env.ops.poll(ino, fh, None, env.ctx) & select.POLLIN
    await env.ops.release(fh)
