"""`outheisfs CONFIG MOUNTPOINT -o OPTIONS`: the form `mount -t fuse.outheisfs` uses.

`mount -t fuse.outheisfs CONFIG MOUNTPOINT -o state=DIR` (and so a line of
/etc/fstab) runs `mount.fuse3`, which runs the program named after `fuse.`
as `outheisfs CONFIG MOUNTPOINT -o OPTIONS`, through /bin/sh, with the PATH
emptied by mount(8). This module turns that into `outheisfs mount`.
"""

from __future__ import annotations

import os

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Options of mount(8) and fstab that concern the mount command, not the filesystem:
# accepted and left alone (the tree always mounts nosuid, nodev and noatime).
IGNORED = {
    "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
    "relatime", "norelatime", "strictatime", "diratime", "nodiratime", "lazytime",
    "sync", "async", "dirsync", "auto", "noauto", "user", "nouser", "users", "owner",
    "group", "defaults", "nofail", "_netdev", "allow_other", "silent", "loud",
}  # fmt: skip


class HelperError(Exception):
    pass


def is_helper_call(argv: list[str], commands: set[str]) -> bool:
    """`outheisfs SOURCE MOUNTPOINT -o OPTIONS`: two operands, no subcommand first, and
    options (mount.fuse3 always passes some); anything else is left to the parser, so
    that a mistyped command gets its usual error."""
    return (
        len(argv) >= 3
        and argv[0] not in commands
        and not argv[0].startswith("-")
        and not argv[1].startswith("-")
        and any(a == "-o" or a.startswith("-o") for a in argv[2:])
    )


def mount_argv(argv: list[str]) -> list[str]:
    """The `outheisfs mount` arguments for a mount helper's call."""
    source, mountpoint, rest = argv[0], argv[1], argv[2:]
    opts: list[str] = []
    while rest:
        flag = rest.pop(0)
        if flag == "-o" and rest:
            opts += [o for o in rest.pop(0).split(",") if o]
        elif flag.startswith("-o") and len(flag) > 2:
            opts += [o for o in flag[2:].split(",") if o]
        elif flag in ("-n", "-s", "-f", "-v"):  # flags mount(8) may pass on: no meaning here
            continue
        else:
            raise HelperError(f"mount helper: unexpected argument {flag!r}")
    out = ["mount", mountpoint]
    if source not in ("none", "outheisfs"):
        out += ["--config", source]
    state = None
    for opt in opts:
        key, eq, value = opt.partition("=")
        if key == "state" and eq and value:
            state = value
        elif key == "durability" and eq:
            out += ["--durability", value]
        elif key == "ro":
            raise HelperError("mount option 'ro': an outheisfs tree cannot be mounted read-only")
        elif opt in IGNORED or key.startswith("x-") or key == "comment":
            continue
        else:
            raise HelperError(f"unknown mount option {opt!r} (known: state=DIR, durability=MODE)")
    if state is None:
        raise HelperError("mount helper: give the state folder with -o state=DIR")
    out += ["--state", state]
    os.environ.setdefault("PATH", DEFAULT_PATH)  # mount(8) runs helpers without one
    return out
