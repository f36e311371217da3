"""Who sees what: unveil.

The operator sees everything. An agent sees its own folder, the inboxes of the
agents it may send to (write only), and the paths it was granted: `unveil` in
its config, its vault domains, and what the operator added at run time. The
folders above a granted path can be walked through and list only what leads to
it; everything else does not exist for the agent. A request that cannot be
attributed to anyone with certainty is NOBODY: it sees an empty root.

Rights are a pure function of (who, path): `ops` asks at lookup and open, and
the open file keeps the answer. Grants are a map of path -> perms; "-" hides a
path that a shorter grant would show.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import TOPIC_PREFIX, Config
from .names import NOBODY
from .tree import AGENT_ROWS, ROOT_ROWS

HIDE = "-"

# What the files of the tree can ever allow to an agent, from the tree's table.
OWN_FILES = {row.name: row.own for row in AGENT_ROWS}
OTHER_FILES = {row.name: row.other for row in AGENT_ROWS}
ROOT_FILES = {"/" + row.name: row.other for row in ROOT_ROWS if not row.is_dir}


def normalize(path: str) -> str:
    """'/a//b/' -> '/a/b'. Paths in grants and checks are absolute in the mount."""
    parts = [p for p in path.split("/") if p and p != "."]
    return "/" + "/".join(parts)


def is_below(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


def config_grants(config: Config, name: str) -> dict[str, str]:
    """The grants an agent starts with: send rights, unveil, vault domains it owns."""
    ac = config.agents.get(name)
    grants: dict[str, str] = {}
    if ac is not None:
        for target in ac.send:
            if target == "*":
                grants["/agents/*/inbox"] = "w"
            elif target.startswith(TOPIC_PREFIX):  # topics/NAME
                grants["/" + target] = "w"
            else:
                grants[f"/agents/{target}/inbox"] = "w"
        for path, perms in ac.unveil.items():
            grants[normalize(path)] = perms
    for domain, owner in config.vault.items():
        if owner == name:
            grants[f"/vault/{domain}"] = "rw"
    return grants


class View:
    """One agent's view: perms(path) is None (hidden), "" (a folder it may only
    walk through), or a subset of "rw"."""

    def __init__(self, agent: str, grants: Mapping[str, str]) -> None:
        self.agent = agent
        self.grants = dict(grants)
        self.all_inboxes = self.grants.get("/agents/*/inbox") == "w"

    def _grant(self, path: str) -> str | None:
        """The longest grant at or above `path` (HIDE included); None if none."""
        probe = path
        while True:
            if probe in self.grants:
                return self.grants[probe]
            if probe == "/":
                return None
            probe = probe.rsplit("/", 1)[0] or "/"

    def _granted(self, path: str) -> str | None:
        """The perms of the longest grant at or above `path`; None if none or hidden."""
        grant = self._grant(path)
        return None if grant == HIDE else grant

    def _leads_to_grant(self, path: str) -> bool:
        if self.all_inboxes and (is_below("/agents", path) or path == "/topics"):
            return True
        return any(
            p != HIDE and is_below(g, path) and g != path and not self._hidden_above(g)
            for g, p in self.grants.items()
        )

    def _hidden_above(self, path: str) -> bool:
        return self._granted(path) is None

    def perms(self, path: str) -> str | None:
        if self.agent == NOBODY:
            return "" if path == "/" else None
        parts = path.strip("/").split("/") if path != "/" else []
        if len(parts) >= 2 and parts[0] == "agents":
            return self._agent_path(path, parts)
        if len(parts) == 2 and parts[0] == "topics":  # write-only, by `send`
            if self._grant(path) == HIDE:
                return None
            granted = self._granted(path)
            return _meet("w" if granted is None and self.all_inboxes else granted, "w")
        if path in ROOT_FILES:  # an agent may never see a file that allows it nothing
            allowed = ROOT_FILES[path]
            return _meet(self._granted(path), allowed) if allowed else None
        if self._grant(path) == HIDE and path not in ("/", "/agents"):
            return None
        granted = self._granted(path)
        if granted is not None:
            return granted
        if path in ("/", "/agents") or self._leads_to_grant(path):
            return ""
        return None

    def _agent_path(self, path: str, parts: list[str]) -> str | None:
        name = parts[1]
        own = name == self.agent
        if not own and self._grant(path) == HIDE:
            return None
        if len(parts) == 2:  # agents/NAME/
            if own:
                return "r"
            granted = self._granted(path)
            if granted is not None:
                return "r" if "r" in granted else ""
            if (self.all_inboxes and name != self.agent) or self._leads_to_grant(path):
                return ""
            return None
        if len(parts) != 3:
            return None
        file = parts[2]
        if own:
            return OWN_FILES.get(file)
        granted = self._granted(path)
        if granted is None and file == "inbox" and self.all_inboxes:
            granted = "w"
        return _meet(granted, OTHER_FILES.get(file, ""))

    def may_send(self, to: str) -> bool:
        if to == self.agent:
            return True
        perms = self.perms(f"/agents/{to}/inbox")
        return perms is not None and "w" in perms

    def narrowed(self, path: str, perms: str) -> dict[str, str]:
        """The grants after the agent itself asks to see `path` with `perms` only.
        Raises ValueError if that would widen its view."""
        path = normalize(path)
        now = self.perms(path)
        if is_below(path, f"/agents/{self.agent}"):
            raise ValueError("an agent's own folder is always part of its view")
        want = "" if perms == HIDE else perms
        if now is None and want:
            raise ValueError(f"{path} is not in the view: unveil can only narrow it")
        if not set(want) <= set(now or ""):
            raise ValueError(f"{path}: {perms!r} is more than the {now or 'nothing'!r} it has")
        grants = {}
        for g, p in self.grants.items():
            if is_below(g, path) and g != path:
                p = HIDE if perms == HIDE else "".join(c for c in p if c in want) or HIDE
            grants[g] = p
        grants[path] = perms
        return grants


def _meet(granted: str | None, allowed: str) -> str | None:
    if granted is None:
        return None
    return "".join(c for c in "rw" if c in granted and c in allowed)
