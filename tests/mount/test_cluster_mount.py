"""Several mounts, one system: real mounts on one machine against three `nats-server`s.

Each host is its own mount (its own mountpoint, state folder and `--host`), all
sharing one stream of a `LocalCluster`; the tests use shell tools and real
processes, as users and agents do.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from outheisfs.cluster.engine import ConnectOptions, open_engine
from outheisfs.cluster.local import LocalCluster

from .cluster_helpers import ThreadProxy
from .conftest import (
    Server,
    _alive,
    outheisfs,
    read_nonblock,
    read_one,
    sh,
    take,
    wait_for,
)

pytestmark = pytest.mark.cluster

# Echoes each message with the name of the host it runs on (its mount's folder);
# on h1, "hold" is held in flight for ever.
ECHO = """\
import json, os, time
host = os.path.basename(os.path.dirname(os.environ["OUTHEIS_MOUNT"]))
with open("inbox") as inbox, open("outbox", "w") as out:
    for line in inbox:
        m = json.loads(line)
        while m["body"] == "hold" and host == "h1":
            time.sleep(60)
        echo = {"echo": m["body"], "host": host}
        if m["attempt"] > 1:
            echo["attempt"] = m["attempt"]
        out.write(json.dumps({"body": echo}) + "\\n")
        out.flush()
"""

# Asks echo what the operator sent it, and passes the answer on to the operator.
ASKER = """\
import json, os
host = os.path.basename(os.path.dirname(os.environ["OUTHEIS_MOUNT"]))
with open("inbox") as inbox:
    for line in inbox:
        m = json.loads(line)
        if m["from"] == "user":
            to, body = "echo", m["body"]
        else:
            to, body = "user", {"asker": host, **m["body"]}
        with open(f"../{to}/inbox", "w") as f:
            f.write(json.dumps({"body": body}) + "\\n")
"""


class Hosts:
    """Mounts on one LocalCluster; each with its own folder."""

    def __init__(self, root: Path, cluster: LocalCluster, host_timeout: float = 5.0) -> None:
        self.root = root
        self.cluster = cluster
        self.host_timeout = host_timeout
        self.mounts: dict[str, Server] = {}
        (root / "echo.py").write_text(ECHO)
        (root / "asker.py").write_text(ASKER)
        self.echo_hosts = ["h1", "h2"]
        self.servers = cluster.urls
        self.extra = ""

    def config(self) -> str:
        return (
            f'[cluster]\nservers = {json.dumps(self.servers)}\nstream = "outheis"\n'
            f"replicas = 3\nhost_timeout = {self.host_timeout}\n{self.extra}\n"
            f'[agents.echo]\ncommand = ["python3", "{self.root / "echo.py"}"]\n'
            f"host = {json.dumps(self.echo_hosts)}\n\n"
            f'[agents.asker]\ncommand = ["python3", "{self.root / "asker.py"}"]\n'
            'host = "h1"\nsend = ["*"]\n\n[agents.worker]\n'
        )

    def mount(self, name: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        s = self.mounts.get(name)
        if s is None:
            folder = self.root / name
            folder.mkdir()
            s = self.mounts[name] = Server(folder)
            s.write_config(self.config())
        return s.mount("--host", name, check=check)

    def cleanup(self) -> None:
        for s in self.mounts.values():
            s.cleanup()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with LocalCluster(tmp_path / "nats") as cluster:
        h = Hosts(tmp_path, cluster)
        try:
            yield h
        finally:
            h.cleanup()


def log_of(s: Server) -> list[dict[str, Any]]:
    return [json.loads(line) for line in s.p("log").read_text().splitlines()]


def test_a_message_written_on_one_host_is_read_on_another(hosts: Hosts) -> None:
    hosts.mount("h1")
    hosts.mount("h2")
    h1, h2 = hosts.mounts["h1"], hosts.mounts["h2"]
    r = sh(f"echo hello from h1 > {h1.agent('worker', 'inbox')}")
    assert r.returncode == 0, r.stderr
    got = read_one(h2, "worker")
    assert got["body"] == "hello from h1" and got["from"] == "user"
    # The same log on both hosts: same seqs, same events, same order.
    wait_for(lambda: log_of(h1) == log_of(h2), timeout=10)
    seqs = [e["seq"] for e in log_of(h1)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e["type"] for e in log_of(h1)].count("deliver") == 1
    # the cache in each state folder holds the same events
    assert h1.events() == log_of(h1)


def test_one_delivery_per_message_across_hosts(hosts: Hosts) -> None:
    hosts.mount("h1")
    hosts.mount("h2")
    h1, h2 = hosts.mounts["h1"], hosts.mounts["h2"]
    n = 40
    lines = "".join(f"m{i}\n" for i in range(n))
    with open(h1.agent("worker", "inbox"), "w") as f:
        f.write(lines)
    # readers on both hosts at once, each taking until the queue is empty
    script = 'while m=$(timeout 3 head -n1 {}); [ -n "$m" ]; do echo "$m"; done'
    procs = [
        subprocess.Popen(
            ["bash", "-c", script.format(s.agent("worker", "inbox"))],
            stdout=subprocess.PIPE,
            text=True,
        )
        for s in (h1, h2, h1, h2)
    ]
    bodies: list[str] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        bodies += [json.loads(line)["body"] for line in out.splitlines()]
    assert sorted(bodies) == sorted(f"m{i}" for i in range(n))  # each once
    wait_for(lambda: log_of(h1) == log_of(h2), timeout=10)


def test_a_second_mount_with_a_host_name_in_use_is_refused(hosts: Hosts) -> None:
    hosts.mount("h1")
    (hosts.root / "other").mkdir()
    other = hosts.mounts["other"] = Server(hosts.root / "other")
    other.write_config(hosts.config())
    r = other.mount("--host", "h1", check=False)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "'h1'" in r.stderr
    assert not os.path.ismount(other.mp)


def test_the_agent_runs_on_its_first_host_and_fails_over(hosts: Hosts) -> None:
    hosts.mount("h1")
    hosts.mount("h2")
    h1, h2 = hosts.mounts["h1"], hosts.mounts["h2"]
    wait_for(lambda: h1.status("echo")["state"] == "running", timeout=10)
    assert h2.status("echo")["state"] == "stopped"
    assert h1.status("echo")["host"] == "h1" and h2.status("echo")["host"] == "h1"
    r = sh(f"echo start > {h2.agent('echo', 'ctl')}")  # one runner: not a second on h2
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert h2.status("echo")["state"] == "stopped"
    h2.send("echo", "one")
    assert read_one(h2, "user")["body"] == {"echo": "one", "host": "h1"}
    # h1 killed while its agent holds a message: after host_timeout its agent runs
    # on h2 and gets the message again (attempt 2); one sent meanwhile follows.
    h2.send("echo", "hold")
    wait_for(lambda: h2.status("echo")["inflight"] == "1", timeout=10)
    echo_pid = int(h1.status("echo")["pid"])
    h1.kill9()
    wait_for(lambda: not _alive(echo_pid), timeout=10)  # it dies with its server
    h2.send("echo", "two")
    wait_for(lambda: h2.status("echo")["state"] == "running", timeout=20)
    assert h2.status("echo")["host"] == "h2"
    assert read_one(h2, "user")["body"] == {"echo": "hold", "host": "h2", "attempt": 2}
    assert read_one(h2, "user")["body"] == {"echo": "two", "host": "h2"}
    gone = [e for e in log_of(h2) if e["type"] == "host-gone"]
    assert [e["host"] for e in gone] == ["h1"]
    # h1 mounted again (once its lease lapsed) does not take the agent back
    wait_for(lambda: hosts.mount("h1", check=False).returncode == 0, timeout=20, interval=0.5)
    wait_for(lambda: h1.status("echo")["host"] == "h2", timeout=10)
    assert h1.status("echo")["state"] == "stopped"
    assert outheisfs("umount", str(h1.mp)).returncode == 0


def test_a_mount_that_reaches_no_server_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mp").mkdir()
    (tmp_path / "c.toml").write_text('[cluster]\nservers = ["nats://127.0.0.1:9"]\n')
    r = outheisfs(
        "mount", str(tmp_path / "mp"), "--config", str(tmp_path / "c.toml"), "--host", "h1",
        "--state", str(tmp_path / "state"),
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "cannot reach the NATS servers" in r.stderr
    assert not os.path.ismount(tmp_path / "mp")


def test_a_pipeline_across_three_hosts_and_replay_equals_the_live_state(hosts: Hosts) -> None:
    """asker runs on h1, echo on h2, the operator reads on h3."""
    hosts.echo_hosts = ["h2"]
    for name in ("h1", "h2", "h3"):
        hosts.mount(name)
    h1, h2, h3 = (hosts.mounts[n] for n in ("h1", "h2", "h3"))
    for s in (h1, h2, h3):  # every tree shows every agent with its host
        wait_for(lambda s=s: "echo running" in s.p("ctl").read_text() or s is not h2, 10)
        rows = {line.split()[0]: line.split() for line in s.p("ctl").read_text().splitlines()}
        assert rows["asker"][5] == "h1" and rows["echo"][5] == "h2" and rows["worker"][5] == "-"
    r = sh(f"echo question > {h3.agent('asker', 'inbox')} && head -n1 {h3.agent('user', 'inbox')}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["body"] == {"asker": "h1", "echo": "question", "host": "h2"}
    for s in (h1, h2):
        s.send("worker", f"left for later from {s.root.name}")
    wait_for(lambda: log_of(h1) == log_of(h2) == log_of(h3), timeout=10)
    r = outheisfs("replay", "--config", str(h3.config), "--json")
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    assert state["seq"] == log_of(h3)[-1]["seq"]
    for name in ("asker", "echo", "user", "worker"):
        live = h3.status(name)
        got = state["agents"][name]
        assert (len(got["queued"]), len(got["inflight"]), got["delivered"]) == (
            int(live["queued"]),
            int(live["inflight"]),
            int(live["delivered"]),
        ), name
    assert sorted(m["body"] for m in state["agents"]["worker"]["queued"]) == [
        "left for later from h1",
        "left for later from h2",
    ]


WRITER = """\
import sys, time
inbox, tag, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
    body = f"{tag}-{i}"
    try:
        with open(inbox, "w") as f:
            f.write(body + "\\n")
        print("ok", body, flush=True)
    except OSError as e:
        print("fail", body, e.errno, flush=True)
    i += 1
"""


def test_a_nats_server_killed_mid_traffic_loses_and_doubles_nothing(hosts: Hosts) -> None:
    """Four writers on two hosts; a NATS server SIGKILLed and started again."""
    # The engine elects a new leader while the victim is down; on a loaded machine
    # its key-value store may answer no lease renewal for longer than 5 s, and a
    # host that cannot renew within host_timeout gives its name up (its mount ends).
    hosts.host_timeout = 20.0
    hosts.mount("h1")
    hosts.mount("h2")
    h1, h2 = hosts.mounts["h1"], hosts.mounts["h2"]
    script = hosts.root / "writer.py"
    script.write_text(WRITER)
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(s.agent("worker", "inbox")),
                f"{s.root.name}w{i}",
                "6",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for s in (h1, h2)
        for i in range(2)
    ]
    time.sleep(1.5)  # traffic first: the kill falls in the middle of it
    leader = hosts.cluster.leader()
    assert leader is not None
    victim = int(leader.removeprefix("n")) - 1  # the JetStream meta leader
    hosts.cluster.kill(victim)
    time.sleep(2)
    hosts.cluster.start(victim)
    ok: set[str] = set()
    failed: set[str] = set()
    for w in writers:
        out, _ = w.communicate(timeout=60)
        assert w.returncode == 0
        for line in out.splitlines():
            word, body = line.split()[:2]
            (ok if word == "ok" else failed).add(body)
    assert len(ok) > 20
    got = [m["body"] for m in take(h2, "worker", len(ok), timeout=30)]
    extra = read_nonblock(h1, "worker")
    while extra is not None:  # only writes that failed may be stored as well
        got.append(json.loads(extra)["body"])
        extra = read_nonblock(h1, "worker")
    lost = ok - set(got)
    doubled = len(got) - len(set(got))
    invented = set(got) - ok - failed
    assert (lost, doubled, invented) == (set(), 0, set())
    print(f"acknowledged {len(ok)}, failed {len(failed)}: 0 lost, 0 doubled, 0 invented")


def test_the_engine_out_of_reach_writes_block_then_fail_and_the_host_catches_up(
    hosts: Hosts,
) -> None:
    proxies = [ThreadProxy(s.client) for s in hosts.cluster.servers]
    for p in proxies:
        p.start()
    hosts.host_timeout = 10.0  # longer than the cut: h1 keeps its name
    hosts.extra = "write_timeout = 3.0"
    hosts.servers = [p.url for p in proxies]
    try:
        hosts.mount("h1")
        hosts.servers = hosts.cluster.urls
        hosts.mount("h2")
        h1, h2 = hosts.mounts["h1"], hosts.mounts["h2"]
        h1.send("worker", "before")
        for p in proxies:
            p.stop()

        written = maybe = 0  # non-blocking writes before the cut was seen: stored, failed

        def eagain() -> bool:
            nonlocal written, maybe
            fd = os.open(h1.agent("worker", "inbox"), os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, b"not now\n")
                written += 1
                return False
            except BlockingIOError:
                return True
            except OSError as e:  # sent before the cut was seen: EIO after the limit
                assert e.errno == errno.EIO
                maybe += 1
                return False
            finally:
                os.close(fd)

        wait_for(eagain, timeout=10, interval=0.1)
        fd = os.open(h1.agent("worker", "inbox"), os.O_WRONLY)
        t0 = time.monotonic()
        with pytest.raises(OSError) as err:
            os.write(fd, b"in vain\n")
        waited = time.monotonic() - t0
        os.close(fd)
        assert err.value.errno == errno.EIO and 2.5 < waited < 20
        h2.send("worker", "while away")
        log1 = h1.p("log").read_text()  # reads keep serving what is known
        assert "before" in log1 and "while away" not in log1
        for p in proxies:
            p.start()
        wait_for(lambda: "while away" in h1.p("log").read_text(), timeout=20, interval=0.1)
        h1.send("worker", "after")
        got = [json.loads(m)["body"] for m in iter(lambda: read_nonblock(h2, "worker"), None)]
        assert written <= got.count("not now") <= written + maybe
        got = [b for b in got if b != "not now"]
        assert sorted(set(got)) == sorted(got)  # none twice
        assert {"before", "while away", "after"} <= set(got)
        assert set(got) <= {"before", "while away", "after", "in vain"}
    finally:
        for p in proxies:
            p.stop()


def test_the_example_runs_a_pipeline_and_a_failover_and_cleans_up() -> None:
    demo = Path(__file__).parents[2] / "examples" / "cluster" / "demo.py"
    r = subprocess.run([sys.executable, str(demo)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"echo":"hello","host":"h1"' in r.stdout
    assert '"echo":"are you there","host":"h2"' in r.stdout
    assert "cleaned up" in r.stdout


def test_a_host_that_stops_cleanly_hands_its_agents_over_at_once(hosts: Hosts) -> None:
    hosts.host_timeout = 60.0  # no heartbeat timeout could explain the move
    hosts.mount("h1")
    hosts.mount("h2")
    h1, h2 = hosts.mounts["h1"], hosts.mounts["h2"]
    wait_for(lambda: h1.status("echo")["state"] == "running", timeout=10)
    assert h1.umount().returncode == 0
    wait_for(lambda: h2.status("echo")["state"] == "running", timeout=15)
    assert h2.status("echo")["host"] == "h2"
    h2.send("echo", "still here")
    assert read_one(h2, "user")["body"] == {"echo": "still here", "host": "h2"}
    umounts = [e for e in log_of(h2) if e["type"] == "umount"]
    assert [e["host"] for e in umounts] == ["h1"]
    assert not [e for e in log_of(h2) if e["type"] == "host-gone"]
    # its name is free at once
    assert hosts.mount("h1", check=False).returncode == 0


def test_outheisfs_run_binds_on_its_host(hosts: Hosts) -> None:
    hosts.mount("h1")
    hosts.mount("h2")
    h1, h2 = hosts.mounts["h1"], hosts.mounts["h2"]
    h1.send("worker", "for a bound process on h2")
    inbox = h2.agent("worker", "inbox")
    r = subprocess.run(
        [sys.executable, "-m", "outheisfs", "run", "worker", "--mount", str(h2.mp), "--",
         "head", "-n1", str(inbox)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["body"] == "for a bound process on h2"
    wait_for(lambda: log_of(h1) == log_of(h2), timeout=10)
    (deliver,) = [e for e in log_of(h1) if e["type"] == "deliver"]
    assert deliver["agent"] == "worker" and deliver["host"] == "h2"
    binds = [e for e in log_of(h1) if e["type"] == "ctl" and e["command"].startswith("bind")]
    assert [(e["agent"], e["host"]) for e in binds] == [("worker", "h2")]


def test_an_unreadable_event_in_the_stream_is_an_error_event_and_nothing_stops(
    hosts: Hosts,
) -> None:
    hosts.mount("h1")
    hosts.mount("h2")
    h1, h2 = hosts.mounts["h1"], hosts.mounts["h2"]

    async def publish_garbage() -> None:
        async with open_engine(ConnectOptions(hosts.cluster.urls), "outheis", 3) as e:
            await e.publish([("garbage-1", b"not json"), ("garbage-2", b'{"type":"x"}')])

    trio.run(publish_garbage)
    h1.send("worker", "after the garbage")
    assert read_one(h2, "worker")["body"] == "after the garbage"
    wait_for(lambda: log_of(h1) == log_of(h2), timeout=10)
    errors = [e for e in log_of(h1) if e["type"] == "error" and "unreadable" in e["why"]]
    assert len(errors) == 2
    assert h1.umount().returncode == 0  # and the cache replays at the next start
    assert hosts.mount("h1", check=False).returncode == 0
    assert log_of(h1)[: len(log_of(h2))] == log_of(h2)
