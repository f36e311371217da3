"""Day-two operations through a real mount: `follow`, agent output, rights given to
`run` up front, the operator's vault domains, finding the mount, one `denied`
event per refused lookup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from outheisfs.models import parse_ts
from outheisfs.mounts import parse_mountinfo

from .conftest import PY, Server, outheisfs, sh, wait_for

# -- a refused lookup is one `denied` event --------------------------------------------

PROBE = """
import os
for p in os.environ["PROBE_PATHS"].split(":"):
    try:
        os.stat(p)
        print("ok")
    except OSError as e:
        print(e.errno)
"""


def test_a_refused_lookup_of_a_name_the_kernel_holds_is_one_denied_event(
    server: Server,
) -> None:
    server.write_config('[agents.alice]\n[agents.secret]\n[vault]\nnotes = "secret"\n')
    server.mount()
    mp = server.mp
    paths = [f"{mp}/agents/secret", f"{mp}/log", f"{mp}/vault/notes", f"{mp}/agents/secret/ctl"]
    # The operator's lookups and listings leave the names in the kernel's cache,
    # so an agent's lookup first revalidates them: the case that logged twice.
    assert sh(f"ls -R {mp} >/dev/null && stat {' '.join(paths)} >/dev/null").returncode == 0
    before = len(server.events("denied"))
    # The paths go in the environment: `run` looks at its command's arguments itself.
    r = subprocess.run(
        [PY, "-m", "outheisfs", "run", "alice", "--mount", str(mp), "--", PY, "-c", PROBE],
        env=dict(os.environ, PROBE_PATHS=":".join(paths)), capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert r.stdout.split() == ["2"] * 4, r.stderr
    time.sleep(0.4)  # past the hold-back of a lookup that no fresh lookup followed
    denied = [(e["who"], e["op"], e["path"]) for e in server.events("denied")[before:]]
    assert denied == [
        ("alice", "lookup", "/agents/secret"),
        ("alice", "lookup", "/log"),
        ("alice", "lookup", "/vault"),
        ("alice", "lookup", "/agents/secret"),
    ]


# -- which mount -----------------------------------------------------------------------


def test_the_mount_source_names_its_state_folder(mounted: Server) -> None:
    info = Path("/proc/self/mountinfo").read_text()
    ours = [m for m in parse_mountinfo(info) if m.mountpoint == mounted.mp]
    assert [m.state for m in ours] == [mounted.state]
    r = sh(f"df {mounted.mp} | tail -n1")
    assert r.stdout.startswith(f"outheisfs:{mounted.state} ")


def test_commands_default_to_outheis_mount(server: Server) -> None:
    mounted = server
    env = dict(os.environ, OUTHEIS_MOUNT=str(mounted.mp))
    r = subprocess.run([PY, "-m", "outheisfs", "mount", "--state", str(mounted.state)], env=env,
                       cwd=mounted.root, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    mounted.pids.append(mounted.pid)  # mounted where the variable says
    r = subprocess.run(
        [PY, "-m", "outheisfs", "run", "alice", "--", "sh", "-c", 'echo "$OUTHEIS_MOUNT"'],
        env=env, cwd=mounted.root, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(mounted.mp)
    assert any(e["command"].startswith("bind") for e in mounted.events("ctl"))
    r = subprocess.run([PY, "-m", "outheisfs", "umount"], env=env, cwd=mounted.root,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mounted.mp)


def test_without_a_mountpoint_run_finds_the_only_mount(mounted: Server) -> None:
    # In a mount namespace of its own, with every other outheisfs mount of this
    # machine detached there, ours is the only one: `run` needs no --mount.
    script = f"""
set -e
grep ' - fuse.outheisfs ' /proc/self/mountinfo | cut -d' ' -f5 | while read -r m; do
  m=$(printf '%b' "$m")
  [ "$m" = {mounted.mp} ] || umount -l "$m"
done
cd /
env -u OUTHEIS_MOUNT {PY} -m outheisfs run finder -- sh -c 'cat $OUTHEIS_MOUNT/agents/finder/ctl'
"""
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "name finder" in r.stdout


# -- the operator's vault domains; unveiled paths that do not exist -------------------


def test_a_domain_owned_by_user_is_the_operators_and_missing_grants_are_marked(
    server: Server,
) -> None:
    server.write_config(
        """
[agents.reader]
unveil = { "/vault/corpus" = "r", "/vault/later" = "r" }

[vault]
corpus = "user"
"""
    )
    server.mount()
    corpus = server.p("vault", "corpus")
    assert corpus.is_dir()  # created at mount
    (corpus / "a.txt").write_text("text\n")  # the operator's own domain
    got = sh(
        f"cd {server.mp} && {PY} -m outheisfs run reader --mount . -- bash -c "
        "'cat vault/corpus/a.txt; echo x > vault/corpus/b.txt || echo refused'"
    )
    assert got.stdout.splitlines() == ["text", "refused"], got.stderr
    assert "Permission denied" in got.stderr
    unveil = server.status("reader")["unveil"]
    assert unveil == "/vault/corpus:r,/vault/later:r(missing)"
    # An operator's unveil of a path that does not exist is accepted, and marked.
    server.agent("reader", "ctl").write_text("unveil /agents/nobody/inbox w\n")
    assert "/agents/nobody/inbox:w(missing)" in server.status("reader")["unveil"]
    server.p("vault", "later").mkdir()
    assert "/vault/later:r," in server.status("reader")["unveil"] + ","


# -- rights given to `run` up front -----------------------------------------------------


def test_run_gives_unveil_and_send_rights_before_the_command_starts(server: Server) -> None:
    server.write_config('[agents.notes]\n[agents.helper]\n[vault]\nnotes = "notes"\n')
    server.mount()
    (server.p("vault", "notes") / "a.txt").write_text("fact\n")
    script = "cat vault/notes/a.txt && echo hello > agents/helper/inbox && echo sent"
    plain = outheisfs("run", "scribe", "--mount", str(server.mp), "--", "bash", "-c", script,
                      cwd=server.mp)  # fmt: skip
    assert plain.returncode == 1 and "No such file" in plain.stderr
    granted = outheisfs(
        "run", "scribe", "--mount", str(server.mp), "--unveil", f"{server.mp}/vault/notes=r",
        "--send", "helper", "--", "bash", "-c", script, cwd=server.mp,
    )  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    assert granted.stdout.splitlines() == ["fact", "sent"]
    assert [m["body"] for m in server.events("message")] == ["hello"]
    cmds = [e["command"] for e in server.events("ctl") if e["agent"] == "scribe"]
    assert cmds[-3].startswith("bind ")
    assert cmds[-2:] == ["unveil /vault/notes r", "unveil /agents/helper/inbox w"]
    assert server.status("scribe")["unveil"] == "/agents/helper/inbox:w,/vault/notes:r"


def test_run_refuses_bad_rights_before_binding(server: Server) -> None:
    server.mount()
    for args, why in [
        (["--unveil", "/vault/x"], "give PATH=PERMS"),
        (["--unveil", "/vault/x=rx"], "give PATH=PERMS"),
        (["--unveil", "vault/x=r"], "absolute in the mount"),
        (["--send", "nobody"], "no such agent"),
    ]:
        r = outheisfs("run", "scribe", "--mount", str(server.mp), *args, "--", "true")
        assert r.returncode == 2 and why in r.stderr, (args, r.stderr)
    assert not server.agent("scribe", "ctl").exists()


# -- follow ----------------------------------------------------------------------------


class Follow:
    """`outheisfs follow` as a subprocess; each line it prints, with when it came."""

    def __init__(self, server: Server, *args: str) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "outheisfs", "follow", str(server.mp), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append((time.time(), json.loads(raw)))

    def wait_open(self, server: Server) -> None:
        """Until it has the log open and waits at its end (sleeping between reads):
        from then on it follows from the end."""
        log = str(server.p("log"))
        proc = Path(f"/proc/{self.proc.pid}")

        def at_the_end() -> bool:
            try:
                has_log = any(os.readlink(fd) == log for fd in (proc / "fd").iterdir())
                return has_log and (proc / "wchan").read_text() == "hrtimer_nanosleep"
            except OSError:
                return False

        wait_for(at_the_end, timeout=15, interval=0.001)

    def seqs(self) -> list[int]:
        return [ev["seq"] for _, ev in self.lines]

    def wait_seq(self, seq: int, timeout: float = 15) -> None:
        wait_for(lambda: self.lines and self.lines[-1][1]["seq"] >= seq, timeout=timeout)

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a user stops it."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read().decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def _last_seq(server: Server) -> int:
    return int(server.events()[-1]["seq"])


def test_follow_goes_on_across_remounts_with_nothing_repeated_or_missed(mounted: Server) -> None:
    for i in range(3):
        mounted.send("echo", f"before {i}")
    f = Follow(mounted, "--since", "2")
    try:
        f.wait_seq(_last_seq(mounted))
        assert mounted.umount().returncode == 0  # a clean remount
        mounted.mount()
        for i in range(3):
            mounted.send("worker", f"between {i}")
        f.wait_seq(_last_seq(mounted))
        mounted.kill9()  # the server killed: a stale mount, cleaned up by the next mount
        mounted.mount()
        for i in range(3):
            mounted.send("echo", f"after {i}")
        f.wait_seq(_last_seq(mounted))
        code, err = f.stop()
    finally:
        f.kill()
    assert code == 0 and "Traceback" not in err, err
    assert f.seqs() == list(range(2, _last_seq(mounted) + 1))  # no gap, no repeat
    assert [ev for _, ev in f.lines] == mounted.events()[1:]  # the log's own lines
    assert err.count("is back") == 2


def test_follow_filters_by_agent_and_type_from_the_end(mounted: Server) -> None:
    mounted.send("echo", "old")
    f = Follow(mounted, "--agent", "worker", "--type", "message,ack")
    try:
        f.wait_open(mounted)
        mounted.send("echo", "not for worker")
        mounted.send("worker", "for worker")
        assert sh(f"head -n1 {mounted.agent('worker', 'inbox')}").returncode == 0
        wait_for(lambda: len(f.lines) == 2, timeout=10)
        code, _ = f.stop()
    finally:
        f.kill()
    assert code == 0
    assert [(ev["type"], ev.get("body")) for _, ev in f.lines] == [
        ("message", "for worker"),
        ("ack", None),
    ]


def test_follow_shows_each_event_within_50_ms(mounted: Server) -> None:
    f = Follow(mounted)
    try:
        f.wait_open(mounted)
        n = 40
        for i in range(n):
            mounted.send("echo", f"m{i}")
            time.sleep(0.02)
        wait_for(lambda: len(f.lines) >= n, timeout=15)
        f.stop()
    finally:
        f.kill()
    lags = sorted(t - parse_ts(ev["ts"]) for t, ev in f.lines)
    median, p95, worst = lags[len(lags) // 2], lags[int(len(lags) * 0.95)], lags[-1]
    print(f"follow latency over {n} events: median {median * 1000:.1f} ms, "
          f"p95 {p95 * 1000:.1f} ms, max {worst * 1000:.1f} ms")  # fmt: skip
    assert median < 0.05, lags


# -- agent output ----------------------------------------------------------------------

# The last line has no newline: it is written when the pipe ends (sleep does not hold it).
POOL_SCRIPT = "echo hello from $OUTHEIS_INSTANCE; echo oops >&2; printf bye; exec sleep 60 >&- 2>&-"
POOL = f"""
[agents.pool]
command = ["bash", "-c", {json.dumps(POOL_SCRIPT)}]
instances = 2
"""


def _output(server: Server, name: str) -> list[list[str]]:
    text = server.agent(name, "output").read_text()
    return [line.split(" ", 4) for line in text.splitlines()]


def test_output_of_a_pool_carries_time_instance_pid_and_stream(server: Server) -> None:
    server.write_config(POOL)
    server.mount()
    wait_for(lambda: len(_output(server, "pool")) == 6, timeout=15)
    pids = {str(e["instance"]): str(e["pid"]) for e in server.events("start")}
    lines = _output(server, "pool")
    assert sorted((inst, pid, stream, text) for _, inst, pid, stream, text in lines) == sorted(
        (i, pids[i], stream, text)
        for i in ("0", "1")
        for stream, text in [("stdout", f"hello from {i}"), ("stderr", "oops"), ("stdout", "bye")]
    )
    for ts, *_ in lines:
        assert abs(parse_ts(ts) - time.time()) < 60
    # A file that only grows, read-only, the agent's own to read; on disk too.
    assert sh(f"echo x > {server.agent('pool', 'output')}").returncode != 0
    mine = outheisfs("run", "pool", "--mount", str(server.mp), "--", "cat", "output",
                     cwd=server.agent("pool", "output").parent)  # fmt: skip
    assert mine.stdout == server.agent("pool", "output").read_text()
    assert (server.state / "output" / "pool.log").read_text() == mine.stdout
    # A restarted instance: its new pid on its new lines.
    server.agent("pool", "ctl").write_text("restart\n")
    wait_for(lambda: len(_output(server, "pool")) == 12, timeout=20)
    new = {str(e["instance"]): str(e["pid"]) for e in server.events("start")}
    assert {(i, p) for _, i, p, *_ in _output(server, "pool")[6:]} == set(new.items())


def test_output_rotates_past_output_max(server: Server) -> None:
    script = 'for i in $(seq 1 300); do printf "line %04d %s\\n" $i ' + "x" * 30 + "; done"
    server.write_config(
        f'output_max = 4096\n[agents.talker]\ncommand = ["bash", "-c", {json.dumps(script)}]\n'
        'restart = "temporary"\n'
    )
    server.mount()
    last = "line 0300 " + "x" * 30
    wait_for(lambda: server.agent("talker", "output").read_text().endswith(last + "\n"), 15)
    current = server.agent("talker", "output").read_text()
    older = (server.state / "output" / "talker.log.1").read_text()
    assert len(current.encode()) <= 4096 and len(older.encode()) <= 4096
    kept = [line.split(" ", 4)[4] for line in (older + current).splitlines()]
    first = int(kept[0].split()[1])
    assert first > 1  # the oldest were dropped ...
    assert kept == [f"line {i:04d} " + "x" * 30 for i in range(first, 301)]  # ... the rest kept
