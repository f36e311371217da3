"""`reload`: the difference of two configs, the `reload` event in the dispatcher,
the root ctl's `reload` command, and a retired reader that takes nothing."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from outheisfs import events
from outheisfs.reload import diff, effective

from .helpers import OpsEnv, errno_of, make_config, make_ops_env, open_dispatcher, replayed, send


def test_diff_sorts_agents_into_added_changed_resized_removed() -> None:
    old = make_config(
        {
            "same": {"command": ["a"]},
            "env": {"command": ["a"], "env": {"MODE": "1"}},
            "argv": {"command": ["a"]},
            "rights": {"command": ["a"]},
            "pool": {"command": ["a"], "instances": 2},
            "gone": {"command": ["a"]},
            "owner": {},
        },
        vault={"notes": "owner"},
    )
    new = make_config(
        {
            "same": {"command": ["a"]},
            "env": {"command": ["a"], "env": {"MODE": "2"}},
            "argv": {"command": ["a", "-v"]},
            "rights": {"command": ["a"], "unveil": {"/vault/notes": "r"}},
            "pool": {"command": ["a"], "instances": {"min": 1, "max": 4}, "scale_idle": 5.0},
            "owner": {},
            "fresh": {"command": ["b"]},
        },
        vault={"notes": "fresh"},  # the domain changes hands: both are changed
        durability="disk",
    )
    ch = diff(old, new)
    assert ch.added == ["fresh"]
    assert sorted(ch.changed) == ["argv", "env", "owner", "rights"]
    assert ch.resized == ["pool"]
    assert ch.removed == ["gone"]
    assert ch.remount == ["durability"]
    kept = effective(old, new)
    assert kept.durability == "process" and kept.agents == new.agents
    assert diff(old, old).__dict__ == diff(new, new).__dict__ == {
        "added": [], "changed": [], "resized": [], "removed": [], "remount": []
    }  # fmt: skip


def test_a_reload_event_keeps_removed_agents_that_hold_messages(tmp_path: Path) -> None:
    old = make_config({"idle": {}, "busy": {}, "stay": {}})
    d, log = open_dispatcher(tmp_path, old)
    send(d, "user", "busy", "wait for me")
    new = make_config({"stay": {"priority": "interactive"}, "fresh": {}})
    ev = events.reload(
        "user",
        "outheis.toml",
        {
            "added": ["fresh"],
            "changed": ["stay"],
            "resized": [],
            "removed": ["idle", "busy"],
            "kept": ["busy"],
            "remount": [],
        },
        {"stay": "interactive", "fresh": "normal"},
    )
    d.reconfigure(new, ev)
    assert set(d.agents) == {"user", "busy", "stay", "fresh"}
    assert d.agents["busy"].queued == 1 and d.agents["busy"].config is None
    assert d.agents["stay"].priority == "interactive"
    assert d.config is new
    log.close()
    again = replayed(tmp_path, new)
    assert set(again.agents) == {"user", "busy", "stay", "fresh"}
    assert again.agents["busy"].queued == 1


# -- the root ctl -----------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Iterator[OpsEnv]:
    e = make_ops_env(tmp_path, make_config({"echo": {}}))
    yield e
    e.log.close()
    e.ops.procs.close()


async def test_reload_on_the_root_ctl_runs_the_servers_reload(env: OpsEnv) -> None:
    called: list[str] = []

    async def reload(who: str) -> Any:
        called.append(who)

    env.ops.commands.reload = reload
    assert await env.write("ctl", b"reload\n") == 7
    assert called == ["user"]


async def test_the_root_ctl_refuses_other_commands_with_a_reason(env: OpsEnv) -> None:
    for line, why in [
        (
            b"stop\n",
            "unknown command of the root ctl 'stop'; known: approve, reject, reload"
            " (stop is for an agent ctl)",
        ),
        (b"reload now\n", "usage: reload (reload takes no argument)"),
        (b"reload\n", "reload: this server cannot reload its config"),
    ]:
        assert await errno_of(env.write("ctl", line)) == errno.EINVAL
        err = env.events("error")[-1]
        assert (err["who"], err["where"], err["why"]) == ("user", "/ctl", why)


async def test_reload_on_an_agent_ctl_points_to_the_root_ctl(env: OpsEnv) -> None:
    assert await errno_of(env.write("agents/echo/ctl", b"reload\n")) == errno.EINVAL
    assert env.events("error")[-1]["why"].endswith("(reload is for the root ctl)")


async def test_a_bad_config_is_einval_with_its_line_and_changes_nothing(
    env: OpsEnv, tmp_path: Path
) -> None:
    from outheisfs.reload import Parts, Reloader

    cfg = tmp_path / "outheis.toml"
    cfg.write_text("[agents.echo]\nbogus = 1\n")
    parts: Any = Parts(None, None, None, None, None, None, None)  # type: ignore[arg-type]
    env.ops.commands.reload = Reloader(env.d, parts, tmp_path / "state", cfg).reload
    before = env.d.config
    assert await errno_of(env.write("ctl", b"reload\n")) == errno.EINVAL
    err = env.events("error")[-1]
    assert err["why"] == f"reload: {cfg}: agents.echo.bogus: unknown key"
    assert env.d.config is before and not env.events("reload")


# -- a retired reader -------------------------------------------------------------------


async def test_a_retired_idle_reader_takes_no_message(env: OpsEnv) -> None:
    env.ops.commands.instance = lambda pid, name: 0  # the reader is instance 0 of echo
    fh = await env.open("agents/echo/inbox", os.O_RDONLY)
    readers = env.ops.files.readers
    async with trio.open_nursery() as nursery:
        nursery.start_soon(env.ops.read, fh, 0, 4096)
        with trio.fail_after(5):
            while not readers.idle("echo"):
                await trio.testing.wait_all_tasks_blocked()
        assert readers.retire("echo", 0)
        send(env.d, "user", "echo", "not for a retiring reader")
        await trio.testing.wait_all_tasks_blocked()
        assert env.d.agents["echo"].queued == 1 and not env.events("deliver")
        nursery.cancel_scope.cancel()
    await env.ops.release(fh)
    assert env.d.agents["echo"].queued == 1


def test_a_resized_pool_keeps_the_count_it_runs_within_its_new_bounds(tmp_path: Path) -> None:
    pool = {"command": ["a"], "instances": {"min": 1, "max": 4}}
    d, log = open_dispatcher(tmp_path, make_config({"p": pool, "q": pool, "f": {"instances": 2}}))
    d.record([events.scale("p", 1, 3, 2, "waited"), events.scale("q", 1, 4, 3, "waited")])
    new = make_config(
        {
            "p": {"command": ["a"], "instances": {"min": 1, "max": 8}},
            "q": {"command": ["a"], "instances": {"min": 1, "max": 2}},
            "f": {"instances": 5},
        }
    )
    ch = diff(d.config, new)
    assert sorted(ch.resized) == ["f", "p", "q"] and not ch.changed
    d.reconfigure(new, events.reload("user", "x", ch.fields([]), {}))
    assert [d.agents[n].instances for n in ("p", "q", "f")] == [3, 2, 5]
    log.close()
