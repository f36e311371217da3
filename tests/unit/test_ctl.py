"""ctl files: commands and status text [SPEC §4, §4.5]."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from outheisfs import ctl
from outheisfs.dispatcher import Dispatcher
from outheisfs.errors import BadInput
from outheisfs.models import new_id
from outheisfs.procstate import Processes

from .helpers import make_config, open_dispatcher, send

KEYS = "name state pid priority restart restarts queued inflight delivered dead send unveil"
STATES = {"running", "starting", "stopped", "failed", "external"}


@pytest.fixture
def d(tmp_path: Path) -> Iterator[Dispatcher]:
    config = make_config(
        {
            "echo": {
                "command": ["python3", "./echo.py"],
                "priority": "interactive",
                "restart": "transient",
                "send": ["notes", "user"],
                "unveil": {"/vault/notes": "r", "/vault/drafts": "rw"},
            },
            "notes": {},
        }
    )
    disp, log = open_dispatcher(tmp_path, config)
    yield disp
    log.close()


def status(text: str) -> dict[str, str]:
    assert text.endswith("\n")
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" ")
        assert sep and key and value, f"not a `key value` line: {line!r}"
        assert key not in out, f"duplicate key {key}"
        out[key] = value
    return out


# -- commands ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "name", "args"),
    [
        ("start", "start", ()),
        ("stop", "stop", ()),
        ("restart", "restart", ()),
        ("kill", "kill", ()),
        ("ack", "ack", ()),
        ("priority interactive", "priority", ("interactive",)),
        ("priority normal", "priority", ("normal",)),
        ("priority background", "priority", ("background",)),
        ("unveil /vault/notes r", "unveil", ("/vault/notes", "r")),
        ("unveil /vault/notes rw", "unveil", ("/vault/notes", "rw")),
        ("  stop  ", "stop", ()),
        ("stop\r", "stop", ()),
        ("priority\tbackground", "priority", ("background",)),
    ],
)
def test_parse(line: str, name: str, args: tuple[str, ...]) -> None:
    cmd = ctl.parse(line)
    assert (cmd.name, cmd.args) == (name, args)
    assert ctl.parse(str(cmd)) == cmd


def test_parse_ack_with_id() -> None:
    mid = new_id()
    cmd = ctl.parse(f"ack {mid}")
    assert cmd.args == (mid,)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "priority",
        "priority urgent",
        "priority normal now",
        "ack not-an-id",
        f"ack {new_id()} {new_id()}",
        "start now",
        "stop 1",
        "kill -9",
        "unveil /vault/notes",
        "unveil",
    ],
)
def test_usage_errors(line: str) -> None:
    with pytest.raises(BadInput) as e:
        ctl.parse(line)
    assert e.value.reason


@pytest.mark.parametrize("line", ["bogus", "START", "prio normal", "ack!", "help"])
def test_unknown_command(line: str) -> None:
    with pytest.raises(BadInput) as e:
        ctl.parse(line)
    assert line.split()[0] in e.value.reason


# -- status --------------------------------------------------------------------------


def test_agent_status_keys(d: Dispatcher) -> None:
    for name in ("user", "echo", "notes"):
        s = status(ctl.agent_status(d.agents[name], Processes(d.config).of(name)))
        assert set(KEYS.split()) <= set(s), name
        assert s["name"] == name
        assert s["state"] in STATES


def test_agent_status_values(d: Dispatcher) -> None:
    send(d, "user", "echo", "a")
    send(d, "user", "echo", "b")
    send(d, "user", "echo", "c")
    m = d.take("echo")
    assert m is not None
    s = status(ctl.agent_status(d.agents["echo"], Processes(d.config).of("echo")))
    assert s["priority"] == "interactive"
    assert s["restart"] == "transient"
    assert (s["queued"], s["inflight"], s["delivered"], s["dead"]) == ("2", "1", "1", "0")
    assert s["restarts"] == "0"
    assert s["state"] == "stopped", "a supervised agent that has not been started"
    assert "notes" in s["send"] and "user" in s["send"]
    assert "/vault/notes" in s["unveil"] and "/vault/drafts" in s["unveil"]
    d.retry(m, "crash")
    m = d.take("echo")
    assert m is not None
    s = status(ctl.agent_status(d.agents["echo"], Processes(d.config).of("echo")))
    assert (s["queued"], s["inflight"], s["delivered"]) == ("2", "1", "2")


def test_agent_status_dead_counter(tmp_path: Path) -> None:
    disp, log = open_dispatcher(tmp_path, make_config({"echo": {}}, max_attempts=1))
    try:
        send(disp, "user", "echo")
        m = disp.take("echo")
        assert m is not None
        disp.retry(m, "crash")
        s = status(ctl.agent_status(disp.agents["echo"], Processes(disp.config).of("echo")))
        assert (s["dead"], s["queued"], s["inflight"]) == ("1", "0", "0")
    finally:
        log.close()


def test_agent_without_process(d: Dispatcher) -> None:
    s = status(ctl.agent_status(d.agents["notes"], Processes(d.config).of("notes")))
    assert s["state"] == "external"
    s = status(ctl.agent_status(d.agents["user"], Processes(d.config).of("user")))
    assert s["state"] == "external"


def test_root_status(d: Dispatcher) -> None:
    send(d, "user", "notes", "x")
    send(d, "user", "notes", "y")
    d.mkdir("made", "user")
    text = ctl.root_status(d, Processes(d.config))
    assert text.endswith("\n")
    rows = [line.split(" ") for line in text.splitlines()]
    assert all(len(r) == 5 for r in rows), rows
    by_name = {r[0]: r for r in rows}
    assert set(by_name) == {"user", "echo", "notes", "made"}
    assert len(rows) == 4
    for name, state, pid, prio, queued in rows:
        assert state in STATES
        assert pid == "-" or pid.replace(",", "").isdigit()
        assert prio in ("interactive", "normal", "background")
        assert queued == str(d.agents[name].queued)
    assert by_name["notes"][4] == "2"
    assert by_name["echo"][3] == "interactive"
