"""`outheisfs run NAME -- COMMAND`: run a command as agent NAME.

A child process asks the server to bind it to NAME (the operator's `bind` on
the agent's ctl) and then becomes COMMAND by exec. The server labels the process
when it binds; every process it forks from then on carries the label, so the
command and all its descendants act as NAME. This process stays the operator and
waits: it passes on SIGTERM and SIGHUP, takes the command's exit status (or dies
of the same signal), and when the command failed it prints the reasons the
server gave for what it refused meanwhile (NAME's `errors` file): a write can
only return an errno, the reason is in that file.

Rights given with `--unveil` and `--send` are written to the agent's ctl in the
same write as `bind`, by the operator (the ctl file was opened before the
process became the agent): the command starts with them in its view.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import signal
import sys
from pathlib import Path

from . import sandbox
from .mounts import hint

PR_SET_PDEATHSIG = 1
SHOWN = 5  # reasons printed at most
XATTR_PID = "user.outheisfs.pid"


class RunError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


PERMS = ("r", "w", "rw", "-")


def grant_lines(mp: Path, unveil: list[str], send: list[str]) -> list[str]:
    """The ctl commands for `--unveil PATH=PERMS` and `--send NAME`. PATH is
    absolute in the mount (a path that begins with the mountpoint is taken too)."""
    lines = []
    for item in unveil:
        path, eq, perms = item.rpartition("=")
        if not eq or not path or perms not in PERMS:
            raise RunError(f"--unveil {item!r}: give PATH=PERMS, PERMS one of r, w, rw, -", 2)
        if path == str(mp) or path.startswith(f"{mp}/"):
            path = path[len(str(mp)) :] or "/"
        if not path.startswith("/") or any(p in (".", "..") for p in path.split("/")):
            raise RunError(f"--unveil {item!r}: PATH must be absolute in the mount", 2)
        if any(c.isspace() for c in path):
            raise RunError(f"--unveil {item!r}: PATH may not hold white space", 2)
        lines.append(f"unveil {path} {perms}")
    for to in send:
        if to.startswith("topics/"):  # the right to write a topic
            if not os.path.isfile(mp / to) or "/" in to.removeprefix("topics/"):
                raise RunError(f"--send {to!r}: no such topic", 2)
            lines.append(f"unveil /{to} w")
            continue
        if to != "*" and not os.path.isdir(mp / "agents" / to):
            raise RunError(f"--send {to!r}: no such agent", 2)
        lines.append(f"unveil /agents/{to}/inbox w")
    return lines


def bind(mp: Path, name: str, grants: list[str] | None = None) -> None:
    """Make this process agent `name` of the mount at `mp` (creating the agent if
    needed), with `grants` (ctl commands of the operator's) added to its view in the
    same write: they hold from the first thing the command does."""
    try:
        os.getxattr(mp, XATTR_PID)
    except OSError:
        raise RunError(
            f"{mp} is not an outheisfs mount (mount it with 'outheisfs mount'){hint(mp)}"
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
            os.write(fd, "".join(f"{line}\n" for line in ["bind", *(grants or [])]).encode())
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno == errno.EPERM:
            raise RunError("an agent's process cannot run as another agent") from None
        if e.errno == errno.EINVAL and grants:
            raise RunError(f"cannot bind to agent {name!r} with {grants}: {e.strerror}") from None
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


def run(
    mp: Path,
    name: str,
    cmd: list[str],
    unveil: list[str] | None = None,
    send: list[str] | None = None,
) -> int:
    if not cmd:
        raise RunError("run: no command given (outheisfs run NAME -- COMMAND [ARG...])", 2)
    grants = grant_lines(mp, unveil or [], send or [])  # refused before anything is done
    errors = mp / "agents" / name / "errors"
    try:
        start = os.stat(errors).st_size
    except OSError:
        start = 0
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os._exit(_child(mp, name, cmd, parent, grants))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: os.kill(pid, s))
    for sig in (signal.SIGINT, signal.SIGQUIT):  # the terminal sends them to the command too
        signal.signal(sig, signal.SIG_IGN)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        for line in reasons(errors, start):
            print(f"outheisfs: {name}: {line}", file=sys.stderr)
    if code < 0:
        sys.stderr.flush()
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def _child(mp: Path, name: str, cmd: list[str], parent: int, grants: list[str]) -> int:
    """Bind, then become the command; a status if that fails."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            return 1
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        bind(mp, name, grants)
        env = dict(os.environ, OUTHEIS_AGENT=name, OUTHEIS_MOUNT=str(mp))
        env["PATH"] = sandbox.agent_path(env.get("PATH"))
        env["TMPDIR"] = confine(mp, name, cmd, env)
        try:
            os.execvpe(cmd[0], cmd, env)
        except OSError as e:
            # Like a shell: 127 for a command that is not there, 126 for one that cannot run.
            status = 127 if e.errno == errno.ENOENT else 126
            raise RunError(f"{cmd[0]}: {e.strerror}", status) from None
    except RunError as e:
        print(f"outheisfs: {e}", file=sys.stderr)
        sys.stderr.flush()
        return e.status
    except BaseException as e:  # never return into the parent's code
        print(f"outheisfs: {e}", file=sys.stderr)
        sys.stderr.flush()
        return 1


def reasons(errors: Path, start: int) -> list[str]:
    """The refusals logged in an agent's `errors` file after byte `start`."""
    try:
        with open(errors, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return []
    out = []
    for raw in data.splitlines()[-SHOWN:]:
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        where = ev.get("where") or ev.get("path") or "?"
        out.append(f"{ev.get('errno', '?')} on {where}: {ev.get('why', '?')}")
    return out
