"""Mounting, unmounting, errors, crashes and replay, as users run them [SPEC §2, §5, §8]."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import PY, Server, _alive, outheisfs, parked, read_one, wait_for


def server_processes(state: Path) -> list[int]:
    r = subprocess.run(["pgrep", "-f", f"outheisfs mount .*--state {state}"], capture_output=True)
    return [int(x) for x in r.stdout.split()]


def test_mount_returns_when_ready_and_umount_when_gone(server: Server) -> None:
    server.mount()
    # No waiting: the mount answers as soon as the command returns.
    assert os.listdir(server.p("agents")) == ["user"]
    pid = server.pid
    r = server.umount()
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(server.mp)
    assert not _alive(pid)  # gone, or a zombie waiting for init to reap it
    types = [e["type"] for e in server.events()]
    assert types[0] == "mount" and types[-1] == "umount"


def test_defaults_mount_state_and_config_in_cwd(tmp_path: Path) -> None:
    (tmp_path / "mount").mkdir()
    (tmp_path / "outheis.toml").write_text("[agents.helper]\n")
    r = outheisfs("mount", cwd=tmp_path)
    try:
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(tmp_path / "mount" / "agents")) == ["helper", "user"]
        assert (tmp_path / ".outheis" / "events.jsonl").exists()
    finally:
        r = outheisfs("umount", cwd=tmp_path)
    assert r.returncode == 0 and not os.path.ismount(tmp_path / "mount")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_stops_cleanly_on_signal(server: Server, sig: int) -> None:
    with subprocess.Popen(
        [
            PY,
            "-m",
            "outheisfs",
            "mount",
            str(server.mp),
            "--state",
            str(server.state),
            "--foreground",
        ],
        stderr=subprocess.PIPE,
    ) as p:
        try:
            wait_for(lambda: os.path.ismount(server.mp), timeout=10)
            server.send("user", "kept")
            p.send_signal(sig)
            assert p.wait(timeout=20) == 0
        finally:
            if p.poll() is None:
                p.kill()
    assert not os.path.ismount(server.mp)
    assert server.events()[-1]["type"] == "umount"
    server.mount()
    assert read_one(server, "user")["body"] == "kept"


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("[agents.echo]\nrestart = 'sometimes'\n", "agents.echo.restart"),
        ("[agents.echo]\ncolour = 'red'\n", "agents.echo.colour"),
        ("[agents.echo]\nsend = ['ghost']\n", "agents.echo.send"),
        ("[agents.user]\n", "agents.user"),
        ("[vault]\nnotes = 'ghost'\n", "vault.notes"),
        ("durability = 'sometimes'\n", "durability"),
        ("this is not toml\n", "TOML"),
    ],
)
def test_bad_config_is_one_line_exit_2_nothing_mounted(
    server: Server, config: str, key: str
) -> None:
    server.write_config(config)
    r = server.mount(check=False)
    assert r.returncode == 2
    assert key in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    assert not os.path.ismount(server.mp)
    assert server_processes(server.state) == []


def test_missing_mountpoint_is_exit_2(server: Server) -> None:
    r = outheisfs("mount", str(server.root / "nowhere"), "--state", str(server.state))
    assert r.returncode == 2 and "nowhere" in r.stderr and "does not exist" in r.stderr


def test_mountpoint_that_is_a_file_is_exit_2(server: Server) -> None:
    f = server.root / "file"
    f.write_text("")
    r = outheisfs("mount", str(f), "--state", str(server.state))
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_busy_mountpoint_is_exit_1(server: Server) -> None:
    server.mount()
    r = outheisfs("mount", str(server.mp), "--state", str(server.root / "other"))
    assert r.returncode == 1 and "busy" in r.stderr
    assert os.listdir(server.p("agents")) == ["user"]  # the first mount still answers


def test_state_in_use_is_exit_1(server: Server) -> None:
    server.mount()
    other = server.root / "mnt2"
    other.mkdir()
    r = outheisfs("mount", str(other), "--state", str(server.state))
    assert r.returncode == 1 and "in use" in r.stderr
    assert not os.path.ismount(other)


def test_unknown_command_and_usage_errors_are_exit_2() -> None:
    r = outheisfs("explode")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = outheisfs("mount", "--durability", "sometimes")
    assert r.returncode == 2


def test_kill_9_loses_no_acknowledged_message(server: Server) -> None:
    server.write_config("[agents.echo]\n")
    server.mount()
    n = 200
    with open(server.agent("echo", "inbox"), "w", buffering=1) as f:
        for i in range(n):
            f.write(f"{i}\n")  # line buffered: each write returns after logging
    server.kill9()
    r = server.mount(check=False)
    assert r.returncode == 0, r.stderr  # the stale mount is cleaned up first
    assert server.status("echo")["queued"] == str(n)
    got = [read_one(server, "echo")["body"] for _ in range(n)]
    assert got == [str(i) for i in range(n)]


def test_message_in_flight_at_kill_comes_back(server: Server) -> None:
    server.write_config("[agents.echo]\n")
    server.mount()
    server.send("echo", "held")
    with subprocess.Popen(
        ["bash", "-c", f"exec 3<{server.agent('echo', 'inbox')}; read -r l <&3; echo x; sleep 60"],
        stdout=subprocess.PIPE,
    ) as reader:
        assert reader.stdout is not None and reader.stdout.readline() == b"x\n"
        server.kill9()
        reader.kill()
    server.mount()
    msg = read_one(server, "echo")
    assert msg["body"] == "held" and msg["attempt"] == 2
    redo = server.events("redeliver")
    assert redo and "restarted" in redo[-1]["reason"]


@pytest.mark.parametrize("stop", ["umount", "sigterm"])
def test_a_clean_stop_keeps_the_acks_of_readers_within_the_close_grace(
    server: Server, stop: str
) -> None:
    """A reader that closed its inbox just before a clean stop handled its message:
    the stop settles it (before its `umount` event), and it is not delivered again."""
    server.write_config("[agents.echo]\n")
    server.mount()
    server.send("echo", "handled")
    pid = server.pid
    fd = os.open(server.agent("echo", "inbox"), os.O_RDONLY)
    msg = json.loads(os.read(fd, 1 << 16))
    os.close(fd)  # this process lives on: its message waits out the close grace
    if stop == "umount":
        r = server.umount()
        assert r.returncode == 0, r.stderr
    else:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid) and not os.path.ismount(server.mp), timeout=30)
    kinds = [(e["type"], e.get("id")) for e in server.events()]
    assert ("ack", msg["id"]) in kinds, "settled by the stop"
    assert kinds.index(("ack", msg["id"])) < kinds.index(("umount", None))
    server.mount()
    assert server.status("echo")["queued"] == "0"
    assert server.events("redeliver") == [], "not delivered again"


def test_blocked_reader_gets_an_error_when_the_server_dies(server: Server) -> None:
    server.mount()
    with subprocess.Popen(
        ["cat", str(server.agent("user", "inbox"))], stderr=subprocess.PIPE
    ) as cat:
        wait_for(lambda: parked(cat.pid))
        server.kill9()
        t0 = time.monotonic()
        assert cat.wait(timeout=5) != 0
        assert time.monotonic() - t0 < 2


def test_disk_durability_mounts_and_keeps_messages(server: Server) -> None:
    server.mount("--durability", "disk")
    assert server.events("mount")[-1]["durability"] == "disk"
    server.send("user", "synced")
    server.kill9()
    server.mount()
    assert read_one(server, "user")["body"] == "synced"


def test_torn_last_record_is_cut_with_an_error_event(server: Server) -> None:
    server.mount()
    server.send("user", "whole")
    assert server.umount().returncode == 0
    log = server.state / "events.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"seq": 99, "ts": "2026-')  # a write cut short by a crash
    size = log.stat().st_size
    server.mount()
    err = [e for e in server.events("error") if "torn" in e["why"]]
    assert len(err) == 1 and str(size - 24) in err[0]["why"]
    assert read_one(server, "user")["body"] == "whole"


@pytest.mark.parametrize("garble", ["line start", "one byte"])
def test_damage_before_the_end_refuses_the_mount(server: Server, garble: str) -> None:
    server.mount()
    server.send("user", "one\ntwo")
    assert server.umount().returncode == 0
    log = server.state / "events.jsonl"
    lines = log.read_bytes().split(b"\n")
    offset = len(lines[0]) + 1
    if garble == "line start":
        lines[1] = b"garbage" + lines[1][7:]
    else:  # one flipped byte in the middle of the line: not UTF-8 any more
        mid = len(lines[1]) // 2
        lines[1] = lines[1][:mid] + b"\xff" + lines[1][mid + 1 :]
    log.write_bytes(b"\n".join(lines))
    before = log.read_bytes()
    # The checkpoint of the clean stop holds what those events said: start-up and
    # `replay` read only what follows it, and `replay --full` finds the damage.
    r = outheisfs("replay", "--state", str(server.state))
    assert r.returncode == 0, r.stderr
    r = outheisfs("replay", "--full", "--state", str(server.state))
    assert r.returncode == 1 and f"byte {offset}" in r.stderr and "line 2" in r.stderr
    shutil.rmtree(server.state / "checkpoints")  # without it, the whole log is read
    r = server.mount(check=False)
    assert r.returncode == 1
    assert f"byte {offset}" in r.stderr and "line 2" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(server.mp)
    assert server_processes(server.state) == []
    # `replay` refuses it the same way.
    r = outheisfs("replay", "--state", str(server.state))
    assert r.returncode == 1 and f"byte {offset}" in r.stderr and "line 2" in r.stderr
    assert log.read_bytes() == before  # nothing overwritten


def test_replay_prints_the_state(server: Server) -> None:
    server.write_config("[agents.echo]\n")
    server.mount()
    server.send("echo", "a\nb\nc")
    read_one(server, "echo")
    assert server.umount().returncode == 0
    r = outheisfs("replay", "--state", str(server.state), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert [m["body"] for m in s["agents"]["echo"]["queued"]] == ["b", "c"]
    assert s["agents"]["echo"]["delivered"] == 1
    messages = [e["seq"] for e in server.events("message")]
    r = outheisfs("replay", "--state", str(server.state), "--json", "--until", str(messages[0]))
    early = json.loads(r.stdout)
    assert [m["body"] for m in early["agents"]["echo"]["queued"]] == ["a"]
    r = outheisfs("replay", "--state", str(server.state))
    assert r.returncode == 0 and "echo" in r.stdout
    r = outheisfs("replay", "--state", str(server.root / "none"))
    assert r.returncode == 1 and "no event log" in r.stderr


def test_umount_of_a_stale_mount_cleans_it(server: Server) -> None:
    server.mount()
    server.kill9()
    r = server.umount()
    assert r.returncode == 0
    assert not os.path.ismount(server.mp)
    os.listdir(server.mp)  # usable again


def test_python_m_entry_point_matches_console_script() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "outheisfs", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "mount" in r.stdout
