"""The vault's store below FUSE: inodes are backing files, held while the kernel knows them."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from outheisfs.vault import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "vault", 5)
    yield s
    s.close()


def test_a_looked_up_file_is_reached_through_its_descriptor_after_its_name_goes(
    store: Store,
) -> None:
    (store.root / "f").write_text("old")
    ino, _ = store.entry(store.top, "f")
    store.looked_up(ino)
    (store.root / "g").write_text("new!")
    os.rename(store.root / "g", store.root / "f")  # replaced on the host
    assert store.lstat(ino).st_size == 3
    fd = store.open(ino, os.O_RDONLY)
    assert os.read(fd, 10) == b"old"
    os.close(fd)


def test_a_listed_file_is_reached_by_name_and_checked(store: Store) -> None:
    (store.root / "d").mkdir()
    (store.root / "d" / "f").write_text("x")
    d, _ = store.stat_in(store.top, "d")
    f, _ = store.stat_in(d, "f")
    assert f.fd == -1  # a listing takes no descriptor (its folder needs one)
    assert store.listdir(d) == ["f"]
    assert store.lstat(f).st_size == 1
    g, _ = store.stat_in(d, "f")
    assert g is f
    (store.root / "d" / "g").write_text("another file")
    os.rename(store.root / "d" / "g", store.root / "d" / "f")
    other, _ = store.stat_in(d, "f")
    assert other is not f and other.number != f.number


def test_a_listed_file_replaced_before_its_first_use_is_enoent(store: Store) -> None:
    (store.root / "f").write_text("x")
    f, _ = store.stat_in(store.top, "f")
    (store.root / "g").write_text("y")
    os.rename(store.root / "g", store.root / "f")
    with pytest.raises(OSError) as e:
        store.lstat(f)
    assert e.value.errno == errno.ENOENT


def test_forgotten_inodes_let_their_files_go_but_parents_stay_while_children_are_known(
    store: Store,
) -> None:
    (store.root / "d").mkdir()
    (store.root / "d" / "f").write_text("x")
    d, _ = store.entry(store.top, "d")
    store.looked_up(d)
    f, _ = store.entry(d, "f")
    store.looked_up(f)
    assert store.known() == 3
    store.forget(d.number, 1)
    assert store.known() == 3  # f still names d as its parent
    assert f.path == "d/f"
    fd = store.open(f, os.O_RDONLY)
    store.forget(f.number, 1)
    assert store.known() == 3  # open
    os.close(fd)
    f.opens -= 1
    store.forget(f.number, 0)
    assert store.known() == 1
    assert d.fd == -1 and f.fd == -1


def test_a_rename_moves_what_lies_below_by_one_entry(store: Store) -> None:
    (store.root / "a" / "b").mkdir(parents=True)
    (store.root / "a" / "b" / "f").write_text("x")
    a, _ = store.entry(store.top, "a")
    b, _ = store.entry(a, "b")
    f, _ = store.entry(b, "f")
    st = os.stat(store.root / "a")
    store.rename(store.top, "a", store.top, "z")
    store.moved(st, store.top, "z")
    assert f.path == "z/b/f"
    assert store.lstat(f).st_size == 1
