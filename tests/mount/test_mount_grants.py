"""Owners grant access, through a real mount [SPEC §17, §6, §7].

The owner of a vault domain writes `grant AGENT PATH r` and `revoke AGENT PATH`
to its ctl; the grantee's processes, already running, see the path at once and
lose it at once (names and attributes, nothing served from a kernel cache); the
grant outlives restarts of both agents and of the server; refusals have their
errno and their reason in the granter's errors.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PY, Server, outheisfs, sh, take, wait_for

CONFIG = """
[agents.notes]
[agents.planner]
[agents.other]
[agents.sleeper]
command = ["sleep", "1000"]
[vault]
notes = "notes"
archive = "other"
"""
END = "__done__"


class Shell:
    """A bash that acts as an agent (`outheisfs run NAME -- bash`) and stays alive:
    the test feeds it scripts, one after the other, in the same process."""

    def __init__(self, server: Server, name: str) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "outheisfs", "run", name, "--mount", str(server.mp), "--", "bash"],
            cwd=server.mp,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.buf = b""
        self.do("true")  # bound: from here on it is the agent

    def do(self, script: str, timeout: float = 30) -> str:
        """Run `script` in this bash; its output (stdout and stderr), then its status."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{{ {script}\n}} 2>&1; echo {END} $?\n".encode())
        self.proc.stdin.flush()
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while f"{END} ".encode() not in self.buf or not self.buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"no answer to {script!r} in {timeout} s: {self.buf!r}")
            data = os.read(fd, 1 << 16)
            if not data:
                raise AssertionError(f"the shell ended: {self.buf!r}")
            self.buf += data
        out, _, rest = self.buf.decode().partition(f"{END} ")
        status, _, after = rest.partition("\n")
        self.buf = after.encode()
        return f"{out}status {status}"

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None and not f.closed:
                f.close()


@pytest.fixture
def vault(server: Server) -> Iterator[Server]:
    server.write_config(CONFIG)
    server.mount()
    plans = server.p("vault", "notes", "plans")
    plans.mkdir()
    (plans / "week.md").write_text("monday: ship\n")
    server.p("vault", "notes", "diary").mkdir()
    (server.p("vault", "notes", "diary") / "secret.md").write_text("secret\n")
    yield server


@pytest.fixture
def shells() -> Iterator[list[Shell]]:
    made: list[Shell] = []
    yield made
    for s in made:
        s.close()


def shell(vault: Server, shells: list[Shell], name: str) -> Shell:
    s = Shell(vault, name)
    shells.append(s)
    return s


def ctl(server: Server, name: str, line: str) -> subprocess.CompletedProcess[str]:
    """The operator writes one line to NAME's ctl, as `echo` does."""
    return sh(f"echo '{line}' > {server.agent(name, 'ctl')}")


def grant_lines(server: Server, name: str) -> list[str]:
    text = server.agent(name, "ctl").read_text().splitlines()
    return [line for line in text if "granted" in line]


def test_a_grant_is_seen_at_once_by_every_process_of_the_grantee(
    vault: Server, shells: list[Shell]
) -> None:
    notes, one, two = (shell(vault, shells, n) for n in ("notes", "planner", "planner"))
    before = one.do("ls vault; ls vault/notes")
    assert "No such file" in before and "plans" not in before
    out = notes.do("echo 'grant planner /vault/notes/plans r' > agents/notes/ctl")
    assert out == "status 0"
    # Both running processes see it at once: no restart, no new process.
    for sh_ in (one, two):
        assert sh_.do("ls vault") == "notes\nstatus 0"
        assert sh_.do("ls vault/notes") == "plans\nstatus 0"  # only what leads to the grant
        assert sh_.do("cat vault/notes/plans/week.md") == "monday: ship\nstatus 0"
        denied = sh_.do("ls vault/notes/diary; cat vault/notes/diary/secret.md")
        assert denied.count("No such file") == 2
        # Read only: the domain keeps its one writer.
        written = sh_.do("echo x >> vault/notes/plans/week.md; touch vault/notes/plans/new")
        assert written.count("Permission denied") == 2
        assert sh_.do("stat -c %A vault/notes/plans/week.md") == "-r--r--r--\nstatus 0"
    assert (vault.p("vault", "notes", "plans", "week.md")).read_text() == "monday: ship\n"
    # Both ctl files show it; the events say who granted what to whom.
    assert "unveil /vault/notes/plans r (granted by notes)" in grant_lines(vault, "planner")
    assert grant_lines(vault, "notes") == ["granted planner /vault/notes/plans r"]
    summary = vault.agent("planner", "ctl").read_text().split("\nunveil ", 1)[1]
    assert summary.startswith("/vault/notes/plans:r(granted by notes)\n")
    (ev,) = vault.events("grant")
    assert (ev["agent"], ev["who"], ev["to"], ev["path"], ev["perms"]) == (
        "notes",
        "notes",
        "planner",
        "/vault/notes/plans",
        "r",
    )
    # The grantee's own log tells it.
    logged = [json.loads(x) for x in one.do("cat agents/planner/log").splitlines()[:-1]]
    assert [e["path"] for e in logged if e["type"] == "grant"] == ["/vault/notes/plans"]


def test_a_revoke_hides_the_path_from_a_process_that_listed_it(
    vault: Server, shells: list[Shell]
) -> None:
    assert ctl(vault, "notes", "grant planner /vault/notes/plans r").returncode == 0
    planner = shell(vault, shells, "planner")
    # The process lists, stats and enters the folder, and keeps a file of it open.
    seen = planner.do(
        "ls vault/notes/plans; stat -c %n vault/notes/plans/week.md; "
        "cd vault/notes/plans; exec 3< week.md; ls"
    )
    assert seen == "week.md\nvault/notes/plans/week.md\nweek.md\nstatus 0"
    # The operator takes it back through the owner's ctl.
    assert ctl(vault, "notes", "revoke planner /vault/notes/plans").returncode == 0
    # Names: gone from listings and lookups, in the same process, at once.
    names = planner.do("ls; ls $OUTHEIS_MOUNT/vault; ls $OUTHEIS_MOUNT/vault/notes")
    *lines, _ = names.splitlines()
    assert len(lines) == 3 and all(x.startswith("ls: cannot") for x in lines), names
    assert all(x.endswith("No such file or directory") for x in lines), names
    # Attributes: stat of the folder it stands in, and of the file, fail.
    attrs = planner.do(
        "stat -c '%n %s' . week.md; stat -c '%n %s' $OUTHEIS_MOUNT/vault/notes/plans; "
        "test -e week.md && echo exists; cat week.md"
    )
    assert attrs.count("No such file") == 4 and "exists" not in attrs
    # A file opened before stays open, as after a narrowing.
    assert planner.do("cat <&3") == "monday: ship\nstatus 0"
    # Nothing left in either ctl; a fresh process sees nothing either.
    assert grant_lines(vault, "planner") == [] and grant_lines(vault, "notes") == []
    assert "/vault/notes" not in vault.status("planner")["unveil"]
    fresh = shell(vault, shells, "planner").do("ls vault/notes")
    assert "No such file" in fresh
    (ev,) = vault.events("revoke")
    assert (ev["agent"], ev["who"], ev["to"], ev["path"]) == (
        "notes",
        "user",
        "planner",
        "/vault/notes/plans",
    )


def test_grants_survive_restarts_of_both_agents_and_of_the_server(
    vault: Server, shells: list[Shell]
) -> None:
    notes = shell(vault, shells, "notes")
    assert notes.do("echo 'grant sleeper /vault/notes/plans r' > agents/notes/ctl") == "status 0"
    assert notes.do("echo 'grant planner /vault/notes r' > agents/notes/ctl") == "status 0"
    wait_for(lambda: vault.status("sleeper")["state"] == "running", timeout=20)
    first = vault.status("sleeper")["pid"]

    def sees(name: str) -> str:
        r = outheisfs("run", name, "--mount", str(vault.mp), "--", "cat",
                      "vault/notes/plans/week.md", cwd=vault.mp)  # fmt: skip
        return r.stdout + r.stderr

    # The grantee restarted (a `start` event resets its view to the config's) ...
    assert ctl(vault, "sleeper", "restart").returncode == 0
    wait_for(lambda: vault.status("sleeper")["pid"] not in ("-", first), timeout=20)
    assert "unveil /vault/notes/plans r (granted by notes)" in grant_lines(vault, "sleeper")
    # ... and a process bound by `outheisfs run` (a `bind` resets it too) ...
    assert sees("planner") == "monday: ship\n"
    # ... and the owner's processes ended and bound again.
    notes.close()
    assert shell(vault, shells, "notes").do("cat agents/notes/ctl | grep ^granted") == (
        "granted planner /vault/notes r\ngranted sleeper /vault/notes/plans r\nstatus 0"
    )
    # The server stopped cleanly, then killed: the log alone brings the grants back.
    for s in shells:
        s.close()
    assert vault.umount().returncode == 0
    vault.mount()
    assert grant_lines(vault, "notes") == [
        "granted planner /vault/notes r",
        "granted sleeper /vault/notes/plans r",
    ]
    assert sees("planner") == "monday: ship\n"
    vault.kill9()
    vault.mount()
    assert "unveil /vault/notes/plans r (granted by notes)" in grant_lines(vault, "sleeper")
    assert sees("planner") == "monday: ship\n"
    assert "No such file" in sees("other")
    # Taken back, it stays taken back after a restart.
    assert ctl(vault, "notes", "revoke planner /vault/notes").returncode == 0
    assert vault.umount().returncode == 0
    vault.mount()
    assert "No such file" in sees("planner")
    assert grant_lines(vault, "notes") == ["granted sleeper /vault/notes/plans r"]
    # `replay` rebuilds them from the log alone.
    r = outheisfs("replay", "--state", str(vault.state), "--json")
    assert json.loads(r.stdout)["grants"] == {"sleeper": {"/vault/notes/plans": "notes"}}
    text = outheisfs("replay", "--state", str(vault.state)).stdout
    assert text.endswith("  sleeper unveil /vault/notes/plans r (granted by notes)\n")


def test_refused_grants_have_an_errno_and_a_reason_in_the_granters_errors(
    vault: Server, shells: list[Shell]
) -> None:
    notes = shell(vault, shells, "notes")

    def refused(line: str) -> str:
        return notes.do(f"echo '{line}' > agents/notes/ctl")

    assert "Operation not permitted" in refused("grant planner /vault/archive r")
    assert "Operation not permitted" in refused("grant planner /vault r")
    assert "Operation not permitted" in refused("grant planner /vault/notes rw")
    assert "No such file" in refused("grant ghost /vault/notes r")
    assert "Invalid argument" in refused("grant planner vault/notes r")
    assert "Invalid argument" in refused("grant planner /vault/notes/../archive r")
    assert "No such file" in refused("revoke planner /vault/notes/plans")
    errors = [json.loads(x) for x in vault.agent("notes", "errors").read_text().splitlines()]
    assert [e["errno"] for e in errors] == [
        "EPERM", "EPERM", "EPERM", "ENOENT", "EINVAL", "EINVAL", "ENOENT",
    ]  # fmt: skip
    assert "outside the domain of notes (its domain is /vault/notes)" in errors[0]["why"]
    assert "only r can be granted" in errors[2]["why"]
    assert "no agent 'ghost'" in errors[3]["why"]
    assert "has not granted /vault/notes/plans to planner" in errors[6]["why"]
    # Another agent may not give grants from a domain it does not own, nor through
    # another's ctl (which it does not even see).
    planner = shell(vault, shells, "planner")
    out = planner.do("echo 'grant planner /vault/notes r' > agents/planner/ctl")
    assert "Operation not permitted" in out
    assert "No such file" in planner.do("echo 'grant planner /vault/notes r' > agents/notes/ctl")
    why = json.loads(vault.agent("planner", "errors").read_text().splitlines()[0])["why"]
    assert "outside the domain of planner (it owns no vault domain)" in why
    # Nothing was granted by any of it.
    assert vault.events("grant") == [] and "No such file" in planner.do("ls vault/notes")


def test_the_operator_grants_for_the_owner_and_from_its_own_domain(vault: Server) -> None:
    vault.umount()
    vault.write_config(CONFIG + 'shared = "user"\n')
    vault.mount()
    assert ctl(vault, "user", "grant other /vault/shared r").returncode == 0
    assert ctl(vault, "notes", "grant other /vault/notes/diary r").returncode == 0
    r = outheisfs("run", "other", "--mount", str(vault.mp), "--", "ls", "vault",
                  cwd=vault.mp)  # fmt: skip
    assert r.stdout.split() == ["archive", "notes", "shared"]
    assert grant_lines(vault, "user") == ["granted other /vault/shared r"]
    # Written anywhere, the operator's grant is given for the domain's owner.
    assert ctl(vault, "other", "grant planner /vault/notes/plans r").returncode == 0
    assert grant_lines(vault, "notes") == [
        "granted other /vault/notes/diary r",
        "granted planner /vault/notes/plans r",
    ]
    refused = ctl(vault, "user", "grant other /vault r")
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    why = json.loads(vault.agent("user", "errors").read_text().splitlines()[-1])["why"]
    assert why == "grant: /vault is in no vault domain (the operator's `unveil` gives any path)"


def test_an_open_folder_listing_follows_the_revoke(vault: Server, tmp_path: Path) -> None:
    """A folder opened before a revoke and listed again (rewound) lists nothing hidden."""
    assert ctl(vault, "notes", "grant planner /vault/notes r").returncode == 0
    script = tmp_path / "lister.py"
    script.write_text(
        "import os, sys\n"
        "fd = os.open('vault/notes', os.O_RDONLY | os.O_DIRECTORY)\n"
        "print(sorted(os.listdir(fd)), flush=True)\n"
        "sys.stdin.readline()\n"
        "try:\n"
        "    os.lseek(fd, 0, 0); print(sorted(os.listdir(fd)), flush=True)\n"
        "except OSError as e:\n"
        "    print('error', e.strerror, flush=True)\n"
    )
    p = subprocess.Popen(
        [PY, "-m", "outheisfs", "run", "planner", "--mount", str(vault.mp), "--", PY, str(script)],
        cwd=vault.mp, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip

    def line() -> str:
        assert p.stdout is not None
        got = b""
        while not got.endswith(b"\n"):
            ready, _, _ = select.select([p.stdout], [], [], 30)
            assert ready, f"no line from the lister in 30 s: {got!r}"
            data = os.read(p.stdout.fileno(), 1 << 16)
            assert data, f"the lister ended: {got!r}"
            got += data
        return got.decode().strip()

    try:
        assert p.stdin is not None
        assert line() == "['diary', 'plans']"
        assert ctl(vault, "notes", "revoke planner /vault/notes").returncode == 0
        p.stdin.write(b"\n")
        p.stdin.flush()
        after = line()
        assert "diary" not in after and "plans" not in after, after
    finally:
        p.kill()
        p.wait()
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()


# -- the example: an owner that grants on request -------------------------------------------

EXAMPLE = Path(__file__).parents[2] / "examples" / "owners"


def test_the_owners_example_grants_one_folder_on_request_and_takes_it_back(
    server: Server,
) -> None:
    if shutil.which("jq") is None:
        pytest.fail("jq is needed")
    server.config = EXAMPLE / "outheis.toml"
    server.mount()
    wait_for(lambda: server.p("vault", "notes", "private", "diary.md").exists(), timeout=20)

    def planner_sees() -> str:
        r = outheisfs("run", "planner", "--mount", str(server.mp), "--", "ls", "vault/notes",
                      cwd=server.mp)  # fmt: skip
        return r.stdout + r.stderr

    assert "No such file" in planner_sees()
    server.send("planner", json.dumps({"body": {"plan": "projects"}}))
    (summary,) = take(server, "user", 1, timeout=30)
    assert summary["from"] == "planner"
    assert summary["body"] == {
        "plan": "projects",
        "files": [
            {"name": "budget.md", "title": "# Budget", "lines": 2},
            {"name": "launch.md", "title": "# Launch", "lines": 3},
        ],
        "lines": 5,
    }
    # Granted by the owner for the request, and handed back after it.
    (grant,) = server.events("grant")
    assert (grant["agent"], grant["to"], grant["path"]) == (
        "notes",
        "planner",
        "/vault/notes/projects",
    )
    wait_for(lambda: server.events("revoke"), timeout=10)
    assert "No such file" in planner_sees()
    assert grant_lines(server, "notes") == [] and grant_lines(server, "planner") == []
    # A folder the owner does not share: refused, with the reason, nothing granted.
    server.send("planner", json.dumps({"body": {"plan": "private"}}))
    (refused,) = take(server, "user", 1, timeout=30)
    assert refused["body"] == {
        "refused": "/vault/notes/private",
        "why": "notes does not share private",
    }
    assert len(server.events("grant")) == 1
    # A request it cannot read is answered, not fatal.
    server.send("planner", "plan everything")
    (bad,) = take(server, "user", 1, timeout=30)
    assert bad["body"] == {"refused": "plan everything", "why": 'give {"plan": FOLDER}'}
    assert server.status("planner")["restarts"] == "0"
    # The planner never wrote anything in the domain; only the owner did.
    writers = {e["who"] for e in server.events("vault")}
    assert writers == {"notes"}
