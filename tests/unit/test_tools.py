"""The operator tools below FUSE: `take`, trace's one pass, the mount helper's
arguments, ask's line, top's layout, the progress line, bash completion."""

from __future__ import annotations

import io
import json
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from outheisfs import ctl, helper, progress, top
from outheisfs.ask import line_of
from outheisfs.completion import BASH
from outheisfs.errors import BadInput, NotFound
from outheisfs.eventlog import EventLog
from outheisfs.models import dumps, new_id
from outheisfs.trace import as_json, follow, render

from .helpers import make_config, open_dispatcher, read_events, replayed, send, snapshot

# -- take ID ------------------------------------------------------------------------------


def test_take_parses_and_is_the_operators() -> None:
    i = new_id()
    assert ctl.parse(f"take {i}") == ctl.Command("take", (i,))
    assert "take" in ctl.OPERATOR_ONLY
    with pytest.raises(BadInput):
        ctl.parse("take nonsense")
    with pytest.raises(BadInput):
        ctl.parse("take")


def test_take_one_message_leaves_the_others_in_order(tmp_path: Path) -> None:
    config = make_config()
    d, log = open_dispatcher(tmp_path, config)
    ids = [send(d, "user", "user", body=f"m{i}")[0]["id"] for i in range(4)]
    d.take_id("user", ids[2], "user")
    assert [m.id for m in d.agents["user"].inbox.messages()] == [ids[0], ids[1], ids[3]]
    assert d.agents["user"].queued == 3 and not d.agents["user"].inflight
    kinds = [(e["type"], e.get("id")) for e in read_events(tmp_path)[-2:]]
    assert kinds == [("deliver", ids[2]), ("ack", ids[2])]
    # The reader of the mailbox gets the others in order, and replay agrees.
    assert d.take("user") is not None
    assert snapshot(replayed(tmp_path, config)) == snapshot(d)
    with pytest.raises(NotFound):
        d.take_id("user", ids[2], "user")  # gone
    with pytest.raises(NotFound):
        d.take_id("user", ids[0], "user")  # in flight now, not queued
    log.close()


# -- trace ----------------------------------------------------------------------------


def _ev(seq: int, kind: str, t: float, **kw: Any) -> bytes:
    ts = f"2026-01-01T00:00:{t:09.6f}Z"
    return (dumps({"seq": seq, "ts": ts, "type": kind, **kw}) + "\n").encode()


def _msg(seq: int, t: float, i: str, frm: str, to: str, reply_to: str | None = None) -> bytes:
    body = f"from {frm}"
    return _ev(
        seq,
        "message",
        t,
        id=i,
        to=to,
        priority="normal",
        reply_to=reply_to,
        body=body,
        **{"from": frm},
    )


def test_trace_follows_the_reply_tree() -> None:
    a, b, c, other = new_id(), new_id(), new_id(), new_id()
    lines = [
        _msg(1, 1.0, other, "user", "echo"),
        _msg(2, 1.5, a, "user", "planner"),
        _ev(3, "deliver", 1.6, agent="planner", id=a, attempt=1),
        _msg(4, 1.7, b, "planner", "worker", reply_to=None),  # not a reply: not traced
        _msg(5, 1.8, c, "planner", "user", reply_to=a),
        _ev(6, "redeliver", 1.9, agent="planner", id=a, attempt=2, reason="reader killed"),
        _ev(7, "deliver", 2.0, agent="user", id=c, attempt=1),
        _msg(8, 2.1, b + "", "worker", "planner", reply_to=other),
        _ev(9, "ack", 2.5, agent="planner", id=a, who="planner"),
    ]
    root = follow(iter(lines), a)
    assert root is not None
    assert [e["type"] for e in root.events] == ["message", "deliver", "redeliver", "ack"]
    assert [r.id for r in root.replies] == [c]
    assert [e["seq"] for e in root.replies[0].events] == [5, 7]
    j = as_json(root)
    assert [e["t"] for e in j["events"]] == [0.0, 0.1, 0.4, 1.0]
    assert j["replies"][0]["events"][0]["t"] == 0.3
    text = render(root)
    assert text[0].startswith(f"{a} user -> planner")
    assert any(line.startswith(f"  reply {c} planner -> user") for line in text)
    assert follow(iter(lines), new_id()) is None


def test_trace_is_one_pass_and_keeps_no_more_than_the_trace() -> None:
    a = new_id()
    n = 200_000

    def log() -> Iterator[bytes]:  # a generator: it can be read only once
        yield _msg(1, 0.0, a, "user", "echo")
        other = _msg(2, 1.0, new_id(), "x", "y")  # the same line again: no memory of its own
        for _ in range(2, n):
            yield other
        yield _ev(n, "ack", 2.0, agent="echo", id=a, who="echo")

    tracemalloc.start()
    root = follow(log(), a)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert root is not None and [e["seq"] for e in root.events] == [1, n]
    assert peak < 1_000_000  # a list of 200,000 references alone would take 1.6 MB


# -- the mount helper -----------------------------------------------------------------


def test_mount_helper_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATH")
    argv = ["/etc/team.toml", "/srv/team", "-o", "rw,state=/var/lib/team,dev,suid,_netdev"]
    assert helper.is_helper_call(argv, {"mount"})
    assert helper.mount_argv(argv) == [
        "mount", "/srv/team", "--config", "/etc/team.toml", "--state", "/var/lib/team",
    ]  # fmt: skip
    import os

    assert os.environ["PATH"] == helper.DEFAULT_PATH  # mount(8) gives helpers none
    none = helper.mount_argv(["none", "/m", "-o", "state=/s,durability=disk,x-systemd.after=a"])
    assert none == ["mount", "/m", "--durability", "disk", "--state", "/s"]
    assert not helper.is_helper_call(["mount", "x", "-o", "y"], {"mount"})
    assert not helper.is_helper_call(["x"], {"mount"})
    assert not helper.is_helper_call(["mout", "mnt"], {"mount"})  # a typo: argparse says so


@pytest.mark.parametrize(
    ("opts", "why"),
    [
        ("rw", "-o state=DIR"),
        ("state=/s,ro", "read-only"),
        ("state=/s,colour=red", "unknown mount option 'colour=red'"),
    ],
)
def test_mount_helper_refuses(opts: str, why: str) -> None:
    with pytest.raises(helper.HelperError, match=why):
        helper.mount_argv(["c.toml", "/m", "-o", opts])


# -- ask ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("hello world", b"hello world\n"),
        ("from stdin\n", b"from stdin\n"),
        ('{"body": {"x": 1}}', b'{"body": {"x": 1}}\n'),
        ("two\nlines\n", b'{"body":"two\\nlines"}\n'),
        ("", b'{"body":""}\n'),
    ],
)
def test_ask_sends_exactly_one_line(text: str, line: bytes) -> None:
    assert line_of(text) == line


# -- top ------------------------------------------------------------------------------


def _rows() -> list[top.Row]:
    return [
        top.Row("echo", "running", "123", "vm", 3, 1, 0, 0, 12.5, 12.5, ""),
        top.Row("worker", "failed", "-", "vm", 40, 0, 4, 2, 0.0, 0.0, "failed: 4 restarts"),
    ]


def test_top_drops_columns_on_a_narrow_terminal() -> None:
    wide = [k for _, k, _, _ in top.fit_columns(_rows(), 200)]
    assert wide == [k for _, k, _ in top.COLUMNS]
    narrow = [k for _, k, _, _ in top.fit_columns(_rows(), 40)]
    assert narrow[0] == "name" and "host" not in narrow and "queued" in narrow
    assert [k for _, k, _, _ in top.fit_columns(_rows(), 5)] == ["name"]


def test_top_sorts() -> None:
    rows = _rows()
    assert [r.name for r in top.sort_rows(rows, "queued", False)] == ["worker", "echo"]
    assert [r.name for r in top.sort_rows(rows, "queued", True)] == ["echo", "worker"]
    assert [r.name for r in top.sort_rows(rows, "name", False)] == ["echo", "worker"]


def test_top_frame_fits_the_width() -> None:
    from rich.console import Console

    snap = top.Snapshot(_rows(), 30.0, 25.0, 99, 0.0)
    for width in (30, 60, 120):
        out = io.StringIO()
        console = Console(file=out, width=width, no_color=True)
        console.print(top.frame(snap, Path("/m"), "vm", width, 20, "name", False))
        lines = out.getvalue().splitlines()
        assert all(len(line) <= width for line in lines), lines
        assert any(line.startswith("echo") for line in lines)


@pytest.mark.parametrize(
    ("ev", "want"),
    [
        ({"type": "error", "who": "echo", "where": "/agents/x/inbox", "why": "bad"}, "echo"),
        ({"type": "error", "who": "server", "where": "/agents/w", "why": "no prog"}, "w"),
        ({"type": "exit", "agent": "w", "signal": 9}, "w"),
        ({"type": "exit", "agent": "w", "code": 0}, None),
        ({"type": "error", "who": "server", "where": "/log", "why": "torn"}, None),
    ],
)
def test_top_last_error_goes_to_its_agent(ev: dict[str, Any], want: str | None) -> None:
    got = top._problem(ev)
    assert (got[0] if got else None) == want


# -- progress -------------------------------------------------------------------------


def test_progress_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    p = progress.Progress("replay", quiet)
    p.update(5, 10, "bytes")
    p.done()
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    p = progress.Progress("replay", shown, force=True)
    p.update(5_000_000, 10_000_000, "bytes")
    p.done()
    assert shown.getvalue() == "\rreplay:  50% (5.0 of 10.0 MB)\x1b[K\r\x1b[K"


def test_replay_reports_progress(tmp_path: Path) -> None:
    d, log = open_dispatcher(tmp_path, make_config())
    for i in range(40_000):
        send(d, "user", "user", body=i)
    log.close()
    seen: list[tuple[int, int]] = []
    EventLog(tmp_path, readonly=True).open(
        lambda ev: None, progress=lambda a, b: seen.append((a, b))
    )
    size = (tmp_path / "events.jsonl").stat().st_size
    assert len(seen) == 2 and all(b == size and 0 < a < size for a, b in seen)


# -- bash completion ------------------------------------------------------------------


def complete(
    words: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> list[str]:
    """What the completion function offers for the last of `words`."""
    script = (
        BASH
        + "COMP_WORDS=("
        + " ".join(json.dumps(w) for w in words)
        + f"); COMP_CWORD={len(words) - 1}; _outheisfs; printf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
    )
    r = subprocess.run(
        ["bash", "--norc", "-c", script], capture_output=True, text=True, env=env, cwd=cwd
    )
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_completion_of_commands_and_options() -> None:
    assert complete(["outheisfs", "t"]) == ["top", "trace"]
    assert complete(["outheisfs", "ask", "--t"]) == ["--timeout"]
    assert complete(["outheisfs", "mount", "--durability", ""]) == ["process", "disk"]
    assert complete(["outheisfs", "completion", ""]) == ["bash"]


def test_completion_of_names_and_ids_from_a_mount(tmp_path: Path) -> None:
    """A folder that looks like a mount to the script: a root ctl and a log."""
    (tmp_path / "ctl").write_text("echo running 12 normal 0\nuser external - normal 0\n")
    a, b = new_id(), new_id()
    (tmp_path / "log").write_bytes(
        _msg(1, 0.0, a, "user", "echo") + _msg(2, 0.1, b, "echo", "user", a)
    )
    assert complete(["outheisfs", "ask", "--mount", str(tmp_path), "e"]) == ["echo"]
    assert complete(["outheisfs", "ask", "--mount", str(tmp_path), "echo", ""]) == []
    env = {"OUTHEIS_MOUNT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    assert complete(["outheisfs", "run", ""], env) == ["echo", "user"]
    assert complete(["outheisfs", "trace", ""], env) == [a, b]
    assert a in complete(["outheisfs", "trace", "--json", "--mount", str(tmp_path), a[:-1]])


def test_trace_refuses_a_bad_id_and_a_missing_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from outheisfs import cli

    assert cli.main(["trace", "nonsense"]) == 2
    assert capsys.readouterr().err == "outheisfs: trace: 'nonsense' is not a message id\n"
    assert cli.main(["trace", new_id(), "--state", str(tmp_path)]) == 1
    assert "No such file or directory" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`outheisfs trace ID | head -n 1`: no traceback when the reader goes."""
    import sys

    root = new_id()
    lines = [_msg(1, 0.0, root, "user", "many")]
    lines += [_msg(i, 1.0, new_id(), "many", "user", root) for i in range(2, 3000)]
    (tmp_path / "events.jsonl").write_bytes(b"".join(lines))
    p = subprocess.Popen(
        [sys.executable, "-m", "outheisfs", "trace", root, "--state", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None
    p.stdout.close()  # before it writes: every write fails with EPIPE
    _, err = p.communicate(timeout=60)
    assert (p.returncode, err) == (141, b"")
