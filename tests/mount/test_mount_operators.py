"""Who may use the mount: only the mounting user, root, and the config's `operators`.

The server runs as root here, so it mounts with `allow_other`: every local user
can reach the tree, and only the identity rule keeps them out. The other users
are real processes switched with `setpriv`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Server, read_one

NOBODY_UID = 65534


@pytest.fixture
def open_server() -> Iterator[Server]:
    """A server in a folder every user may walk through (pytest's own is 0700)."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to act as another user")
    root = Path(tempfile.mkdtemp(prefix="outheisfs-users-"))
    root.chmod(0o755)
    s = Server(root)
    s.mp.chmod(0o755)
    try:
        yield s
    finally:
        s.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def as_user(uid: int, gid: int, *cmd: str, groups: str = "") -> subprocess.CompletedProcess[str]:
    grp = ["--groups", groups] if groups else ["--clear-groups"]
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", *grp, *cmd],
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_another_user_is_refused_and_takes_nothing(open_server: Server) -> None:
    s = open_server
    s.write_config("[agents.bob]\n")
    s.mount()
    s.send("bob", "for bob only")

    r = as_user(NOBODY_UID, NOBODY_UID, "cat", str(s.agent("bob", "inbox")))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_user(NOBODY_UID, NOBODY_UID, "cat", str(s.p("log")))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_user(NOBODY_UID, NOBODY_UID, "sh", "-c", f"echo forged > {s.agent('bob', 'inbox')}")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    # The mount's root itself may be looked at (df, ls -d, mount checks).
    assert as_user(NOBODY_UID, NOBODY_UID, "stat", str(s.mp)).returncode == 0

    assert read_one(s, "bob")["body"] == "for bob only"
    denied = [e for e in s.events("denied") if e["who"] == f"uid:{NOBODY_UID}"]
    assert {e["path"] for e in denied} >= {"/agents", "/log"}, denied
    assert not [e for e in s.events("message") if e["body"] == "forged"]


def test_operators_key_admits_uids_and_groups(open_server: Server) -> None:
    s = open_server
    s.write_config(f'operators = [{NOBODY_UID}, "@nogroup"]\n[agents.bob]\n')
    s.mount()
    s.send("bob", "one")
    s.send("bob", "two")
    r = as_user(NOBODY_UID, NOBODY_UID, "head", "-n1", str(s.agent("bob", "inbox")))
    assert r.returncode == 0, r.stderr
    assert '"body":"one"' in r.stdout
    # Another uid, admitted by its supplementary group only.
    r = as_user(12345, 100, "head", "-n1", str(s.agent("bob", "inbox")), groups=str(NOBODY_UID))
    assert r.returncode == 0, r.stderr
    assert '"body":"two"' in r.stdout
    # A uid in neither is still refused.
    r = as_user(12346, 100, "cat", str(s.p("ctl")))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r


@pytest.mark.parametrize(
    ("entry", "said"),
    [('"no-such-user-here"', "no user named"), ('"@no-such-group"', "no group named")],
)
def test_unknown_operator_is_a_config_error(server: Server, entry: str, said: str) -> None:
    server.write_config(f"operators = [{entry}]\n")
    r = server.mount(check=False)
    assert r.returncode == 2
    assert "operators" in r.stderr and said in r.stderr
    assert not os.path.ismount(server.mp)
