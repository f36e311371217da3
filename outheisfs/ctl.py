"""ctl files: the commands they take and the status they show [SPEC §4.5]."""

from __future__ import annotations

from dataclasses import dataclass

from .config import PRIORITIES
from .dispatcher import Agent, Dispatcher
from .errors import BadInput
from .models import is_id

# command -> (min args, max args, usage)
COMMANDS: dict[str, tuple[int, int, str]] = {
    "ack": (0, 1, "ack [ID]"),
    "priority": (1, 1, "priority interactive|normal|background"),
    "start": (0, 0, "start"),
    "stop": (0, 0, "stop"),
    "restart": (0, 0, "restart"),
    "kill": (0, 0, "kill"),
    "unveil": (2, 2, "unveil PATH r|w|rw|-"),
    "bind": (0, 0, "bind"),
}
SUPERVISOR = {"start", "stop", "restart", "kill"}
OPERATOR = SUPERVISOR | {"priority", "bind"}  # commands only the operator may give


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join((self.name, *self.args))


def parse(line: str) -> Command:
    words = line.split()
    if not words:
        raise BadInput("empty command")
    name, args = words[0], tuple(words[1:])
    spec = COMMANDS.get(name)
    if spec is None:
        raise BadInput(f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}")
    lo, hi, usage = spec
    if not lo <= len(args) <= hi:
        raise BadInput(f"usage: {usage}")
    if name == "priority" and args[0] not in PRIORITIES:
        raise BadInput(f"unknown priority class {args[0]!r}; usage: {usage}")
    if name == "unveil":
        path, perms = args
        if not path.startswith("/") or "/../" in path + "/" or "/./" in path + "/":
            raise BadInput(f"unveil: {path!r} is not an absolute path in the mount")
        if perms not in ("r", "w", "rw", "-"):
            raise BadInput(f"unveil: permissions {perms!r} are not r, w, rw or -; usage: {usage}")
    if name == "ack" and args and not is_id(args[0]):
        raise BadInput(f"{args[0]!r} is not a message id")
    return Command(name, args)


def pids(agent: Agent) -> str:
    """Supervised processes, or else the processes bound by `outheisfs run`."""
    live = agent.pids or sorted(agent.bound)
    return ",".join(map(str, live)) or "-"


def agent_status(agent: Agent) -> str:
    ac = agent.config
    send = ",".join(ac.send) if ac and ac.send else "-"
    unveil = ",".join(f"{p}:{m}" for p, m in sorted(agent.grants.items())) or "-"
    rows = [
        ("name", agent.name),
        ("state", agent.state),
        ("pid", pids(agent)),
        ("priority", agent.priority),
        ("restart", ac.restart if ac else "-"),
        ("restarts", str(agent.restarts)),
        ("queued", str(agent.queued)),
        ("inflight", str(len(agent.inflight))),
        ("delivered", str(agent.delivered)),
        ("dead", str(agent.dead)),
        ("send", send),
        ("unveil", unveil),
    ]
    if ac is not None:
        rows += [
            ("command", " ".join(ac.command) if ac.command else "-"),
            ("instances", str(ac.instances)),
            ("max_restarts", str(ac.max_restarts)),
            ("restart_window", str(ac.restart_window)),
            ("env", ",".join(f"{k}={v}" for k, v in ac.env.items()) or "-"),
        ]
    return "".join(f"{k} {v}\n" for k, v in rows)


def root_status(d: Dispatcher) -> str:
    """One line per agent: NAME STATE PID PRIORITY QUEUED."""
    return "".join(
        f"{a.name} {a.state} {pids(a)} {a.priority} {a.queued}\n" for a in d.agents.values()
    )
