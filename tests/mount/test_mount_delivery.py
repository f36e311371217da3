"""At-least-once delivery through a real mount: signals, acks, dying readers [SPEC §4.3]."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import Server, parked, read_one, sh, wait_for


def deliveries(server: Server) -> list[tuple[str, int]]:
    return [(e["id"], e["attempt"]) for e in server.events("deliver")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_blocked_cat_dies_promptly_and_takes_nothing(mounted: Server, sig: int) -> None:
    with subprocess.Popen(["cat", str(mounted.agent("echo", "inbox"))]) as cat:
        wait_for(lambda: parked(cat.pid))
        assert cat.poll() is None
        t0 = time.monotonic()
        cat.send_signal(sig)
        cat.wait(timeout=5)
        assert time.monotonic() - t0 < 0.3
    assert mounted.events("deliver") == []
    mounted.send("echo", "after")
    msg = read_one(mounted, "echo")
    assert msg["body"] == "after" and msg["attempt"] == 1


def test_python_reader_gets_eintr_runs_its_handler_and_retries(mounted: Server) -> None:
    code = f"""
import os, signal, sys, time
hits = []
def hit(*a):
    hits.append(time.monotonic())
    print("hit", flush=True)
signal.signal(signal.SIGUSR1, hit)
print("ready", flush=True)
fd = os.open({str(mounted.agent("echo", "inbox"))!r}, os.O_RDONLY)
data = os.read(fd, 4096)   # PEP 475: retried after the handler ran
print(len(hits), data.decode().strip(), flush=True)
"""
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        wait_for(lambda: parked(p.pid))
        p.send_signal(signal.SIGUSR1)
        assert p.stdout.readline().strip() == "hit"  # the read gave way to the handler
        wait_for(lambda: parked(p.pid))  # and is parked again
        assert p.poll() is None
        mounted.send("echo", "late")
        out = p.stdout.readline().split(" ", 1)
        p.wait(timeout=5)
    assert out[0] == "1"
    assert json.loads(out[1])["body"] == "late"


def test_ctrl_c_latency_is_under_200ms(mounted: Server) -> None:
    code = f"""
import os, signal, time, sys
fd = os.open({str(mounted.agent("echo", "inbox"))!r}, os.O_RDONLY)
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.read(fd, 10)
"""
    worst = 0.0
    for _ in range(5):
        with subprocess.Popen([sys.executable, "-c", code]) as p:
            wait_for(lambda p=p: parked(p.pid), timeout=5)
            t0 = time.monotonic()
            p.send_signal(signal.SIGINT)
            p.wait(timeout=5)
            worst = max(worst, time.monotonic() - t0)
            assert p.returncode == -signal.SIGINT
    assert worst < 0.2, worst


def test_reader_killed_holding_a_message_gets_it_again(mounted: Server) -> None:
    mounted.send("echo", "precious")
    script = f"exec 3< {mounted.agent('echo', 'inbox')}; IFS= read -r line <&3; echo got; sleep 30"
    with subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None and p.stdout.readline() == "got\n"
        assert mounted.status("echo")["inflight"] == "1"
        p.kill()
        p.wait()
    wait_for(lambda: mounted.status("echo")["queued"] == "1")
    redo = mounted.events("redeliver")
    assert len(redo) == 1 and "signal 9" in redo[0]["reason"]
    msg = read_one(mounted, "echo")
    assert msg["body"] == "precious" and msg["attempt"] == 2


def test_reader_exiting_nonzero_gets_it_again(mounted: Server) -> None:
    mounted.send("echo", "task")
    r = sh(f"exec 3< {mounted.agent('echo', 'inbox')}; IFS= read -r line <&3; exit 3")
    assert r.returncode == 3
    wait_for(lambda: mounted.status("echo")["queued"] == "1")
    assert "status 3" in mounted.events("redeliver")[0]["reason"]
    assert read_one(mounted, "echo")["attempt"] == 2


def test_python_agent_crashing_after_closing_gets_it_again(mounted: Server) -> None:
    # `with open(...)` closes the inbox while the exception unwinds, before exit.
    mounted.send("echo", "job")
    code = f"""
import json
with open({str(mounted.agent("echo", "inbox"))!r}) as inbox:
    msg = json.loads(inbox.readline())
    raise RuntimeError("cannot handle " + msg["body"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "cannot handle job" in r.stderr
    wait_for(lambda: mounted.status("echo")["queued"] == "1", timeout=3)
    msg = read_one(mounted, "echo")
    assert msg["body"] == "job" and msg["attempt"] == 2


def test_python_agent_closing_and_exiting_zero_acks(mounted: Server) -> None:
    mounted.send("echo", "done right")
    code = f"""
with open({str(mounted.agent("echo", "inbox"))!r}) as inbox:
    inbox.readline()
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=10)
    wait_for(lambda: mounted.status("echo")["inflight"] == "0", timeout=3)
    assert mounted.status("echo")["queued"] == "0"
    assert len(mounted.events("ack")) == 1 and mounted.events("redeliver") == []


def test_next_read_acks_the_previous(mounted: Server) -> None:
    mounted.send("echo", "one\ntwo")
    fd = os.open(mounted.agent("echo", "inbox"), os.O_RDONLY)
    try:
        first = json.loads(os.read(fd, 4096))
        assert mounted.status("echo")["inflight"] == "1"
        assert mounted.events("ack") == []
        os.read(fd, 4096)
        assert [e["id"] for e in mounted.events("ack")] == [first["id"]]
    finally:
        os.close(fd)


def test_ack_through_ctl(mounted: Server) -> None:
    mounted.send("echo", "a\nb")
    fd = os.open(mounted.agent("echo", "inbox"), os.O_RDONLY)
    fd2 = os.open(mounted.agent("echo", "inbox"), os.O_RDONLY)
    try:
        a = json.loads(os.read(fd, 4096))
        b = json.loads(os.read(fd2, 4096))
        assert mounted.status("echo")["inflight"] == "2"
        sh(f"echo 'ack {a['id']}' > {mounted.agent('echo', 'ctl')}").check_returncode()
        assert mounted.status("echo")["inflight"] == "1"
        sh(f"echo ack > {mounted.agent('echo', 'ctl')}").check_returncode()
        assert mounted.status("echo")["inflight"] == "0"
        assert sorted(e["id"] for e in mounted.events("ack")) == sorted([a["id"], b["id"]])
        r = sh(f"echo 'ack {a['id']}' > {mounted.agent('echo', 'ctl')}")
        assert r.returncode != 0 and "Invalid argument" in r.stderr
    finally:
        os.close(fd)
        os.close(fd2)
    assert mounted.events("redeliver") == []  # closing after the acks changes nothing


def test_dead_letter_after_max_attempts(server: Server) -> None:
    server.write_config("max_attempts = 2\n[agents.echo]\n")
    server.mount()
    server.send("echo", "poison")
    for attempt in (1, 2):
        r = sh(f'exec 3< {server.agent("echo", "inbox")}; IFS= read -r l <&3; echo "$l"; exit 1')
        assert json.loads(r.stdout)["attempt"] == attempt
    wait_for(lambda: server.status("echo")["dead"] == "1")
    assert server.status("echo")["queued"] == "0"
    dead = server.events("dead")
    assert len(dead) == 1 and dead[0]["attempts"] == 2
    fd = os.open(server.agent("echo", "inbox"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.read(fd, 100)
    finally:
        os.close(fd)


def test_competing_readers_each_message_once(mounted: Server) -> None:
    # Note: bash ignores `read -t` on regular files, so readers stop on a sentinel.
    n = 60
    mounted.send("worker", "\n".join([*(str(i) for i in range(n)), "stop", "stop", "stop"]))
    script = f"""
exec 3< {mounted.agent("worker", "inbox")}
while IFS= read -r line <&3; do
  body=$(jq -r .body <<<"$line")
  [ "$body" = stop ] && exit 0
  echo "$body"
done
"""
    procs = [
        subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=30)
        outs.append(out.split())
    got = sorted(int(x) for out in outs for x in out)
    assert got == list(range(n))
    assert all(outs), "every reader got some of the work"
    wait_for(lambda: mounted.status("worker")["inflight"] == "0")
    assert mounted.events("redeliver") == []
