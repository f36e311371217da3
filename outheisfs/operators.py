"""Who may act as the operator: the mounting user, root, and those the config names.

A process that is no agent's is the operator only when it runs as the uid that
mounted the tree, as root, or as a user the top-level `operators` key admits
(user names, uids, `@group`). Any other uid is a stranger: it may stat the
mount's root and nothing else. Without this, a server running as root (which
mounts with `allow_other`) would let every local user read every inbox.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable

from .errors import ConfigError

STRANGER_PREFIX = "uid:"  # a stranger acts as "uid:N": never a valid agent name


def stranger(uid: int) -> str:
    return f"{STRANGER_PREFIX}{uid}"


def is_stranger(who: str) -> bool:
    return who.startswith(STRANGER_PREFIX)


class Operators:
    """The uids and groups admitted as the operator, resolved once at mount."""

    def __init__(self, uids: Iterable[int] = (), gids: Iterable[int] = ()) -> None:
        self.uids = {0, os.getuid(), *uids}
        self.gids = set(gids)

    @classmethod
    def resolve(cls, entries: Iterable[str | int]) -> Operators:
        """From the config's `operators` list; an unknown name is a ConfigError."""
        uids: set[int] = set()
        gids: set[int] = set()
        for entry in entries:
            if isinstance(entry, int):
                if entry < 0:
                    raise ConfigError(f"operators: {entry} is not a uid")
                uids.add(entry)
            elif entry.startswith("@"):
                try:
                    gids.add(grp.getgrnam(entry[1:]).gr_gid)
                except KeyError:
                    raise ConfigError(f"operators: no group named {entry[1:]!r}") from None
            else:
                try:
                    uids.add(pwd.getpwnam(entry).pw_uid)
                except KeyError:
                    raise ConfigError(f"operators: no user named {entry!r}") from None
        return cls(uids, gids)

    def admits(self, uid: int, gid: int, pid: int) -> bool:
        """Whether a process (not an agent's) of `uid` acts as the operator."""
        if uid in self.uids:
            return True
        if not self.gids:
            return False
        return gid in self.gids or not self.gids.isdisjoint(groups_of(pid))


def groups_of(pid: int) -> set[int]:
    """The supplementary groups of a process; empty if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()
