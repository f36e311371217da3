"""The vault through a real mount: a local filesystem with one owner per domain [SPEC §7]."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from outheisfs.vault import Store

from .conftest import Server, outheisfs

CONFIG = """
[agents.owner]
[agents.reader]
unveil = { "/vault/notes" = "r" }
[agents.stranger]
[vault]
notes = "owner"
code = "reader"
"""


@pytest.fixture
def vault(server: Server) -> Server:
    server.write_config(CONFIG)
    server.mount()
    return server


def outcome(fn: Callable[[], Any]) -> Any:
    """What an operation gives: its result, or the errno it failed with."""
    try:
        return ("ok", fn())
    except OSError as e:
        return ("error", errno.errorcode[e.errno or 0])


def posix_script(d: Path) -> list[Any]:
    """A run of operations; the same run on a local folder must give the same."""
    out: list[Any] = []
    a, b, sub = d / "a.txt", d / "b.txt", d / "sub"
    out.append(outcome(lambda: a.write_bytes(b"hello world")))
    out.append(outcome(lambda: a.read_bytes()))
    with open(a, "ab") as f:
        f.write(b"!")
    out.append(outcome(lambda: a.read_bytes()))
    out.append(outcome(lambda: os.truncate(a, 5)))
    out.append(outcome(lambda: (os.stat(a).st_size, stat.S_ISREG(os.stat(a).st_mode))))
    fd = os.open(a, os.O_RDWR)
    out.append(outcome(lambda: os.pwrite(fd, b"J", 0)))
    out.append(outcome(lambda: os.pread(fd, 3, 0)))
    out.append(outcome(lambda: os.pread(fd, 10, 100)))
    os.close(fd)
    out.append(outcome(lambda: os.open(a, os.O_CREAT | os.O_EXCL | os.O_WRONLY)))
    out.append(outcome(lambda: os.mkdir(sub)))
    out.append(outcome(lambda: os.mkdir(sub)))
    out.append(outcome(lambda: (sub / "x").write_text("x")))
    out.append(outcome(lambda: os.rmdir(sub)))
    out.append(outcome(lambda: os.rmdir(a)))
    out.append(outcome(lambda: os.unlink(sub)))
    out.append(outcome(lambda: os.open(sub, os.O_WRONLY)))
    out.append(outcome(lambda: os.rename(a, b)))
    out.append(outcome(lambda: a.exists()))
    out.append(outcome(lambda: (d / "c.txt").write_text("c")))
    out.append(outcome(lambda: os.rename(d / "c.txt", b)))  # over an existing file
    out.append(outcome(lambda: b.read_text()))
    out.append(outcome(lambda: os.rename(sub, d / "moved")))
    out.append(outcome(lambda: (d / "moved" / "x").read_text()))
    out.append(outcome(lambda: os.symlink("b.txt", d / "link")))
    out.append(outcome(lambda: os.readlink(d / "link")))
    out.append(outcome(lambda: (d / "link").read_text()))
    out.append(outcome(lambda: os.link(b, d / "hard")))
    out.append(outcome(lambda: os.stat(b).st_nlink))
    out.append(outcome(lambda: os.chmod(b, 0o600)))
    out.append(outcome(lambda: stat.S_IMODE(os.stat(b).st_mode)))
    out.append(outcome(lambda: os.utime(b, ns=(10**18, 2 * 10**18))))
    out.append(outcome(lambda: os.stat(b).st_mtime_ns))
    out.append(outcome(lambda: sorted(os.listdir(d))))
    out.append(outcome(lambda: os.unlink(d / "missing")))
    out.append(outcome(lambda: os.unlink(d / "hard")))
    out.append(outcome(lambda: os.stat(b).st_nlink))
    big = os.urandom(3 << 20)
    out.append(outcome(lambda: (d / "big").write_bytes(big)))
    out.append(outcome(lambda: (d / "big").read_bytes() == big))
    out.append(outcome(lambda: os.rmdir(d / "moved")))
    return out


def test_the_vault_behaves_like_a_local_folder(vault: Server, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    expected = posix_script(local)
    got = posix_script(vault.p("vault", "notes"))
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        assert g == e, f"step {i}: vault gave {g}, a local folder {e}"


def test_the_vault_survives_a_remount(vault: Server) -> None:
    vault.p("vault", "notes", "kept.txt").write_text("kept")
    assert vault.umount().returncode == 0
    vault.mount()
    assert vault.p("vault", "notes", "kept.txt").read_text() == "kept"
    assert (vault.state / "vault" / "notes" / "kept.txt").read_text() == "kept"


def as_agent(server: Server, name: str, script: str) -> str:
    """Run a bash script as agent `name`; its output, one line per step."""
    r = outheisfs("run", name, "--mount", str(server.mp), "--", "bash", "-c", script,
                  cwd=server.mp)  # fmt: skip
    return r.stdout + r.stderr


STEPS = """
try() {
  err="$TMPDIR/err.$$"  # agents write only their TMPDIR outside the mount
  if "$@" >/dev/null 2>"$err"; then echo ok; else echo "no: $(tail -c 80 "$err")"; fi
}
try cat vault/notes/a.txt
try sh -c 'echo more >> vault/notes/a.txt'
try touch vault/notes/new.txt
try mv vault/notes/new.txt vault/notes/renamed.txt
try rm vault/notes/renamed.txt
try mkdir vault/notes/dir
try rmdir vault/notes/dir
try ls vault/notes
try ls vault
try touch vault/top.txt
try cat vault/code/c.txt
try sh -c 'echo x > vault/code/c.txt'
"""


def verdicts(text: str) -> list[str]:
    return [
        "ok" if line == "ok" else "ENOENT" if "No such file" in line or "nonexistent" in line
        else "EACCES"
        if "Permission denied" in line else line
        for line in text.splitlines()
    ]  # fmt: skip


def test_owner_reader_stranger(vault: Server) -> None:
    vault.p("vault", "notes", "a.txt").write_text("secret words\n")
    vault.p("vault", "code", "c.txt").write_text("code\n")
    owner = verdicts(as_agent(vault, "owner", STEPS))
    reader = verdicts(as_agent(vault, "reader", STEPS))
    stranger = verdicts(as_agent(vault, "stranger", STEPS))
    # cat, append, touch, mv, rm, mkdir, rmdir, ls notes, ls vault, touch top, code r, code w
    assert owner == ["ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok",
                     "EACCES", "ENOENT", "ENOENT"]  # fmt: skip
    assert reader == ["ok", "EACCES", "EACCES", "ENOENT", "ENOENT", "EACCES", "ENOENT",
                      "ok", "ok", "EACCES", "ok", "ok"]  # fmt: skip
    assert stranger == ["ENOENT"] * 8 + ["ENOENT", "ENOENT", "ENOENT", "ENOENT"]
    assert vault.p("vault", "notes", "a.txt").read_text() == "secret words\nmore\n"
    assert vault.p("vault", "code", "c.txt").read_text() == "x\n"
    changes = [(e["who"], e["op"], e["path"]) for e in vault.events("vault")]
    assert ("owner", "write", "/vault/notes/a.txt") in changes
    assert ("owner", "rename", "/vault/notes/new.txt") in changes
    assert ("reader", "truncate", "/vault/code/c.txt") in changes
    assert not any(w in ("stranger",) for w, _, _ in changes)
    assert "secret words" not in (vault.state / "events.jsonl").read_text()  # no contents
    denied = {(e["who"], e["op"]) for e in vault.events("denied")}
    assert ("reader", "open") in denied and ("stranger", "lookup") in denied


def test_listings_show_only_the_view(vault: Server) -> None:
    vault.p("vault", "notes", "n.txt").write_text("n")
    vault.p("vault", "other").mkdir()
    assert as_agent(vault, "reader", "ls vault; ls vault/notes").split() == [
        "code", "notes", "n.txt"]  # fmt: skip
    assert sorted(os.listdir(vault.p("vault"))) == ["code", "notes", "other"]
    assert as_agent(vault, "owner", "ls vault").split() == ["notes"]


def test_top_level_is_the_operators(vault: Server) -> None:
    vault.p("vault", "shared").mkdir()
    vault.p("vault", "top.txt").write_text("t")
    assert "Permission denied" in as_agent(vault, "owner", "mkdir vault/notes2")


def test_the_server_never_follows_a_symlink_in_the_backing_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    root = tmp_path / "vault"
    store = Store(root, 5)
    (root / "notes").mkdir()
    (root / "notes" / "escape").symlink_to(outside)
    notes, _ = store.entry(store.top, "notes")
    link, _ = store.entry(notes, "escape")
    for fn in (
        lambda: store.entry(link, "secret"),
        lambda: store.listdir(link),
        lambda: store.unlink(link, "secret"),
        lambda: store.mkdir(link, "x", 0o755),
    ):
        with pytest.raises(OSError) as e:
            fn()
        assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)
    with pytest.raises(OSError):  # the link itself is not opened through
        store.open(link, os.O_RDONLY)
    assert (outside / "secret").read_text() == "secret"
    assert not (outside / "x").exists()
    store.close()


def test_no_setuid_no_fifo_no_hang(vault: Server) -> None:
    """Files the server makes are root's: modes are masked; only regular files."""
    notes = vault.p("vault", "notes")
    f = notes / "tool"
    f.write_text("#!/bin/sh\n")
    os.chmod(f, 0o4777)
    assert stat.S_IMODE(os.stat(vault.state / "vault" / "notes" / "tool").st_mode) == 0o755
    os.mkdir(notes / "open", 0o777)
    assert stat.S_IMODE(os.stat(vault.state / "vault" / "notes" / "open").st_mode) == 0o755
    with pytest.raises(OSError) as e:
        os.mkfifo(notes / "pipe")
    assert e.value.errno == errno.EPERM
    os.mkfifo(vault.state / "vault" / "notes" / "planted")  # put there from outside
    r = as_agent(vault, "owner", "timeout 5 cat vault/notes/planted; echo status $?")
    assert "status 1" in r  # refused at once, the server did not block
    assert vault.p("ctl").read_text()  # and still answers


def test_a_rename_cannot_carry_a_narrowed_path_out_of_its_grant(vault: Server) -> None:
    secret = vault.p("vault", "notes", "x", "secret")
    secret.mkdir(parents=True)
    (secret / "s").write_text("s")
    out = as_agent(
        vault,
        "owner",  # narrows its own view, then tries to move the hidden part out of it
        "echo 'unveil /vault/notes/x/secret -' > agents/owner/ctl; "
        "cat vault/notes/x/secret/s; mv vault/notes/x vault/notes/y",
    )
    assert "No such file" in out and "Permission denied" in out
    assert (vault.p("vault", "notes", "x", "secret", "s")).read_text() == "s"
