"""Day-two operations through a real mount: `outheisfs reload` and SIGHUP apply only
the difference of the config while messages flow; ctl `instances N`; a pool that
sizes itself under a burst (examples/burst)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from .conftest import PY, Server, outheisfs, sh, wait_for

AGENTS = Path(__file__).parent / "agents"
WORKER = f'command = ["{PY}", "{AGENTS / "modeworker.py"}"]'
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def answers(server: Server, want: set[Any], timeout: float = 60.0) -> list[dict[str, Any]]:
    """Read the operator's mailbox until the jobs of `want` have all been answered."""
    got: list[dict[str, Any]] = []
    fd = os.open(server.agent("user", "inbox"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while not want <= {job(m) for m in got}:
            left = deadline - time.monotonic()
            missing = want - {job(m) for m in got}
            assert left > 0, f"{len(missing)} jobs unanswered, e.g. {sorted(missing)[:5]}"
            if poller.poll(min(left, 1.0) * 1000):
                try:
                    got.append(json.loads(os.read(fd, 1 << 20)))
                except BlockingIOError:
                    pass
    finally:
        os.close(fd)
    return got


def job(m: dict[str, Any]) -> Any:
    body = m["body"]["job"]
    return tuple(body) if isinstance(body, list) else body


def pids(server: Server, name: str) -> list[int]:
    text = server.status(name)["pid"]
    return [] if text == "-" else [int(p) for p in text.split(",")]


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


def reload(server: Server) -> Any:
    return outheisfs("reload", str(server.mp), cwd=server.root)


CONFIG = f"""
[agents.keep]
{WORKER}
env = {{ MODE = "keep" }}

[agents.change]
{WORKER}
env = {{ MODE = "old" }}

[agents.gone]
{WORKER}
env = {{ WORK_SECONDS = "30" }}
"""

CHANGED = f"""
[agents.keep]
{WORKER}
env = {{ MODE = "keep" }}

[agents.change]
{WORKER}
env = {{ MODE = "new" }}

[agents.fresh]
{WORKER}
env = {{ MODE = "fresh" }}
"""


def test_reload_adds_changes_and_removes_agents_while_messages_flow(server: Server) -> None:
    server.write_config(CONFIG)
    server.mount()
    wait_for(lambda: all(pids(server, n) for n in ("keep", "change", "gone")), timeout=20)
    keep_pid = pids(server, "keep")
    old_change = pids(server, "change")
    for i in range(3):  # one in flight for 30 s, two queued: gone holds messages
        server.send("gone", json.dumps({"body": ["gone", i]}))
    wait_for(lambda: server.status("gone")["inflight"] == "1", timeout=20)

    sent: list[tuple[str, int]] = []

    def flow() -> None:
        for i in range(300):
            to = ("keep", "change")[i % 2]
            server.send(to, json.dumps({"body": [to, i]}))
            sent.append((to, i))
            time.sleep(0.003)

    writer = threading.Thread(target=flow)
    writer.start()
    wait_for(lambda: len(sent) > 60, timeout=20)
    server.write_config(CHANGED)
    r = reload(server)
    writer.join(60)
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.splitlines()[0] == "reloaded: added fresh; changed change; removed gone; kept gone"
    )
    assert len(sent) == 300 and sent[-1] == ("change", 299)

    got = answers(server, set(sent))  # every message answered: nothing lost
    assert pids(server, "keep") == keep_pid  # untouched
    new_change = pids(server, "change")
    assert new_change and set(new_change).isdisjoint(old_change)
    assert environ(new_change[0])["MODE"] == "new"
    late = [m for m in got if m["from"] == "change" and m["body"]["pid"] in new_change]
    assert late and all(m["body"]["mode"] == "new" for m in late)
    # gone: stopped, its messages kept in its mailbox (the held one given back)
    st = server.status("gone")
    assert (st["state"], st["pid"], st["queued"], st["inflight"]) == ("external", "-", "3", "0")
    ev = server.events("reload")[-1]
    assert (ev["who"], ev["added"], ev["changed"], ev["removed"], ev["kept"]) == (
        "user", ["fresh"], ["change"], ["gone"], ["gone"]
    )  # fmt: skip
    wait_for(lambda: pids(server, "fresh"), timeout=20)
    server.send("fresh", json.dumps({"body": "hello"}))
    (hello,) = [m for m in answers(server, {"hello"}) if m["from"] == "fresh"]
    assert hello["body"]["mode"] == "fresh"
    # the operator reads what the removed agent held
    r = sh(f"head -n3 {server.agent('gone', 'inbox')}")
    assert [json.loads(x)["body"][1] for x in r.stdout.splitlines()] == [0, 1, 2]


def test_a_bad_config_changes_nothing_and_says_why(server: Server) -> None:
    server.write_config(CONFIG)
    server.mount()
    wait_for(lambda: all(pids(server, n) for n in ("keep", "change", "gone")), timeout=20)
    before = {n: pids(server, n) for n in ("keep", "change", "gone")}
    server.write_config(CHANGED.replace('MODE = "new" }', 'MODE = "new" }\nbogus = 1'))
    r = reload(server)
    assert r.returncode == 2
    assert r.stderr == (
        f"outheisfs: reload: {server.config}: agents.change.bogus: unknown key\n"
    )  # fmt: skip
    err = server.events("error")[-1]
    assert (err["who"], err["where"], err["errno"]) == ("user", "/ctl", "EINVAL")
    assert {n: pids(server, n) for n in before} == before
    assert not server.events("reload")
    assert "fresh" not in os.listdir(server.p("agents"))


def test_sighup_reloads_and_a_bad_config_by_sighup_is_an_error_event(server: Server) -> None:
    server.write_config(CONFIG)
    server.mount()
    wait_for(lambda: pids(server, "change"), timeout=20)
    old = pids(server, "change")
    server.write_config(CONFIG.replace('"old"', '"hup"'))
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: server.events("reload"), timeout=20)
    assert server.events("reload")[-1]["who"] == "server"
    assert server.events("reload")[-1]["changed"] == ["change"]
    new = wait_for(lambda: pids(server, "change"), timeout=20)
    assert new != old and environ(new[0])["MODE"] == "hup"
    server.write_config("[agents.change\n")
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: server.events("error"), timeout=20)
    err = server.events("error")[-1]
    assert err["who"] == "server" and "not valid TOML" in err["why"]
    assert pids(server, "change") == new and os.path.ismount(server.mp)  # still serving


def test_instances_n_grows_and_shrinks_a_pool_without_losing_work(server: Server) -> None:
    server.write_config(
        f'[agents.pool]\n{WORKER}\ninstances = 3\nenv = {{ WORK_SECONDS = "0.3" }}\n'
    )
    server.mount()
    wait_for(lambda: len(pids(server, "pool")) == 3, timeout=20)
    # Idle instances stop first, taking nothing.
    (server.agent("pool", "ctl")).write_text("instances 1\n")
    assert len(pids(server, "pool")) == 1
    assert server.status("pool")["instances"] == "1"
    assert sorted(e["instance"] for e in server.events("exit")) == [1, 2]  # the highest
    assert all(e["signal"] == signal.SIGTERM for e in server.events("exit"))
    assert not server.events("redeliver")
    (server.agent("pool", "ctl")).write_text("instances 4\n")
    assert len(pids(server, "pool")) == 4
    # Busy instances stopped by a shrink give their message back: nothing is lost.
    jobs = {("pool", i) for i in range(12)}
    for j in sorted(jobs):
        server.send("pool", json.dumps({"body": list(j)}))
    wait_for(lambda: server.status("pool")["inflight"] == "4", timeout=20)
    (server.agent("pool", "ctl")).write_text("instances 2\n")
    assert len(pids(server, "pool")) == 2
    answers(server, jobs)
    for e in server.events("redeliver"):
        assert e["counted"] is False and e["reason"] == "reader stopped by the supervisor"
    r = sh(f"echo 'stop 1' > {server.agent('pool', 'ctl')}")
    assert r.returncode != 0
    assert "to run a number of instances: instances N" in server.events("error")[-1]["why"]


def test_a_pool_grows_under_a_burst_and_shrinks_when_idle(server: Server) -> None:
    """examples/burst: 200 jobs, a pool of 1..4; each job done exactly once, and
    scaling down delivers nothing twice."""
    example = server.root / "burst"
    shutil.copytree(EXAMPLES / "burst", example)
    server.config = example / "outheis.toml"
    server.mount()
    wait_for(lambda: server.status("worker")["instances"] == "1 (1..4)", timeout=20)
    t0 = time.monotonic()
    server.send("worker", "\n".join(str(i) for i in range(200)))
    got = answers(server, {str(i) for i in range(200)}, timeout=120)  # plain-text bodies
    took = time.monotonic() - t0
    assert sorted(int(job(m)) for m in got) == list(range(200))  # each exactly once
    ups = [e for e in server.events("scale") if e["instances"] > e["was"]]
    assert [e["instances"] for e in ups] == [2, 3, 4]
    assert {m["body"]["instance"] for m in got} == {0, 1, 2, 3}
    wait_for(lambda: server.status("worker")["instances"] == "1 (1..4)", timeout=60)
    downs = [e for e in server.events("scale") if e["instances"] < e["was"]]
    assert [e["instances"] for e in downs] == [3, 2, 1]
    assert all(e["reason"].startswith("instance idle on its inbox for ") for e in downs)
    assert not server.events("redeliver")
    assert len([e for e in server.events("deliver") if e["agent"] == "worker"]) == 200
    print(f"200 jobs in {took:.2f} s")
    # The example's own script does the same from a shell.
    r = sh(f"bash {example / 'burst.sh'} 40 {server.mp}", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "40 jobs in " in r.stdout and "instances 1 (1..4)" in r.stdout.splitlines()
