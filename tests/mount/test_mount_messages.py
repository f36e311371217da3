"""Sending and reading messages through a real mount, with shell tools [SPEC §4.1-§4.3]."""

from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import Server, parked, read_one, sh, wait_for


def test_echo_and_head(mounted: Server) -> None:
    r = sh(f"echo hello > {mounted.agent('echo', 'inbox')}")
    assert r.returncode == 0, r.stderr
    msg = read_one(mounted, "echo")
    assert msg["body"] == "hello"
    assert msg["from"] == "user" and msg["to"] == "echo"
    assert msg["attempt"] == 1 and msg["reply_to"] is None and msg["priority"] == "normal"
    assert list(msg) == ["id", "seq", "from", "to", "ts", "priority", "body", "reply_to", "attempt"]
    logged = {e["id"]: e for e in mounted.events("message")}[msg["id"]]
    assert logged["seq"] == msg["seq"] and logged["body"] == "hello"
    # head exited normally: the message is acknowledged and gone.
    assert mounted.status("echo")["queued"] == "0"
    assert mounted.status("echo")["inflight"] == "0"
    assert [e["id"] for e in mounted.events("ack")] == [msg["id"]]


def test_several_messages_per_write_and_envelopes(mounted: Server) -> None:
    lines = [
        "plain text",
        json.dumps({"body": {"task": [1, 2, 3]}}),
        json.dumps({"body": None, "priority": "background"}),
        "  {not json at all",
    ]
    with open(mounted.agent("echo", "inbox"), "w") as f:
        f.write("\n".join(lines) + "\n")
    got = [read_one(mounted, "echo") for _ in range(3)]
    assert [m["body"] for m in got] == ["plain text", {"task": [1, 2, 3]}, "  {not json at all"]
    last = read_one(mounted, "echo")
    assert last["body"] is None and last["priority"] == "background"


def test_partial_lines_wait_for_the_rest(mounted: Server) -> None:
    fd = os.open(mounted.agent("echo", "inbox"), os.O_WRONLY)
    try:
        os.write(fd, b"hel")
        assert mounted.status("echo")["queued"] == "0"
        os.write(fd, b"lo\nwor")
        assert mounted.status("echo")["queued"] == "1"
        os.write(fd, b"ld")
    finally:
        os.close(fd)  # the unterminated last line is a message at close
    assert [read_one(mounted, "echo")["body"] for _ in range(2)] == ["hello", "world"]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"body": 1, "colour": "red"}', "colour"),
        ('{"priority": "normal"}', "body"),
        ('{"body": 1, "priority": "urgent"}', "priority"),
        ('{"body": 1, "to": "worker"}', "to"),
        ('{"body": 1, "reply_to": "nonsense"}', "reply_to"),
    ],
)
def test_bad_envelope_is_einval_and_nothing_accepted(mounted: Server, line: str, why: str) -> None:
    fd = os.open(mounted.agent("echo", "inbox"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, f"good one\n{line}\n".encode())
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert mounted.status("echo")["queued"] == "0"  # not even the good line
    err = mounted.events("error")[-1]
    assert err["errno"] == "EINVAL" and err["where"] == "/agents/echo/inbox"
    assert err["who"] == "user" and why in err["why"]


def test_shell_sees_the_error(mounted: Server) -> None:
    r = sh(f"""echo '{{"body": 1, "oops": 2}}' > {mounted.agent("echo", "inbox")}""")
    assert r.returncode != 0
    assert "Invalid argument" in r.stderr


def test_non_utf8_is_einval_and_empty_line_is_a_message(mounted: Server) -> None:
    fd = os.open(mounted.agent("echo", "inbox"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, b"\xff\xfe\n")
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert mounted.status("echo")["queued"] == "0"
    sh(f"echo > {mounted.agent('echo', 'inbox')}").check_returncode()
    assert read_one(mounted, "echo")["body"] == ""


def test_emsgsize(server: Server) -> None:
    server.write_config("max_message = 1000\n[agents.echo]\n")
    server.mount()
    fd = os.open(server.agent("echo", "inbox"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, b"x" * 1001 + b"\n")
        assert e.value.errno == errno.EMSGSIZE
        os.write(fd, b"y" * 1000 + b"\n")  # exactly at the limit is fine
    finally:
        os.close(fd)
    assert server.events("error")[-1]["errno"] == "EMSGSIZE"
    assert read_one(server, "echo")["body"] == "y" * 1000


def test_default_limit_is_one_mib(mounted: Server) -> None:
    # The kernel cuts a large write into pieces: the piece that crosses the
    # limit fails, and so does every later piece of the same line.
    with pytest.raises(OSError) as e, open(mounted.agent("echo", "inbox"), "wb") as f:
        f.write(b"z" * (1 << 20) + b"x\nnext\n")
        f.flush()
    assert e.value.errno == errno.EMSGSIZE
    assert mounted.status("echo")["queued"] == "0"
    mounted.send("echo", "fine")
    assert read_one(mounted, "echo")["body"] == "fine"


def test_outbox_routes_by_to(mounted: Server) -> None:
    env = {"body": "job", "to": ["worker", "user"]}
    sh(f"echo '{json.dumps(env)}' > {mounted.agent('echo', 'outbox')}").check_returncode()
    for name in ("worker", "user"):
        m = read_one(mounted, name)
        assert m["from"] == "echo" and m["body"] == "job" and m["to"] == name
    sent = [json.loads(x) for x in mounted.agent("echo", "outbox").read_text().splitlines()]
    assert [(m["to"], m["body"]) for m in sent] == [("worker", "job"), ("user", "job")]


def test_outbox_unknown_recipient_is_enoent(mounted: Server) -> None:
    fd = os.open(mounted.agent("echo", "outbox"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, b'{"body": 1, "to": "nobody"}\n')
        assert e.value.errno == errno.ENOENT
    finally:
        os.close(fd)
    assert mounted.events("error")[-1]["errno"] == "ENOENT"


def test_reply_through_outbox_goes_to_sender(mounted: Server) -> None:
    mounted.send("echo", "question")
    script = f"""
        exec 3< {mounted.agent("echo", "inbox")}
        IFS= read -r line <&3
        echo "answer" > {mounted.agent("echo", "outbox")}
        echo "$line"
    """
    r = sh(script)
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)
    reply = read_one(mounted, "user")
    assert reply["from"] == "echo" and reply["body"] == "answer"
    assert reply["reply_to"] == q["id"]


def test_reply_with_nothing_in_flight_is_einval(mounted: Server) -> None:
    r = sh(f"echo answer > {mounted.agent('echo', 'outbox')}")
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert "in flight" in mounted.events("error")[-1]["why"]


def test_one_message_per_read_and_small_buffers(mounted: Server) -> None:
    mounted.send("echo", "first\nsecond")
    fd = os.open(mounted.agent("echo", "inbox"), os.O_RDONLY)
    try:
        first = os.read(fd, 65536)
        assert first.count(b"\n") == 1 and json.loads(first)["body"] == "first"
        parts: list[bytes] = []
        while not (parts and parts[-1].endswith(b"\n")):
            parts.append(os.read(fd, 7))  # a small buffer gets the rest later
        assert all(len(p) <= 7 for p in parts)
        assert json.loads(b"".join(parts))["body"] == "second"
    finally:
        os.close(fd)


def test_bash_byte_at_a_time_read_loop(mounted: Server) -> None:
    long = "x" * 500
    mounted.send("echo", f"a\n{long}\nb")
    script = f"""
        exec 3< {mounted.agent("echo", "inbox")}
        for i in 1 2 3; do IFS= read -r line <&3; echo "$line" | jq -r .body; done
    """
    r = sh(script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["a", long, "b"]


def test_one_byte_reads(mounted: Server) -> None:
    mounted.send("echo", "bytewise\nnext")
    fd = os.open(mounted.agent("echo", "inbox"), os.O_RDONLY)
    try:
        got = b""
        while not got.endswith(b"\n"):
            b = os.read(fd, 1)
            assert len(b) == 1
            got += b
        assert json.loads(got)["body"] == "bytewise"
        assert json.loads(os.read(fd, 4096))["body"] == "next"
    finally:
        os.close(fd)


def test_python_open_and_jq(mounted: Server) -> None:
    code = f"""
import json
with open({str(mounted.agent("echo", "outbox"))!r}, "w") as out:
    out.write(json.dumps({{"body": {{"n": 41}}, "to": "worker"}}) + "\\n")
with open({str(mounted.agent("worker", "inbox"))!r}) as inbox:
    msg = json.loads(inbox.readline())
print(msg["body"]["n"] + 1)
"""
    r = subprocess.run(["python3", "-c", code], capture_output=True, text=True, timeout=10)
    assert r.stdout.strip() == "42", r.stderr
    r = sh(f"jq -c 'select(.type==\"message\") | .body.n' {mounted.p('log')}")
    assert r.stdout.split() == ["41"]


def test_priority_order_fifo_within_class(mounted: Server) -> None:
    lines = [
        {"body": "b1", "priority": "background"},
        {"body": "n1"},
        {"body": "i1", "priority": "interactive"},
        {"body": "n2"},
        {"body": "i2", "priority": "interactive"},
        {"body": "b2", "priority": "background"},
    ]
    mounted.send("echo", "\n".join(json.dumps(x) for x in lines))
    order = [read_one(mounted, "echo")["body"] for _ in lines]
    assert order == ["i1", "i2", "n1", "n2", "b1", "b2"]


def test_aging_serves_old_background_first(server: Server) -> None:
    server.write_config("aging = 0.3\n[agents.echo]\n")
    server.mount()
    server.send("echo", json.dumps({"body": "old", "priority": "background"}))
    time.sleep(0.35)  # one aging period: competes as normal, and is older
    server.send("echo", json.dumps({"body": "new"}))
    assert read_one(server, "echo")["body"] == "old"


def test_nonblocking_read_on_empty_inbox_is_eagain(mounted: Server) -> None:
    fd = os.open(mounted.agent("echo", "inbox"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.read(fd, 100)
    finally:
        os.close(fd)


def test_poll_reports_readable_when_a_message_arrives(mounted: Server) -> None:
    fd = os.open(mounted.agent("echo", "inbox"), os.O_RDONLY)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(100) == []
        t0 = time.monotonic()
        cmd = f"sleep 0.2; echo ping > {mounted.agent('echo', 'inbox')}"
        with subprocess.Popen(["bash", "-c", cmd]) as sender:
            ready = p.poll(5000)
            sender.wait(5)
        assert ready and ready[0][1] & select.POLLIN
        assert time.monotonic() - t0 < 2
        assert json.loads(os.read(fd, 4096))["body"] == "ping"
        r, _, _ = select.select([fd], [], [], 0.05)
        assert r == []
    finally:
        os.close(fd)


def test_full_inbox_blocks_then_eagain(server: Server) -> None:
    server.write_config("max_queue = 3\n[agents.echo]\n")
    server.mount()
    inbox = server.agent("echo", "inbox")
    server.send("echo", "1\n2\n3")
    fd = os.open(inbox, os.O_WRONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.write(fd, b"4\n")
    finally:
        os.close(fd)
    writer = subprocess.Popen(
        ["bash", "-c", f"echo 4 > {inbox}; echo done"], stdout=subprocess.PIPE
    )
    wait_for(lambda: parked(writer.pid))
    assert writer.poll() is None  # blocked on the full inbox
    assert read_one(server, "echo")["body"] == "1"
    out, _ = writer.communicate(timeout=5)
    assert out == b"done\n"
    assert [read_one(server, "echo")["body"] for _ in range(3)] == ["2", "3", "4"]


def test_echo_with_o_trunc_and_append(mounted: Server) -> None:
    inbox = mounted.agent("echo", "inbox")
    sh(f"echo one > {inbox}; echo two >> {inbox}; printf 'three' > {inbox}").check_returncode()
    assert [read_one(mounted, "echo")["body"] for _ in range(3)] == ["one", "two", "three"]


def follows(pid: int, path: Path) -> bool:
    """`tail -f` has the file open and sleeps, waiting for it to grow."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return str(path) in links and state == "S"


def test_tail_f_follows_the_log(mounted: Server) -> None:
    cmd = ["tail", "-n", "0", "-f", str(mounted.p("log"))]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as tail:
        try:
            wait_for(lambda: follows(tail.pid, mounted.p("log")))
            mounted.send("echo", "followed")
            assert tail.stdout is not None
            line = json.loads(tail.stdout.readline())
            assert line["type"] == "message" and line["body"] == "followed"
        finally:
            tail.kill()


def test_growing_files_are_regular_files(mounted: Server) -> None:
    mounted.send("echo", "a\nb")
    log = mounted.p("log")
    data = log.read_bytes()
    assert os.stat(log).st_size == len(data) and data.endswith(b"\n")
    with open(log, "rb") as f:
        f.seek(10)
        assert f.read(20) == data[10:30]
        f.seek(len(data))
        assert f.read() == b""
    r = sh(f"tail -n 2 {log} | jq -r .body")
    assert r.stdout.split() == ["a", "b"]
    agent_log = [json.loads(x) for x in mounted.agent("echo", "log").read_text().splitlines()]
    assert [e["body"] for e in agent_log if e["type"] == "message"] == ["a", "b"]
    assert os.stat(mounted.agent("echo", "log")).st_size == len(
        mounted.agent("echo", "log").read_bytes()
    )
    before = os.stat(log).st_size
    mounted.send("echo", "c")
    assert os.stat(log).st_size > before  # no stale cached size


def test_modes_and_wrong_access(mounted: Server) -> None:
    for f in ("log", "output"):
        with pytest.raises(PermissionError):
            open(mounted.agent("echo", f), "w")
        assert os.stat(mounted.agent("echo", f)).st_mode & 0o222 == 0
    with pytest.raises(PermissionError):
        open(mounted.p("log"), "w")
    # The root ctl takes the operator's `reload`; it is read-only to agents.
    assert os.stat(mounted.p("ctl")).st_mode & 0o777 == 0o660
    with pytest.raises(OSError):
        (mounted.p("agents", "echo", "newfile")).write_text("x")
    assert sorted(os.listdir(mounted.mp)) == ["agents", "ctl", "log", "vault"]
    assert sorted(os.listdir(mounted.p("agents", "echo"))) == [
        "ctl",
        "dead",
        "errors",
        "inbox",
        "log",
        "outbox",
        "output",
    ]


def test_mkdir_and_rmdir_agents(mounted: Server) -> None:
    agents = mounted.p("agents")
    os.mkdir(agents / "helper")
    assert "helper" in os.listdir(agents)
    mounted.send("helper", "hi")
    with pytest.raises(OSError) as e:
        os.rmdir(agents / "helper")
    assert e.value.errno == errno.ENOTEMPTY
    read_one(mounted, "helper")
    os.rmdir(agents / "helper")
    assert "helper" not in os.listdir(agents)
    for bad in ("Upper", "-dash", "a" * 65):
        with pytest.raises(OSError) as e:
            os.mkdir(agents / bad)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(FileExistsError):
        os.mkdir(agents / "echo")
    with pytest.raises(OSError) as e:
        os.rmdir(agents / "user")
    assert e.value.errno == errno.EBUSY
    with pytest.raises(OSError):
        os.mkdir(mounted.p("newtop"))
    types = [(e["op"], e["agent"]) for e in mounted.events("agent")]
    assert types == [("create", "helper"), ("remove", "helper")]


def test_many_blocked_readers_do_not_starve_others(mounted: Server) -> None:
    readers = [
        subprocess.Popen(["cat", str(mounted.agent("worker", "inbox"))], stdout=subprocess.DEVNULL)
        for _ in range(120)
    ]
    try:
        wait_for(lambda: all(parked(p.pid) for p in readers), timeout=30)
        t0 = time.monotonic()
        mounted.send("echo", "still served")
        assert read_one(mounted, "echo")["body"] == "still served"
        assert os.listdir(mounted.p("agents"))
        assert time.monotonic() - t0 < 5
    finally:
        for p in readers:
            p.kill()
        for p in readers:
            p.wait(timeout=10)
    wait_for(lambda: mounted.status("worker")["queued"] == "0")
