"""Confinement outside the mount: real processes, as agents, try what they must not.

The attacks are `tests/agents/attack.py`: each argument one attempt, the answer
one JSON object of errno names. Agents run by `outheisfs run` (whose output the
test reads directly) and supervised ones (a sleeper to attack, and attackers
whose output is their log in the state folder).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PY, Server, take, wait_for

ATTACK = Path(__file__).parent / "agents" / "attack.py"
EXAMPLES = Path(__file__).parents[2] / "examples"
SLEEPER = 'command = ["sleep", "1000"]\nrestart = "temporary"\n'


def attack(
    server: Server, name: str, *attempts: str, env: dict[str, str] | None = None
) -> dict[str, str]:
    r = subprocess.run(
        [
            PY,
            "-m",
            "outheisfs",
            "run",
            name,
            "--mount",
            str(server.mp),
            "--",
            PY,
            str(ATTACK),
            *attempts,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def pid_of(server: Server, name: str) -> int:
    return int(
        wait_for(
            lambda: (
                server.status(name)["pid"].split(",")[0].isdigit()
                and server.status(name)["pid"].split(",")[0]
            ),
            timeout=10,
        )
    )


@pytest.fixture
def tcp() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts and closes connections."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join()
        srv.close()


def test_an_agent_reaches_only_its_paths(server: Server) -> None:
    data = server.root / "data"
    data.mkdir()
    (data / "in.txt").write_text("in\n")
    server.write_config(
        f'[agents.a]\nfiles = {{ "{data}" = "rw" }}\n[agents.b]\n'
        f'[agents.c]\nfiles = {{ "{data}" = "r" }}\n'
    )
    server.mount()
    b = attack(server, "b", "write:" + str(Path(server.status("b")["tmpdir"]) / "mine"))
    assert b == {"write:" + str(server.state / "tmp" / "b" / "mine"): "ok"}
    events = server.state / "events.jsonl"
    got = attack(
        server,
        "a",
        "read:/root",
        f"read:{events}",
        f"read:{server.state}",
        f"read:{server.state / 'tmp' / 'b'}",
        f"read:{server.state / 'tmp' / 'b' / 'mine'}",
        f"write:{server.root / 'outside'}",
        "write:/tmp/outheisfs-confine-test",
        f"write:{data / 'out.txt'}",
        f"read:{data / 'in.txt'}",
        f"read:{server.config}",
        "read:/etc/hostname",
        "read:/proc/self/status",
        "write:/dev/null",
        f"read:{server.agent('a', 'ctl')}",
    )
    assert got == {
        "read:/root": "EACCES",
        f"read:{events}": "EACCES",
        f"read:{server.state}": "EACCES",
        f"read:{server.state / 'tmp' / 'b'}": "EACCES",
        f"read:{server.state / 'tmp' / 'b' / 'mine'}": "EACCES",
        f"write:{server.root / 'outside'}": "EACCES",
        "write:/tmp/outheisfs-confine-test": "EACCES",
        f"write:{data / 'out.txt'}": "ok",
        f"read:{data / 'in.txt'}": "ok",
        f"read:{server.config}": "ok",
        "read:/etc/hostname": "ok",
        "read:/proc/self/status": "ok",
        "write:/dev/null": "ok",
        f"read:{server.agent('a', 'ctl')}": "ok",
    }
    assert not (server.root / "outside").exists()
    # `r` reads but does not write.
    c = attack(server, "c", f"read:{data / 'in.txt'}", f"write:{data / 'c.txt'}")
    assert c == {f"read:{data / 'in.txt'}": "ok", f"write:{data / 'c.txt'}": "EACCES"}
    status = server.status("a")
    assert status["confined"] == "full"
    assert status["files"] == f"{data}:rw"
    assert status["net"] == "-"
    assert status["tmpdir"] == str(server.state / "tmp" / "a")
    # The operator is never confined.
    assert os.listdir("/root") is not None
    assert events.read_text()


def test_supervised_agents_are_confined_and_get_their_own_tmpdir(server: Server) -> None:
    server.write_config(
        f'[agents.probe]\ncommand = ["{PY}", "{ATTACK}", "read:/root", "write:$TMPDIR/x"]\n'
        'restart = "temporary"\n'
    )
    server.mount()
    out = server.state / "output" / "probe.log"
    wait_for(lambda: out.exists() and out.read_text().strip(), timeout=10)
    text = out.read_text().split(" ", 4)[4]  # after time, instance, pid and stream
    assert json.loads(text) == {"read:/root": "EACCES", "write:$TMPDIR/x": "ok"}
    # TMPDIR in the environment is the private folder, kept per agent.
    assert (server.root / "TMPDIR").exists() is False
    assert (server.state / "tmp" / "probe").is_dir()


def test_files_at_or_below_the_state_folder_are_a_config_error(server: Server) -> None:
    server.write_config(f'[agents.a]\nfiles = {{ "{server.state / "vault"}" = "r" }}\n')
    r = server.mount(check=False)
    assert r.returncode == 2
    assert "agents.a.files" in r.stderr and "state folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(server.mp)


def test_tcp_only_with_net(server: Server, tcp: int) -> None:
    server.write_config(
        f'[agents.none]\n[agents.port]\nnet = ["connect:{tcp}"]\n'
        '[agents.other]\nnet = ["connect:1"]\n'
        '[agents.all]\nnet = "all"\n'
    )
    server.mount()
    target = f"connect:127.0.0.1:{tcp}"
    assert attack(server, "none", target, "bind:0", "udp", "unix", "socketpair") == {
        target: "EACCES",
        "bind:0": "EACCES",
        "udp": "EACCES",
        "unix": "EACCES",
        "socketpair": "ok",
    }
    assert attack(server, "port", target, "udp") == {target: "ok", "udp": "EACCES"}
    assert attack(server, "other", target) == {target: "EACCES"}
    assert attack(server, "all", target, "bind:0", "udp", "unix") == {
        target: "ok",
        "bind:0": "ok",
        "udp": "ok",
        "unix": "ok",
    }
    assert server.status("port")["net"] == f"connect:{tcp}"
    assert server.status("all")["net"] == "all"
    # The operator is not confined.
    socket.create_connection(("127.0.0.1", tcp)).close()


def test_no_agent_reaches_another_process(server: Server) -> None:
    server.write_config(f'[agents.victim]\n{SLEEPER}[agents.a]\nnet = "all"\n')
    server.mount()
    victim = pid_of(server, "victim")
    operator = subprocess.Popen(["sleep", "1000"])
    try:
        tries = [
            f"{what}:{pid}"
            for pid in (victim, operator.pid, server.pid)
            for what in ("ptrace", "pidfd_getfd", "vm_readv", "mem", "environ", "signal")
        ]
        got = attack(server, "a", *tries)
        for t in tries:
            assert got[t] in ("EPERM", "EACCES"), (t, got[t])
        # Not even an agent's own other instance (each runs in its own domain).
        assert os.path.exists(f"/proc/{victim}") and operator.poll() is None
        # The operator may (it is not confined).
        os.kill(victim, 0)
        with open(f"/proc/{victim}/environ", "rb") as f:
            assert f.read(1)
    finally:
        operator.kill()
        operator.wait()


def test_no_inotify_and_no_process_event_sockets(server: Server) -> None:
    server.write_config('[agents.a]\n[agents.all]\nnet = "all"\n')
    server.mount()
    tries = [
        f"inotify:{server.mp}",
        f"inotify:{server.mp / 'agents'}",
        "inotify:/etc",
        "netlink:11",
    ]
    assert attack(server, "a", *tries) == {
        t: ("EPERM" if "inotify" in t else "EACCES") for t in tries
    }
    got = attack(server, "all", "netlink:11", "netlink:0")
    assert got == {"netlink:11": "EACCES", "netlink:0": "ok"}
    # The operator is not confined.
    socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11).close()


def test_no_io_uring(server: Server) -> None:
    """A ring makes sockets without socket(2) (IORING_OP_SOCKET), past the filter's
    socket rules: UDP and UNIX without `net`, a connector socket with any `net`."""
    server.write_config('[agents.a]\n[agents.all]\nnet = "all"\n')
    server.mount()
    udp, unix, connector = "uring_socket:2,2,0", "uring_socket:1,1,0", "uring_socket:16,2,11"
    assert attack(server, "a", udp, unix, connector) == dict.fromkeys(
        (udp, unix, connector), "ENOSYS"
    )
    assert attack(server, "all", connector) == {connector: "ENOSYS"}
    # The operator is not confined.
    r = subprocess.run([PY, str(ATTACK), udp], capture_output=True, text=True, timeout=30)
    assert json.loads(r.stdout) == {udp: "ok"}, r.stderr


def test_tail_f_follows_a_file_of_the_mount_for_an_agent(server: Server) -> None:
    server.write_config('[agents.a]\nsend = ["user"]\n')
    server.mount()
    tail = subprocess.Popen(
        [
            PY,
            "-m",
            "outheisfs",
            "run",
            "a",
            "--mount",
            str(server.mp),
            "--",
            "tail",
            "-n0",
            "-f",
            "outbox",
        ],
        cwd=server.mp / "agents" / "a",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: server.status("a")["pid"] != "-", timeout=10)
        time.sleep(0.3)  # tail has read to the end (nothing to await: it prints nothing yet)
        with open(server.agent("a", "outbox"), "w") as f:
            f.write('{"to": "user", "body": "followed"}\n')
        assert tail.stdout is not None
        line = tail.stdout.readline()
        assert json.loads(line)["body"] == "followed"
    finally:
        tail.kill()
        tail.wait()
        assert tail.stderr is not None
        tail.stderr.close()
        assert tail.stdout is not None
        tail.stdout.close()
    take(server, "user", 1)


def _mount_env(server: Server, abi: str) -> subprocess.CompletedProcess[str]:
    assert server.config is not None
    return subprocess.run(
        [
            PY,
            "-m",
            "outheisfs",
            "mount",
            str(server.mp),
            "--state",
            str(server.state),
            "--config",
            str(server.config),
        ],
        cwd=server.root,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, OUTHEISFS_LANDLOCK_ABI=abi),
    )


def test_required_refuses_a_kernel_without_the_abi(server: Server) -> None:
    server.write_config("[agents.a]\n")
    r = _mount_env(server, "5")
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert "Landlock ABI 6" in line and "ABI 5" in line and 'confine = "best-effort"' in line
    assert not os.path.ismount(server.mp)
    r = _mount_env(server, "0")
    assert r.returncode == 1 and "lacks Landlock" in r.stderr


def test_best_effort_applies_what_the_kernel_has(server: Server) -> None:
    server.write_config('confine = "best-effort"\n[agents.a]\n[agents.victim]\n' + SLEEPER)
    r = _mount_env(server, "3")
    assert r.returncode == 0, r.stderr
    server.pids.append(server.pid)
    victim = pid_of(server, "victim")
    env = dict(os.environ, OUTHEISFS_LANDLOCK_ABI="3")
    got = attack(server, "a", "read:/root", f"signal:{victim}", "connect:127.0.0.1:1", env=env)
    # Files are ruled at ABI 3; signals (ABI 6) and TCP (ABI 4) are not.
    assert got["read:/root"] == "EACCES"
    assert got[f"signal:{victim}"] == "ok"
    assert got["connect:127.0.0.1:1"] == "ECONNREFUSED"
    status = server.status("a")
    assert status["confined"] == "partial" and status["net"] == "all"


def test_confine_off(server: Server) -> None:
    server.write_config('confine = "off"\n[agents.a]\n')
    server.mount()
    assert attack(server, "a", "read:/root", "netlink:11", "inotify:/etc") == {
        "read:/root": "ok",
        "netlink:11": "EACCES",  # the seccomp filter stays: it guards the server itself
        "inotify:/etc": "EPERM",
    }
    assert server.status("a")["confined"] == "no"


def test_the_server_and_the_operator_are_not_confined(server: Server) -> None:
    server.write_config(f"[agents.victim]\n{SLEEPER}")
    server.mount()
    victim = pid_of(server, "victim")

    assert status(victim, "Seccomp") == 2
    assert status(server.pid, "Seccomp") == 0
    assert status(os.getpid(), "Seccomp") == 0
    # Root agents lose the capabilities that reach past every rule; the operator keeps them.
    sys_module, sys_admin, bpf = 1 << 16, 1 << 21, 1 << 39
    for cap in (sys_module, sys_admin, bpf):
        assert not status(victim, "CapBnd") & cap and not status(victim, "CapEff") & cap
        assert status(os.getpid(), "CapBnd") & cap
    assert status(victim, "NoNewPrivs") == 1


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            v = line.split()[1]
            return int(v, 16) if key.startswith("Cap") else int(v)
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def test_example_fetcher_with_and_without_net(server: Server) -> None:
    """examples/net.toml: `fetcher` may connect to one port, `offline` may not."""
    body = b"hello from the test server\n"
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        for _ in range(1):
            conn, _ = srv.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    text = (EXAMPLES / "net.toml").read_text()
    text = text.replace("./agents/", f"{EXAMPLES}/agents/").replace("8000", str(port))
    server.write_config(text)
    server.mount()
    url = f"http://127.0.0.1:{port}/"
    server.send("fetcher", json.dumps({"body": url}))
    (reply,) = take(server, "user", 1)
    assert reply["from"] == "fetcher"
    assert reply["body"] == {"url": url, "status": 200, "text": body.decode()}
    server.send("offline", json.dumps({"body": url}))
    (reply,) = take(server, "user", 1)
    assert reply["from"] == "offline"
    assert "Permission denied" in reply["body"]["error"]
    log = server.state / "output" / "offline.log"
    assert f"fetch {url}: refused: [Errno 13] Permission denied" in log.read_text()
    t.join(timeout=10)
    srv.close()
