"""Who sees what, as a pure function of (agent, grants, path) [SPEC §6]."""

from __future__ import annotations

import pytest

from outheisfs.names import NOBODY
from outheisfs.views import View, config_grants, normalize

from .helpers import make_config


def view(grants: dict[str, str], agent: str = "me") -> View:
    return View(agent, grants)


def test_normalize() -> None:
    assert normalize("//agents///x/") == "/agents/x"
    assert normalize("/") == "/"
    assert normalize("/a/./b") == "/a/b"


def test_own_folder_and_files() -> None:
    v = view({})
    assert v.perms("/agents/me") == "r"
    assert v.perms("/agents/me/inbox") == "rw"
    assert v.perms("/agents/me/outbox") == "rw"
    assert v.perms("/agents/me/ctl") == "rw"
    assert v.perms("/agents/me/log") == "r"
    assert v.perms("/agents/me/nothing") is None


def test_nothing_else_without_grants() -> None:
    v = view({})
    assert v.perms("/") == ""
    assert v.perms("/agents") == ""
    for hidden in ("/ctl", "/log", "/vault", "/agents/other", "/agents/other/inbox",
                   "/agents/user/inbox", "/vault/notes"):  # fmt: skip
        assert v.perms(hidden) is None, hidden


def test_send_right_is_a_write_only_inbox_and_a_walk_through_folder() -> None:
    v = view({"/agents/x/inbox": "w"})
    assert v.perms("/agents/x") == ""
    assert v.perms("/agents/x/inbox") == "w"
    assert v.perms("/agents/x/log") is None
    assert v.perms("/agents/x/outbox") is None
    assert v.may_send("x") and not v.may_send("y") and v.may_send("me")


def test_send_to_all() -> None:
    v = view({"/agents/*/inbox": "w"})
    assert v.perms("/agents/anyone/inbox") == "w"
    assert v.perms("/agents/user/inbox") == "w"
    assert v.perms("/agents/anyone") == ""
    assert v.perms("/agents/anyone/log") is None


def test_an_unveiled_agent_folder_is_limited_by_what_files_allow() -> None:
    v = view({"/agents/x": "rw"})
    assert v.perms("/agents/x") == "r"
    assert v.perms("/agents/x/log") == "r"
    assert v.perms("/agents/x/outbox") == "r"  # never send as x
    assert v.perms("/agents/x/ctl") == "r"
    assert v.perms("/agents/x/inbox") == "w"  # never take x's messages


def test_unveiled_read_only_inbox_is_visible_but_useless() -> None:
    v = view({"/agents/x/inbox": "r"})
    assert v.perms("/agents/x/inbox") == ""


def test_root_files_only_read_and_only_when_unveiled() -> None:
    v = view({"/log": "rw", "/ctl": "r"})
    assert v.perms("/log") == "r" and v.perms("/ctl") == "r"


def test_folders_above_a_grant_are_walk_through_only() -> None:
    v = view({"/vault/notes/drafts": "r"})
    assert v.perms("/vault") == ""
    assert v.perms("/vault/notes") == ""
    assert v.perms("/vault/notes/drafts") == "r"
    assert v.perms("/vault/notes/drafts/a/b.txt") == "r"
    assert v.perms("/vault/notes/other") is None
    assert v.perms("/vault/other") is None


def test_a_longer_grant_wins_and_dash_hides() -> None:
    v = view({"/vault/notes": "rw", "/vault/notes/secret": "-", "/vault/notes/ro": "r"})
    assert v.perms("/vault/notes/x") == "rw"
    assert v.perms("/vault/notes/secret") is None
    assert v.perms("/vault/notes/secret/deeper") is None
    assert v.perms("/vault/notes/ro/file") == "r"


def test_nobody_sees_an_empty_root() -> None:
    v = View(NOBODY, {"/vault": "rw"})
    assert v.perms("/") == ""
    assert v.perms("/agents") is None and v.perms("/vault") is None


@pytest.mark.parametrize(
    ("path", "perms", "result"),
    [
        ("/vault/notes", "r", {"/vault/notes": "r", "/vault/notes/ro": "r"}),
        ("/vault/notes", "-", {"/vault/notes": "-", "/vault/notes/ro": "-"}),
        ("/vault/notes/x", "r", None),  # adds a narrower entry below
    ],
)
def test_narrowing(path: str, perms: str, result: dict[str, str] | None) -> None:
    v = view({"/vault/notes": "rw", "/vault/notes/ro": "r"})
    grants = v.narrowed(path, perms)
    if result is not None:
        assert grants == result
    else:
        assert grants[path] == perms and grants["/vault/notes"] == "rw"
    assert View("me", grants).perms(path) == (None if perms == "-" else perms)


@pytest.mark.parametrize(
    ("path", "perms"),
    [
        ("/vault/notes/ro", "rw"),  # more than it has
        ("/vault/elsewhere", "r"),  # not in its view
        ("/agents/x/inbox", "r"),  # send right is w only
        ("/log", "r"),
        ("/agents/me/inbox", "r"),  # its own folder is always there
    ],
)
def test_widening_is_refused(path: str, perms: str) -> None:
    v = view({"/vault/notes": "rw", "/vault/notes/ro": "r", "/agents/x/inbox": "w"})
    with pytest.raises(ValueError):
        v.narrowed(path, perms)


def test_hiding_a_send_right_removes_it() -> None:
    v = view({"/agents/x/inbox": "w"})
    grants = v.narrowed("/agents/x/inbox", "-")
    assert not View("me", grants).may_send("x")
    assert View("me", grants).perms("/agents/x") is None


def test_config_grants() -> None:
    config = make_config(
        {
            "a": {"send": ["b", "user"], "unveil": {"//vault/notes/": "r", "/log": "r"}},
            "b": {"send": ["*"]},
            "c": {},
        },
        vault={"notes": "b", "code": "a"},
    )
    assert config_grants(config, "a") == {
        "/agents/b/inbox": "w",
        "/agents/user/inbox": "w",
        "/vault/notes": "r",
        "/log": "r",
        "/vault/code": "rw",
    }
    assert config_grants(config, "b") == {"/agents/*/inbox": "w", "/vault/notes": "rw"}
    assert config_grants(config, "c") == {}
    assert config_grants(config, "unknown") == {}


def test_dash_beats_send_to_all() -> None:
    v = view({"/agents/*/inbox": "w", "/agents/x": "-"})
    assert v.perms("/agents/x") is None
    assert v.perms("/agents/x/inbox") is None
    assert not v.may_send("x") and v.may_send("y")
