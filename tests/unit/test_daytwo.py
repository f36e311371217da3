"""Day-two operations below FUSE: the pieces of `follow`, agent output, `run`'s
rights, finding the mount, and the bookkeeping that logs a refused lookup once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from outheisfs.config import parse_config
from outheisfs.dentries import Dentries
from outheisfs.errors import ConfigError
from outheisfs.follow import Filter, Position, last_line, seq_of
from outheisfs.mounts import Mount, default_mountpoint, fsname, parse_mountinfo
from outheisfs.output import MAX_LINE, Output

# -- one refused lookup, one `denied` event --------------------------------------------


def test_a_refusal_of_a_held_name_waits_for_the_fresh_lookup() -> None:
    d = Dentries()
    ev = ("lookup", "not in the view of a")
    assert not d.refused("a", "/x", ev)  # a name the kernel does not hold: logged
    d.shown("/x")
    assert d.refused("a", "/x", ev)  # the revalidation: held back
    assert not d.refused("a", "/x", ev)  # the fresh lookup: logged
    assert d.overdue("a", "/x") is None  # and the held one is gone
    assert not d.refused("a", "/x", ev)  # the kernel no longer holds it


def test_a_held_refusal_without_a_fresh_lookup_is_logged_when_overdue() -> None:
    d = Dentries()
    ev = ("lookup", "not in the view of a")
    d.shown("/x")
    assert d.refused("a", "/x", ev)
    assert d.overdue("a", "/x") is ev
    assert d.overdue("a", "/x") is None


# -- which mount -----------------------------------------------------------------------

MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "47 27 0:42 / /tmp/a\\040b/mnt rw,nosuid,nodev,noatime - fuse.outheisfs "
    "outheisfs:/tmp/a\\040b/state rw,user_id=0,group_id=0\n"
    "48 27 0:43 / /tmp/floor rw,nosuid - fuse.floor floor rw\n"
    "49 27 0:44 / /tmp/old rw master:3 - fuse.outheisfs outheisfs rw\n"
)


def test_mountinfo_lists_outheisfs_mounts_with_their_state_folder() -> None:
    found = parse_mountinfo(MOUNTINFO)
    assert [m.mountpoint for m in found] == [Path("/tmp/a b/mnt"), Path("/tmp/old")]
    assert [m.state for m in found] == [Path("/tmp/a b/state"), None]


def test_the_default_mountpoint_is_the_env_then_the_only_mount_then_dot_mount() -> None:
    one = [Mount(Path("/srv/one"), "outheisfs:/srv/state")]
    two = [*one, Mount(Path("/srv/two"), "outheisfs:/srv/state2")]
    assert default_mountpoint({"OUTHEIS_MOUNT": "/x/m"}, one) == Path("/x/m")
    assert default_mountpoint({}, one) == Path("/srv/one")
    assert default_mountpoint({}, two) == Path("mount").absolute()
    assert default_mountpoint({}, []) == Path("mount").absolute()


def test_fsname_escapes_what_the_option_parser_would_split() -> None:
    assert fsname(Path("/s,t\\u")) == "fsname=outheisfs:/s\\,t\\\\u"


# -- the operator's vault domains ------------------------------------------------------


def test_a_vault_domain_may_belong_to_user_but_not_to_an_unknown_agent() -> None:
    config = parse_config('[vault]\ncorpus = "user"\n', Path("."))
    assert config.vault == {"corpus": "user"}
    with pytest.raises(ConfigError, match=r"vault\.corpus: unknown owner agent 'nobody'"):
        parse_config('[vault]\ncorpus = "nobody"\n', Path("."))


# -- follow ----------------------------------------------------------------------------


def _line(seq: int, type_: str = "message", **more: Any) -> bytes:
    return (json.dumps({"seq": seq, "ts": "t", "type": type_, **more}) + "\n").encode()


def test_follow_takes_whole_lines_once_and_keeps_a_partial_one_for_later() -> None:
    pos = Position(offset=100, seq=1)
    data = _line(1) + _line(2) + _line(3)[:-5]  # 1 again (skipped), 2, and part of 3
    assert [seq_of(x) for x in pos.take(data, Filter())] == [2]
    assert pos.offset == 100 + len(_line(1) + _line(2))
    assert pos.seq == 2
    assert [seq_of(x) for x in pos.take(_line(3), Filter())] == [3]


def test_follow_filters_by_agent_and_type_but_counts_every_event() -> None:
    wanted = Filter({"b"}, {"message", "ack"})
    data = (
        _line(1, **{"from": "a", "to": "b"})
        + _line(2, "deliver", agent="b")
        + _line(3, **{"from": "a", "to": "c"})
        + _line(4, "ack", agent="b", who="user")
    )
    pos = Position()
    assert [seq_of(x) for x in pos.take(data, wanted)] == [1, 4]
    assert pos.seq == 4


def test_last_line_finds_the_line_that_ends_at_an_offset(tmp_path: Path) -> None:
    p = tmp_path / "log"
    long = _line(2, body="x" * 200_000)
    p.write_bytes(_line(1) + long + _line(3))
    fd = os.open(p, os.O_RDONLY)
    try:
        assert last_line(fd, len(_line(1))) == _line(1)
        assert last_line(fd, len(_line(1) + long)) == long  # longer than one look back
        assert last_line(fd, len(_line(1)) - 3) == b""  # not at the end of a line
        assert last_line(fd, 0) == b""
    finally:
        os.close(fd)


# -- agent output ----------------------------------------------------------------------


async def test_output_pump_writes_one_line_per_line_and_cuts_long_ones(tmp_path: Path) -> None:
    out = Output(tmp_path, 1 << 20)
    r, w = os.pipe()

    def writer() -> None:  # more than a pipe holds: written while the pump reads
        os.write(w, b"one\ntw")
        os.write(w, b"o\n" + b"x" * (MAX_LINE + 10) + b"\n\nlast")
        os.close(w)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, writer)
        await out.pump(r, "a", 1, 42, "stderr")
    lines = [line.split(b" ", 4) for line in out.path("a").read_bytes().split(b"\n")[:-1]]
    assert [(i, p, s) for _, i, p, s, _ in lines] == [(b"1", b"42", b"stderr")] * 6
    assert [t for *_, t in lines] == [b"one", b"two", b"x" * MAX_LINE, b"x" * 10, b"", b"last"]
    assert out.size("a") == len(out.path("a").read_bytes())
    assert out.read("a", 0, 1 << 20) == out.path("a").read_bytes()
    out.close()


def test_output_rotates_to_one_older_file(tmp_path: Path) -> None:
    out = Output(tmp_path, 4096)
    for i in range(200):
        out.write("a", 0, 1, "stdout", b"%04d" % i)
    current, older = out.path("a").read_bytes(), (tmp_path / "a.log.1").read_bytes()
    assert len(current) <= 4096 and len(older) <= 4096
    assert out.size("a") == len(current)
    assert current.endswith(b" 0 1 stdout 0199\n")
    assert Output(tmp_path, 4096).size("a") == len(current)  # as found on disk
    out.close()


# -- the docs stand alone --------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_docs_and_code_cite_no_file_users_do_not_have() -> None:
    """The reference is the contract users read: no doc, docstring, comment or
    message of the package refers them to a specification they cannot open."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "outheisfs").rglob("*.py"))
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "SPEC" in line
    ]
    assert not found, "\n".join(found)


def test_follow_of_a_mountpoint_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "outheisfs", "follow", str(tmp_path / "nothere")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr == f"outheisfs: follow: mountpoint {tmp_path / 'nothere'} does not exist\n"
