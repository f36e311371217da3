"""`outheisfs run NAME -- COMMAND`: run a command as agent NAME [SPEC §2].

The process asks the server to bind it to NAME (the operator's `bind` on the
agent's ctl) and then becomes COMMAND by exec. The server labels the process
when it binds; every process it forks from then on carries the label, so the
command and all its descendants act as NAME. Because COMMAND replaces this
process, its exit status, and the signals sent to it, are its own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import sys
from pathlib import Path

from . import sandbox

XATTR_PID = "user.outheisfs.pid"


class RunError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def bind(mp: Path, name: str) -> None:
    """Make this process agent `name` of the mount at `mp` (creating the agent if needed)."""
    try:
        os.getxattr(mp, XATTR_PID)
    except OSError:
        raise RunError(
            f"{mp} is not an outheisfs mount (mount it with 'outheisfs mount')"
        ) from None
    folder = mp / "agents" / name
    try:
        os.mkdir(folder)
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise RunError(f"{name!r} is not a valid agent name", 2) from None
        raise RunError(f"cannot create agent {name!r}: {e.strerror}") from None
    try:
        fd = os.open(folder / "ctl", os.O_WRONLY)
        try:
            os.write(fd, b"bind\n")
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno == errno.EPERM:
            raise RunError("an agent's process cannot run as another agent") from None
        raise RunError(f"cannot bind to agent {name!r}: {e.strerror}") from None


def confine(mp: Path, name: str, cmd: list[str], env: dict[str, str]) -> str:
    """Apply agent `name`'s confinement, as the server tells it, to this process;
    return its TMPDIR. Its seccomp filter also keeps a child of no agent (which
    could not be told from the operator's) from being made."""
    try:
        raw = os.getxattr(mp, sandbox.XATTR_POLICY)
    except OSError as e:
        raise RunError(f"cannot learn agent {name!r}'s confinement: {e.strerror}") from None
    policy = sandbox.Policy.from_json(raw)
    policy = dataclasses.replace(policy, mount=str(mp), programs=sandbox.programs(cmd, env))
    try:
        apply = sandbox.preparer(policy)
    except OSError as e:
        raise RunError(f"cannot confine agent {name!r}: {e}") from None
    ok = apply()
    sandbox.done(apply)
    if not ok and policy.confine == "required":
        raise RunError(f"cannot confine agent {name!r}: {os.strerror(ctypes.get_errno())}")
    return policy.tmpdir


def run(mp: Path, name: str, cmd: list[str]) -> int:
    if not cmd:
        raise RunError("run: no command given (outheisfs run NAME -- COMMAND [ARG...])", 2)
    bind(mp, name)
    env = dict(os.environ, OUTHEIS_AGENT=name, OUTHEIS_MOUNT=str(mp))
    env["PATH"] = sandbox.agent_path(env.get("PATH"))
    env["TMPDIR"] = confine(mp, name, cmd, env)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        # Like a shell: 127 for a command that is not there, 126 for one that cannot run.
        status = 127 if e.errno == errno.ENOENT else 126
        raise RunError(f"{cmd[0]}: {e.strerror}", status) from None
