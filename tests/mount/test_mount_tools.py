"""The operator tools through real mounts: ask with a real echo agent, trace, top in
tmux under load, `mount -t fuse.outheisfs` and fstab, the systemd unit, progress."""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from outheisfs.models import is_id

from .conftest import PY, Server, _alive, outheisfs, read_one, wait_for

ROOT = Path(__file__).resolve().parents[2]
ECHO = ROOT / "examples" / "agents" / "echo.py"
BIN = Path(sys.executable).parent  # the environment's bin/, with the outheisfs script


@pytest.fixture
def team(server: Server) -> Server:
    """A real echo agent, and `box`, a mailbox without a process."""
    server.write_config(
        f"""
[agents.echo]
command = ["{PY}", "{ECHO}"]

[agents.box]
"""
    )
    server.mount()
    wait_for(lambda: server.status("echo")["state"] == "running", timeout=15)
    return server


def ask(s: Server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "outheisfs", "ask", "--mount", str(s.mp), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- ask ------------------------------------------------------------------------------


def test_ask_leaves_the_operators_other_messages_in_order(team: Server) -> None:
    for word in ("first", "second", "third"):
        team.send("user", word)
    r = ask(team, "echo", "hello", "world")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hello world\n", "")
    # The three are still there, unacknowledged, in order, for other readers.
    st = team.status("user")
    assert (st["queued"], st["inflight"]) == ("3", "0")
    assert [read_one(team, "user")["body"] for _ in range(3)] == ["first", "second", "third"]
    # The reply was taken by `take` as deliver + ack, logged under a ctl event.
    takes = [e for e in team.events("ctl") if e["command"].startswith("take ")]
    assert len(takes) == 1 and takes[0]["agent"] == "user" and takes[0]["who"] == "user"


def test_two_asks_at_once_each_get_their_own_reply(team: Server) -> None:
    team.send("user", "someone else's")
    procs = [
        subprocess.Popen(
            [PY, "-m", "outheisfs", "ask", "--mount", str(team.mp), "--json", "echo", f"q{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    replies = [json.loads(out) for out, _ in outs]
    sent = {e["id"]: e["body"] for e in team.events("message") if e["to"] == "echo"}
    for i, reply in enumerate(replies):
        assert reply["body"] == f"q{i}" and sent[reply["reply_to"]] == f"q{i}"
        assert reply["from"] == "echo" and reply["to"] == "user"
        assert list(reply) == [
            "id", "seq", "from", "to", "ts", "priority", "body", "reply_to", "attempt",
        ]  # fmt: skip
    assert team.status("user")["queued"] == "1"
    assert read_one(team, "user")["body"] == "someone else's"


def test_ask_reads_standard_input_as_one_message(team: Server) -> None:
    r = ask(team, "echo", stdin="line one\nline two\n")
    assert (r.returncode, r.stdout) == (0, "line one\nline two\n"), r.stderr
    r = ask(team, "--json", "echo", stdin='{"body": {"n": [1, 2]}, "priority": "interactive"}\n')
    reply = json.loads(r.stdout)
    assert reply["body"] == {"n": [1, 2]} and reply["priority"] == "normal"


def test_ask_times_out_and_says_so(team: Server) -> None:
    t = time.monotonic()
    r = ask(team, "--timeout", "0.5", "box", "anyone?")
    assert r.returncode == 1 and r.stdout == ""
    m = re.fullmatch(r"outheisfs: ask: no reply from box to (\S+) within 0.5 s\n", r.stderr)
    assert m and is_id(m.group(1)), r.stderr
    assert time.monotonic() - t < 10
    assert read_one(team, "box")["id"] == m.group(1)  # the question itself stays queued


def test_ask_errors(team: Server, tmp_path: Path) -> None:
    r = ask(team, "nobody", "x")
    assert (r.returncode, r.stderr) == (1, f"outheisfs: ask: no agent 'nobody' in {team.mp}\n")
    r = outheisfs("ask", "--mount", str(tmp_path), "echo", "x")
    assert r.returncode == 1 and "is not an outheisfs mount" in r.stderr
    # A refused message: the reason the server logged, not only the errno.
    r = ask(team, "echo", '{"body": 1, "colour": "red"}')
    assert r.returncode == 1
    assert "refused: Invalid argument (EINVAL on /agents/echo/inbox:" in r.stderr, r.stderr
    assert "colour" in r.stderr, r.stderr


def test_take_through_the_mount(team: Server) -> None:
    team.send("box", "a")
    team.send("box", "b")
    first, second = (e["id"] for e in team.events("message")[-2:])
    ctl = team.agent("box", "ctl")
    with open(ctl, "w") as f:
        f.write(f"take {second}\n")
    assert team.status("box")["queued"] == "1"
    assert read_one(team, "box")["id"] == first
    for bad, code in ((f"take {second}", errno.ENOENT), ("take 42", errno.EINVAL)):
        fd = os.open(ctl, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, f"{bad}\n".encode())
            assert e.value.errno == code
        finally:
            os.close(fd)
    assert "not queued for box" in team.events("error")[-2]["why"]
    # An agent may not take: it is the operator's.
    team.send("box", "c")
    third = team.events("message")[-1]["id"]
    r = outheisfs(
        "run",
        "box",
        "--mount",
        str(team.mp),
        "--",
        "bash",
        "-c",
        f"echo take {third} > $OUTHEIS_MOUNT/agents/box/ctl",
    )
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    assert team.status("box")["queued"] == "1"


def test_sent_attribute_names_the_ids_of_the_last_write(team: Server) -> None:
    fd = os.open(team.agent("box", "inbox"), os.O_WRONLY)
    try:
        os.write(fd, b"one\ntwo\n")
        ids = os.getxattr(fd, "user.outheisfs.sent").decode().split()
        assert ids == [e["id"] for e in team.events("message")[-2:]]
        # Another process has no write of its own on the file.
        code = f"import os; os.getxattr({str(team.agent('box', 'inbox'))!r}, 'user.outheisfs.sent')"
        r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "No data available" in r.stderr
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        os.getxattr(team.agent("box", "inbox"), "user.outheisfs.sent")
    assert e.value.errno == errno.ENODATA


# -- trace ----------------------------------------------------------------------------


def test_trace_a_question_and_its_reply(team: Server) -> None:
    r = ask(team, "--json", "echo", "trace me")
    question = json.loads(r.stdout)["reply_to"]
    from_mount = outheisfs("trace", question, "--mount", str(team.mp), "--json")
    from_state = outheisfs("trace", question, "--state", str(team.state), "--json")
    assert from_mount.returncode == 0, from_mount.stderr
    assert json.loads(from_mount.stdout) == json.loads(from_state.stdout)
    t = json.loads(from_mount.stdout)
    assert t["body"] == "trace me" and t["from"] == "user" and t["to"] == "echo"
    assert [e["type"] for e in t["events"]] == ["message", "deliver", "ack"]
    assert t["events"][0]["t"] == 0.0 and all(e["t"] >= 0 for e in t["events"])
    (reply,) = t["replies"]
    assert reply["from"] == "echo" and reply["body"] == "trace me"
    assert [e["type"] for e in reply["events"]] == ["message", "deliver", "ack"]
    text = outheisfs("trace", question, "--mount", str(team.mp))
    lines = text.stdout.splitlines()
    assert lines[0] == f'{question} user -> echo: "trace me"'
    assert any(line.startswith(f"  reply {reply['id']} echo -> user") for line in lines)
    missing = outheisfs("trace", "0" * 26, "--state", str(team.state))
    assert missing.returncode == 1 and "no message" in missing.stderr


# -- top ------------------------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket, in the test's folder), one window running bash."""

    def __init__(self, sock: Path, width: int, height: int) -> None:
        self.sock = str(sock)
        self("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height))
        self("set-option", "-t", "t", "status", "off")

    def __call__(self, *args: str) -> str:
        r = subprocess.run(
            ["tmux", "-S", self.sock, *args], capture_output=True, text=True, timeout=10
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    def type(self, text: str) -> None:
        self("send-keys", "-t", "t", "-l", text)
        self("send-keys", "-t", "t", "Enter")

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "t")

    def wait(self, pred: object, timeout: float = 20) -> str:
        found: list[str] = []

        def check() -> bool:
            text = self.screen()
            found[:] = [text]
            return bool(pred(text))  # type: ignore[operator]

        try:
            wait_for(check, timeout=timeout, interval=0.1)
        except AssertionError:
            raise AssertionError(f"screen never matched:\n{found[0] if found else ''}") from None
        return found[0]

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (the CI setup installs it)")
    t = Tmux(tmp_path / "tmux.sock", 150, 30)
    try:
        yield t
    finally:
        t.close()


def _rows(screen: str) -> dict[str, list[str]]:
    """Table rows of top's screen by agent name."""
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("AGENT"))
    header = lines[start].split()
    columns = len(header) - 2 if "LAST" in header else len(header)  # "LAST ERROR" may be empty
    rows = {}
    for line in lines[start + 1 :]:
        words = line.split()
        if words and len(words) >= columns:
            rows[words[0]] = words
    rows["AGENT"] = header
    return rows


def _order(screen: str) -> list[str]:
    return [name for name in _rows(screen) if name != "AGENT"]


def _col(screen: str, agent: str, col: str) -> str:
    rows = _rows(screen)
    return rows[agent][rows["AGENT"].index(col)]


def test_top_in_tmux_under_load(server: Server, tmux: Tmux) -> None:
    server.write_config(
        f"""
[agents.echo]
command = ["{PY}", "{ECHO}"]

[agents.crash]
command = ["sh", "-c", "exit 3"]
max_restarts = 2
restart_window = 60.0

[agents.box]
"""
    )
    server.mount()
    wait_for(lambda: server.status("crash")["state"] == "failed", timeout=20)
    for i in range(25):
        server.send("box", f"m{i}")
    stop = threading.Event()
    sent = [0]

    def load() -> None:  # 40 messages a second to echo, whose replies go to user
        fd = os.open(server.agent("echo", "inbox"), os.O_WRONLY)
        try:
            t0 = time.monotonic()
            while not stop.is_set():
                sent[0] += 1
                os.write(fd, b"ping\n")
                time.sleep(max(0.0, t0 + sent[0] / 40 - time.monotonic()))
        finally:
            os.close(fd)

    writer = threading.Thread(target=load)
    writer.start()
    try:
        tmux.type("PS1='$ '; stty -a | grep -o -- '-*icanon'")
        tmux.type(f"{BIN}/outheisfs top {server.mp}; echo EXIT=$?; stty -a | grep -o -- '-*icanon'")
        screen = tmux.wait(lambda s: "AGENT" in s and "\nbox " in s)
        time.sleep(6)  # a full window of rates
        screen = tmux.screen()
        assert _col(screen, "box", "QUEUED") == "25"
        assert _col(screen, "box", "STATE") == "external"
        assert _col(screen, "echo", "STATE") == "running"
        assert _col(screen, "echo", "PIDS") == server.status("echo")["pid"]
        assert _col(screen, "crash", "STATE") == "failed"
        assert _col(screen, "crash", "RESTARTS") == "2"
        assert "failed: 2 restarts" in screen or "exit: status 3" in screen
        assert _col(screen, "echo", "HOST") == os.uname().nodename
        rate_in = float(_col(screen, "echo", "IN/S"))
        rate_out = float(_col(screen, "echo", "OUT/S"))
        assert 20 <= rate_in <= 50, screen  # 40 a second sent, on a busy machine
        assert abs(rate_out - rate_in) <= 8, screen  # every ping answered
        assert abs(float(_col(screen, "user", "IN/S")) - rate_out) <= 8
        head = screen.splitlines()[1]
        queued = sum(int(_col(screen, a, "QUEUED")) for a in ("box", "echo", "crash", "user"))
        assert "agents 4 (1 running, 1 failed)" in head and f" queued {queued} " in head
        # Per ping: its message, deliver and ack, and the reply's message (nobody reads it).
        events = float(re.search(r"log ([\d.]+) events/s", head).group(1))  # type: ignore[union-attr]
        messages = float(re.search(r"messages ([\d.]+)/s", head).group(1))  # type: ignore[union-attr]
        assert 3.2 * rate_in <= events <= 4.8 * rate_in, head
        assert 1.6 * rate_in <= messages <= 2.4 * rate_in, head
        # Sort keys: twice `>` is "queued", descending (user holds every reply); `r` turns it.
        tmux("send-keys", "-t", "t", ">", ">")
        screen = tmux.wait(lambda s: "sort: queued descending" in s)
        assert _order(screen)[:2] == ["user", "box"]
        tmux("send-keys", "-t", "t", "r")
        screen = tmux.wait(lambda s: "sort: queued ascending" in s)
        assert _order(screen)[-2:] == ["box", "user"]
        # A narrow terminal: columns go, the name and the queue stay, nothing wraps.
        tmux("resize-window", "-t", "t", "-x", "40")
        screen = tmux.wait(lambda s: "HOST" not in s and "AGENT" in s)
        assert all(len(line) <= 40 for line in screen.splitlines())
        assert _col(screen, "box", "QUEUED") == "25"
        tmux("resize-window", "-t", "t", "-x", "150")
        # q ends it, and the terminal is as it was (canonical mode back, main screen).
        tmux("send-keys", "-t", "t", "q")
        screen = tmux.wait(lambda s: re.search(r"^EXIT=\d+\n-?icanon$", s, re.M))
        assert "\nEXIT=0\nicanon\n" in screen, screen  # not -icanon: cbreak undone
        assert "AGENT" not in screen
        # Ctrl-C as well.
        tmux.type(
            f"{BIN}/outheisfs top {server.mp}; echo EXIT2=$?; stty -a | grep -o -- '-*icanon'"
        )
        tmux.wait(lambda s: "AGENT" in s)
        tmux("send-keys", "-t", "t", "C-c")
        screen = tmux.wait(lambda s: re.search(r"^EXIT2=\d+\n-?icanon$", s, re.M))
        assert "\nEXIT2=0\nicanon\n" in screen, screen
    finally:
        stop.set()
        writer.join()


def test_top_without_a_terminal_prints_one_frame(team: Server) -> None:
    team.send("box", "x")
    r = outheisfs("top", str(team.mp), "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout
    assert _col(r.stdout, "box", "QUEUED") == "1"
    assert _col(r.stdout, "echo", "STATE") == "running"
    r = outheisfs("top", str(team.root))
    assert r.returncode == 1 and "is not an outheisfs mount" in r.stderr


# -- mount -t fuse.outheisfs, fstab, systemd ------------------------------------------


def _in_namespace(script: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run a bash script in a private mount namespace where /usr/local/sbin holds
    an `outheisfs` (a link to this environment's), as an installed one would be:
    mount(8) runs helpers without PATH, so they find only the standard folders."""
    sbin = tmp / "sbin"
    sbin.mkdir()
    (sbin / "outheisfs").symlink_to(BIN / "outheisfs")
    full = f"set -eu\nmount --bind {sbin} /usr/local/sbin\n{script}"
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", full],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_mount_dash_t_and_fstab(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("needs root and unshare(1) (util-linux) for a private mount namespace")
    config = tmp_path / "team.toml"
    config.write_text(f'[agents.echo]\ncommand = ["{PY}", "{ECHO}"]\n[agents.box]\n')
    mp, mp2 = tmp_path / "mnt", tmp_path / "mnt2"
    mp.mkdir()
    mp2.mkdir()
    fstab = tmp_path / "fstab"
    # The fstab mount has no agent processes: their working folders in the tree would
    # make a plain umount(8) EBUSY (`outheisfs umount` stops them first).
    config2 = tmp_path / "mailbox.toml"
    config2.write_text("[agents.box]\n")
    fstab.write_text(f"{config2} {mp2} fuse.outheisfs state={tmp_path / 's2'},_netdev,noauto 0 0\n")
    code = 'import os, sys; print(os.getxattr(sys.argv[1], "user.outheisfs.pid").decode())'
    server_pid = f"{PY} -c '{code}'"
    script = f"""
trap 'fusermount3 -u -z {mp} 2>/dev/null || true; fusermount3 -u -z {mp2} 2>/dev/null || true' EXIT
mount -t fuse.outheisfs {config} {mp} -o state={tmp_path / "s1"}
echo "pid1 $({server_pid} {mp})"
findmnt -n -o FSTYPE {mp}
cut -d' ' -f1,2 {mp}/ctl
echo hello > {mp}/agents/echo/inbox
echo "$(head -n1 {mp}/agents/user/inbox)"
{BIN}/outheisfs umount {mp}
mountpoint -q {mp} || echo "unmounted 1"
mount --bind {fstab} /etc/fstab
mount {mp2}
echo "pid2 $({server_pid} {mp2})"
cut -d' ' -f1 {mp2}/ctl | tr '\\n' ' '; echo
umount {mp2}
for i in $(seq 100); do mountpoint -q {mp2} || break; sleep 0.1; done
mountpoint -q {mp2} || echo "unmounted 2"
"""
    r = _in_namespace(script, tmp_path)
    pids = [int(p) for p in re.findall(r"^pid\d (\d+)$", r.stdout, re.M)]
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        assert "fuse.outheisfs" in lines
        assert "echo running" in lines and "box external" in lines
        reply = json.loads(next(line for line in lines if line.startswith("{")))
        assert reply["from"] == "echo" and reply["body"] == "hello"
        assert "unmounted 1" in lines and "unmounted 2" in lines
        assert "user box " in lines
        for pid in pids:  # `umount` from outside ends the server too
            wait_for(lambda pid=pid: not _alive(pid), timeout=20)
        events = [
            json.loads(x) for x in (tmp_path / "s2" / "events.jsonl").read_text().splitlines()
        ]
        assert events[-1]["type"] == "umount"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_mount_helper_refuses_a_missing_state(tmp_path: Path) -> None:
    r = subprocess.run(
        ["/sbin/mount.fuse3", "none", str(tmp_path), "-t", "fuse.outheisfs", "-o", "rw"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
        timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr == "outheisfs: mount helper: give the state folder with -o state=DIR\n"
    assert not os.path.ismount(tmp_path)


def _unit() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    text = (ROOT / "examples" / "systemd" / "outheisfs@.service").read_text()
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            keys.setdefault(k, []).append(v)
    return keys


def test_systemd_unit(tmp_path: Path) -> None:
    unit = _unit()
    assert unit["Type"] == ["forking"] and unit["Restart"] == ["on-failure"]
    own = (ROOT / "examples" / "systemd" / "outheisfs@.service").read_text()
    here = own.replace("/usr/local/bin/outheisfs", str(BIN / "outheisfs"))
    if shutil.which("systemd-analyze"):
        (tmp_path / "outheisfs@team.service").write_text(here)
        r = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / "outheisfs@team.service")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
    # Its commands, run by hand as systemd would: start, the PID file, stop.
    roots = {
        "/etc/outheis/": f"{tmp_path}/etc/",
        "/srv/outheis/": f"{tmp_path}/srv/",
        "/var/lib/outheis/": f"{tmp_path}/lib/",
    }

    def expand(v: str) -> list[str]:
        v = v.replace("%i", "team").replace("/usr/local/bin/outheisfs", str(BIN / "outheisfs"))
        for a, b in roots.items():
            v = v.replace(a, b)
        return v.split()

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "team.toml").write_text(f'[agents.echo]\ncommand = ["{PY}", "{ECHO}"]\n')
    (tmp_path / "lib" / "team").mkdir(parents=True, mode=0o700)  # StateDirectory=
    mp = tmp_path / "srv" / "team"
    for key in ("ExecStartPre", "ExecStart"):
        r = subprocess.run(expand(unit[key][0]), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    try:
        assert os.path.ismount(mp)
        pid = int(Path(expand(unit["PIDFile"][0])[0]).read_text())
        assert pid == int(os.getxattr(mp, "user.outheisfs.pid"))
        wait_for(lambda: "running" in (mp / "agents" / "echo" / "ctl").read_text(), timeout=15)
        with open(tmp_path / "etc" / "team.toml", "a") as f:
            f.write("[agents.more]\n")
        r = subprocess.run(
            expand(unit["ExecReload"][0]), capture_output=True, text=True, timeout=60
        )
        assert (r.returncode, r.stdout) == (0, "reloaded: added more\n"), r.stderr
        r = subprocess.run(expand(unit["ExecStop"][0]), capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr
        assert not os.path.ismount(mp) and not _alive(pid)
    finally:
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


# -- progress -------------------------------------------------------------------------


def _on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal; (status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, cwd=cwd, text=True)
    os.close(slave)
    got = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every writer closed
            break
        if not chunk:
            break
        got += chunk
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    return proc.returncode, out, got.decode(errors="replace")


def test_progress_on_a_terminal_only(server: Server) -> None:
    from outheisfs.bench import write_log

    write_log(server.state, 60_000, 10)
    code, out, tty = _on_a_terminal(
        [PY, "-m", "outheisfs", "replay", "--state", str(server.state)], server.root
    )
    assert code == 0 and out.startswith("state as of seq")
    assert "\rreplay: " in tty and "MB)" in tty
    r = outheisfs("replay", "--state", str(server.state))
    assert r.returncode == 0 and r.stderr == ""
    args = [PY, "-m", "outheisfs", "mount", str(server.mp), "--state", str(server.state)]
    code, _, tty = _on_a_terminal(args, server.root)
    assert code == 0, tty
    server.pids.append(server.pid)
    assert "\rmount: replaying the event log: " in tty
    server.umount()
    r = server.mount()
    assert r.stderr == ""


def test_completion_names_agents_of_a_real_mount(team: Server) -> None:
    from ..unit.test_tools import complete

    assert sorted(complete(["outheisfs", "ask", "--mount", str(team.mp), ""])) == [
        "box", "echo", "user",
    ]  # fmt: skip
    env = {**os.environ, "OUTHEIS_MOUNT": str(team.mp)}
    r = ask(team, "--json", "echo", "x")
    question = json.loads(r.stdout)["reply_to"]
    assert question in complete(["outheisfs", "trace", question[:20]], env)
