"""What an agent's processes may touch outside the mount, and how it is enforced.

A `Policy` says it for one agent: the config's `files`, `net` and `confine`,
the folders it needs (the config's folder, the mount, its private TMPDIR) and
the state folder it must never reach. `rules()` turns it into Landlock path
rules: the defaults, then `files`, with every grant that contains the state
folder narrowed to that folder's other entries, and the agent's own TMPDIR.

The server builds a policy for each supervised process; `outheisfs run` asks
the server for its agent's policy (an extended attribute of the mount's root)
and applies the same rules to itself before it becomes the command. Both then
add the seccomp filter of `confine.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import confine, landlock, names
from .config import Config
from .errors import ConfigError

L = landlock
R = L.READ_FILE | L.READ_DIR
RX = R | L.EXECUTE
W = (
    L.WRITE_FILE
    | L.TRUNCATE
    | L.REMOVE_DIR
    | L.REMOVE_FILE
    | L.MAKE_DIR
    | L.MAKE_REG
    | L.MAKE_SOCK
    | L.MAKE_FIFO
    | L.MAKE_SYM
    | L.REFER
)
DEV = L.READ_FILE | L.WRITE_FILE | L.TRUNCATE | L.IOCTL_DEV
ALL = (1 << 16) - 1  # whatever the kernel knows (masked by the ruleset)
PERMS = {"r": R, "w": W, "rw": R | W, "x": RX}

SYSTEM_RX = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_R = ("/etc",)
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/tty")
XATTR_POLICY = names.XATTR_POLICY.decode()


class ConfineError(Exception):
    """Confinement cannot be set up as required."""


@dataclass(frozen=True)
class Policy:
    agent: str
    confine: str  # required | best-effort | off
    home: str  # the config file's folder (read)
    state: str  # never reachable, but for `tmpdir`
    tmpdir: str
    mount: str = ""
    files: dict[str, str] = field(default_factory=dict)
    net: list[str] | str = field(default_factory=list)  # or "all"
    programs: tuple[str, ...] = ()  # files named in the command (read and execute)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Policy:
        raw = json.loads(data)
        raw["programs"] = tuple(raw.get("programs", ()))
        return cls(**raw)


def policy(config: Config, agent: str, state: Path, mount: Path | None = None) -> Policy:
    ac = config.agents.get(agent)
    return Policy(
        agent=agent,
        confine=config.confine,
        home=str(config.home),
        state=str(state),
        tmpdir=str(state / "tmp" / agent),
        mount=str(mount) if mount else "",
        files=dict(ac.files) if ac else {},
        net=(ac.net if isinstance(ac.net, str) else list(ac.net)) if ac else [],
    )


def programs(cmd: list[str], env: dict[str, str]) -> tuple[str, ...]:
    """The files a command names: its program (found on PATH) and any argument that
    is an existing file, e.g. the script an interpreter runs."""
    out = []
    first = shutil.which(cmd[0], path=env.get("PATH")) if cmd else None
    if first:
        out += [first, os.path.realpath(first)]
    for arg in cmd[1:]:
        if arg.startswith("/") and os.path.isfile(arg):
            out.append(arg)
    return tuple(dict.fromkeys(out))


def python_env() -> list[str]:
    """The Python that runs outheisfs (a project's .venv, say): agents started with
    the same `python3` find the same packages; and outheisfs itself, wherever it is
    installed from, so that an agent may use `outheisfs run` and the like."""
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted({sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, here})


def agent_path(path: str | None) -> str:
    """PATH for agents: the folder of the Python that runs outheisfs first (a venv's
    bin, say), so that `python3` in an agent's command or scripts is that Python,
    whose environment the defaults grant, and not a version manager's shim that
    would need the operator's home folder."""
    entries = (path or os.defpath).split(os.pathsep)
    bindir = os.path.dirname(sys.executable)
    if bindir and bindir not in entries:
        entries.insert(0, bindir)
    return os.pathsep.join(entries)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _narrow(path: str, state: str) -> list[str]:
    """`path`'s entries but the one that leads to (or is) `state`, recursively."""
    out: list[str] = []
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return out
    for name in names:
        entry = os.path.join(path, name)
        real = os.path.realpath(entry)
        if _within(real, state):
            continue  # the state folder itself, or a link into it
        if _within(state, real):
            out += _narrow(real, state)
        else:
            out.append(entry)
    return out


def rules(p: Policy) -> list[tuple[str, int]]:
    """Path rules (path, Landlock rights) for policy `p`, narrowed around the state folder."""
    state = os.path.realpath(p.state)
    grants: list[tuple[str, int]] = [(d, RX) for d in SYSTEM_RX]
    grants += [(d, R) for d in SYSTEM_R]
    grants += [(d, RX) for d in python_env()]
    grants += [(d, DEV) for d in DEVICES]
    grants.append(("/proc", R))
    grants.append((p.home, R))
    grants += [(prog, RX) for prog in p.programs]
    grants += [(path, PERMS[perms]) for path, perms in p.files.items()]
    out: list[tuple[str, int]] = []
    mount = os.path.realpath(p.mount) if p.mount else ""
    for path, access in grants:
        if not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        if mount and _within(real, mount):
            continue  # the mount is granted whole below (a link into it, say)
        if _within(real, state):
            continue  # never the state folder (config checks refuse such `files`)
        if _within(state, real):
            out += [(entry, access) for entry in _narrow(real, state)]
        else:
            out.append((path, access))
    if p.mount:
        out.append((p.mount, ALL))
    out.append((p.tmpdir, ALL))
    return out


def net_ports(p: Policy) -> list[tuple[int, int]]:
    if p.net == "all":
        return []
    kinds = {"connect": L.NET_CONNECT_TCP, "bind": L.NET_BIND_TCP}
    out = []
    for item in p.net:
        kind, port = item.split(":")
        out.append((int(port), kinds[kind]))
    return out


# -- what the kernel gives ---------------------------------------------------------------


def level(mode: str, abi: int) -> str:
    """`full`, `partial` or `no`: how confined an agent's processes are."""
    if mode == "off" or abi < 1:
        return "no"
    return "full" if abi >= L.ABI_FULL else "partial"


def missing(abi: int) -> str:
    if abi < 1:
        return "Landlock (Linux 5.13, enabled in the kernel's lsm= list)"
    if abi < L.ABI_NET:
        return f"Landlock ABI {L.ABI_NET} for network rules (the kernel has ABI {abi})"
    return f"Landlock ABI {L.ABI_SCOPES} for signal and socket scopes (the kernel has ABI {abi})"


def check(config: Config, state: Path) -> None:
    """At mount: `files` never at or below the state folder; `required` needs the kernel."""
    st = os.path.realpath(state)
    for name, ac in config.agents.items():
        for path in ac.files:
            if _within(os.path.realpath(path), st):
                raise ConfigError(
                    f"agents.{name}.files: {path} is inside the state folder {state}, "
                    "which no agent may reach"
                )
    abi = L.abi()
    if config.confine == "required" and abi < L.ABI_FULL:
        raise ConfineError(
            f'confine: this kernel lacks {missing(abi)}; set confine = "best-effort" '
            'in the config to confine agents as far as it can, or confine = "off"'
        )


def describe(p: Policy, abi: int) -> list[tuple[str, str]]:
    """The ctl lines that show an agent's effective rights outside the mount."""
    lvl = level(p.confine, abi)
    files = ",".join(f"{k}:{v}" for k, v in sorted(p.files.items())) or "-"
    net = p.net if isinstance(p.net, str) else ",".join(p.net) or "-"
    if lvl == "no":
        files = net = "all"
    elif abi < L.ABI_NET:
        net = "all"
    return [("confined", lvl), ("files", files), ("net", net), ("tmpdir", p.tmpdir)]


# -- applying it -------------------------------------------------------------------------


def preparer(p: Policy) -> Callable[[], bool]:
    """Build the ruleset and filter for `p` now; return the function that applies them to
    the calling process (between fork and exec: it only makes system calls). It returns
    False if a restriction could not be applied."""
    Path(p.tmpdir).mkdir(mode=0o700, parents=True, exist_ok=True)
    seccomp = confine.installer(net_all=p.net == "all" or p.confine == "off")
    abi = L.abi()
    if p.confine == "off" or abi < 1:
        return seccomp
    rs = L.Ruleset(abi, net=p.net != "all")
    try:
        for path, access in rules(p):
            try:
                rs.allow_path(path, access)
            except (FileNotFoundError, PermissionError):
                pass  # gone since, or out of reach anyway
        for port, access in net_ports(p):
            rs.allow_port(port, access)
    except BaseException:
        rs.close()
        raise

    def apply() -> bool:
        ok = rs.restrict()
        return seccomp() and ok

    apply.ruleset = rs  # type: ignore[attr-defined]  # the caller closes it after the fork
    return apply


def done(apply: Callable[[], bool]) -> None:
    """Close what `preparer` opened in this (the parent) process."""
    rs = getattr(apply, "ruleset", None)
    if rs is not None:
        rs.close()
