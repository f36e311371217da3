"""Faults and bad input lose nothing [SPEC §4.2, §5, §8], through real mounts.

- The server killed under load: writers send uniquely numbered messages as fast
  as they can; the server is killed with SIGKILL at a random moment; a new mount
  replays the log. Every message whose write returned success must be there
  once; nothing else may be there but the one message each writer had in flight
  when the server died.
- The server's death frees every waiting client at once.
- A writer killed in the middle of a line delivers nothing of that line; an
  unterminated line of a writer that exits without being killed is a message.
- A full disk (a small tmpfs under the state folder): writes fail with ENOSPC
  and leave nothing behind, the server stays up, and everything acknowledged is
  there once there is room again.
- A torn last record, cut at sample positions: the mount cuts it off, says
  where, and serves every earlier message.

OUTHEISFS_SOAK=N runs N rounds of the randomised tests instead of a few.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import PY, Server, _alive, outheisfs, parked, read_nonblock, sh, take, wait_for

TEXT: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 30}

WRITER = Path(__file__).parent / "agents" / "numbered_writer.py"
SOAK = int(os.environ.get("OUTHEISFS_SOAK", "0"))


def holds_open(pid: int, path: str) -> bool:
    """The process has `path` open."""
    fds = f"/proc/{pid}/fd"
    try:
        return any(os.readlink(f"{fds}/{fd}") == path for fd in os.listdir(fds))
    except OSError:
        return False


def one_round(server: Server, writers: int, rng: random.Random) -> dict[str, int]:
    inbox = str(server.agent("sink", "inbox"))
    procs = [
        subprocess.Popen([PY, str(WRITER), inbox, f"w{k}"], stdout=subprocess.PIPE, text=True)
        for k in range(writers)
    ]
    # Each writer has the inbox open before the random moment of the kill (a
    # loaded machine may take longer than that to start Python).
    wait_for(lambda: all(holds_open(p.pid, inbox) for p in procs), timeout=30)
    time.sleep(rng.uniform(0.1, 0.6))
    server.kill9()
    acked: set[str] = set()
    attempted: set[str] = set()
    for k, p in enumerate(procs):
        out, _ = p.communicate(timeout=30)
        done, in_flight = out.splitlines()
        acked |= {f"w{k}-{i}" for i in done.split()}
        attempted |= acked | {f"w{k}-{in_flight}"}
    if server.config is not None and "disk" in server.config.read_text():
        try:  # what only the page cache held would be lost now (root only)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            pass
    server.mount()
    r = outheisfs("replay", "--state", str(server.state), "--json")
    assert r.returncode == 0, r.stderr
    found = Counter(m["body"] for m in json.loads(r.stdout)["agents"]["sink"]["queued"])
    # The log itself, read directly, agrees with the replay.
    logged = Counter(e["body"] for e in server.events("message"))
    assert logged == found
    return {
        "acknowledged": len(acked),
        "lost": len(acked - set(found)),
        "duplicated": sum(n - 1 for n in found.values() if n > 1),
        "unexpected": len(set(found) - attempted),
    }


@pytest.mark.parametrize("durability", ["process", "disk"])
def test_server_killed_under_load_loses_nothing(server: Server, durability: str) -> None:
    server.write_config(f'durability = "{durability}"\nmax_queue = 10000000\n[agents.sink]\n')
    server.mount()
    rng = random.Random()
    rounds = SOAK or 3
    totals: Counter[str] = Counter()
    for _ in range(rounds):
        got = one_round(server, writers=3, rng=rng)
        totals.update(got)
        assert (got["lost"], got["duplicated"], got["unexpected"]) == (0, 0, 0), got
        # Start the next round from an empty inbox.
        server.umount()
        for f in server.state.glob("events.jsonl"):
            f.unlink()
        for f in (server.state / "streams").glob("*"):
            f.unlink()
        server.mount()
    assert totals["acknowledged"] > 0
    print(f"{durability}: {rounds} rounds, {dict(totals)}")


def test_server_death_frees_every_waiting_client_and_the_next_mount_works(
    server: Server,
) -> None:
    """Blocked readers and a writer blocked on a full inbox get an error at once;
    none hangs; a new mount over the stale one serves again [SPEC §2, §4.2]."""
    server.write_config("max_queue = 1\n[agents.full]\n[agents.empty]\n")
    server.mount()
    server.send("full", "fills it")
    full_inbox, empty_inbox = server.agent("full", "inbox"), server.agent("empty", "inbox")
    waiting = [
        subprocess.Popen(["cat", str(empty_inbox)], stderr=subprocess.DEVNULL),
        subprocess.Popen(["cat", str(empty_inbox)], stderr=subprocess.DEVNULL),
        subprocess.Popen(
            ["bash", "-c", f"echo waits for room > {full_inbox}"], stderr=subprocess.DEVNULL
        ),
    ]
    wait_for(lambda: all(parked(p.pid) for p in waiting))
    assert all(p.poll() is None for p in waiting), "they wait"
    server.kill9()
    t0 = time.monotonic()
    codes = [p.wait(timeout=5) for p in waiting]
    assert time.monotonic() - t0 < 2
    assert all(c != 0 for c in codes), codes
    server.mount()  # over the stale mount
    (msg,) = take(server, "full", 1)
    assert msg["body"] == "fills it"
    assert server.status("full")["queued"] == "0"  # not the write that never returned


# -- writers killed in the middle of a line [SPEC §4.2] ----------------------------------

# Each writer sends a whole line, then the first half of another in a second
# write(2), says "ready" and waits to be killed before the second half.
HALF_WRITERS = {
    "python": [
        PY,
        "-c",
        """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
os.write(fd, b"whole line\\n")
os.write(fd, b"first half of a line, ")
print("ready", flush=True)
time.sleep(60)
os.write(fd, b"second half\\n")
""",
    ],
    # The file is opened and written by a thread that is not the main one.
    "python-thread": [
        PY,
        "-c",
        """
import os, sys, threading, time
ready = threading.Event()
def write():
    fd = os.open(sys.argv[1], os.O_WRONLY)
    os.write(fd, b"whole line\\n")
    os.write(fd, b"first half of a line, ")
    ready.set()
    time.sleep(60)
    os.write(fd, b"second half\\n")
threading.Thread(target=write, daemon=True).start()
ready.wait()
print("ready", flush=True)
time.sleep(60)
""",
    ],
    # `exec sleep` keeps the shell's descriptor in the same process.
    "bash": [
        "bash",
        "-c",
        'exec 3>"$1"; printf "whole line\\n" >&3; printf "first half of a line, " >&3;'
        " echo ready; exec sleep 60",
        "bash",
    ],
}


def take_all(server: Server, name: str) -> list[dict[str, Any]]:
    """Every queued message, read whole however long (one open file, non-blocking)."""
    out: list[dict[str, Any]] = []
    fd = os.open(server.agent(name, "inbox"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        line = b""
        while True:
            try:
                line += os.read(fd, 1 << 20)
            except BlockingIOError:
                assert line == b"", "a read that stopped in the middle of a message"
                return out
            if line.endswith(b"\n"):
                out.append(json.loads(line))
                line = b""
    finally:
        os.close(fd)


def logged_bodies(server: Server) -> list[Any]:
    return [e["body"] for e in server.events("message")]


@pytest.mark.parametrize("writer", sorted(HALF_WRITERS))
def test_writer_killed_between_two_halves_of_a_line_delivers_nothing_of_it(
    server: Server, writer: str
) -> None:
    server.write_config("[agents.sink]\n")
    server.mount()
    inbox = str(server.agent("sink", "inbox"))
    for sig in (signal.SIGKILL, signal.SIGTERM):
        with subprocess.Popen(
            [*HALF_WRITERS[writer], inbox], stdout=subprocess.PIPE, text=True
        ) as p:
            try:
                assert p.stdout is not None and p.stdout.readline() == "ready\n"
                p.send_signal(sig)
                assert p.wait(timeout=10) == -sig
            finally:
                p.kill()
        time.sleep(0.3)  # time for a late close to show up, if one were to
        (msg,) = take(server, "sink", 1)
        assert msg["body"] == "whole line", sig
        assert read_nonblock(server, "sink") is None, sig
    assert not any("half" in str(b) for b in logged_bodies(server))


TWO_OPENS = """
import os, sys
keep = os.open(sys.argv[1], os.O_WRONLY)  # another open file of the same inbox
fd = os.open(sys.argv[1], os.O_WRONLY)
os.write(fd, sys.argv[2].encode())
try:
    os.close(fd)
    print("closed")
except OSError as e:
    print(os.strerror(e.errno))
"""


def test_close_of_its_own_open_file_sends_the_line_and_reports_a_refusal(
    server: Server,
) -> None:
    """A process that has the inbox open twice: closing one open file sends its
    unterminated line then, and close() tells when it was refused. (Closing a
    mere copy of a descriptor, as bash's `printf >&3` does, lets the line go on.)"""
    server.write_config("[agents.sink]\n")
    server.mount()
    inbox = str(server.agent("sink", "inbox"))
    bad = subprocess.run([PY, "-c", TWO_OPENS, inbox, '{"body": 1, "bogus": 2}'], **TEXT)
    assert bad.stdout.split("\n")[0] == "Invalid argument"
    good = subprocess.run([PY, "-c", TWO_OPENS, inbox, "sent at close"], **TEXT)
    assert good.stdout.split("\n")[0] == "closed"
    assert [m["body"] for m in take(server, "sink", 1)] == ["sent at close"]


def test_unterminated_line_of_a_writer_not_killed_is_one_message(server: Server) -> None:
    """Exit 0 or a non-zero status: the last line is sent whole, once. Only a
    signal drops it (SPEC §4.2); the exit status says nothing about the line."""
    server.write_config("[agents.sink]\n")
    server.mount()
    inbox = server.agent("sink", "inbox")
    no_newline = server.root / "no-newline"
    no_newline.write_bytes(b"x" * 5000)
    writers: list[tuple[list[str], int, str]] = [
        (["bash", "-c", f"printf 'printf, no newline' > {inbox}"], 0, "printf, no newline"),
        (["bash", "-c", f"head -c 1000 {no_newline} > {inbox}"], 0, "x" * 1000),
        (
            [PY, "-c", f"open({str(inbox)!r}, 'w').write('python, closed at exit')"],
            0,
            "python, closed at exit",
        ),
        (
            [
                PY,
                "-c",
                f"import os; os.write(os.open({str(inbox)!r}, os.O_WRONLY), b'os._exit(3)')"
                "; os._exit(3)",
            ],
            3,
            "os._exit(3)",
        ),
        (
            ["bash", "-c", f"exec 3>{inbox}; printf 'bash, exit 3' >&3; exit 3"],
            3,
            "bash, exit 3",
        ),
        # One line in pieces through a dup of fd 3: each `>&3` closes a copy.
        (
            ["bash", "-c", f"exec 3>{inbox}; printf 'in ' >&3; printf 'pieces' >&3; /bin/echo >&3"],
            0,
            "in pieces",
        ),
    ]
    for cmd, status, _ in writers:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        assert r.returncode == status, (cmd, r.stderr)
        assert r.stderr == ""
    expected = [body for _, _, body in writers]
    got = [m["body"] for m in take(server, "sink", len(expected))]
    assert got == expected
    assert read_nonblock(server, "sink") is None
    assert server.events("error") == []


CHUNK = 64 << 10
BIG = 5 * CHUNK  # bytes of each big line, its newline included
HUGE = (5 << 20) // 2  # one write(2) of it is cut into several kernel requests

# Writes stdin's line to the inbox in 16 KiB pieces, or in one write(2) if told.
BIG_WRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
line = sys.stdin.buffer.read()
print("go", flush=True)
if sys.argv[2] == "one":
    os.write(fd, line)
else:
    for i in range(0, len(line), 16384):
        os.write(fd, line[i : i + 16384])
        time.sleep(0.001)
"""


def written(pid: int) -> int:
    """Bytes the process has passed to write(2) so far, as /proc counts them."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def test_big_message_killed_midway_is_never_delivered_in_part(server: Server) -> None:
    server.write_config(f"max_message = {4 << 20}\n[agents.sink]\n")
    server.mount()
    inbox = str(server.agent("sink", "inbox"))
    rng = random.Random()
    sent: dict[str, str] = {}  # body -> how it was written
    cut: Counter[str] = Counter()

    def body(tag: str, size: int) -> bytes:
        text = f"{tag}:" + rng.randbytes(size // 2).hex()
        text = text[: size - 1]
        sent[text] = tag.rstrip("0123456789")
        return text.encode() + b"\n"

    # dd copies a pipe, one write(2) per 64 KiB, and is killed after a random
    # number of them has returned, so always in the middle of the line.
    rounds = SOAK or 4
    for r in range(rounds):
        line = body(f"dd{r}", BIG)
        k = rng.randrange(1, BIG // CHUNK)
        with subprocess.Popen(
            ["dd", f"of={inbox}", f"bs={CHUNK}", "iflag=fullblock", "status=none"],
            stdin=subprocess.PIPE,
        ) as p:
            assert p.stdin is not None
            try:
                p.stdin.write(line[: k * CHUNK])
                p.stdin.flush()
                wait_for(lambda p=p, k=k: written(p.pid) >= k * CHUNK, timeout=10)
                p.kill()
                assert p.wait(timeout=10) == -signal.SIGKILL
            finally:
                p.kill()
                p.stdin.close()
        cut["dd"] += 1
    # Python writers killed at random moments: between its 16 KiB writes, or
    # inside one write(2) that the kernel sends as several requests.
    # The delays span about the time each takes to write here.
    for kind, size, within in (("pieces", BIG, 0.03), ("one", HUGE, 0.01)):
        for r in range(rounds):
            line = body(f"{kind}{r}", size)
            with subprocess.Popen(
                [PY, "-c", BIG_WRITER, inbox, kind],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            ) as p:
                assert p.stdin is not None and p.stdout is not None
                try:
                    p.stdin.write(line)
                    p.stdin.close()
                    assert p.stdout.readline() == b"go\n"
                    time.sleep(rng.uniform(0, within))
                    p.kill()
                    p.wait(timeout=30)
                finally:
                    p.kill()
    time.sleep(0.3)  # time for a late close to show up, if one were to
    logged = logged_bodies(server)
    assert all(b in sent for b in logged), "a message that is part of a line"
    assert len(set(logged)) == len(logged), "a line sent twice"
    assert not any(sent[b] == "dd" for b in logged)
    assert sorted(m["body"] for m in take_all(server, "sink")) == sorted(logged)
    for b, kind in sent.items():
        if b not in logged and kind != "dd":
            cut[kind] += 1
    print(f"{len(sent)} big lines killed midway; cut short, so not delivered: {dict(cut)}")


# -- a full disk [SPEC §4.2, §5, §8] ------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[None]:
    """A tmpfs of `size` mounted on `path` for the duration (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> None:
    """Write zeros to `path` until the disk is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def whole_log(server: Server) -> list[dict[str, Any]]:
    """Every line of the event log parses, and seq rises by one from 1."""
    events = server.events()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert server.state.joinpath("events.jsonl").read_bytes().endswith(b"\n")
    return events


def fill_the_page(server: Server, to: str) -> str:
    """Send one message whose record ends the log exactly at a page boundary, so
    that on a full tmpfs not one more byte fits. Returns its body."""
    log = server.state / "events.jsonl"
    like = server.events("message")[-1]  # same sender and recipient
    seq = server.events()[-1]["seq"] + 1

    def size(body: str) -> int:
        ev = {**like, "seq": seq, "body": body}
        return len(json.dumps(ev, separators=(",", ":"), ensure_ascii=False)) + 1

    room = -log.stat().st_size % os.sysconf("SC_PAGESIZE")
    assert room >= size(""), f"only {room} bytes left in the page"
    body = "f" * (room - size(""))
    server.send(to, body)
    assert log.stat().st_size % os.sysconf("SC_PAGESIZE") == 0
    return body


def test_full_disk_refuses_writes_keeps_every_acknowledged_message(server: Server) -> None:
    """On a full disk a write fails with ENOSPC and leaves nothing behind, reads
    go on while their small events fit, the server stays up, and once there is
    room again everything acknowledged is there [SPEC §4.2, §5]."""
    server.write_config("[agents.sink]\n")
    with small_disk(server.state, "1m"):
        try:
            server.mount()
            pid = server.pid
            queued = [f"kept-{i}" for i in range(4)]
            for body in queued:
                server.send("sink", body)
            fill(server.state / "filler")
            # Full, but for the rest of the log's last page.
            inbox = server.agent("sink", "inbox")
            refused = os.open(inbox, os.O_WRONLY)
            try:
                # A line too big for that rest; the same write(2) begins another
                # line, which must die with it.
                with pytest.raises(OSError) as e:
                    os.write(refused, b"y" * 20000 + b"\nrest of a refused write")
                assert e.value.errno == errno.ENOSPC
                (err,) = server.events("error")  # small enough to fit
                assert (err["errno"], err["where"]) == ("ENOSPC", "/agents/sink/inbox")
                # Queued messages are still served.
                assert json.loads(sh(f"head -n1 {inbox}").stdout)["body"] == queued.pop(0)
                wait_for(lambda: server.status("sink")["inflight"] == "0")  # acked
                # Full to the last byte.
                queued.append(fill_the_page(server, "sink"))
                with pytest.raises(OSError) as e:
                    Path(inbox).write_text("small\n")
                assert e.value.errno == errno.ENOSPC
                r = sh(f"echo from the shell > {inbox}")
                assert r.returncode != 0 and "No space left on device" in r.stderr
                r = sh(f"head -n1 {inbox}")
                assert r.returncode != 0 and "No space left on device" in r.stderr
                # Nothing partial in the log, nothing missing, nothing taken; the
                # same server answers.
                events = whole_log(server)
                logged = [e["body"] for e in events if e["type"] == "message"]
                assert logged == ["kept-0", *queued]
                assert server.pid == pid
                status = server.status("sink")
                assert (status["queued"], status["inflight"]) == (str(len(queued)), "0")
                assert server.p("log").read_bytes() == (server.state / "events.jsonl").read_bytes()
                # Room again.
                subprocess.run(
                    ["mount", "-o", "remount,size=4m", str(server.state)],
                    check=True,
                    capture_output=True,
                )
            finally:
                os.close(refused)  # nothing of the refused write is left to send
            server.send("sink", "after")
            queued.append("after")
            assert json.loads(sh(f"head -n1 {inbox}").stdout)["body"] == queued.pop(0)
            assert server.pid == pid
            assert server.umount().returncode == 0
            server.mount()
            assert [m["body"] for m in take_all(server, "sink")] == queued
            whole_log(server)
        finally:
            server.cleanup()


def test_umount_on_a_full_disk_comes_down_cleanly(server: Server) -> None:
    """`outheisfs umount` with no room left: the server stops, nothing stays
    mounted; `mount` then says why it cannot, and with room again it replays
    every message [SPEC §2, §5]."""
    server.write_config("[agents.sink]\n")
    with small_disk(server.state, "1m"):
        try:
            server.mount()
            pid = server.pid
            for body in ("one", "two"):
                server.send("sink", body)
            for f in ("agents/sink/log", "agents/user/log", "agents/user/outbox"):
                server.p(f).read_bytes()  # as `cat` would: the stream files catch up
            fill(server.state / "filler")
            r = server.umount()
            assert r.returncode == 0, r.stderr
            assert not os.path.ismount(server.mp)
            assert os.listdir(server.mp) == []  # not a stale mount left behind
            wait_for(lambda: not _alive(pid), timeout=10)
            # Mounting again without room (the stop freed a little): one line that
            # says why, nothing mounted.
            fill(server.state / "more filler")
            r = server.mount(check=False)
            assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
            assert not os.path.ismount(server.mp)
            subprocess.run(
                ["mount", "-o", "remount,size=4m", str(server.state)],
                check=True,
                capture_output=True,
            )
            server.mount()
            assert [m["body"] for m in take_all(server, "sink")] == ["one", "two"]
            whole_log(server)
        finally:
            server.cleanup()


# -- a torn log through a real mount [SPEC §5] --------------------------------------------


def test_torn_last_record_is_cut_and_every_earlier_message_is_served(server: Server) -> None:
    """The server dies while writing its last record: whatever part of that record
    reached the file, the next mount cuts it off with an `error` event that says
    where, and serves every earlier message in order. (Every cut position is
    checked below FUSE in test_eventlog; here a sample, through real mounts.)"""
    server.write_config("[agents.sink]\n")
    server.mount()
    earlier = ["first", "second", "third"]
    for body in [*earlier, "torn"]:
        server.send("sink", body)
    server.kill9()  # the last record is the message "torn"
    log = server.state / "events.jsonl"
    full = log.read_bytes()
    start = full.rindex(b"\n", 0, len(full) - 1) + 1
    record = full[start:]
    assert json.loads(record)["body"] == "torn"
    seq = json.loads(record)["seq"]
    saved = server.root / "saved"
    shutil.copytree(server.state, saved)
    rng = random.Random()
    n = len(record)
    cuts = {
        "first byte": record[:1],
        "middle": record[: n // 2],
        "random": record[: rng.randrange(2, n - 1)],
        "all but the newline": record[:-1],
        "zeros": bytes(n),  # the file grew, its data never reached the disk
    }
    for what, tail in cuts.items():
        shutil.rmtree(server.state)
        shutil.copytree(saved, server.state)
        log.write_bytes(full[:start] + tail)
        server.mount()
        try:
            events = whole_log(server)
            torn = [e for e in events if e["type"] == "error" and "torn" in e["why"]]
            assert len(torn) == 1, what
            assert f"at byte {start} ({len(tail)} bytes)" in torn[0]["why"], what
            assert torn[0]["seq"] == seq  # never acknowledged, so its seq is used again
            got = []
            for _ in earlier:
                r = sh(f"head -n1 {server.agent('sink', 'inbox')}", timeout=10)
                assert r.returncode == 0, r.stderr
                got.append(json.loads(r.stdout)["body"])
            assert got == earlier, what
            assert read_nonblock(server, "sink") is None, what
        finally:
            server.umount()
