"""Workflows that survive real use, through a real mount: replies after the ack,
explicit acks, ack_wait, poison messages, dead letters, readable errors [SPEC §15]."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import PY, Server, outheisfs, read_one, sh, take, wait_for

pytestmark = pytest.mark.mount

AGENTS = Path(__file__).parent / "agents"


def run_py(server: Server, name: str, code: str, *args: str) -> Any:
    """Run a Python script as agent NAME; it prints one JSON value."""
    script = server.root / f"{name}-{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(code))
    r = outheisfs(
        "run", name, "--mount", str(server.mp), "--", PY, str(script), *args,
        cwd=server.mp / "agents" / name,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def events_for(server: Server, type_: str, agent: str) -> list[dict[str, Any]]:
    return [e for e in server.events(type_) if e.get("agent") == agent]


# -- 1. a reply after the ack ------------------------------------------------------------


def test_a_reply_after_the_ack_goes_back_without_a_send_right(server: Server) -> None:
    server.write_config('[agents.client]\nsend = ["planner"]\n[agents.planner]\n')
    server.mount()
    mp = server.mp
    r = outheisfs("run", "client", "--mount", str(mp), "--", "sh", "-c",
                  f"echo task > {mp}/agents/planner/inbox")  # fmt: skip
    assert r.returncode == 0, r.stderr
    # The planner reads (head acks by exiting 0), then replies: after the ack.
    script = (
        f"id=$(head -n1 {mp}/agents/planner/inbox | jq -r .id) && "
        f'printf \'{{"reply_to":"%s","body":"done"}}\\n\' "$id" > {mp}/agents/planner/outbox '
        f'&& echo "$id"'
    )
    r = outheisfs("run", "planner", "--mount", str(mp), "--", "bash", "-c", script)
    assert r.returncode == 0, r.stderr
    task_id = r.stdout.strip()
    assert server.status("planner")["inflight"] == "0"
    (reply,) = take(server, "client", 1)
    assert reply["body"] == "done" and reply["reply_to"] == task_id
    # The right survives a restart of the server (rebuilt from the log).
    assert server.umount().returncode == 0
    server.mount()
    line = json.dumps({"reply_to": task_id, "body": "again"})
    r = outheisfs("run", "planner", "--mount", str(mp), "--", "bash", "-c",
                  f"echo '{line}' > {mp}/agents/planner/outbox")  # fmt: skip
    assert r.returncode == 0, r.stderr
    (reply,) = take(server, "client", 1)
    assert reply["body"] == "again"
    # A reply_to naming a message the planner never received: EACCES.
    line = json.dumps({"reply_to": reply["id"], "body": "forged"})
    r = outheisfs("run", "planner", "--mount", str(mp), "--", "bash", "-c",
                  f"echo '{line}' > {mp}/agents/planner/outbox")  # fmt: skip
    assert r.returncode != 0
    assert "Permission denied" in r.stderr
    assert f"EACCES on /agents/planner/outbox: {reply['id']} is not a message planner" in r.stderr


# -- 2. explicit acks ---------------------------------------------------------------------

EXPLICIT = """
max_attempts = 3
[agents.worker]
ack = "explicit"
max_inflight = 2
ack_wait = 0
"""


def test_explicit_acks_reading_and_closing_do_not_ack(server: Server) -> None:
    server.write_config(EXPLICIT)
    server.mount()
    for body in ("a", "b", "c", "d"):
        server.send("worker", body)
    got = run_py(server, "worker", """
        import errno, json, os, sys
        fd = os.open("inbox", os.O_RDONLY | os.O_NONBLOCK)
        a = json.loads(os.read(fd, 1 << 20))
        b = json.loads(os.read(fd, 1 << 20))
        try:
            os.read(fd, 1 << 20)
            third = "read"
        except OSError as e:
            third = errno.errorcode[e.errno]
        status = open("ctl").read()
        os.close(fd)
        print(json.dumps({"a": a, "b": b, "third": third, "status": status}))
    """)  # fmt: skip
    assert got["third"] == "EAGAIN"  # max_inflight: two held, the third waits
    assert "inflight 2\n" in got["status"]
    # Closing the inbox and exiting normally acked nothing.
    assert server.status("worker")["inflight"] == "2"
    a, b = got["a"], got["b"]
    ctl = server.agent("worker", "ctl")
    # ack, nack with a delay, term: by id.
    result = run_py(server, "worker", f"""
        import errno, json, os, time
        out = {{}}
        def cmd(line):
            fd = os.open("ctl", os.O_WRONLY)
            try:
                os.write(fd, (line + "\\n").encode())
                return "ok"
            except OSError as e:
                return errno.errorcode[e.errno]
            finally:
                os.close(fd)
        out["ack"] = cmd("ack {a['id']}")
        out["again"] = cmd("ack {a['id']}")
        out["progress"] = cmd("progress {b['id']}")
        out["nack"] = cmd("nack {b['id']} 1.5")
        t = time.monotonic()
        fd = os.open("inbox", os.O_RDONLY)
        c = json.loads(os.read(fd, 1 << 20))
        d = json.loads(os.read(fd, 1 << 20))
        out["term"] = cmd("term " + c["id"] + " cannot parse this")
        out["ack_d"] = cmd("ack " + d["id"])
        again = json.loads(os.read(fd, 1 << 20))  # b, after its delay
        out["waited"] = time.monotonic() - t
        out["again"] = [again["body"], again["attempt"]]
        out["ack_b"] = cmd("ack " + again["id"])
        out["bodies"] = [c["body"], d["body"]]
        print(json.dumps(out))
    """)  # fmt: skip
    assert result["ack"] == "ok" and result["progress"] == "ok" and result["nack"] == "ok"
    assert result["term"] == "ok" and result["ack_d"] == "ok" and result["ack_b"] == "ok"
    assert result["bodies"] == ["c", "d"]
    assert result["again"] == ["b", 2] and result["waited"] >= 1.2
    st = server.status("worker")
    assert st["inflight"] == "0" and st["queued"] == "0" and st["dead_letters"] == "1"
    (dead,) = [json.loads(x) for x in server.agent("worker", "dead").read_text().splitlines()]
    assert dead["body"] == "c" and dead["reason"] == "term: cannot parse this"
    (nack,) = events_for(server, "nack", "worker")
    assert nack["id"] == b["id"] and nack["due"] > 0
    assert events_for(server, "progress", "worker")
    with pytest.raises(OSError) as e:  # a message not in flight
        ctl.write_text(f"ack {a['id']}\n")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:  # an auto agent has no nack
        server.agent("user", "ctl").write_text(f"nack {a['id']}\n")
    assert e.value.errno == errno.EINVAL


def test_explicit_acks_a_killed_reader_spends_an_attempt(server: Server) -> None:
    server.write_config(EXPLICIT)
    server.mount()
    server.send("worker", "job")
    script = server.root / "die.py"
    script.write_text(
        "import os, signal\n"
        "fd = os.open('inbox', os.O_RDONLY)\n"
        "os.read(fd, 1 << 20)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = outheisfs("run", "worker", "--mount", str(server.mp), "--", PY, str(script),
                  cwd=server.mp / "agents" / "worker")  # fmt: skip
    assert r.returncode == -signal.SIGKILL or r.returncode == 128 + signal.SIGKILL
    (redo,) = wait_for(lambda: events_for(server, "redeliver", "worker"))
    assert redo["reason"] == "reader killed by signal 9" and redo["attempt"] == 2
    with open(server.agent("worker", "inbox"), "rb") as f:  # the operator reads it
        msg = json.loads(f.readline())
    assert msg["body"] == "job" and msg["attempt"] == 2
    assert server.status("worker")["inflight"] == "1"  # the operator's read acks nothing
    server.agent("worker", "ctl").write_text(f"ack {msg['id']}\n")
    assert server.status("worker")["inflight"] == "0"


# -- 3. ack_wait, and who took what -------------------------------------------------------


def test_a_hung_worker_loses_its_message_to_another_instance(server: Server) -> None:
    server.write_config(
        f"""
[agents.worker]
command = ["{PY}", "{AGENTS / "flowworker.py"}"]
ack = "explicit"
ack_wait = 1
instances = 2
send = ["user"]
"""
    )
    server.mount()
    wait_for(lambda: len(server.status("worker")["pid"].split(",")) == 2, timeout=10)
    server.send("worker", "slow")
    (first,) = wait_for(lambda: events_for(server, "deliver", "worker"))
    assert first["instance"] in (0, 1) and first["pid"] > 0  # who took it
    os.kill(first["pid"], signal.SIGSTOP)  # hung, holding it
    try:
        redo = wait_for(lambda: events_for(server, "redeliver", "worker"), timeout=10)
        assert redo[0]["reason"] == "ack_wait"
        (done,) = take(server, "user", 1, timeout=20)  # the other instance did it
        assert done["body"]["ack"] == "ok" and done["body"]["attempt"] == 2
        assert done["body"]["instance"] == str(1 - first["instance"])
        second = events_for(server, "deliver", "worker")[1]
        assert second["instance"] == 1 - first["instance"] and second["pid"] != first["pid"]
    finally:
        os.kill(first["pid"], signal.SIGCONT)
    (late,) = take(server, "user", 1, timeout=20)
    assert late["body"]["ack"] == "ESTALE" and late["body"]["id"] == done["body"]["id"]
    assert server.status("worker")["inflight"] == "0"


# -- 4. poison messages -------------------------------------------------------------------


def test_a_poison_message_dies_with_its_readers_reason_and_the_pool_comes_back(
    server: Server,
) -> None:
    if shutil.which("jq") is None:
        pytest.fail("jq is needed")
    server.write_config(
        f"""
max_attempts = 3
stop_grace = 1.0
[agents.worker]
command = ["bash", "{AGENTS / "poison.sh"}"]
instances = 2
max_restarts = 1
restart_window = 30
cooldown = 1
"""
    )
    server.mount()
    server.send("worker", "boom")

    def failed_once() -> bool:
        return bool(events_for(server, "failed", "worker"))

    wait_for(failed_once, timeout=20)
    (failed,) = events_for(server, "failed", "worker")[:1]
    assert failed["cooldown"] == 1 and failed["next_start"]
    (dead,) = wait_for(lambda: events_for(server, "dead", "worker"), timeout=30)
    assert dead["reason"].startswith("reader exited with status 1"), dead
    assert dead["attempts"] == 3
    # No dead reason, nor a counted attempt, from the supervisor's own stop.
    for ev in events_for(server, "redeliver", "worker"):
        if "signal 15" in ev["reason"] or "supervisor" in ev["reason"]:
            assert ev.get("counted") is False, ev
    # The pool comes back by itself after its cool-down, and works.
    wait_for(lambda: server.status("worker")["state"] == "running", timeout=20)
    server.send("worker", "fine")
    r = wait_for(lambda: [m for m in server.events("message") if m["from"] == "worker"], 20)
    assert r[0]["body"] == {"done": "fine"}
    (row,) = [json.loads(x) for x in server.agent("worker", "dead").read_text().splitlines()]
    assert row["body"] == "boom" and row["attempts"] == 3


def test_ctl_shows_when_a_failed_agent_starts_next(server: Server) -> None:
    server.write_config(
        """
[agents.crasher]
command = ["sh", "-c", "exit 1"]
max_restarts = 0
cooldown = 3600
"""
    )
    server.mount()
    wait_for(lambda: server.status("crasher")["state"] == "failed", timeout=10)
    st = server.status("crasher")
    assert st["next_start"].endswith("Z") and st["next_start"] > time.strftime("%Y")
    (ev,) = events_for(server, "failed", "crasher")
    assert ev["cooldown"] == 600  # 3600 capped at ten minutes


# -- 5. dead letters ----------------------------------------------------------------------


def test_dead_letters_can_be_read_requeued_and_purged(server: Server) -> None:
    server.write_config("max_attempts = 1\n[agents.w]\n")
    server.mount()
    for body in ("one", "two"):
        server.send("w", body)
        r = outheisfs("run", "w", "--mount", str(server.mp), "--", "bash", "-c",
                      f"read -r line < {server.agent('w', 'inbox')}; exit 3")  # fmt: skip
        assert r.returncode == 3
    wait_for(lambda: server.status("w")["dead_letters"] == "2")
    rows = [json.loads(x) for x in server.agent("w", "dead").read_text().splitlines()]
    assert [x["body"] for x in rows] == ["one", "two"]
    assert all(x["attempts"] == 1 for x in rows)
    assert all(x["reason"].startswith("reader exited with status 3") for x in rows)
    os.stat(server.agent("w", "dead"))
    with pytest.raises(OSError) as e:
        server.agent("w", "dead").write_text("x\n")
    assert e.value.errno == errno.EACCES
    ctl = server.agent("w", "ctl")
    ctl.write_text(f"requeue {rows[0]['id']}\n")
    again = read_one(server, "w")
    assert again["body"] == "one" and again["attempt"] == 1
    ctl.write_text("purge all\n")
    assert server.agent("w", "dead").read_text() == ""
    assert server.status("w")["dead_letters"] == "0"
    assert [e["id"] for e in events_for(server, "requeue", "w")] == [rows[0]["id"]]
    assert [e["id"] for e in events_for(server, "purge", "w")] == [rows[1]["id"]]
    with pytest.raises(OSError) as e:
        ctl.write_text(f"requeue {rows[1]['id']}\n")
    assert e.value.errno == errno.EINVAL
    # Dead letters survive a restart.
    server.send("w", "three")
    sh(f"head -n1 {server.agent('w', 'inbox')} >/dev/null")  # acks it
    assert server.umount().returncode == 0
    server.mount()
    assert server.status("w")["dead_letters"] == "0"


# -- 6. errors the caller can read --------------------------------------------------------


def test_refusals_are_readable_in_the_errors_file_and_run_prints_them(server: Server) -> None:
    server.write_config('[agents.a]\nsend = ["b"]\n[agents.b]\n[agents.c]\n')
    server.mount()
    with pytest.raises(OSError) as e:
        server.agent("a", "ctl").write_text("scale 3\n")
    assert e.value.errno == errno.EINVAL
    rows = [json.loads(x) for x in server.agent("user", "errors").read_text().splitlines()]
    row = rows[-1]  # (Python writes its buffer again at close: two refusals)
    assert "unknown command 'scale'" in row["why"] and row["errno"] == "EINVAL"
    # An agent's refusal: in its own errors file, and printed by `run`.
    r = outheisfs("run", "a", "--mount", str(server.mp), "--", "sh", "-c",
                  f"echo hi > {server.agent('a', 'log')}")  # fmt: skip
    assert r.returncode != 0
    assert "Permission denied" in r.stderr  # the shell's errno
    assert "outheisfs: a: EACCES on /agents/a/log:" in r.stderr  # and the reason
    rows = [json.loads(x) for x in server.agent("a", "errors").read_text().splitlines()]
    assert rows and rows[-1]["type"] == "denied" and rows[-1]["why"]
    line = json.dumps({"to": "c", "body": 1})
    r = outheisfs("run", "a", "--mount", str(server.mp), "--", "sh", "-c",
                  f"echo '{line}' > {server.agent('a', 'outbox')}")  # fmt: skip
    assert r.returncode != 0
    assert "may not send to c" in r.stderr
    # A refusal of a hidden path stays out of the file (it would tell that c exists).
    r = outheisfs("run", "a", "--mount", str(server.mp), "--", "sh", "-c",
                  f"cat {server.agent('c', 'log')}")  # fmt: skip
    assert r.returncode != 0
    text = server.agent("a", "errors").read_text()
    assert "/agents/c/log" not in text
    assert "/agents/c/log" not in server.agent("b", "errors").read_text()


# -- the scatter/gather example -----------------------------------------------------------

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_the_scatter_gather_example_survives_kill_9_of_itself_and_of_the_server(
    server: Server,
) -> None:
    if shutil.which("jq") is None:
        pytest.fail("jq is needed")
    server.write_config(
        f"""
[agents.planner]
command = ["{PY}", "{EXAMPLES / "agents" / "planner.py"}"]
ack = "explicit"
max_inflight = 200
send = ["squarer"]

[agents.squarer]
command = ["bash", "{EXAMPLES / "agents" / "squarer.sh"}"]
instances = 2
env = {{ WORK_SECONDS = "0.3" }}

[vault]
plans = "planner"
"""
    )
    server.mount()
    numbers = list(range(1, 13))
    server.send("planner", json.dumps({"body": {"numbers": numbers}}))

    def gathered() -> int:
        return sum(1 for e in events_for(server, "deliver", "planner") if e["attempt"] == 1) - 1

    wait_for(lambda: gathered() >= 3, timeout=30)
    planner = int(server.status("planner")["pid"])
    os.kill(planner, signal.SIGKILL)  # holding the request and some replies, unacked
    wait_for(lambda: gathered() >= 7, timeout=30)
    assert server.status("planner")["inflight"] != "0"
    server.kill9()
    server.mount()
    (answer,) = take(server, "user", 1, timeout=60)
    assert answer["from"] == "planner"
    assert answer["body"] == {
        "sum": sum(n * n for n in numbers),
        "squares": [n * n for n in numbers],
    }
    wait_for(lambda: server.status("planner")["inflight"] == "0", timeout=10)
    assert server.status("planner")["dead"] == "0" and server.status("squarer")["dead"] == "0"
    redo = events_for(server, "redeliver", "planner")
    assert any(e["reason"] == "reader killed by signal 9" for e in redo)
    assert any(e["reason"] == "server restarted while in flight" for e in redo)
    assert not list((server.state / "vault" / "plans").iterdir())  # its notes, cleaned up


def test_explicit_acks_a_read_waits_while_max_inflight_are_held(server: Server) -> None:
    server.write_config(EXPLICIT)
    server.mount()
    for body in ("a", "b", "c"):
        server.send("worker", body)
    got = run_py(server, "worker", """
        import json, os, threading, time
        fd = os.open("inbox", os.O_RDONLY)
        first = json.loads(os.read(fd, 1 << 20))
        json.loads(os.read(fd, 1 << 20))
        def ack_later():
            time.sleep(0.5)
            with open("ctl", "w") as ctl:
                ctl.write("ack " + first["id"] + "\\n")
        threading.Thread(target=ack_later).start()
        t = time.monotonic()
        third = json.loads(os.read(fd, 1 << 20))  # waits for the ack
        print(json.dumps({"waited": time.monotonic() - t, "body": third["body"]}))
    """)  # fmt: skip
    assert got["body"] == "c" and got["waited"] >= 0.4
