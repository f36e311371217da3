"""Attacks on identity by an agent's own processes, through a real mount.

An agent that could shed its label would be the operator; one that could take
another's label would read its messages. Each attack is a real process bound
to an agent with `outheisfs run`, and each test fails if the attack works.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import PY, Server, outheisfs, read_one, wait_for

# Sends the kernel's process-events connector group a made-up event, then tries
# to read what only the operator (or bob) may: prints OK or the errno's name.
FORGE = r"""
import errno, os, socket, struct, sys
kind, mount = sys.argv[1], sys.argv[2]
me = os.getpid()
if kind == "exit":  # "I have exited": drop my label, become the operator
    event = struct.pack("IIQ", 0x80000000, 0, 0) + struct.pack("IIII", me, me, 0, 0)
    target = os.path.join(mount, "log")
else:  # "bob's process forked me": take bob's label
    bob = int(sys.argv[3])
    event = struct.pack("IIQ", 0x00000001, 0, 0) + struct.pack("IIII", bob, bob, me, me)
    target = os.path.join(mount, "agents", "bob", "inbox")
cn = struct.pack("IIIIHH", 1, 1, 0, 0, len(event), 0) + event
msg = struct.pack("IHHII", 16 + len(cn), 3, 0, 0, 0) + cn
with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11) as s:
    s.bind((0, 0))
    try:
        s.sendto(msg, (0, 1))  # to every listener of the connector's group
    except OSError:
        pass  # the kernel's own copy may be refused; the listeners got theirs
try:
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
    os.close(fd)
    print("OK")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def forge(server: Server, *args: str) -> str:
    r = outheisfs("run", "spy", "--mount", str(server.mp), "--", PY, "-c", FORGE, *args)
    if r.returncode != 0 and not r.stdout.strip():
        # seccomp may refuse the socket itself: the attack cannot even start.
        assert "Operation not permitted" in r.stderr or "PermissionError" in r.stderr, r
        return "EPERM"
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_forged_exit_does_not_make_an_agent_the_operator(server: Server) -> None:
    server.write_config("[agents.spy]\n[agents.bob]\n")
    server.mount()
    assert forge(server, "exit", str(server.mp)) in ("ENOENT", "EPERM")


def test_a_forged_fork_does_not_lend_another_agents_label(server: Server) -> None:
    server.write_config("[agents.spy]\n[agents.bob]\n")
    server.mount()
    server.send("bob", "for bob only")
    bob = subprocess.Popen(
        [PY, "-m", "outheisfs", "run", "bob", "--mount", str(server.mp), "--", "sleep", "60"]
    )
    try:
        wait_for(lambda: server.status("bob")["pid"] not in ("-", ""), timeout=10)
        pid = server.status("bob")["pid"].split(",")[0]
        assert forge(server, "fork", str(server.mp), pid) in ("ENOENT", "EPERM")
    finally:
        bob.kill()
        bob.wait()
    assert read_one(server, "bob")["body"] == "for bob only"


# An agent process forks thousands of children whose main thread exits while
# another thread lives on; then does the same itself, and from its surviving
# thread execs `cat` on the root log, which only the operator may read.
FLOOD_C = r"""
#include <pthread.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static char *target;

static void *idle(void *arg) { (void)arg; usleep(100000); return NULL; }

static void *late(void *arg) {
    (void)arg;
    usleep(300000);
    execl("/bin/cat", "cat", target, (char *)NULL);
    _exit(127);
}

int main(int argc, char **argv) {
    target = argv[1];
    int n = atoi(argv[2]);
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0) {
            pthread_t t;
            pthread_create(&t, NULL, idle, NULL);
            pthread_exit(NULL);
        }
        if (p < 0) return 2;
    }
    while (wait(NULL) > 0) {}
    pthread_t t;
    pthread_create(&t, NULL, late, NULL);
    pthread_exit(NULL);
}
"""


def test_outliving_threads_never_lose_their_label(server: Server, tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the attacker (setup installs it)")
    src, exe = tmp_path / "flood.c", tmp_path / "flood"
    src.write_text(FLOOD_C)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(exe), str(src)], check=True)
    server.write_config("[agents.spy]\n")
    server.mount()
    # 4,096 children fill the old table of leaders that left; the attacker's own
    # entry then overflowed it and was cleared with the rest.
    r = outheisfs(
        "run",
        "spy",
        "--mount",
        str(server.mp),
        "--",
        str(exe),
        str(server.p("log")),
        "4096",
        timeout=120,
    )
    assert r.returncode != 0, "the agent read the operator's log"
    assert "No such file or directory" in r.stderr, r.stderr
