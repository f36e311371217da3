"""Which mount a command means, and how a mount names its state folder.

A command that takes a MOUNTPOINT and is given none uses `$OUTHEIS_MOUNT` (set
for every agent process), else the only outheisfs mount of this machine (read
from /proc/self/mountinfo), else `./mount`. Each mount's source is
`outheisfs:STATE` (the FUSE fsname), so `mount`, `df` and this module can tell
several servers apart.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

FSTYPE = "fuse.outheisfs"
SOURCE_PREFIX = "outheisfs:"
MOUNTINFO = Path("/proc/self/mountinfo")
DEFAULT = Path("mount")


@dataclass(frozen=True, slots=True)
class Mount:
    mountpoint: Path
    source: str

    @property
    def state(self) -> Path | None:
        """The state folder the source names (None for a mount of an older version)."""
        if self.source.startswith(SOURCE_PREFIX):
            return Path(self.source[len(SOURCE_PREFIX) :])
        return None


def fsname(state: Path) -> str:
    """The `fsname` mount option for a server of `state`. Option values are split
    at commas, and a backslash escapes the character after it."""
    text = SOURCE_PREFIX + str(state)
    return "fsname=" + text.replace("\\", "\\\\").replace(",", "\\,")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The outheisfs mounts in the text of /proc/self/mountinfo."""
    out = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)
            fstype, source = fields[dash + 1], fields[dash + 2]
        except (ValueError, IndexError):
            continue
        if fstype == FSTYPE:
            out.append(Mount(Path(_unescape(fields[4])), _unescape(source)))
    return out


def outheisfs_mounts() -> list[Mount]:
    try:
        return parse_mountinfo(MOUNTINFO.read_text())
    except OSError:
        return []


def default_mountpoint(
    env: Mapping[str, str] | None = None, mounts: list[Mount] | None = None
) -> Path:
    """$OUTHEIS_MOUNT, else the only outheisfs mount, else ./mount (absolute)."""
    env = os.environ if env is None else env
    if env.get("OUTHEIS_MOUNT"):
        return Path(env["OUTHEIS_MOUNT"]).absolute()
    mounts = outheisfs_mounts() if mounts is None else mounts
    if len(mounts) == 1:
        return mounts[0].mountpoint
    return DEFAULT.absolute()


def mountpoint(given: str | None) -> Path:
    """The mountpoint a command was given, or its default."""
    return Path(given).absolute() if given else default_mountpoint()


def hint(mp: Path) -> str:
    """For an error about `mp`: which outheisfs mounts there are, if any."""
    others = [m for m in outheisfs_mounts() if m.mountpoint != mp]
    if not others:
        return ""
    listed = ", ".join(str(m.mountpoint) for m in others[:5])
    more = f" and {len(others) - 5} more" if len(others) > 5 else ""
    return f" (outheisfs mounts here: {listed}{more}; name one, or set OUTHEIS_MOUNT)"
