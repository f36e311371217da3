"""One agent must not stall the others: what an agent's requests cost the server
is bounded, or paid off the event loop by that agent alone.

Two attacks, each while the operator reads a ctl file, which must stay quick:
an agent holds an unfinished line in its outbox, makes thousands of copies of
the descriptor and closes them from several threads (each close is a `flush`,
after which the server counts the opener's descriptors of the file in /proc: the
line waits while a copy remains); and a vault owner lists a folder of 100,000
names from several threads.
"""

from __future__ import annotations

import statistics
import subprocess
import time

from .conftest import PY, Server, take, wait_for

# Open the outbox, leave a line unfinished, dup the descriptor COPIES times, then
# close copies from THREADS threads for SECONDS; print how many closes were done.
CLOSER = """
import os, resource, sys, threading, time
outbox, copies, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds = float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
fd = os.open(outbox, os.O_WRONLY)
os.write(fd, b'{"to": "user", "body": "after the flood"}')
dups = [os.dup(fd) for _ in range(min(copies, hard - 64))]
print("ready", len(dups), flush=True)
closed = [0]
lock = threading.Lock()
end = time.monotonic() + seconds
def close_some():
    while time.monotonic() < end:
        with lock:
            if not dups:
                return
            d = dups.pop()
        os.close(d)
        with lock:
            closed[0] += 1
ts = [threading.Thread(target=close_some) for _ in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print("closed", closed[0], flush=True)
os._exit(0)  # the rest close at exit: the line goes whole when the last one does
"""


def test_closing_thousands_of_copies_does_not_stall_the_operator(server: Server) -> None:
    server.write_config('[agents.alice]\nsend = ["user"]\n[agents.bob]\n')
    server.mount()
    ctl = server.agent("bob", "ctl")
    ctl.read_text()
    quiet = []
    for _ in range(20):
        t0 = time.monotonic()
        ctl.read_text()
        quiet.append(time.monotonic() - t0)
    seconds = 6.0
    attacker = subprocess.Popen(
        [
            PY, "-m", "outheisfs", "run", "alice", "--mount", str(server.mp), "--",
            PY, "-c", CLOSER, str(server.agent("alice", "outbox")), "8000", "4", str(seconds),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert attacker.stdout is not None
        ready = attacker.stdout.readline().split()
        assert ready[0] == "ready" and int(ready[1]) >= 4000, ready
        start = time.monotonic()
        times = []
        while time.monotonic() - start < seconds - 0.5:
            t0 = time.monotonic()
            ctl.read_text()
            times.append(time.monotonic() - t0)
        out, err = attacker.communicate(timeout=120)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    assert attacker.returncode == 0, err
    closed = int(out.split()[1])
    print(f"quiet median {statistics.median(quiet) * 1000:.1f} ms; under attack "
          f"{len(times)} reads, median {statistics.median(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.0f} ms; {closed} copies closed")  # fmt: skip
    assert closed >= 8, "the attack ran"
    # The operator kept reading all along: no read took more than a fraction of
    # the attack's length (before, each waited for the agent's queued closes).
    assert max(times) < 1.0, times
    assert len(times) >= 10
    # The line waited while copies were open, and went once, whole, at the end.
    (msg,) = take(server, "user", 1, timeout=60)
    assert msg["from"] == "alice" and msg["body"] == "after the flood"
    wait_for(lambda: server.status("alice")["pid"] == "-", timeout=10)
    assert [e["id"] for e in server.events("message") if e["from"] == "alice"] == [msg["id"]]


# Threads listing one folder again and again (first reply only, as `ls` would start).
LISTER = """
import os, sys, threading, time
folder, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
done = [0]
end = time.monotonic() + seconds
def loop():
    while time.monotonic() < end:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        with os.scandir(fd) as it:
            next(it, None)
        os.close(fd)
        done[0] += 1
ts = [threading.Thread(target=loop) for _ in range(threads)]
print("ready", flush=True)
for t in ts:
    t.start()
for t in ts:
    t.join()
print("listed", done[0], flush=True)
"""


def test_listing_a_huge_vault_folder_does_not_stall_the_operator(server: Server) -> None:
    """A vault owner may fill its folder with names; reading and sifting them
    for a listing costs in proportion, so it is done off the event loop too."""
    server.write_config('[agents.alice]\n[agents.bob]\n[vault]\nbig = "alice"\n')
    server.mount()
    big = server.state / "vault" / "big"
    for i in range(100_000):
        (big / f"f{i:06}").touch()
    ctl = server.agent("bob", "ctl")
    seconds = 6.0
    attacker = subprocess.Popen(
        [
            PY, "-m", "outheisfs", "run", "alice", "--mount", str(server.mp), "--",
            PY, "-c", LISTER, str(server.p("vault", "big")), "4", str(seconds),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline() == "ready\n"
        start = time.monotonic()
        times = []
        while time.monotonic() - start < seconds - 1:
            t0 = time.monotonic()
            ctl.read_text()
            times.append(time.monotonic() - t0)
        out, err = attacker.communicate(timeout=120)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    assert attacker.returncode == 0, err
    print(f"{out.strip()}; {len(times)} reads, median "
          f"{statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.0f} ms")  # fmt: skip
    assert int(out.split()[1]) >= 4, "the attack ran"
    # Before, each read waited for the listings queued before it (a median of
    # 0.76 s, 100,000 names); now the listings wait for each other only.
    assert statistics.median(times) < 0.2 and max(times) < 2.0, times
