"""What one agent may hold of the server, through a real mount [SPEC §6].

An agent that parks request after request (blocked reads of an empty inbox) would
take every request worker of the server, and every other agent would hang. Past
`max_waiting` parked requests, its next one is refused with ENOBUFS and an
`error` event; the operator is not limited.
"""

from __future__ import annotations

import subprocess

from .conftest import PY, Server, outheisfs

# Twelve blocked `cat`s of one inbox; after a moment, say how each one ended.
CATS = """
for i in $(seq 12); do cat "$1" > /dev/null 2>> "$2" & done
sleep 1.5
jobs -r | wc -l
kill %1 %2 %3 %4 %5 %6 %7 %8 %9 %10 %11 %12 2> /dev/null
wait
"""


def alice_cats(server: Server, inbox: str, errs: str) -> subprocess.CompletedProcess[str]:
    mp = str(server.mp)
    return outheisfs("run", "alice", "--mount", mp, "--", "bash", "-c", CATS, "-", inbox, errs)


def test_an_agent_parks_at_most_max_waiting_requests_the_operator_more(server: Server) -> None:
    out = server.root / "out"  # where alice's processes may write, outside the mount
    out.mkdir()
    server.write_config(f'max_waiting = 8\n[agents.alice]\nfiles = {{ "{out}" = "rw" }}\n')
    server.mount()
    inbox, errs = str(server.agent("alice", "inbox")), out / "errs"
    r = alice_cats(server, inbox, str(errs))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["8"], "eight wait, the others were refused"
    assert errs.read_text().count("No buffer space available") == 4
    refused = [e for e in server.events("error") if e["errno"] == "ENOBUFS"]
    assert len(refused) == 4 and all(e["who"] == "alice" for e in refused)
    assert server.events("deliver") == [], "nothing was taken"
    # Once they are gone, alice may wait again; and the operator is not limited.
    errs.unlink()
    r = alice_cats(server, inbox, str(errs))
    assert r.stdout.split() == ["8"]
    errs.unlink()
    r = subprocess.run(["bash", "-c", CATS, "-", inbox, str(errs)], capture_output=True, text=True)
    assert r.stdout.split() == ["12"], "all of the operator's readers wait"
    assert "No buffer space" not in errs.read_text()


# Two open files of one outbox, each given 600 kB of an unterminated line: the
# second goes past max_unfinished, and fits once the first is closed.
HOARDER = """
import os, sys
def write(fd):
    try:
        os.write(fd, b"x" * 600_000)
        print("kept")
    except OSError as e:
        print(os.strerror(e.errno))
a, b = os.open(sys.argv[1], os.O_WRONLY), os.open(sys.argv[1], os.O_WRONLY)
write(a)
write(b)
try:
    os.close(a)  # its line goes now, and is refused: alice holds nothing to answer
except OSError as e:
    print(os.strerror(e.errno))
write(b)
os._exit(0)
"""


def test_an_agent_holds_at_most_max_unfinished_bytes_of_unterminated_lines(
    server: Server,
) -> None:
    server.write_config("max_unfinished = 1048576\n[agents.alice]\n")
    server.mount()
    outbox = str(server.agent("alice", "outbox"))
    r = outheisfs("run", "alice", "--mount", str(server.mp), "--", PY, "-c", HOARDER, outbox)
    assert r.stdout.splitlines() == [
        "kept",
        "No buffer space available",
        "Invalid argument",
        "kept",
    ], r.stderr
    refused = [e for e in server.events("error") if e["errno"] == "ENOBUFS"]
    assert len(refused) == 1 and refused[0]["who"] == "alice"
    assert "max 1048576" in refused[0]["why"]


# One read parks (the agent's one allowed wait); then 3,000 more each refused at once.
FLOOD = """
import os, sys, threading, time
inbox = sys.argv[1]
threading.Thread(target=lambda: os.read(os.open(inbox, os.O_RDONLY), 100), daemon=True).start()
time.sleep(0.5)
refused = 0
t0 = time.monotonic()
for _ in range(3000):
    fd = os.open(inbox, os.O_RDONLY)
    try:
        os.read(fd, 100)
    except OSError:
        refused += 1
    os.close(fd)
print(refused, time.monotonic() - t0)
os._exit(0)
"""


def test_refused_waits_are_error_events_at_a_bounded_rate(server: Server) -> None:
    """An agent looping on reads refused past max_waiting must not fill the log:
    like `denied` events, a burst of 1,000, then 100 a second, and the next one
    logged counts those left out."""
    server.write_config("max_waiting = 1\n[agents.alice]\n")
    server.mount()
    inbox = str(server.agent("alice", "inbox"))
    r = outheisfs("run", "alice", "--mount", str(server.mp), "--", PY, "-c", FLOOD, inbox)
    assert r.returncode == 0, r.stderr
    refused, took = r.stdout.split()
    assert int(refused) == 3000
    errors = [e for e in server.events("error") if e["errno"] == "ENOBUFS"]
    assert 1000 <= len(errors) <= 1000 + 100 * float(took) + 2
    r = outheisfs("run", "alice", "--mount", str(server.mp), "--", PY, "-c", FLOOD, inbox)
    later = [e for e in server.events("error") if e["errno"] == "ENOBUFS"][len(errors) :]
    # Every refusal of the first run is either logged or counted as left out by a
    # later logged one (the first of the second run counts the tail of the first).
    counted = len(errors) + sum(e.get("unlogged", 0) for e in errors)
    assert later and counted + later[0].get("unlogged", 0) == 3000
