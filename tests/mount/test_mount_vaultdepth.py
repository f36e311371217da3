"""Deep vault trees: past MAX_DEPTH levels a path is ENAMETOOLONG, so no caller can
make every request cost time in proportion to a tree thousands of levels deep."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from outheisfs.vault import MAX_DEPTH

from .conftest import Server

pytestmark = pytest.mark.mount


def test_a_tree_deeper_than_the_limit_cannot_be_made_or_reached(server: Server) -> None:
    server.write_config('[vault]\ndeep = "user"\n')
    server.mount()
    # Through the mount, one level at a time from inside (as a path would be too long).
    fd = os.open(server.p("vault", "deep"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(MAX_DEPTH - 1):  # "deep" is the first level
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with pytest.raises(OSError) as e:
            os.mkdir("d", dir_fd=fd)
        assert e.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as e:
            os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        assert e.value.errno == errno.ENAMETOOLONG
        # A deeper folder made on the backing disk is not reached through the mount.
        backing = server.state / "vault" / "deep" / Path(*["d"] * (MAX_DEPTH - 1))
        (backing / "made-outside").mkdir()
        with pytest.raises(OSError) as e:
            os.stat("made-outside", dir_fd=fd)
        assert e.value.errno == errno.ENAMETOOLONG
        assert os.listdir(fd) == ["made-outside"]  # listed, but not entered
    finally:
        os.close(fd)
