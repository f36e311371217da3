"""The vault used as tools use a local filesystem [SPEC §14]: open files outlive their
names, listings survive changes, `df`, access(), editor saves, `cp -a`, `tar`, O_DIRECT."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Server, outheisfs, sh, wait_for

CONFIG = """
[agents.owner]
[agents.reader]
unveil = { "/vault/notes" = "r" }
[vault]
notes = "owner"
"""


@pytest.fixture
def vault(server: Server) -> Server:
    server.write_config(CONFIG)
    server.mount()
    return server


def notes(server: Server) -> Path:
    return server.p("vault", "notes")


# -- open files outlive their names ----------------------------------------------------


def test_an_unlinked_file_stays_usable_until_its_last_close(vault: Server) -> None:
    f = notes(vault) / "f"
    f.write_bytes(b"hello")
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert not f.exists()
        assert os.fstat(fd).st_size == 5
        assert os.pread(fd, 10, 0) == b"hello"
        assert os.pwrite(fd, b" world", 5) == 6
        assert os.pread(fd, 20, 0) == b"hello world"
        os.ftruncate(fd, 4)
        assert os.fstat(fd).st_size == 4
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 20, 0) == b"hell"
    finally:
        os.close(fd)


def test_a_file_replaced_by_a_rename_keeps_its_old_content_for_its_readers(
    vault: Server,
) -> None:
    f, tmp = notes(vault) / "f", notes(vault) / "f.tmp"
    f.write_bytes(b"old content")
    fd = os.open(f, os.O_RDWR)
    try:
        tmp.write_bytes(b"new")
        os.rename(tmp, f)
        assert f.read_bytes() == b"new"
        assert os.fstat(fd).st_size == len(b"old content")
        assert os.pread(fd, 100, 0) == b"old content"
        os.pwrite(fd, b"OLD", 0)
        os.ftruncate(fd, 3)
        assert os.pread(fd, 100, 0) == b"OLD"
        assert f.read_bytes() == b"new"
    finally:
        os.close(fd)


def test_a_file_whose_other_hard_link_is_removed_stays_usable(vault: Server) -> None:
    f, g = notes(vault) / "f", notes(vault) / "g"
    f.write_bytes(b"data")
    fd = os.open(f, os.O_RDWR)
    try:
        os.link(f, g)
        os.unlink(g)
        assert os.fstat(fd).st_nlink == 1
        assert os.pread(fd, 10, 0) == b"data"
        os.ftruncate(fd, 2)
        assert f.read_bytes() == b"da"
    finally:
        os.close(fd)
    os.link(f, g)
    os.unlink(f)
    assert g.read_bytes() == b"da"  # and the other way round, by name
    assert os.stat(g).st_nlink == 1


SAVER = """
import os, sys, time
d = sys.argv[1]
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    with open(os.path.join(d, "f.tmp"), "w") as f:
        f.write("version %d\\n" % n)
    os.rename(os.path.join(d, "f.tmp"), os.path.join(d, "f"))
    n += 1
print(n)
"""


def test_a_name_that_always_exists_opens_while_an_editor_saves_over_it(vault: Server) -> None:
    d = notes(vault)
    (d / "f").write_text("version -1\n")
    saver = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(d), "3"], stdout=subprocess.PIPE, text=True
    )
    opened = failed = 0
    try:
        while saver.poll() is None:
            try:
                with open(d / "f") as f:
                    assert f.read().startswith("version ")
                opened += 1
            except FileNotFoundError:
                failed += 1
    finally:
        out, _ = saver.communicate(timeout=30)
    assert int(out) > 20 and opened > 20
    assert failed == 0, f"{failed} of {opened + failed} opens failed with ENOENT"


# -- statvfs ------------------------------------------------------------------------


def test_statvfs_reports_the_backing_filesystem_and_the_longest_name(vault: Server) -> None:
    got = os.statvfs(notes(vault))
    backing = os.statvfs(vault.state)
    assert got.f_blocks == backing.f_blocks > 0
    assert got.f_files == backing.f_files
    assert got.f_bsize == backing.f_bsize
    assert got.f_namemax == 255
    longest = notes(vault) / ("n" * got.f_namemax)
    longest.write_text("x")
    assert longest.read_text() == "x"
    with pytest.raises(OSError) as e:
        (notes(vault) / ("n" * (got.f_namemax + 1))).write_text("x")
    assert e.value.errno == errno.ENAMETOOLONG
    r = sh(f"df -P {notes(vault)} | tail -n 1")
    assert r.returncode == 0 and int(r.stdout.split()[1]) > 0, r.stdout


# -- listings -----------------------------------------------------------------------


def test_a_listing_survives_unlinking_each_entry_as_it_is_returned(vault: Server) -> None:
    d = notes(vault) / "many"
    d.mkdir()
    names = {f"file{i:03d}" for i in range(300)}
    for n in names:
        (d / n).write_text("")
    seen: list[str] = []
    with os.scandir(d) as it:
        for entry in it:
            seen.append(entry.name)
            os.unlink(d / entry.name)
    assert sorted(seen) == sorted(names)
    assert os.listdir(d) == []


def test_a_listing_survives_a_file_created_per_entry_returned(vault: Server) -> None:
    d = notes(vault) / "grow"
    d.mkdir()
    names = {f"file{i:03d}" for i in range(300)}
    for n in names:
        (d / n).write_text("")
    seen: list[str] = []
    with os.scandir(d) as it:
        for entry in it:
            seen.append(entry.name)
            (d / f"new-{entry.name}").write_text("")
            assert len(seen) < 2000, "the listing does not end"
    originals = [n for n in seen if n in names]
    assert sorted(originals) == sorted(names)  # each exactly once
    assert len(os.listdir(d)) == 300 + len(seen)


def test_rm_r_and_find_delete_empty_a_big_folder(vault: Server) -> None:
    d = notes(vault) / "tree"
    r = sh(f"mkdir -p {d}/a {d}/b && for i in $(seq 200); do : > {d}/a/$i; : > {d}/b/$i; done")
    assert r.returncode == 0, r.stderr
    r = sh(f"find {d}/a -type f -delete && rm -r {d}/b && ls -A {d}/a")
    assert r.returncode == 0 and r.stdout == "", r.stderr


# -- access() agrees with open() ------------------------------------------------------

PROBE = """
import os, sys
out = []
for path in sys.argv[1:]:
    for mode, flags in ((os.R_OK, os.O_RDONLY), (os.W_OK, os.O_WRONLY)):
        if os.path.isdir(path):
            if mode == os.W_OK:
                continue
            try:
                os.listdir(path); opened = True
            except OSError:
                opened = False
        else:
            try:
                os.close(os.open(path, flags)); opened = True
            except OSError:
                opened = False
        allowed = os.access(path, mode)
        shown = os.stat(path).st_mode & (0o444 if mode == os.R_OK else 0o222) != 0
        if not (allowed == opened):
            out.append(f"{path} mode {mode}: access {allowed}, open {opened}")
        if os.geteuid() != 0 and shown != opened:
            out.append(f"{path} mode {mode}: shown {shown}, open {opened}")
    if os.path.isdir(path):
        try:
            os.chdir(path); cd = True
        except OSError:
            cd = False
        if cd != os.access(path, os.X_OK):
            out.append(f"{path}: chdir {cd}, access X_OK {not cd}")
print("\\n".join(out) or "agree")
"""


def test_access_answers_as_open_does_for_every_caller(vault: Server) -> None:
    d = notes(vault)
    for name, mode in (("none", 0o000), ("ro", 0o444), ("rw", 0o644), ("x", 0o755)):
        (d / name).write_text(name)
        os.chmod(d / name, mode)
    (d / "closed").mkdir()
    os.chmod(d / "closed", 0o000)
    paths = [str(d / n) for n in ("none", "ro", "rw", "x", "closed")] + [str(vault.p("vault"))]
    r = subprocess.run([sys.executable, "-c", PROBE, *paths], capture_output=True, text=True)
    assert r.stdout.strip() == "agree", r.stdout + r.stderr
    for agent in ("owner", "reader"):
        r = outheisfs("run", agent, "--mount", str(vault.mp), "--", sys.executable, "-c", PROBE,
                      *paths)  # fmt: skip
        assert r.stdout.strip() == "agree", (agent, r.stdout + r.stderr)
    # The modes shown to an agent are what it may do.
    r = outheisfs("run", "reader", "--mount", str(vault.mp), "--", "stat", "-c", "%A",
                  str(d / "rw"), str(vault.p("vault")))  # fmt: skip
    assert r.stdout.split() == ["-r--r--r--", "dr-xr-x---"], r.stdout + r.stderr
    assert stat.filemode(os.stat(vault.p("vault")).st_mode) == "drwxrwx---"


# -- chown, cp -a, tar, O_DIRECT ------------------------------------------------------


def test_a_chown_that_changes_nothing_succeeds(vault: Server) -> None:
    f = notes(vault) / "f"
    f.write_text("x")
    st = os.stat(f)
    os.chown(f, st.st_uid, st.st_gid)
    os.chown(f, -1, st.st_gid)
    os.lchown(f, st.st_uid, -1)
    with pytest.raises(OSError) as e:
        os.chown(f, st.st_uid + 4321, -1)
    assert e.value.errno == errno.EPERM
    assert os.stat(f).st_uid == st.st_uid


def test_cp_a_and_tar_x_copy_a_tree_into_the_vault(vault: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "deeper" / "f").write_text("f")
    (src / "tool").write_text("#!/bin/sh\n")
    os.chmod(src / "tool", 0o755)
    os.chmod(src / "sub", 0o750)
    os.symlink("tool", src / "link")
    d = notes(vault)
    r = sh(f"cp -a {src} {d}/copy && tar -C {tmp_path} -cf {tmp_path}/t.tar src "
           f"&& mkdir {d}/untar && tar -C {d}/untar -xf {tmp_path}/t.tar")  # fmt: skip
    assert r.returncode == 0, r.stderr
    for top in (d / "copy", d / "untar" / "src"):
        assert (top / "sub" / "deeper" / "f").read_text() == "f"
        assert stat.S_IMODE(os.stat(top / "sub").st_mode) == 0o750
        assert stat.S_IMODE(os.stat(top / "tool").st_mode) == 0o755
        assert os.readlink(top / "link") == "tool"
    r = sh(f"diff -r {src} {d}/copy && diff -r {src} {d}/untar/src")
    assert r.returncode == 0, r.stdout + r.stderr


def test_o_direct_reads_and_writes_work(vault: Server) -> None:
    f = notes(vault) / "direct"
    r = sh(f"dd if=/dev/urandom of={f}.src bs=4096 count=16 2>/dev/null && "
           f"dd if={f}.src of={f} bs=4096 oflag=direct 2>&1 && "
           f"dd if={f} of={f}.back bs=4096 iflag=direct 2>&1 && cmp {f}.src {f}.back")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


# -- the server lets go of what the kernel forgets -----------------------------------


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_forgotten_files_are_let_go(vault: Server) -> None:
    d = notes(vault) / "churn"
    d.mkdir()
    before = _fds(vault.pid)
    r = sh(f"cd {d} && for i in $(seq 500); do echo $i > f$i; done && ls -l > /dev/null "
           f"&& rm f*")  # fmt: skip
    assert r.returncode == 0, r.stderr

    def settled() -> bool:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        return _fds(vault.pid) < before + 50

    wait_for(settled, timeout=10, interval=0.2)


def test_another_uid_inside_the_vault_learns_nothing_of_its_names(vault: Server) -> None:
    """A process of a uid that is no operator, started inside the vault by root, is
    refused alike for a name that exists and one that does not."""
    (notes(vault) / "f").write_text("secret")
    r = sh(f"cd {notes(vault)} && setpriv --reuid=65534 --regid=65534 --clear-groups "
           "sh -c 'cat f; cat missing; ls .'")  # fmt: skip
    assert "secret" not in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 3 and all("Permission denied" in line for line in lines), r.stderr
