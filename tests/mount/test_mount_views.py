"""Per-agent views through a real mount, with real processes [SPEC §6, §4.2, §4.5].

Agents here are `tests/agents/viewprobe.py`: a process that runs the file
operations it is asked for (over two FIFOs outside the mount) and answers with
what each one gave. One runs through `outheisfs run`, one is started by the
supervisor from the config; the operator is the test process and plain
subprocesses. Every refusal must be ENOENT (hidden) or EACCES (visible, beyond
its rights) and leave a `denied` event naming who, the operation and the path.
"""

from __future__ import annotations

import errno
import json
import os
import select
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from outheisfs import confine

from .conftest import PY, Server, outheisfs, take, wait_for

VIEWPROBE = Path(__file__).parent / "agents" / "viewprobe.py"
OK = "OK"
FILES = ["ctl", "dead", "errors", "inbox", "log", "outbox", "output"]
EVERYONE = sorted(["user", "me", "sup", "friend", "peer", "hidden"])  # see matrix_config

# The view under test, the same for the `run` agent and the supervised one:
# it may send to friend, reads peer's folder and the root log, and nothing more.
VIEW = 'send = ["friend"]\nunveil = { "/agents/peer" = "r", "/log" = "r" }\n'


# -- driving probes -----------------------------------------------------------------------


class Probe:
    """One viewprobe process, asked over FIFOs: `do(ops)` returns their results."""

    def __init__(self, root: Path, tag: str) -> None:
        root = root / "io"  # the agents' `files` (see `io`)
        root.mkdir(exist_ok=True)
        self.fin = root / f"{tag}.in"
        self.fout = root / f"{tag}.out"
        for fifo in (self.fin, self.fout):
            if not fifo.exists():
                os.mkfifo(fifo)
        self.env = {"PROBE_IN": str(self.fin), "PROBE_OUT": str(self.fout)}
        self.proc: subprocess.Popen[bytes] | None = None  # when the test started it
        self.stderr = root / f"{tag}.stderr"
        self._r = self._w = -1
        self._buf = b""

    def connect(self, timeout: float = 10.0) -> Probe:
        self.disconnect()
        self._r = os.open(self.fout, os.O_RDWR | os.O_NONBLOCK)

        def opened() -> bool:
            try:
                self._w = os.open(self.fin, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                # No reader yet: the probe has not started, or it failed.
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(
                        f"probe exited with {self.proc.returncode}: {self.stderr.read_text()}"
                    ) from None
                return False
            return True

        wait_for(opened, timeout=timeout)
        os.set_blocking(self._w, True)
        return self

    def disconnect(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1
        self._buf = b""

    def do(self, ops: list[list[Any]], timeout: float = 15.0) -> list[Any]:
        os.write(self._w, (json.dumps(ops) + "\n").encode())
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self._r], [], [], timeout)
            if not ready:
                raise AssertionError(f"the probe did not answer {ops} in {timeout} s")
            try:
                self._buf += os.read(self._r, 1 << 20)
            except BlockingIOError:
                continue
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]

    def one(self, op: list[Any]) -> Any:
        return self.do([op])[0]

    def exit(self) -> None:
        assert self.do([["exit"]]) == ["OK"]
        self.disconnect()
        if self.proc is not None:
            self.proc.wait(timeout=10)


@dataclass
class Probes:
    server: Server
    started: list[Probe]

    def run(self, name: str) -> Probe:
        """A probe started with `outheisfs run NAME`."""
        return self._start(["-m", "outheisfs", "run", name, "--mount", str(self.server.mp),
                            "--", PY, str(VIEWPROBE)], f"run-{name}")  # fmt: skip

    def plain(self, tag: str = "plain") -> Probe:
        """A probe that is no agent's process: the operator."""
        return self._start([str(VIEWPROBE)], tag)

    def _start(self, args: list[str], tag: str) -> Probe:
        p = Probe(self.server.root, tag)
        out = open(p.stderr, "ab")
        p.proc = subprocess.Popen(
            [PY, *args], env=dict(os.environ, **p.env), cwd=self.server.root,
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
        out.close()
        self.started.append(p)
        return p.connect()

    def supervised(self, tag: str) -> Probe:
        """The probe the supervisor started with this tag's FIFOs (see `probe_agent`)."""
        p = Probe(self.server.root, tag)
        self.started.append(p)
        return p.connect()


@pytest.fixture
def probes(server: Server) -> Iterator[Probes]:
    ps = Probes(server, [])
    try:
        yield ps
    finally:
        for p in ps.started:
            p.disconnect()
            if p.proc is not None and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()


def io(server: Server) -> str:
    """The config line that lets an agent's processes use the probes' FIFOs and
    outputs, outside the mount (they are confined to their paths)."""
    (server.root / "io").mkdir(exist_ok=True)
    return f'files = {{ "{server.root / "io"}" = "rw" }}\n'


def probe_agent(server: Server, name: str, extra: str = "") -> str:
    """Config lines for a supervised viewprobe agent NAME (its FIFOs are tagged NAME)."""
    p = Probe(server.root, name)
    return (
        f"[agents.{name}]\n"
        f'command = ["{PY}", "{VIEWPROBE}"]\n'
        f'env = {{ PROBE_IN = "{p.fin}", PROBE_OUT = "{p.fout}" }}\n'
        f"{io(server)}{extra}"
    )


class Events:
    """New events of the log since the last call (read from the state folder)."""

    def __init__(self, server: Server) -> None:
        self.path = server.state / "events.jsonl"
        self.offset = 0
        self.new()

    def new(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def messages(server: Server, to: str) -> list[tuple[str, Any]]:
    return [(e["from"], e["body"]) for e in server.events("message") if e["to"] == to]


def walked(path: str) -> set[str]:
    """Every mount path a lookup of `path` (relative to the mount) passes through."""
    seen = {"/"}
    cur: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if cur:
                cur.pop()
        else:
            cur.append(part)
        seen.add("/" + "/".join(cur))
    return seen


# -- the matrix ---------------------------------------------------------------------------

# What a refused operation may log as its `op`: the refusing request.
DENIED_OPS = {
    "stat": {"lookup", "stat"},
    "mode": {"lookup", "stat"},
    "read": {"lookup", "open"},
    "write": {"lookup", "open"},
    "listdir": {"lookup", "readdir"},
    "mkdir": {"lookup", "mkdir"},
    "rmdir": {"lookup", "rmdir"},
    "rename": {"lookup", "rename"},
    "unlink": {"lookup", "unlink"},
    "link": {"lookup", "link"},
    "symlink": {"lookup", "symlink"},
    "truncate": {"lookup", "setattr"},
    "access": {"lookup", "access"},
}


@dataclass
class Cell:
    key: tuple[str, ...]  # the operation and its paths as written in the matrix
    op: list[Any]  # as sent to the probe: paths absolute
    expect: Any
    denied: bool  # a `denied` event is due
    where: set[str]  # the mount paths such an event may name

    def __str__(self) -> str:
        return " ".join(self.key)


def matrix(
    server: Server,
    me: str,
    other: str,
    fds: dict[str, int],
    confined: bool = True,
    holder: int = 0,
) -> list[Cell]:
    """Operation x path -> what agent `me` (with VIEW) must get [SPEC §6].

    A path is relative to the mount; "@NAME" is NAME in the agents' `io` folder
    (outside the mount); "/proc/..." reaches an operator's open file without a
    lookup by name: the kernel refuses that to a confined agent (EACCES: no
    process of the operator's is within its reach), and the server refuses it to
    an unconfined one. ENOENT and EACCES are refusals, with a `denied` event,
    unless `denied=False` (the name exists for no one, or the kernel answered by
    itself).
    """
    mp, root = str(server.mp), str(server.root / "io")
    a = f"agents/{me}"
    cells: list[Cell] = []

    def cell(op: str, *paths: str, expect: Any, denied: bool | None = None, via: str = "") -> None:
        # via: for a /proc path, the mount path it reaches
        full: list[str] = []
        where: set[str] = walked(via)
        for p in paths:
            if p.startswith("@"):
                full.append(f"{root}/{p[1:]}")
                target = os.path.realpath(full[-1])
                inside = target.startswith(mp + "/")
                where |= walked(os.path.relpath(target, mp)) if inside else set()
            elif p.startswith("/"):
                full.append(p)
            else:
                full.append(f"{mp}/{p}")
                where |= walked(p)
        if denied is None:
            denied = expect in ("ENOENT", "EACCES")
        where.discard("/")  # the root is everyone's: never the refused path
        # /proc paths are named by what they reach: pids and fds differ from run to run.
        key = tuple(f"/proc/PID/fd/<{via}>" if p.startswith("/proc/") else p for p in paths)
        cells.append(Cell((op, *key), [op, *full], expect, denied, where))

    for p in ["", "agents", a, *(f"{a}/{f}" for f in FILES), "agents/friend",
              "agents/friend/inbox", "agents/peer", *(f"agents/peer/{f}" for f in FILES),
              "log", f"{a}/../peer/log", "agents//peer//log", f"agents/friend/../{me}/log",
              f"{a}/./log", "agents/peer/", f"{a}//inbox"]:  # fmt: skip
        cell("stat", p, expect=OK)
    for p in ["agents/hidden", *(f"agents/hidden/{f}" for f in FILES), "agents/user",
              "agents/user/inbox", f"agents/{other}", f"agents/{other}/inbox", "ctl", "vault",
              "agents/friend/outbox", "agents/friend/ctl", "agents/friend/log",
              f"{a}/../hidden/log", "agents//hidden//log", f"agents/hidden/../{me}/log",
              "agents/./hidden", "agents/hidden/", f"{a}/../{other}/ctl"]:  # fmt: skip
        cell("stat", p, expect="ENOENT")
    for p in ("agents/nosuch", f"{a}/nosuch", f"{a}/../nosuch/log"):  # exists for no one
        cell("stat", p, expect="ENOENT", denied=False)

    # The mode shows what the agent may do [SPEC §4: no bit for what cannot be done].
    for p, mode in [("", 0o550), ("agents", 0o550), (a, 0o550), (f"{a}/inbox", 0o660),
                    (f"{a}/outbox", 0o660), (f"{a}/ctl", 0o660), (f"{a}/log", 0o440),
                    ("agents/friend", 0o550), ("agents/friend/inbox", 0o220),
                    ("agents/peer/inbox", 0o000), ("agents/peer/outbox", 0o440),
                    ("agents/peer/ctl", 0o440), ("agents/peer/log", 0o440),
                    ("log", 0o440)]:  # fmt: skip
        cell("mode", p, expect=mode)

    seen = sorted(["friend", me, "peer"])
    for p, names in [("", ["agents", "log"]), ("agents", seen), (a, FILES),
                     ("agents/friend", ["inbox"]), ("agents/peer", FILES),
                     ("agents//friend/", ["inbox"]), (f"{a}/..", seen)]:  # fmt: skip
        cell("listdir", p, expect=names)
    for p in ("agents/hidden", "agents/user", f"agents/{other}", f"{a}/../hidden", "vault"):
        cell("listdir", p, expect="ENOENT")
    cell("listdir", f"{a}/inbox", expect="ENOTDIR", denied=False)

    for p, want in [(f"{a}/inbox", OK), (f"{a}/outbox", OK), (f"{a}/ctl", OK), (f"{a}/log", OK),
                    ("agents/friend/inbox", "EACCES"), ("agents/friend/log", "ENOENT"),
                    ("agents/peer/inbox", "EACCES"), ("agents/peer/outbox", OK),
                    ("agents/peer/ctl", OK), ("agents/peer/log", OK),
                    ("agents/hidden/inbox", "ENOENT"), ("agents/hidden/log", "ENOENT"),
                    ("agents/user/inbox", "ENOENT"), ("ctl", "ENOENT"), ("log", OK),
                    (f"{a}/../hidden/log", "ENOENT"), ("agents//peer//outbox", OK)]:  # fmt: skip
        cell("read", p, expect=want)

    for p, want in [(f"{a}/inbox", OK), (f"{a}/outbox", OK), (f"{a}/ctl", OK),
                    ("agents/friend/inbox", OK), ("agents//friend//inbox", OK),
                    ("agents/friend/log", "ENOENT"), ("agents/peer/inbox", "EACCES"),
                    ("agents/peer/outbox", "EACCES"), ("agents/peer/ctl", "EACCES"),
                    ("agents/hidden/inbox", "ENOENT"), ("agents/hidden/ctl", "ENOENT"),
                    ("agents/user/inbox", "ENOENT"), (f"agents/{other}/inbox", "ENOENT"),
                    ("ctl", "ENOENT"), (f"{a}/../hidden/inbox", "ENOENT"),
                    (f"{a}/log", "EACCES"), ("agents/peer/log", "EACCES"),
                    ("log", "EACCES")]:  # fmt: skip
        cell("write", p, expect=want)

    for p, want in [(f"{a}/x", "EACCES"), ("agents/x", "EACCES"), ("x", "EACCES"),
                    ("agents/hidden", "EACCES"), (f"agents/{other}", "EACCES"),
                    ("agents/hidden/x", "ENOENT"), ("agents/friend/x", "EACCES"),
                    ("agents/peer/x", "EACCES"), ("vault/x", "ENOENT")]:  # fmt: skip
        cell("mkdir", p, expect=want)
    for p in (a, "agents/peer", "agents/friend"):
        cell("mkdir", p, expect="EEXIST", denied=False)

    for p, want in [(a, "EACCES"), ("agents/peer", "EACCES"), ("agents/friend", "EACCES"),
                    ("agents", "EACCES"), ("agents/hidden", "ENOENT"),
                    (f"agents/{other}", "ENOENT")]:  # fmt: skip
        cell("rmdir", p, expect=want)

    for src, dst, want in [(f"{a}/log", f"{a}/log2", "EACCES"),
                           (f"{a}/inbox", f"{a}/outbox", "EACCES"),
                           ("agents/peer/log", f"{a}/x", "EACCES"),
                           ("agents/peer", "agents/peer2", "EACCES"),
                           ("agents/hidden/log", f"{a}/x", "ENOENT"),
                           (f"{a}/log", "agents/hidden/x", "ENOENT"),
                           ("agents/hidden", "agents/hidden2", "ENOENT"),
                           (f"{a}/../hidden/log", f"{a}/x", "ENOENT")]:  # fmt: skip
        cell("rename", src, dst, expect=want)

    for p, want in [(f"{a}/log", "EACCES"), (f"{a}/inbox", "EACCES"),
                    ("agents/peer/log", "EACCES"), ("agents/friend/inbox", "EACCES"),
                    ("agents/hidden/log", "ENOENT"), ("agents/friend/log", "ENOENT"),
                    ("ctl", "ENOENT"), ("log", "EACCES")]:  # fmt: skip
        cell("unlink", p, expect=want)
    cell("unlink", "agents", expect="EISDIR", denied=False)
    cell("unlink", f"{a}/nosuch", expect="ENOENT", denied=False)

    for src, dst, want in [(f"{a}/log", f"{a}/log2", "EACCES"),
                           ("agents/peer/log", f"{a}/x", "EACCES"),
                           ("agents/friend/inbox", f"{a}/x", "EACCES"),
                           ("agents/hidden/log", f"{a}/x", "ENOENT"),
                           (f"{a}/log", "agents/hidden/x", "ENOENT")]:  # fmt: skip
        cell("link", src, dst, expect=want)

    for p, want in [(f"{a}/inbox", OK), (f"{a}/outbox", OK), (f"{a}/ctl", OK),
                    ("agents/friend/inbox", OK), ("agents/peer/log", "EACCES"),
                    ("agents/peer/outbox", "EACCES"), ("agents/peer/ctl", "EACCES"),
                    ("agents/peer/inbox", "EACCES"), ("agents/hidden/log", "ENOENT"),
                    ("agents/user/inbox", "ENOENT"), ("ctl", "ENOENT"),
                    (f"{a}/log", "EACCES"), ("log", "EACCES")]:  # fmt: skip
        cell("truncate", p, expect=want)

    for p, rw, may in [(f"{a}/inbox", "rw", True), ("agents/peer/log", "r", True),
                       ("agents/peer/log", "w", False), ("agents/friend/inbox", "w", True),
                       ("agents/friend/inbox", "r", False), ("agents/peer/inbox", "r", False),
                       ("agents/hidden/log", "r", False)]:  # fmt: skip
        cells.append(Cell(("access", p, rw), ["access", f"{mp}/{p}", rw], may,
                          p.startswith("agents/hidden"), walked(p) - {"/"}))  # fmt: skip

    # Symlinks: the tree takes none, and one outside the mount leads nowhere new:
    # planted by the operator (@to-...) or made by the agent itself.
    cell("symlink", "../hidden/log", f"{a}/x", expect="EACCES")
    cell("symlink", "x", "agents/x", expect="EACCES")
    cell("symlink", "x", "agents/hidden/x", expect="ENOENT")
    cell("symlink", "x", f"{a}/inbox", expect="EEXIST", denied=False)
    cell("symlink", "agents/hidden/inbox", f"@made-by-{me}", expect=OK, denied=False)
    cell("write", f"@made-by-{me}", expect="ENOENT", via="agents/hidden/inbox")
    cell("lstat", "@to-hidden", expect=OK, denied=False)
    cell("stat", "@to-hidden", expect="ENOENT")
    cell("read", "@to-hidden", expect="ENOENT")
    cell("stat", "@to-peer", expect=OK)
    cell("read", "@to-peer", expect=OK)
    cell("write", "@to-peer", expect="EACCES")

    # Hidden files the operator holds open, reached through /proc without a name.
    proc = f"/proc/{holder or os.getpid()}/fd"
    hdir, hlog, pout = (f"{proc}/{fds[p]}" for p in OPERATOR_HOLDS)
    if confined:
        hidden, log, outbox = OPERATOR_HOLDS
        for via, op, *paths in [
            (hidden, "stat", hdir), (hidden, "listdir", hdir),
            (f"{hidden}/log", "stat", f"{hdir}/log"), (f"{hidden}/inbox", "read", f"{hdir}/inbox"),
            (f"{hidden}/x", "mkdir", f"{hdir}/x"), (f"{hidden}/x", "symlink", "x", f"{hdir}/x"),
            (log, "rename", f"{hdir}/log", f"{hdir}/x"),
            (log, "stat", hlog), (log, "read", hlog), (log, "truncate", hlog), (log, "write", hlog),
            (outbox, "read", pout), (outbox, "write", pout),
        ]:  # fmt: skip
            cell(op, *paths, expect="EACCES", denied=False, via=via)
        return cells
    cell("stat", hdir, expect="ENOENT", via="agents/hidden")
    cell("listdir", hdir, expect="ENOENT", via="agents/hidden")
    cell("stat", f"{hdir}/log", expect="ENOENT", via="agents/hidden/log")
    cell("read", f"{hdir}/inbox", expect="ENOENT", via="agents/hidden/inbox")
    cell("mkdir", f"{hdir}/x", expect="ENOENT", via="agents/hidden/x")
    cell("symlink", "x", f"{hdir}/x", expect="ENOENT", via="agents/hidden/x")
    cell("rename", f"{hdir}/log", f"{hdir}/x", expect="ENOENT", via="agents/hidden/log")
    cell("stat", hlog, expect="ENOENT", via="agents/hidden/log")
    cell("read", hlog, expect="ENOENT", via="agents/hidden/log")
    cell("truncate", hlog, expect="ENOENT", via="agents/hidden/log")
    cell("write", hlog, expect="ENOENT", via="agents/hidden/log")
    cell("read", pout, expect=OK)
    cell("write", pout, expect="EACCES", via="agents/peer/outbox")
    return cells


# What the operator holds open for the /proc cells.
OPERATOR_HOLDS = ["agents/hidden", "agents/hidden/log", "agents/peer/outbox"]


@contextmanager
def operator_fds(server: Server) -> Iterator[dict[str, int]]:
    """Open OPERATOR_HOLDS as the operator; the fds by path."""
    fds = {p: os.open(server.mp / p, os.O_RDONLY) for p in OPERATOR_HOLDS}
    try:
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


# Opening a log for writing, which no one may do: checked on its own below (a
# refusal of the view like any other: EACCES and a `denied` event, or ENOENT for a
# hidden log reached without a lookup, through /proc).
ROW_FIRST = {("write", "{a}/log"), ("write", "agents/peer/log"), ("write", "log"),
             ("write", "/proc/PID/fd/<agents/hidden/log>")}  # fmt: skip


def row_first(c: Cell, me: str) -> bool:
    return c.key in {(op, p.format(a=f"agents/{me}")) for op, p in ROW_FIRST}


def plant_symlinks(server: Server) -> None:
    """Symlinks outside the mount, made by the operator, into the mount."""
    (server.root / "io").mkdir(exist_ok=True)
    os.symlink(server.p("agents", "hidden", "log"), server.root / "io" / "to-hidden")
    os.symlink(server.p("agents", "peer", "outbox"), server.root / "io" / "to-peer")


def check_matrix(server: Server, probe: Probe, me: str, cells: list[Cell]) -> list[str]:
    """Run each cell alone and compare result and `denied` events; the mismatches."""
    events = Events(server)
    bad: list[str] = []
    for c in cells:
        events.new()
        got = probe.one(c.op)
        denied = [e for e in events.new() if e["type"] == "denied"]
        if got != c.expect:
            bad.append(f"{c}: got {got!r}, expected {c.expect!r}")
        if c.denied:
            ops = DENIED_OPS[c.op[0]]
            if not any(e["who"] == me and e["path"] in c.where and e["op"] in ops for e in denied):
                bad.append(f"{c}: no denied event (who {me}, op in {sorted(ops)}, "
                           f"path in {sorted(c.where)}); got {denied}")  # fmt: skip
        elif denied:
            bad.append(f"{c}: unexpected denied events {denied}")
        if any(e["who"] != me for e in denied):
            bad.append(f"{c}: denied event for someone else {denied}")
    return bad


def matrix_config(server: Server, top: str = "") -> None:
    server.write_config(
        f"{top}stop_grace = 0.5\n"
        f"[agents.me]\n{VIEW}{io(server)}"
        + probe_agent(server, "sup", VIEW)
        + "[agents.friend]\n[agents.peer]\n[agents.hidden]\n"
    )


@pytest.mark.parametrize("kind", ["run", "supervised"])
def test_matrix_of_operations_and_paths(server: Server, probes: Probes, kind: str) -> None:
    matrix_config(server)
    server.mount()
    plant_symlinks(server)
    me, other = ("me", "sup") if kind == "run" else ("sup", "me")
    probe = probes.run("me") if kind == "run" else probes.supervised("sup")
    assert probe.one(["ids"])["pid"] in {int(p) for p in server.status(me)["pid"].split(",")}
    with operator_fds(server) as fds:
        cells = [c for c in matrix(server, me, other, fds) if not row_first(c, me)]
        bad = check_matrix(server, probe, me, cells)
    assert not bad, f"{len(bad)} of {len(cells)} cells wrong:\n" + "\n".join(bad)
    assert len(cells) > 180
    # Paths relative to the supervised agent's folder, where it starts [SPEC §3].
    if kind == "supervised":
        got = probe.do([["stat", "../hidden/log"], ["stat", "../peer/log"], ["read", "./inbox"],
                        ["listdir", ".."], ["listdir", "."]])  # fmt: skip
        assert got == ["ENOENT", OK, OK, sorted(["friend", "sup", "peer"]), FILES]
    # None of this delivered or changed anything.
    assert not server.events("message")
    assert sorted(os.listdir(server.p("agents"))) == EVERYONE
    assert sorted(os.listdir(server.p("agents", me))) == FILES


def test_an_unconfined_agent_is_refused_through_proc_by_the_server(
    server: Server, probes: Probes
) -> None:
    """The server's own defence, where the kernel's is off: an operator's open
    files reached through /proc answer as their names would."""
    matrix_config(server, 'confine = "off"\n')
    server.mount()
    probe = probes.run("me")
    # The files are held by an operator's process that has no more capabilities than
    # an agent's (else the kernel would refuse the agent its /proc links anyway).
    hold = (
        "import os, sys, time\n"
        "print(*(os.open(p, os.O_RDONLY) for p in sys.argv[1:]), flush=True)\n"
        "time.sleep(1000)"
    )
    holder = subprocess.Popen(
        [PY, "-c", hold, *(str(server.mp / p) for p in OPERATOR_HOLDS)],
        stdout=subprocess.PIPE, text=True, preexec_fn=confine.installer(),
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        fds = dict(zip(OPERATOR_HOLDS, map(int, holder.stdout.readline().split()), strict=True))
        cells = [c for c in matrix(server, "me", "sup", fds, confined=False, holder=holder.pid)
                 if c.key[-1].startswith("/proc/")]  # fmt: skip
        assert len(cells) == 13
        bad = check_matrix(server, probe, "me", cells)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert not bad, "\n".join(bad)


def test_opening_a_log_for_writing_is_a_refusal_of_the_view(server: Server, probes: Probes) -> None:
    matrix_config(server)
    server.mount()
    probe = probes.run("me")
    with operator_fds(server) as fds:
        cells = [c for c in matrix(server, "me", "sup", fds) if row_first(c, "me")]
        assert len(cells) == len(ROW_FIRST)
        bad = check_matrix(server, probe, "me", cells)
    assert not bad, "\n".join(bad)


def test_the_operator_sees_and_may_do_everything(server: Server, probes: Probes) -> None:
    matrix_config(server)
    server.mount()
    events = Events(server)
    mp = str(server.mp)
    every = ["", "ctl", "log", "vault", "agents", *(f"agents/{n}" for n in
             ("user", "me", "sup", "friend", "peer", "hidden"))]  # fmt: skip
    every += [f"agents/{n}/{f}" for n in ("me", "hidden", "user") for f in FILES]
    ops: list[list[Any]] = [["stat", f"{mp}/{p}"] for p in every]
    ops += [["read", f"{mp}/{p}"] for p in ("ctl", "log", "agents/hidden/inbox",
            "agents/hidden/log", "agents/me/inbox", "agents/peer/outbox")]  # fmt: skip
    ops += [["write", f"{mp}/{p}"] for p in ("agents/hidden/inbox", "agents/peer/outbox",
            "agents/me/ctl")]  # fmt: skip
    ops += [["mode", f"{mp}/agents/peer/outbox"], ["mode", f"{mp}/agents/friend/inbox"],
            ["listdir", f"{mp}/"], ["listdir", f"{mp}/agents"], ["listdir", f"{mp}/agents/hidden"],
            ["stat", f"{mp}/agents/me/../hidden/log"],
            ["mkdir", f"{mp}/agents/me/x"], ["unlink", f"{mp}/agents/hidden/log"],
            ["write", f"{mp}/log"]]  # fmt: skip
    want = [OK] * (len(every) + 9) + [0o660, 0o660, ["agents", "ctl", "log", "vault"], EVERYONE,
                                      FILES, OK, "EPERM", "EPERM", "EACCES"]  # fmt: skip
    # A plain subprocess, one in a new session, and the test process itself.
    assert probes.plain().do(ops) == want
    assert probes.plain("plain2").one(["daemon", ops]) == want
    assert os.stat(server.p("agents", "hidden", "log")).st_mode & 0o777 == 0o440
    assert sorted(os.listdir(server.p("agents"))) == EVERYONE
    assert not [e for e in events.new() if e["type"] == "denied"]


# -- caches ---------------------------------------------------------------------------------


def test_kernel_caches_do_not_leak_a_view(server: Server, probes: Probes) -> None:
    matrix_config(server)
    server.mount()
    me = probes.run("me")
    hidden_log = server.p("agents", "hidden", "log")
    outbox = server.p("agents", "peer", "outbox")
    agent_asks = [["stat", str(hidden_log)], ["stat", str(hidden_log.parent)],
                  ["read", str(hidden_log)], ["mode", str(outbox)],
                  ["listdir", str(server.p("agents"))], ["mode", str(server.mp)],
                  ["stat", f"{server.mp}/agents/me/../hidden/inbox"]]  # fmt: skip
    agent_sees = ["ENOENT", "ENOENT", "ENOENT", 0o440, ["friend", "me", "peer"], 0o550, "ENOENT"]
    for _ in range(20):
        # The operator first, many times, with an open folder of the hidden agent...
        fd = os.open(hidden_log.parent, os.O_RDONLY)
        try:
            for _ in range(5):
                assert os.stat(hidden_log).st_mode & 0o777 == 0o440
                assert os.stat(outbox).st_mode & 0o777 == 0o660
            assert sorted(os.listdir(server.p("agents"))) == EVERYONE
            assert sorted(os.listdir(hidden_log.parent)) == FILES
            # ... then the agent at once.
            assert me.do(agent_asks) == agent_sees
        finally:
            os.close(fd)
        # The agent first, many times, then the operator at once.
        assert me.do(agent_asks * 5) == agent_sees * 5
        assert os.stat(hidden_log).st_mode & 0o777 == 0o440
        assert os.stat(outbox).st_mode & 0o777 == 0o660
        assert os.stat(server.mp).st_mode & 0o777 == 0o755
        assert sorted(os.listdir(server.p("agents"))) == EVERYONE


# -- identity ---------------------------------------------------------------------------------


def as_agent(server: Server, me: str, marker: str) -> list[list[Any]]:
    """What any process of `me` must see, and a message it sends to friend."""
    mp = server.mp
    return [["stat", f"{mp}/agents/hidden/log"], ["stat", f"{mp}/agents/{me}/log"],
            ["stat", f"{mp}/ctl"], ["write", f"{mp}/agents/peer/outbox"],
            ["send", f"{mp}/agents/friend/inbox", marker + "\n"], ["ids"]]  # fmt: skip


AGENT_SEES = ["ENOENT", OK, "ENOENT", "EACCES", OK]


@pytest.mark.parametrize("kind", ["run", "supervised"])
def test_every_descendant_is_the_agent(server: Server, probes: Probes, kind: str) -> None:
    matrix_config(server)
    server.mount()
    me = "me" if kind == "run" else "sup"
    probe = probes.run("me") if kind == "run" else probes.supervised("sup")
    main = probe.one(["ids"])
    wrappers = ["fork", "exec", "spawn", "daemon", "fork+thread"]
    ops = [[w, as_agent(server, me, f"{kind} {w}")] for w in wrappers[:-1]]
    ops.append(["fork", [["thread", as_agent(server, me, f"{kind} fork+thread")]]])
    got = probe.do(ops)
    got[-1] = got[-1][0]  # fork -> [thread -> its results]
    for w, results in zip(wrappers, got, strict=True):
        assert results[:-1] == AGENT_SEES, (w, results)
    ids = dict(zip(wrappers, (r[-1] for r in got), strict=True))
    assert ids["fork"]["ppid"] == main["pid"] and ids["exec"]["ppid"] == main["pid"]
    assert ids["spawn"]["ppid"] == main["pid"]
    assert ids["fork+thread"]["tid"] != ids["fork+thread"]["pid"]
    # The daemon: in a new session (of the middle process, which is gone) and
    # re-parented away from the agent's processes.
    assert ids["daemon"]["sid"] not in (main["sid"], ids["daemon"]["pid"])
    assert ids["daemon"]["ppid"] not in (main["pid"], ids["daemon"]["sid"])
    assert messages(server, "friend") == [(me, f"{kind} {w}") for w in wrappers]
    denied = server.events("denied")  # each one's refusals are the agent's
    assert len(denied) >= 3 * len(wrappers) and {e["who"] for e in denied} == {me}
    if kind == "run":
        # A child that outlives the agent's first process.
        out = server.root / "io" / "orphan.json"
        child = probe.one(["orphan", as_agent(server, me, "orphan"), str(out)])
        probe.exit()
        assert probe.proc is not None and probe.proc.returncode == 0
        result = json.loads(wait_for(lambda: out.exists() and out.read_text(), timeout=10))
        assert result["results"][:-1] == AGENT_SEES
        assert result["ids"]["pid"] == child and result["ids"]["ppid"] != main["pid"]
        assert messages(server, "friend")[-1] == (me, "orphan")


@pytest.mark.parametrize("kind", ["run", "supervised"])
def test_a_second_thread_is_the_agent(server: Server, probes: Probes, kind: str) -> None:
    matrix_config(server)
    server.mount()
    me = "me" if kind == "run" else "sup"
    probe = probes.run("me") if kind == "run" else probes.supervised("sup")
    main = probe.one(["ids"])
    (results,) = probe.do([["thread", as_agent(server, me, "thread")]])
    ids = results[-1]
    assert ids["pid"] == main["pid"] and ids["tid"] != main["tid"]
    assert results[:-1] == AGENT_SEES
    assert messages(server, "friend") == [(me, "thread")]


@pytest.mark.parametrize("kind", ["run", "supervised"])
def test_exec_from_a_second_thread_stays_the_agent(
    server: Server, probes: Probes, kind: str
) -> None:
    matrix_config(server)
    server.mount()
    me = "me" if kind == "run" else "sup"
    probe = probes.run("me") if kind == "run" else probes.supervised("sup")
    got = probe.one(["thread_exec", as_agent(server, me, "thread exec")])
    assert got["results"][:-1] == AGENT_SEES
    assert messages(server, "friend") == [(me, "thread exec")]


def test_processes_of_no_agent_are_the_operator(server: Server, probes: Probes) -> None:
    """A plain subprocess, also when an agent runs beside it, and its own descendants."""
    matrix_config(server)
    server.mount()
    agent = probes.run("me")
    assert agent.one(["stat", str(server.p("agents", "hidden"))]) == "ENOENT"
    plain = probes.plain()
    ops = [["stat", str(server.p("agents", "hidden", "log"))],
           ["send", str(server.p("agents", "friend", "inbox")), "from the operator\n"]]  # fmt: skip
    assert plain.do(ops) == [OK, OK]
    assert plain.one(["thread", ops]) == [OK, OK]
    assert plain.one(["daemon", ops]) == [OK, OK]
    assert {f for f, _ in messages(server, "friend")} == {"user"}


def test_an_agent_cannot_run_as_another_agent(server: Server, probes: Probes) -> None:
    """`outheisfs run` from inside an agent: as a hidden, a visible, a new agent or itself."""
    matrix_config(server)
    server.mount()
    me = probes.run("me")
    mp = str(server.mp)
    reveal = json.dumps([["stat", f"{mp}/agents/hidden/log"]])
    names = ["hidden", "peer", "newcomer", "me"]
    got = me.do([["cmd", [PY, "-m", "outheisfs", "run", name, "--mount", mp, "--",
                          PY, str(VIEWPROBE), "--ops", reveal]] for name in names])  # fmt: skip
    for name, r in zip(names, got, strict=True):
        assert r["rc"] == 1 and r["stdout"] == "", (name, r)  # COMMAND never ran
    assert "cannot create agent 'hidden': Permission denied" in got[0]["stderr"]
    assert "cannot bind to agent 'peer': Permission denied" in got[1]["stderr"]
    assert "cannot create agent 'newcomer': Permission denied" in got[2]["stderr"]
    assert "cannot run as another agent" in got[3]["stderr"]
    assert sorted(os.listdir(server.p("agents"))) == EVERYONE
    # The only bind is the operator's, of the probe itself.
    binds = [(e["agent"], e["who"], e["command"].split()[0]) for e in server.events("ctl")]
    assert binds == [("me", "user", "bind")]


# -- pid reuse ---------------------------------------------------------------------------------


def spawn_with_pid(pid: int, cmd: list[str], tries: int = 20) -> subprocess.Popen[bytes] | None:
    """Start `cmd` as process `pid` (writing ns_last_pid, as root); None if it never got it."""
    for _ in range(tries):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError:
            return None
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


def reuse(pid: int, server: Server) -> list[Any]:
    """As a plain process that gets `pid`: what it sees, and a message it sends."""
    mp = server.mp
    ops = [["ids"], ["stat", f"{mp}/agents/hidden/log"], ["listdir", f"{mp}/agents"],
           ["send", f"{mp}/agents/friend/inbox", f"reused {pid}\n"]]  # fmt: skip
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)
    p = spawn_with_pid(pid, [PY, str(VIEWPROBE), "--ops", json.dumps(ops)])
    if p is None:
        pytest.skip(f"could not get pid {pid} again (ns_last_pid not writable, or a busy system)")
    out, _ = p.communicate(timeout=20)
    return json.loads(out)  # type: ignore[no-any-return]


def test_a_reused_pid_of_a_dead_agent_process_is_not_the_agent(
    server: Server, probes: Probes
) -> None:
    matrix_config(server)
    server.mount()
    hidden = str(server.p("agents", "hidden", "log"))
    # A process bound by `outheisfs run`, gone.
    probe = probes.run("me")
    ids, seen = probe.do([["ids"], ["stat", hidden]])
    assert seen == "ENOENT"  # it was the agent
    probe.exit()
    again, *seen = reuse(ids["pid"], server)
    assert again["pid"] == ids["pid"]
    assert seen == [OK, EVERYONE, OK]  # the operator, not `me`
    # A supervised process, stopped by the operator.
    sup = probes.supervised("sup")
    sids, seen = sup.do([["ids"], ["stat", hidden]])
    assert seen == "ENOENT" and sids["pid"] == int(server.status("sup")["pid"])
    server.agent("sup", "ctl").write_text("stop\n")
    again, *seen = reuse(sids["pid"], server)
    assert again["pid"] == sids["pid"]
    assert seen == [OK, EVERYONE, OK]
    assert messages(server, "friend") == [
        ("user", f"reused {ids['pid']}"),
        ("user", f"reused {sids['pid']}"),
    ]


def test_a_reused_thread_id_of_an_agent_is_not_the_agent(server: Server, probes: Probes) -> None:
    matrix_config(server)
    server.mount()
    probe = probes.run("me")
    tid = probe.one(["thread_exec", [["ids"]]])["tid"]
    again, *seen = reuse(tid, server)
    assert again["pid"] == tid
    assert seen == [OK, EVERYONE, OK]
    assert messages(server, "friend") == [("user", f"reused {tid}")]


# -- narrowing and widening ------------------------------------------------------------------

NARROW_VIEW = 'send = ["friend"]\nunveil = { "/agents/peer" = "rw", "/log" = "r" }\n'


def narrow_config(server: Server) -> None:
    server.write_config(
        "stop_grace = 0.5\n"
        f"[agents.me]\n{NARROW_VIEW}{io(server)}"
        + probe_agent(server, "sup", NARROW_VIEW)
        + "[agents.friend]\n[agents.peer]\n[agents.hidden]\n"
    )


def ctl(server: Server, me: str, command: str) -> list[Any]:
    return ["send", f"{server.mp}/agents/{me}/ctl", command + "\n"]


@pytest.mark.parametrize("kind", ["run", "supervised"])
def test_an_agent_narrows_its_own_view(server: Server, probes: Probes, kind: str) -> None:
    narrow_config(server)
    server.mount()
    me = "me" if kind == "run" else "sup"
    probe = probes.run("me") if kind == "run" else probes.supervised("sup")
    mp = server.mp
    peer_inbox = f"{mp}/agents/peer/inbox"
    outbox = f"{mp}/agents/{me}/outbox"
    to_peer = json.dumps({"to": "peer", "body": "to peer"}) + "\n"
    # "rw" on peer's folder: it may send to peer (its inbox: write only).
    assert probe.do([["write", peer_inbox], ["send", outbox, to_peer]]) == [OK, OK]
    events = Events(server)
    got = probe.do([
        ctl(server, me, "unveil /agents/peer r"),  # narrowing: allowed
        ["write", peer_inbox], ["truncate", peer_inbox], ["send", outbox, to_peer],
        ["read", f"{mp}/agents/peer/log"], ["mode", peer_inbox],
        ctl(server, me, "unveil /agents/peer rw"),  # widening back: not permitted
        ctl(server, me, "unveil /agents/hidden r"),
        ctl(server, me, "unveil /agents/hidden/inbox w"),
        ctl(server, me, "unveil /log rw"),
        ctl(server, me, "unveil /ctl r"),
        ctl(server, me, f"unveil /agents/{me}/log -"),  # its own folder is always its own
        ctl(server, me, "unveil agents/peer -"),  # not an absolute path
        ctl(server, me, f"unveil /agents/{me}/../hidden r"),  # no way around with ..
        ["write", peer_inbox],
    ])  # fmt: skip
    assert got == [OK, "EACCES", "EACCES", "EACCES", OK, 0o000] + ["EPERM"] * 6 + [
        "EINVAL",
        "EINVAL",
        "EACCES",
    ]
    denied = [(e["who"], e["op"], e["path"]) for e in events.new() if e["type"] == "denied"]
    inbox = "/agents/peer/inbox"
    # (the refused outbox write is also logged against the agent's own outbox: see below)
    assert [d for d in denied if d[2] != f"/agents/{me}/outbox"] == [
        (me, "open", inbox), (me, "setattr", inbox), (me, "send", inbox), (me, "open", inbox)
    ]  # fmt: skip
    assert [m for m in messages(server, "peer") if m[1] == "to peer"] == [(me, "to peer")]
    # Hiding with "-": gone, and absent from listings.
    got = probe.do([
        ctl(server, me, "unveil //agents//peer/log/ -"),
        ["stat", f"{mp}/agents/peer/log"], ["listdir", f"{mp}/agents/peer"],
        ["read", f"{mp}/agents/peer/outbox"],
        ctl(server, me, "unveil /agents/friend/inbox -"),
        ["stat", f"{mp}/agents/friend"], ["listdir", f"{mp}/agents"],
        ["send", f"{mp}/agents/friend/inbox", "x\n"],
        ["send", outbox, json.dumps({"to": "friend", "body": "x"}) + "\n"],
        ctl(server, me, "unveil /agents/friend/inbox w"),  # back: not by itself
        ctl(server, me, "unveil /agents/peer/log r"),
    ])  # fmt: skip
    peer_files = ["ctl", "dead", "errors", "inbox", "outbox", "output"]  # its log hidden
    assert got == [OK, "ENOENT", peer_files, OK, OK, "ENOENT",
                   sorted([me, "peer"]), "ENOENT", "EACCES", "EPERM", "EPERM"]  # fmt: skip
    assert not messages(server, "friend")
    # The operator widens it at run time: a send right to `hidden`, and friend again.
    server.agent(me, "ctl").write_text(
        "unveil /agents/hidden/inbox w\nunveil /agents/friend/inbox w\n"
    )
    got = probe.do([
        ["stat", f"{mp}/agents/hidden"], ["listdir", f"{mp}/agents/hidden"],
        ["stat", f"{mp}/agents/hidden/log"], ["read", f"{mp}/agents/hidden/inbox"],
        ["send", f"{mp}/agents/hidden/inbox", "direct\n"],
        ["send", outbox, json.dumps({"to": ["hidden", "friend"], "body": "both"}) + "\n"],
        ["listdir", f"{mp}/agents"],
    ])  # fmt: skip
    assert got == [OK, ["inbox"], "ENOENT", "EACCES", OK, OK,
                   sorted([me, "peer", "hidden", "friend"])]  # fmt: skip
    assert messages(server, "hidden") == [(me, "direct"), (me, "both")]
    assert messages(server, "friend") == [(me, "both")]
    # The operator can take a right away too. (A "-" on a folder leaves a longer grant
    # below it in force, so the grant itself is hidden.)
    server.agent(me, "ctl").write_text("unveil /agents/hidden/inbox -\n")
    assert probe.do([["stat", f"{mp}/agents/hidden"], ["write", f"{mp}/agents/hidden/inbox"]]) == [
        "ENOENT",
        "ENOENT",
    ]
    if kind == "supervised":
        # A restart goes back to the view of the config.
        old = probe.one(["ids"])["pid"]
        server.agent(me, "ctl").write_text("unveil /agents/hidden/inbox w\nrestart\n")
        wait_for(lambda: server.status(me)["pid"] not in ("-", str(old)), timeout=10)
        probe.connect()
        assert probe.one(["ids"])["pid"] != old
        got = probe.do([["write", peer_inbox], ["stat", f"{mp}/agents/peer/log"],
                        ["stat", f"{mp}/agents/friend/inbox"], ["stat", f"{mp}/agents/hidden"],
                        ["listdir", f"{mp}/agents"]])  # fmt: skip
        assert got == [OK, OK, OK, "ENOENT", sorted([me, "peer", "friend"])]


BOSS_SEES_ME = '[agents.boss]\nunveil = { "/agents/me" = "r" }\n'


def test_other_agents_cannot_change_a_view(server: Server, probes: Probes) -> None:
    """boss reads me's folder, but may not write `unveil` to me's ctl."""
    narrow_config(server)
    assert server.config is not None
    server.write_config(server.config.read_text() + BOSS_SEES_ME + io(server))
    server.mount()
    boss = probes.run("boss")
    me = probes.run("me")
    mp = server.mp
    got = boss.do([ctl(server, "me", "unveil /agents/hidden r"),
                   ["write", f"{mp}/agents/me/ctl"], ["stat", f"{mp}/agents/sup/ctl"]])  # fmt: skip
    assert got == ["EACCES", "EACCES", "ENOENT"]
    assert me.one(["stat", f"{mp}/agents/hidden"]) == "ENOENT"


# -- send rights through the outbox --------------------------------------------------------------


def test_send_rights_and_replies_through_the_outbox(server: Server, probes: Probes) -> None:
    server.write_config(
        "stop_grace = 0.5\n"
        + probe_agent(server, "sup", 'send = ["friend"]\n')
        + f'[agents.boss]\nsend = ["sup"]\n{io(server)}[agents.friend]\n'
    )
    server.mount()
    sup = probes.supervised("sup")
    boss = probes.run("boss")
    mp = server.mp
    outbox = f"{mp}/agents/sup/outbox"
    events = Events(server)

    def line(**env: Any) -> str:
        return json.dumps(env) + "\n"

    got = sup.do([
        ["send", outbox, line(to="boss", body="not allowed")],
        ["send", outbox, line(to="friend", body="fine") + line(to="boss", body="bad")],
        ["send", outbox, line(to=["friend", "boss"], body="both")],
        ["send", outbox, line(to="user", body="to the operator")],
        ["send", f"{mp}/agents/boss/inbox", "directly\n"],
        ["send", outbox, line(body="a reply to nothing")],
        ["send", outbox, line(to="friend", body="allowed")],
    ])  # fmt: skip
    assert got == ["EACCES", "EACCES", "EACCES", "EACCES", "ENOENT", "EINVAL", OK]
    assert messages(server, "friend") == [("sup", "allowed")]
    assert not messages(server, "boss") and not messages(server, "user")
    assert server.status("boss")["queued"] == "0"
    denied = [(e["who"], e["op"], e["path"]) for e in events.new() if e["type"] == "denied"]
    assert denied[:4] == [("sup", "send", "/agents/boss/inbox")] * 3 + [
        ("sup", "send", "/agents/user/inbox")
    ]
    # boss's inbox is hidden from sup: ENOENT, denied at the lookup of boss's folder
    assert set(denied[4:]) == {("sup", "lookup", "/agents/boss")}
    # boss may send to sup; sup's reply goes back to boss, not in its send list.
    assert boss.one(["send", f"{mp}/agents/sup/inbox", "ping\n"]) == OK
    msg = sup.one(["take"])
    assert msg["from"] == "boss" and msg["body"] == "ping"
    got = sup.do([
        ["send", outbox, line(body="pong")],
        ["send", outbox, "plain pong\n"],
        ["send", outbox, line(to="boss", reply_to=msg["id"], body="explicit")],
        ["send", outbox, line(to="boss", body="not a reply")],
        ["send", f"{mp}/agents/sup/ctl", "ack\n"],
        ["send", outbox, line(body="too late")],
        ["done"],
    ])  # fmt: skip
    assert got == [OK, OK, OK, "EACCES", OK, "EINVAL", OK]
    replies = take(server, "boss", 3)
    assert [(r["from"], r["body"], r["reply_to"]) for r in replies] == [
        ("sup", "pong", msg["id"]),
        ("sup", "plain pong", msg["id"]),
        ("sup", "explicit", msg["id"]),
    ]
    # The operator is not in its send list either, yet gets its answer.
    server.send("sup", "from the operator")
    msg = sup.one(["take"])
    assert msg["from"] == "user"
    assert sup.do([["send", outbox, "answer\n"], ["done"]]) == [OK, OK]
    (answer,) = take(server, "user", 1)
    assert (answer["from"], answer["body"], answer["reply_to"]) == ("sup", "answer", msg["id"])
    assert server.status("boss")["queued"] == "0"


def test_a_refused_send_is_one_denied_event_naming_the_recipient(
    server: Server, probes: Probes
) -> None:
    matrix_config(server)
    server.mount()
    me = probes.run("me")
    events = Events(server)
    body = json.dumps({"to": "peer", "body": "no right"}) + "\n"
    assert me.one(["send", str(server.agent("me", "outbox")), body]) == "EACCES"
    denied = [(e["who"], e["op"], e["path"]) for e in events.new() if e["type"] == "denied"]
    assert denied == [("me", "send", "/agents/peer/inbox")]


CLONE_PARENT_PROBE = """
import ctypes, os, platform
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": 56, "aarch64": 220}[platform.machine()]
r = libc.syscall(nr, 0x8000 | 17, 0, 0, 0, 0)  # clone(CLONE_PARENT | SIGCHLD)
if r == 0:
    os._exit(0)
print("allowed" if r > 0 else os.strerror(ctypes.get_errno()))
"""


def test_agents_cannot_clone_a_child_of_their_parent(server: Server) -> None:
    """clone(CLONE_PARENT) would give a child that descends from no agent: refused
    to `run` agents and to supervised ones (and to everything they start)."""
    server.write_config(
        f"[agents.sup]\ncommand = {json.dumps([PY, '-c', CLONE_PARENT_PROBE])}\n"
        'restart = "temporary"\n'
    )
    server.mount()
    r = outheisfs("run", "me", "--mount", str(server.mp), "--", PY, "-c", CLONE_PARENT_PROBE)
    assert r.stdout.strip() == "Operation not permitted", r.stdout + r.stderr
    out = server.state / "output" / "sup.log"
    wait_for(lambda: out.exists() and out.read_text().strip(), timeout=10)
    assert out.read_text().strip().endswith(" stdout Operation not permitted")
    # The operator is not confined.
    r = subprocess.run([PY, "-c", CLONE_PARENT_PROBE], capture_output=True, text=True)
    assert r.stdout.strip() == "allowed"
