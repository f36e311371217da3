"""The supervisor through a real mount: agents as real processes in several
languages, started, killed, restarted and stopped [SPEC §2, §3, §4.3, §4.5]."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import PY, Server, _alive, outheisfs, read_nonblock, sh, take, wait_for

AGENTS = Path(__file__).parent / "agents"
EXAMPLES = Path(__file__).parents[2] / "examples"
PROBE = f'command = ["{PY}", "{AGENTS / "probe.py"}"]'


def probe_config(server: Server, extra: str = "", **keys: str) -> None:
    lines = "".join(f"{k} = {v}\n" for k, v in keys.items())
    server.write_config(f"stop_grace = 1.0\n[agents.probe]\n{PROBE}\n{lines}{extra}")


def ask(server: Server, to: str, body: Any) -> dict[str, Any]:
    server.send(to, json.dumps({"body": body}))
    (reply,) = take(server, "user", 1)
    assert reply["from"] == to
    return reply


def pid_of(server: Server, name: str) -> int:
    return int(server.status(name)["pid"])


def running_with_new_pid(server: Server, name: str, old: int) -> int:
    def new() -> int | None:
        st = server.status(name)
        if st["state"] == "running" and st["pid"] not in ("-", str(old)):
            return int(st["pid"])
        return None

    return wait_for(new, timeout=10)  # type: ignore[no-any-return]


def count(server: Server, type_: str, agent: str) -> int:
    return sum(1 for e in server.events(type_) if e.get("agent") == agent)


# -- the example system ----------------------------------------------------------------


@pytest.fixture
def example(server: Server) -> Server:
    for tool in ("jq", "node", "python3"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is needed by the example agents: run .ci/setup (see README)")
    server.config = EXAMPLES / "outheis.toml"
    server.mount()
    supervised = [a for a in _agents(server) if a["state"] != "external"]
    assert len(supervised) == 7  # with the planner and its squarer pool
    wait_for(
        lambda: all(a["state"] in ("running", "external") for a in _agents(server)), timeout=10
    )
    return server


def _agents(server: Server) -> list[dict[str, str]]:
    rows = [line.split() for line in server.p("ctl").read_text().splitlines()]
    return [{"name": r[0], "state": r[1], "pid": r[2]} for r in rows if r[0] != "user"]


@pytest.mark.parametrize("agent", ["echo", "py-echo", "node-echo"])
def test_example_echo_agents_answer(example: Server, agent: str) -> None:
    for body in ["hello", {"n": [1, 2, 3]}, "ünïcode ✓"]:
        reply = ask(example, agent, body)
        assert reply["body"] == body
        (sent,) = [e for e in example.events("message") if e["to"] == agent][-1:]
        assert reply["reply_to"] == sent["id"]


def test_example_shell_user_gets_an_answer_with_echo_and_head(example: Server) -> None:
    r = sh(
        f"cd {example.mp} && echo hi there > agents/echo/inbox && head -n1 agents/user/inbox"
        " | jq -r .body",
        timeout=15,
    )
    assert r.stdout == "hi there\n", r.stderr


def test_example_pipeline_hands_work_on(example: Server) -> None:
    example.send("intake", "count these four words")
    (result,) = take(example, "user", 1)
    assert result["from"] == "intake"
    assert result["body"]["words"] == 4 and result["body"]["for"] == "user"
    hops = [(e["from"], e["to"]) for e in example.events("message")]
    assert hops[-4:] == [("user", "intake"), ("intake", "worker"), ("worker", "intake"),
                         ("intake", "user")]  # fmt: skip


def test_example_worker_pool_spreads_work_each_job_once(example: Server) -> None:
    pids = set(example.status("worker")["pid"].split(","))
    assert len(pids) == 3
    with open(example.agent("worker", "inbox"), "w") as f:
        f.write("".join(f"job number {i}\n" for i in range(30)))
    replies = take(example, "user", 30, timeout=20)
    jobs = {e["id"] for e in example.events("message") if e["to"] == "worker"}
    assert sorted(r["reply_to"] for r in replies) == sorted(jobs)  # each job answered once
    assert {str(r["body"]["pid"]) for r in replies} == pids  # by all three processes
    assert {r["body"]["instance"] for r in replies} == {0, 1, 2}
    # Every job acknowledged: none is in flight, so a second answer to one would
    # need it delivered again.
    wait_for(lambda: jobs <= {e["id"] for e in example.events("ack")}, timeout=10)
    assert example.events("redeliver") == []
    assert read_nonblock(example, "user") is None  # and nothing more


# -- starting: environment, folder, output, niceness ----------------------------------


def test_agent_environment_folder_and_niceness(server: Server) -> None:
    server.write_config(
        f"""
[agents.probe]
{PROBE}
env = {{ MODEL = "small" }}
[agents.bg]
{PROBE}
priority = "background"
"""
    )
    server.mount()
    body = ask(server, "probe", "hi")["body"]
    assert body["cwd"] == str(server.mp / "agents" / "probe")
    assert body["env"] == {
        "OUTHEIS_AGENT": "probe",
        "OUTHEIS_MOUNT": str(server.mp),
        "OUTHEIS_HOME": str(server.root),
        "OUTHEIS_INSTANCE": "0",
        "MODEL": "small",
    }
    assert body["nice"] == 0
    assert ask(server, "bg", "hi")["body"]["nice"] == 10
    out = (server.state / "output" / "probe.log").read_text()
    assert f"probe {body['pid']} starting" in out and "probe stderr line" in out


def test_relative_command_resolves_against_the_config_folder(server: Server) -> None:
    (server.root / "bin").mkdir()
    shutil.copy(AGENTS / "probe.py", server.root / "bin" / "p.py")
    server.write_config(f'[agents.rel]\ncommand = ["{PY}", "./bin/p.py"]\n')
    server.mount()
    assert ask(server, "rel", "x")["body"]["got"] == "x"


def test_missing_command_is_an_error_event_then_failed(server: Server) -> None:
    server.write_config('[agents.nope]\ncommand = ["./no-such-program"]\nmax_restarts = 1\n')
    server.mount()
    wait_for(lambda: server.status("nope")["state"] == "failed", timeout=10)
    errors = [e for e in server.events("error") if e["where"] == "/agents/nope"]
    assert errors and "no-such-program" in errors[0]["why"]
    assert count(server, "failed", "nope") == 1


# -- crashes and restarts --------------------------------------------------------------


def test_kill_9_restarts_and_redelivers_the_message_in_flight(server: Server) -> None:
    probe_config(server)
    server.mount()
    old = wait_for(lambda: server.status("probe")["pid"] != "-" and pid_of(server, "probe"))
    server.send("probe", "hang")
    wait_for(lambda: server.status("probe")["inflight"] == "1")
    os.kill(old, signal.SIGKILL)
    new = running_with_new_pid(server, "probe", old)
    (reply,) = take(server, "user", 1)
    assert reply["body"]["got"] == "hang"
    assert reply["body"]["attempt"] == 2 and reply["body"]["pid"] == new
    assert ask(server, "probe", "still there?")["body"]["pid"] == new
    exits = [e for e in server.events("exit") if e["agent"] == "probe"]
    assert exits[0]["pid"] == old and exits[0]["signal"] == 9
    assert server.status("probe")["restarts"] == "1"
    assert len(server.events("redeliver")) == 1


def test_queued_messages_wait_for_the_restart(server: Server) -> None:
    probe_config(server)
    server.mount()
    old = wait_for(lambda: server.status("probe")["pid"] != "-" and pid_of(server, "probe"))
    server.send("probe", "exit 3")
    server.send("probe", "second")
    server.send("probe", "third")
    new = running_with_new_pid(server, "probe", old)
    replies = take(server, "user", 3)
    got = [(r["body"]["got"], r["body"]["attempt"], r["body"]["pid"]) for r in replies]
    assert got == [("exit 3", 2, new), ("second", 1, new), ("third", 1, new)]
    assert [e.get("code") for e in server.events("exit")] == [3]


def test_crash_loop_marks_failed_after_max_restarts(server: Server) -> None:
    server.write_config(
        '[agents.crash]\ncommand = ["sh", "-c", "exit 3"]\nmax_restarts = 2\nrestart_window = 1.0\n'
    )
    server.mount()
    wait_for(lambda: server.status("crash")["state"] == "failed", timeout=10)
    assert count(server, "start", "crash") == 3
    assert count(server, "restart", "crash") == 2
    assert count(server, "failed", "crash") == 1
    assert all(e.get("code") == 3 for e in server.events("exit") if e["agent"] == "crash")
    delays = [e["delay"] for e in server.events("restart") if e["agent"] == "crash"]
    assert delays == sorted(delays) and delays[1] > delays[0]  # the backoff grows
    time.sleep(2.0)  # twice the window: still failed, nothing started
    assert count(server, "start", "crash") == 3
    st = server.status("crash")
    assert st["state"] == "failed" and st["pid"] == "-" and st["restarts"] == "2"
    # the operator starts it again
    server.agent("crash", "ctl").write_text("start\n")
    wait_for(lambda: count(server, "start", "crash") >= 4, timeout=10)


def test_transient_and_temporary_policies(server: Server) -> None:
    server.write_config(
        """
[agents.done]
command = ["sh", "-c", "exit 0"]
restart = "transient"
[agents.broken]
command = ["sh", "-c", "exit 1"]
restart = "transient"
max_restarts = 1
[agents.once]
command = ["sh", "-c", "exit 1"]
restart = "temporary"
[agents.always]
command = ["sh", "-c", "exit 0"]
max_restarts = 1
"""
    )
    server.mount()
    wait_for(lambda: server.status("broken")["state"] == "failed", timeout=10)
    wait_for(lambda: server.status("always")["state"] == "failed", timeout=10)
    # `done` and `once` exited with the first runs of `broken` and `always`, which
    # have since been restarted after a backoff and failed: their turn is long past.
    assert count(server, "exit", "done") == 1 and count(server, "exit", "once") == 1
    assert count(server, "restart", "done") == 0 and server.status("done")["state"] == "stopped"
    assert count(server, "restart", "once") == 0 and server.status("once")["state"] == "stopped"
    assert count(server, "restart", "broken") == 1
    assert count(server, "restart", "always") == 1  # permanent: even after exit 0


def test_stop_and_start(server: Server) -> None:
    probe_config(server)
    server.mount()
    old = wait_for(lambda: server.status("probe")["pid"] != "-" and pid_of(server, "probe"))
    server.agent("probe", "ctl").write_text("stop\n")
    st = server.status("probe")
    assert st["state"] == "stopped" and st["pid"] == "-"
    assert not _alive(old)
    server.send("probe", "while stopped")
    # `stop` returned once the exit was handled (logged, restart decided): a
    # restart, if there were one, would be in the log by now.
    assert [e["pid"] for e in server.events("exit") if e["agent"] == "probe"] == [old]
    assert server.status("probe")["queued"] == "1"  # waits; nobody restarted it
    assert count(server, "restart", "probe") == 0
    server.agent("probe", "ctl").write_text("start\n")
    reply = take(server, "user", 1)[0]
    assert reply["body"]["got"] == "while stopped" and reply["body"]["pid"] != old
    server.agent("probe", "ctl").write_text("restart\n")
    assert running_with_new_pid(server, "probe", reply["body"]["pid"])


def test_kill_command_restarts_by_policy(server: Server) -> None:
    probe_config(server)
    server.mount()
    old = wait_for(lambda: server.status("probe")["pid"] != "-" and pid_of(server, "probe"))
    server.agent("probe", "ctl").write_text("kill\n")
    running_with_new_pid(server, "probe", old)
    assert [e.get("signal") for e in server.events("exit") if e["agent"] == "probe"] == [9]


def test_instances_each_have_a_pid(server: Server) -> None:
    probe_config(server, instances="3")
    server.mount()
    wait_for(lambda: len(server.status("probe")["pid"].split(",")) == 3)
    line = next(r for r in server.p("ctl").read_text().splitlines() if r.startswith("probe "))
    assert line.split()[2] == server.status("probe")["pid"]


def test_operator_commands_are_refused_to_agents_and_need_a_command(server: Server) -> None:
    probe_config(server, extra='[agents.plain]\nunveil = { "/agents/probe/ctl" = "r" }\n')
    server.mount()
    mp = str(server.mp)
    for ctl_file, error in (
        (server.agent("probe", "ctl"), "Permission denied"),  # another agent's: read only
        (server.agent("plain", "ctl"), "Operation not permitted"),  # its own: not this command
    ):
        r = outheisfs("run", "plain", "--mount", mp, "--", "bash", "-c", f"echo stop > {ctl_file}")
        assert r.returncode == 1 and error in r.stderr, r.stderr
    with pytest.raises(OSError) as e:
        server.agent("plain", "ctl").write_text("start\n")
    assert e.value.errno == errno.EINVAL  # the operator, but plain has no command
    assert server.status("probe")["state"] == "running"


# -- whole process trees ----------------------------------------------------------------


def tree_config(server: Server) -> Path:
    pids = server.root / "pids"
    pids.mkdir()
    server.write_config(
        f"""
stop_grace = 0.5
[agents.tree]
command = ["{AGENTS / "tree.sh"}"]
env = {{ PIDS = "{pids}" }}
files = {{ "{pids}" = "w" }}
"""
    )
    return pids


def tree_pids(pids: Path, main: int) -> list[int]:
    def ready() -> list[int] | None:
        files = [pids / f"{main}.{k}" for k in ("main", "daemon", "stubborn")]
        if all(f.exists() and f.read_text().strip() for f in files):
            return [int(f.read_text()) for f in files]
        return None

    return wait_for(ready, timeout=10)  # type: ignore[no-any-return]


def test_restart_ends_the_whole_tree_first(server: Server) -> None:
    pids = tree_config(server)
    server.mount()
    main = wait_for(lambda: server.status("tree")["pid"] != "-" and pid_of(server, "tree"))
    old = tree_pids(pids, main)
    assert all(_alive(p) for p in old)
    server.agent("tree", "ctl").write_text("restart\n")
    assert not any(_alive(p) for p in old)  # daemon and SIGTERM-ignoring child included
    new_main = running_with_new_pid(server, "tree", main)
    assert all(_alive(p) for p in tree_pids(pids, new_main))


def test_crash_of_the_main_process_ends_its_descendants(server: Server) -> None:
    pids = tree_config(server)
    server.mount()
    main = wait_for(lambda: server.status("tree")["pid"] != "-" and pid_of(server, "tree"))
    old = tree_pids(pids, main)
    os.kill(main, signal.SIGKILL)
    running_with_new_pid(server, "tree", main)
    wait_for(lambda: not any(_alive(p) for p in old), timeout=5)


def test_agent_processes_die_with_a_killed_server(server: Server) -> None:
    pids = tree_config(server)
    server.mount()
    main = wait_for(lambda: server.status("tree")["pid"] != "-" and pid_of(server, "tree"))
    _, daemon, stubborn = tree_pids(pids, main)
    server.kill9()  # no chance to end anything: the kernel's parent-death signal does
    wait_for(lambda: not _alive(main), timeout=5)
    for orphan in (daemon, stubborn):  # known limit: descendants outlive a SIGKILLed server
        os.kill(orphan, signal.SIGKILL)


@pytest.mark.parametrize("how", ["umount", "sigterm"])
def test_no_agent_process_survives_the_server(server: Server, how: str) -> None:
    pids = tree_config(server)
    server.write_config(
        server.config.read_text() + f"[agents.probe]\n{PROBE}\ninstances = 2\n"  # type: ignore[union-attr]
    )
    server.mount()
    main = wait_for(lambda: server.status("tree")["pid"] != "-" and pid_of(server, "tree"))
    probes = [int(p) for p in server.status("probe")["pid"].split(",")]
    everything = tree_pids(pids, main) + probes
    r = outheisfs("run", "scripted", "--mount", str(server.mp), "--", "sh", "-c",
                  "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!")  # fmt: skip
    assert r.returncode == 0, r.stderr
    everything.append(int(r.stdout))
    assert all(_alive(p) for p in everything)
    if how == "umount":
        assert server.umount().returncode == 0
    else:
        os.kill(server.pid, signal.SIGTERM)
        wait_for(lambda: not os.path.ismount(server.mp), timeout=15)
    assert not any(_alive(p) for p in everything)
    stops = server.events("umount")
    assert stops, "the server logged its stop"


# -- outheisfs run -----------------------------------------------------------------------


def test_run_sends_as_the_agent_and_returns_the_status(server: Server) -> None:
    probe_config(server, extra='[agents.scripted]\nsend = ["probe"]\n')
    server.mount()
    inbox = server.agent("probe", "inbox")
    script = (
        f"echo direct > {inbox}; "
        f"(sleep 0.1; setsid sh -c 'echo grandchild > {inbox}') & wait; "
        "exit 7"
    )
    r = outheisfs("run", "scripted", "--mount", str(server.mp), "--", "bash", "-c", script)
    assert r.returncode == 7, r.stderr
    msgs = [e for e in server.events("message") if e["to"] == "probe"]
    assert [(m["from"], m["body"]) for m in msgs] == [
        ("scripted", "direct"),
        ("scripted", "grandchild"),
    ]
    replies = take(server, "scripted", 2)  # answers come back to the agent
    assert {r["body"]["got"] for r in replies} == {"direct", "grandchild"}


def test_run_exit_status_of_a_killed_command(server: Server) -> None:
    server.mount()
    r = outheisfs("run", "x", "--mount", str(server.mp), "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == -signal.SIGTERM or r.returncode == 128 + signal.SIGTERM


def test_run_errors(server: Server) -> None:
    server.mount()
    mp = str(server.mp)
    r = outheisfs("run", "x", "--mount", mp, "--", "no-such-command-here")
    assert r.returncode == 127 and "no-such-command-here" in r.stderr
    r = outheisfs("run", "Bad Name", "--mount", mp, "--", "true")
    assert r.returncode == 2 and "not a valid agent name" in r.stderr
    r = outheisfs("run", "x", "--mount", str(server.root), "--", "true")
    assert r.returncode == 1 and "not an outheisfs mount" in r.stderr
    r = outheisfs("run", "x", "--mount", mp)
    assert r.returncode == 2 and "no command" in r.stderr


def test_run_shows_its_pid_and_its_agent_reads_its_inbox(server: Server) -> None:
    server.mount()
    server.p("agents", "reader").mkdir()
    server.send("reader", "for the reader")
    r = outheisfs("run", "reader", "--mount", str(server.mp), "--", "sh", "-c",
                  "grep '^pid ' agents/reader/ctl; echo $$; head -n1 agents/reader/inbox",
                  cwd=server.mp)  # fmt: skip
    assert r.returncode == 0, r.stderr
    pid_line, own, msg = r.stdout.splitlines()
    grep = pid_line.split()[1].split(",")
    assert own in grep and len(grep) == 2  # the shell, and grep: its child
    assert json.loads(msg)["body"] == "for the reader"
    assert server.status("reader")["pid"] == "-"  # gone with its process


def test_agents_with_processes_cannot_be_removed(server: Server) -> None:
    probe_config(server)
    server.mount()
    with pytest.raises(OSError) as e:
        os.rmdir(server.p("agents", "probe"))
    assert e.value.errno == errno.EBUSY
    server.agent("probe", "ctl").write_text("stop\n")
    with pytest.raises(OSError) as e:  # still declared with a command
        os.rmdir(server.p("agents", "probe"))
    assert e.value.errno == errno.EBUSY
    r = outheisfs("run", "scripted", "--mount", str(server.mp), "--", "bash", "-c",
                  f"rmdir {server.p('agents', 'scripted')}")  # fmt: skip
    assert r.returncode == 1 and "Permission denied" in r.stderr  # agents cannot
    r = outheisfs("run", "scripted", "--mount", str(server.mp), "--", "bash", "-c",
                  "sleep 30 </dev/null >/dev/null 2>&1 & echo $!")  # fmt: skip
    sleeper = int(r.stdout)
    assert server.status("scripted")["pid"] == str(sleeper)  # its descendant lives on
    with pytest.raises(OSError) as e:
        os.rmdir(server.p("agents", "scripted"))
    assert e.value.errno == errno.EBUSY
    os.kill(sleeper, signal.SIGKILL)
    wait_for(lambda: server.status("scripted")["pid"] == "-")
    os.rmdir(server.p("agents", "scripted"))
