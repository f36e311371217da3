"""ctl files: the commands they take, how they are carried out, and the status
they show.

A write of several commands is all or nothing: every command is checked before
the first is carried out. The supervisor's commands go through its public
methods; `bind` labels the writing process as the agent.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import events, flows, gate, grants, landlock, sandbox
from .config import MAX_INSTANCES, PRIORITIES
from .dispatcher import Agent, Dispatcher
from .errors import BadInput, NotFound, NotPermitted
from .models import is_id
from .names import OPERATOR
from .procevents import ProcEvents
from .procstate import Processes, ProcState
from .supervisor import Supervisor
from .views import View

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
    "take": (1, 1, "take ID"),
    "nack": (1, 2, "nack ID [SECONDS]"),
    "term": (2, 1 << 16, "term ID REASON"),
    "progress": (1, 1, "progress ID"),
    "requeue": (1, 1, "requeue ID|all"),
    "purge": (1, 1, "purge ID|all"),
    "grant": (3, 3, "grant AGENT PATH r"),
    "revoke": (2, 2, "revoke AGENT PATH"),
    "instances": (1, 1, f"instances N (1 to {MAX_INSTANCES})"),
}
# What a usage error adds for commands that take no argument.
HINTS = {
    c: f": it {c}s every instance; to run a number of instances: instances N"
    for c in ("start", "stop", "restart", "kill")
}
# Commands of the root ctl (the operator's only).
ROOT_COMMANDS: dict[str, tuple[int, int, str]] = {
    "reload": (0, 0, "reload"),
    "approve": (1, 1, "approve ID"),
    "reject": (2, 1 << 16, "reject ID REASON"),
}
GATE = {"approve", "reject"}  # the operator's decisions at the approval gate
HOLDING = {"ack", "nack", "term", "progress"}  # commands about a message held in flight
DEAD = {"requeue", "purge"}  # commands about dead letters
SUPERVISOR = {"start", "stop", "restart", "kill", "instances"}
OPERATOR_ONLY = SUPERVISOR | {"priority", "bind", "take"}  # commands only the operator may give


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join((self.name, *self.args))


def parse(line: str, table: dict[str, tuple[int, int, str]] = COMMANDS) -> Command:
    words = line.split()
    if not words:
        raise BadInput("empty command")
    name, args = words[0], tuple(words[1:])
    spec = table.get(name)
    if spec is None:
        where = "" if table is COMMANDS else " of the root ctl"
        other = ROOT_COMMANDS if table is COMMANDS else COMMANDS
        hint = f" ({name} is for {'the root ctl' if table is COMMANDS else 'an agent ctl'})"
        raise BadInput(
            f"unknown command{where} {name!r}; known: {', '.join(sorted(table))}"
            + (hint if name in other else "")
        )
    lo, hi, usage = spec
    if not lo <= len(args) <= hi:
        hint = f" ({name} takes no argument{HINTS.get(name, '')})" if not lo and not hi else ""
        raise BadInput(f"usage: {usage}{hint}")
    if name == "instances" and not (args[0].isdigit() and 1 <= int(args[0]) <= MAX_INSTANCES):
        raise BadInput(f"instances: {args[0]!r} is not a number of instances; usage: {usage}")
    if name == "priority" and args[0] not in PRIORITIES:
        raise BadInput(f"unknown priority class {args[0]!r}; usage: {usage}")
    if name == "unveil":
        path, perms = args
        if not path.startswith("/") or "/../" in path + "/" or "/./" in path + "/":
            raise BadInput(f"unveil: {path!r} is not an absolute path in the mount")
        if perms not in ("r", "w", "rw", "-"):
            raise BadInput(f"unveil: permissions {perms!r} are not r, w, rw or -; usage: {usage}")
    if name in HOLDING | {"take"} and args and not is_id(args[0]):
        raise BadInput(f"{args[0]!r} is not a message id; usage: {usage}")
    if name in DEAD and args[0] != "all" and not is_id(args[0]):
        raise BadInput(f"{args[0]!r} is neither a message id nor 'all'; usage: {usage}")
    if name == "nack" and len(args) == 2:
        try:
            delay = float(args[1])
        except ValueError:
            delay = -1.0
        if not 0 <= delay <= 86400 * 365:
            raise BadInput(f"nack: {args[1]!r} is not a delay in seconds; usage: {usage}")
    return Command(name, args)


def pids(proc: ProcState) -> str:
    """Supervised processes, or else the processes bound by `outheisfs run`."""
    return ",".join(map(str, proc.live_pids())) or "-"


def agent_status(
    agent: Agent,
    proc: ProcState,
    confinement: tuple[tuple[str, str], ...] = (),
    exists: Callable[[str], bool] = lambda path: True,
    granted: tuple[tuple[str, str], ...] = (),
    granted_by: Mapping[str, str] | None = None,
    host: str | None = None,
) -> str:
    """Status lines; a granted path that does not exist (yet) is marked `(missing)`.
    `granted`: the lines of the grants it holds and gave (`grants.status`);
    `granted_by`: path -> the owner who granted it, marked in the `unveil` line.
    In a cluster, `host`: where its processes run."""
    by = granted_by or {}
    ac = agent.config
    send = ",".join(ac.send) if ac and ac.send else "-"
    unveil = (
        ",".join(
            f"{p}:{m}"
            + ("" if exists(p) else "(missing)")
            + (f"(granted by {by[p]})" if p in by else "")
            for p, m in sorted(agent.grants.items())
        )
        or "-"
    )
    rows = [
        ("name", agent.name),
        ("state", proc.state),
        ("pid", pids(proc)),
        *([("host", host)] if host is not None else []),
        ("priority", agent.priority),
        ("restart", ac.restart if ac else "-"),
        ("restarts", str(proc.restarts)),
        ("queued", str(agent.queued)),
        ("inflight", str(len(agent.inflight))),
        ("delivered", str(agent.delivered)),
        ("dead", str(agent.dead)),
        ("send", send),
        ("unveil", unveil),
        *granted,
        *confinement,
    ]
    if ac is not None:
        rows += [
            ("command", " ".join(ac.command) if ac.command else "-"),
            ("instances", instances(agent)),
            ("max_restarts", str(ac.max_restarts)),
            ("restart_window", str(ac.restart_window)),
            ("env", ",".join(f"{k}={v}" for k, v in ac.env.items()) or "-"),
        ]
    rows += [
        ("ack", ac.ack if ac else "auto"),
        ("delayed", str(len(agent.delayed))),
        ("dead_letters", str(len(agent.dead_letters))),
        ("held", str(len(agent.held))),  # waiting for the operator's approval
    ]
    if ac is not None and ac.ack == "explicit":
        rows += [("max_inflight", str(ac.max_inflight)), ("ack_wait", f"{ac.ack_wait:g}")]
    if proc.state == "failed":
        rows.append(("next_start", proc.next_start or "-"))
    return "".join(f"{k} {v}\n" for k, v in rows)


def instances(agent: Agent) -> str:
    """How many processes it runs now; for a pool that sizes itself, with its bounds."""
    ac = agent.config
    if ac is None:
        return "-"
    return f"{agent.instances} ({ac.floor}..{ac.ceiling})" if ac.pool else str(agent.instances)


def root_status(
    d: Dispatcher, table: Processes, host_of: Callable[[str], str] | None = None
) -> str:
    """One line per agent: NAME STATE PID PRIORITY QUEUED (in a cluster, then HOST)."""
    out = []
    for a in d.agents.values():
        p = table.of(a.name)
        where = "" if host_of is None else f" {host_of(a.name)}"
        out.append(f"{a.name} {p.state} {pids(p)} {a.priority} {a.queued}{where}\n")
    return "".join(out)


# -- carrying commands out --------------------------------------------------------------


class Commands:
    """Runs the commands written to `agents/NAME/ctl`, and shows the status."""

    def __init__(self, d: Dispatcher, procs: ProcEvents, table: Processes, state: Path) -> None:
        self.d = d
        self.procs = procs
        self.table = table
        self.supervisor: Supervisor | None = None  # set once the mount runs one
        self.state = state  # for the confinement shown (TMPDIR, the state folder's place)
        self.exists: Callable[[str], bool] = lambda path: True  # whether a path is in the tree
        self.host_of: Callable[[str], str] | None = None  # in a cluster: where NAME runs
        # Rereads the config and applies the difference (set by the server, `reload`).
        self.reload: Callable[[str], Awaitable[object]] | None = None

    def status(self, name: str | None) -> bytes:
        """What a ctl file reads as now (the root's if `name` is None). An agent
        bound by `run` shows the processes that act as it: the bound one and its
        descendants, while they run."""
        names = [name] if name else list(self.d.agents)
        for n in names:
            p = self.table.of(n)
            if p.bound:
                p.bound = self.procs.members({n})
        if name:
            rights = sandbox.describe(self.policy(name), landlock.abi())
            agent, proc = self.d.agents[name], self.table.of(name)
            given = tuple(grants.status(self.d, name, self.exists))
            by = self.d.granted.get(name)
            host = None if self.host_of is None else self.host_of(name)
            return agent_status(agent, proc, tuple(rights), self.exists, given, by, host).encode()
        return root_status(self.d, self.table, self.host_of).encode()

    def policy(self, name: str) -> sandbox.Policy:
        """What agent NAME's processes may touch outside the mount."""
        return sandbox.policy(self.d.config, name, self.state)

    async def run(
        self,
        who: str,
        name: str | None,
        lines: list[bytes],
        writer: Callable[[], int],
        drop_held: Callable[[str, str | None], None],
    ) -> None:
        """Carry out `lines` written by `who` to NAME's ctl (None: the root's). `writer()` gives the
        writing process (for `bind`); `drop_held(name, id)` lets the open files
        that hold an acknowledged message forget it (id None: all of NAME's)."""
        table = COMMANDS if name is not None else ROOT_COMMANDS
        try:
            commands = [parse(line.decode(), table) for line in lines if line.strip()]
        except UnicodeDecodeError:
            raise BadInput("command is not UTF-8 text") from None
        if name is None:
            await self._root(who, commands)
            return
        for cmd in commands:  # all or nothing: every command is checked first
            self.check(who, name, cmd, writer)
        for cmd in commands:
            await self._execute(who, name, cmd, writer, drop_held)

    async def _root(self, who: str, commands: list[Command]) -> None:
        """Commands written to the root ctl, the operator's only: the gate's
        `approve`/`reject` (all checked first, then carried out), then `reload`."""
        if commands and who != OPERATOR:
            raise NotPermitted(f"{commands[0].name}: only the operator may do this")
        decisions = [str(c).encode() for c in commands if c.name in GATE]
        if decisions:
            gate.run(self.d, who, decisions)
        for cmd in commands:
            if cmd.name != "reload":
                continue
            if self.reload is None:
                raise BadInput("reload: this server cannot reload its config")
            await self.reload(who)

    def instance(self, pid: int, name: str) -> int | None:
        """Which supervised instance of NAME the process `pid` belongs to, if any."""
        label = self.procs.label_of(pid) if pid else None
        if label is None or "#" not in label:
            return None
        agent, _, index = label.partition("#")
        return int(index) if agent == name and index.isdigit() else None

    def check(
        self, who: str, name: str, cmd: Command, writer: Callable[[], int] | None = None
    ) -> None:
        if cmd.name in OPERATOR_ONLY and who != OPERATOR:
            raise NotPermitted(f"{cmd.name}: only the operator may do this")
        if cmd.name in SUPERVISOR:
            if self.supervisor is None or not self.supervisor.supervises(name):
                raise BadInput(f"agent {name!r} has no command to supervise")
            placed = self.supervisor.placed  # in a cluster: this host runs it, or another
            if placed is not None and not placed(name):
                raise BadInput(f"agent {name!r} runs on another host (see its ctl's host)")
            ac = self.d.agents[name].config
            n = int(cmd.args[0]) if cmd.name == "instances" else 0
            if ac is not None and ac.pool and n and not ac.floor <= n <= ac.ceiling:
                raise BadInput(f"instances: {n} is outside the pool's {ac.floor}..{ac.ceiling}")
        elif cmd.name == "bind" and name == OPERATOR:
            raise BadInput("bind: 'user' is the operator, not an agent to run as")
        elif cmd.name == "unveil" and name == OPERATOR:
            raise BadInput("unveil: 'user' is the operator, who sees the whole tree")
        elif cmd.name == "unveil":
            if who == name:
                try:
                    View(name, self.d.agents[name].grants).narrowed(*cmd.args)
                except ValueError as e:
                    raise NotPermitted(f"unveil: {e}") from None
            elif who != OPERATOR:
                raise NotPermitted("unveil: only the agent itself (to narrow) and the operator")
        elif cmd.name in HOLDING:
            if who not in (name, OPERATOR):
                raise NotPermitted(f"only {name} and the operator acknowledge its messages")
            agent = self.d.agents[name]
            if cmd.name != "ack" and not flows.explicit(agent):
                raise BadInput(f'{cmd.name}: {name} acknowledges by reading (ack = "auto")')
            if cmd.args:
                pid = writer() if writer is not None and who != OPERATOR else 0
                try:
                    flows.held(self.d, name, cmd.args[0], self.instance(pid, name), who != OPERATOR)
                except BadInput as e:
                    raise BadInput(f"{cmd.name}: {e.reason}") from None
        elif cmd.name in grants.COMMANDS:
            grants.check(self.d, who, name, cmd.name, cmd.args)
        elif cmd.name in DEAD:
            if who not in (name, OPERATOR):
                raise NotPermitted(f"only {name} and the operator handle its dead letters")
            one = cmd.args[0]
            if one != "all" and one not in self.d.agents[name].dead_letters:
                raise BadInput(f"{cmd.name}: {one} is not a dead letter of {name}")
        elif cmd.name == "take":
            msg = self.d.messages.get(cmd.args[0])
            agent = self.d.agents[name]
            if msg is None or msg.to != name or msg.id in agent.inflight or msg.id in agent.held:
                raise NotFound(f"take: {cmd.args[0]} is not queued for {name}")

    async def _execute(
        self,
        who: str,
        name: str,
        cmd: Command,
        writer: Callable[[], int],
        drop_held: Callable[[str, str | None], None],
    ) -> None:
        if cmd.name == "bind":
            pid = writer()
            self.d.record([events.ctl(name, who, f"bind {pid}")])
            self.procs.label(pid, name)
            self.table.of(name).bound.add(pid)
            return
        if cmd.name in grants.COMMANDS:  # the command and the change it makes, logged together
            change = grants.event(self.d, who, name, cmd.name, cmd.args)
            self.d.record([events.ctl(name, who, str(cmd)), change])
            return
        self.d.record([events.ctl(name, who, str(cmd))])
        if cmd.name in SUPERVISOR:
            assert self.supervisor is not None  # checked
            await getattr(self.supervisor, cmd.name)(name)
        elif cmd.name == "ack":
            one = cmd.args[0] if cmd.args else None
            if one is not None and one not in self.d.agents[name].inflight:
                return  # acknowledged by an earlier command of the same write
            drop_held(name, one)
            self.d.ack_all(name, who, one)
        elif cmd.name == "take":
            msg = self.d.messages.get(cmd.args[0])
            if msg is not None and msg.id not in self.d.agents[name].inflight:
                self.d.take_id(name, msg.id, who)  # else taken by an earlier command
        elif cmd.name in ("nack", "term", "progress"):
            msg = self.d.agents[name].inflight.get(cmd.args[0])
            if msg is None:
                return  # settled by an earlier command of the same write
            now = time.time()
            if cmd.name == "nack":
                delay = float(cmd.args[1]) if len(cmd.args) > 1 else 0.0
                flows.nack(self.d, msg, who, delay, now)
            elif cmd.name == "term":
                flows.bury(self.d, msg, "term: " + " ".join(cmd.args[1:]), who)
            else:
                flows.progress(self.d, msg, who, now)
        elif cmd.name in DEAD:
            one = None if cmd.args[0] == "all" else cmd.args[0]
            if one is not None and one not in self.d.agents[name].dead_letters:
                return
            getattr(flows, cmd.name)(self.d, name, one, who)
