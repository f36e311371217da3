"""The supervisor: agent processes started, watched and restarted like OTP children.

Each agent with a `command` runs `instances` processes. When one exits, the rest
of its process tree is ended, and the restart policy decides what follows:

    permanent   always restarted
    transient   restarted only after an abnormal exit (non-zero status or a signal)
    temporary   never restarted

More than `max_restarts` restarts within `restart_window` seconds mark the agent
`failed`: it is started again after `cooldown` seconds, doubling (to at most ten
minutes) while it keeps failing; with `cooldown = 0` only an operator's `start`
does. Between restarts
the supervisor waits a backoff that doubles with each restart in the window.

The server is a child subreaper and reaps every child itself (one SIGCHLD
loop); process trees are known from `procevents` labels, so a daemonised
grandchild is ended with its agent too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import queue
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from . import events, flows, procinfo, sandbox
from .config import MAX_INSTANCES, AgentConfig
from .dispatcher import Agent, Dispatcher
from .errors import BadInput
from .output import Output
from .procevents import ProcEvents
from .procinfo import abnormal
from .procstate import Processes, ProcState
from .readers import Readers

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
COOLDOWN_MAX = 600.0  # the longest cool-down of a failed agent
STOPPING_KEEP = 30.0  # seconds a stop by the supervisor explains a reader's death
NICE_BACKGROUND = 10
T = TypeVar("T")


# -- the rules, apart from processes (tested with MockClock) ---------------------------


def should_restart(policy: str, status: int) -> bool:
    if policy == "permanent":
        return True
    if policy == "transient":
        return abnormal(status)
    return False


class Intensity:
    """OTP restart intensity: at most `max_restarts` restarts in `window` seconds."""

    def __init__(self, max_restarts: int, window: float) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self._times: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()

    def allow(self, now: float) -> bool:
        """Record a restart at `now` if the intensity allows it."""
        self._trim(now)
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    def recent(self, now: float) -> int:
        self._trim(now)
        return len(self._times)

    def reset(self) -> None:
        self._times.clear()


def backoff(restarts_in_window: int) -> float:
    """Delay before a restart: 0.1 s, doubling per restart in the window, at most 5 s."""
    n = max(1, restarts_in_window)
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(n - 1, 32)))


def cooldown(first: float, streak: int) -> float:
    """The cool-down before a failed agent starts again: `first`, doubling per
    failure in a row, at most COOLDOWN_MAX."""
    return float(min(COOLDOWN_MAX, first * 2 ** min(streak, 32)))


def iso(t: float) -> str:
    sec = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{int((t - sec) * 1e6):06d}Z"


def become_subreaper() -> None:
    """Orphans of our agents are re-parented to us, not to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        pass


# -- processes -------------------------------------------------------------------------


@dataclass(eq=False)
class Instance:
    index: int
    label: str
    pid: int = 0
    popen: subprocess.Popen[bytes] | None = None
    retiring: bool = False  # stopped to run fewer: not restarted


@dataclass(eq=False)
class Runner:
    """One supervised agent."""

    name: str
    proc: ProcState  # what it shows in its ctl file
    config: AgentConfig
    intensity: Intensity
    instances: dict[int, Instance] = field(default_factory=dict)
    wanted: bool = True  # the operator wants it running
    pending: int = 0  # restarts waiting out their backoff
    streak: int = 0  # failures in a row (the cool-down doubles)
    failed_at: float = 0.0
    cool: int = 0  # bumped by an operator's start or stop: a pending cool-down is void


class Spawner:
    """One thread that lives as long as the server forks every agent process.

    Forking must happen off the trio thread (the child's chdir into the mount
    needs the server to answer), and the kernel sends a child its parent-death
    signal when the *thread* that forked it ends: so not a pooled worker thread.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="spawner", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self._jobs.get()()

    async def run(self, fn: Callable[[], T]) -> T:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[T] = []
        error: list[BaseException] = []

        def job() -> None:
            try:
                result.append(fn())
            except BaseException as e:  # handed to the caller
                error.append(e)
            token.run_sync_soon(done.set)

        self._jobs.put(job)
        await done.wait()
        if error:
            raise error[0]
        return result[0]


def _die_with_server(
    server: int, confine: Callable[[], bool], required: bool
) -> Callable[[], None]:
    """For the child, before exec: SIGKILL when the server dies, even by SIGKILL;
    then its confinement (Landlock and seccomp, see sandbox.py and confine.py)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def child() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != server:  # the server died before the prctl
            os._exit(1)
        if not confine() and required:
            os.write(2, b"outheisfs: cannot confine this agent process; not started\n")
            os._exit(126)

    return child


class Supervisor:
    def __init__(
        self,
        dispatcher: Dispatcher,
        procs: ProcEvents,
        mountpoint: Path,
        state: Path,
        home: Path,
        grace: float,
        table: Processes | None = None,
        output: Output | None = None,
        readers: Readers | None = None,
    ) -> None:
        self.d = dispatcher
        self.readers = readers or Readers()  # who waits idle on its inbox (openfile's)
        self.table = table or Processes(dispatcher.config)
        self.procs = procs
        self.mountpoint = mountpoint
        self.state = state
        self.output = output or Output(state / "output", dispatcher.config.output_max)
        self.home = home
        self.grace = grace
        self.runners: dict[str, Runner] = {}
        self._by_pid: dict[int, tuple[Runner, Instance]] = {}
        self._early: dict[int, int] = {}  # reaped before we knew the pid
        self._stopping: dict[str, float] = {}  # label -> when the supervisor ended it
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        self.shutting_down = False
        self._spawner = Spawner()
        # In a cluster: whether the log places an agent on this host (None: alone, all).
        self.placed: Callable[[str], bool] | None = None
        for name, ac in dispatcher.config.agents.items():
            if ac.command:
                self.runners[name] = Runner(
                    name, self.table.of(name), ac, Intensity(ac.max_restarts, ac.restart_window)
                )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        become_subreaper()
        self.output.folder.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
                nursery.start_soon(self._reaper, sigchld)
                for runner in self.runners.values():
                    if self.placed is None or self.placed(runner.name):
                        await self._start_all(runner)
                task_status.started()
                await trio.sleep_forever()

    # -- reaping ----------------------------------------------------------------------

    async def _reaper(self, sigchld: AsyncIterator[int]) -> None:
        self._reap()
        async for _ in sigchld:
            self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            hit = self._by_pid.pop(pid, None)
            if hit is None:
                self._early[pid] = status  # an adopted orphan, or a child not yet registered
                if len(self._early) > 1024:
                    self._early.clear()
                continue
            runner, inst = hit
            if inst.popen is not None:
                inst.popen.returncode = status
            assert self._nursery is not None
            self._nursery.start_soon(self._exited, runner, inst, status)

    # -- starting ---------------------------------------------------------------------

    def _command(self, runner: Runner) -> list[str]:
        cmd = runner.config.command or []
        return [str((self.home / c).resolve()) if c.startswith(("./", "../")) else c for c in cmd]

    def _env(self, runner: Runner, inst: Instance) -> dict[str, str]:
        env = dict(os.environ, PATH=sandbox.agent_path(os.environ.get("PATH")))
        env.update(runner.config.env)
        env.update(
            OUTHEIS_AGENT=runner.name,
            OUTHEIS_MOUNT=str(self.mountpoint),
            OUTHEIS_HOME=str(self.home),
            OUTHEIS_INSTANCE=str(inst.index),
            TMPDIR=self.policy(runner.name).tmpdir,
        )
        return env

    def policy(
        self, name: str, cmd: list[str] | None = None, env: dict[str, str] | None = None
    ) -> sandbox.Policy:
        p = sandbox.policy(self.d.config, name, self.state, self.mountpoint)
        if cmd is None:
            return p
        return dataclasses.replace(p, programs=sandbox.programs(cmd, env or dict(os.environ)))

    def _size(self, runner: Runner) -> int:
        """How many instances it should run now (the dispatcher's state)."""
        agent = self.d.agents.get(runner.name)
        return agent.instances if agent is not None else 0

    def _free(self, runner: Runner, n: int) -> list[int]:
        """The `n` lowest instance numbers that do not run."""
        return [i for i in range(MAX_INSTANCES) if i not in runner.instances][:n]

    async def _start_all(self, runner: Runner) -> None:
        runner.wanted = True
        for index in self._free(runner, self._size(runner) - len(runner.instances)):
            await self._spawn(runner, index)

    async def _spawn(self, runner: Runner, index: int) -> None:
        name = runner.name
        inst = Instance(index=index, label=f"{name}#{index}")
        self._stopping.pop(inst.label, None)
        self.readers.forget(name, index)
        runner.instances[index] = inst
        cmd = self._command(runner)
        env = self._env(runner, inst)
        cwd = self.mountpoint / "agents" / name
        out_r, out_w = os.pipe()  # stdout and stderr, read by the server, line by line
        err_r, err_w = os.pipe()

        since = time.monotonic()

        policy = self.policy(name, cmd, env)

        def spawn() -> subprocess.Popen[bytes]:
            confine = sandbox.preparer(policy)  # here: it opens paths in the mount
            try:
                with self.procs.spawning(inst.label):
                    return subprocess.Popen(
                        cmd,
                        cwd=cwd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out_w,
                        stderr=err_w,
                        start_new_session=True,
                        preexec_fn=_die_with_server(
                            os.getpid(), confine, policy.confine == "required"
                        ),
                    )
            finally:
                sandbox.done(confine)

        try:
            popen = await self._spawner.run(spawn)
        except OSError as e:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            code = errno.errorcode.get(e.errno or 0, "ENOEXEC")
            self.d.note(
                events.error(f"/agents/{name}", code, f"cannot start {cmd[0]!r}: {e.strerror}")
            )
            del runner.instances[index]
            self._update(runner)
            assert self._nursery is not None
            self._nursery.start_soon(self._exited, runner, inst, 127 << 8)
            return
        os.close(out_w)
        os.close(err_w)
        assert self._nursery is not None
        self._nursery.start_soon(self.output.pump, out_r, name, index, popen.pid, "stdout")
        self._nursery.start_soon(self.output.pump, err_r, name, index, popen.pid, "stderr")
        inst.popen, inst.pid = popen, popen.pid
        self.procs.label(popen.pid, inst.label, since)
        if self.d.agents[name].priority == "background":
            try:
                os.setpriority(os.PRIO_PROCESS, popen.pid, NICE_BACKGROUND)
            except OSError:
                pass
        self.d.note(events.start(name, popen.pid, index))
        early = self._early.pop(popen.pid, None)
        self._by_pid[popen.pid] = (runner, inst)
        self._update(runner)
        if early is not None:
            self._by_pid.pop(popen.pid, None)
            assert self._nursery is not None
            self._nursery.start_soon(self._exited, runner, inst, early)

    def _update(self, runner: Runner) -> None:
        if self.runners.get(runner.name) is not runner:  # replaced or removed by a reload
            self._changed.set()
            self._changed = trio.Event()
            return
        agent = runner.proc
        agent.pids = sorted(i.pid for i in runner.instances.values() if i.pid)
        if agent.pids:
            agent.state = "running"
        elif agent.state == "failed" and not runner.wanted:
            pass  # until an operator's start
        elif runner.pending and runner.wanted:
            agent.state = "starting"
        else:
            agent.state = "stopped"
        self._changed.set()
        self._changed = trio.Event()

    # -- exits and restarts -----------------------------------------------------------

    async def _exited(self, runner: Runner, inst: Instance, status: int) -> None:
        name = runner.name
        if runner.instances.get(inst.index) is inst:
            del runner.instances[inst.index]
        self.readers.forget(name, inst.index)
        if inst.pid:
            self.d.note(events.exit(name, inst.pid, inst.index, status))
        agent = self.d.agents.get(name)
        if agent is not None and flows.explicit(agent) and not self.shutting_down:
            self._give_back(runner, inst, status)
        if inst.retiring:  # stopped to run fewer
            self._update(runner)
            await self._end_tree({inst.label})
            return
        likely = runner.wanted and should_restart(runner.config.restart, status)
        runner.pending += likely  # "starting" while the old tree ends, not "stopped"
        self._update(runner)
        try:
            await self._end_tree({inst.label})  # the old tree is gone before a new one starts
        finally:
            runner.pending -= likely
        if not runner.wanted or self.shutting_down:
            self._update(runner)
            return
        if not should_restart(runner.config.restart, status):
            self._update(runner)
            return
        now = trio.current_time()
        if not runner.intensity.allow(now):
            runner.wanted = False
            runner.proc.state = "failed"
            cfg = runner.config
            ev = events.failed(name, runner.proc.restarts, cfg.max_restarts, cfg.restart_window)
            delay = 0.0
            if runner.config.cooldown:
                if runner.streak and now - runner.failed_at > COOLDOWN_MAX * 2:
                    runner.streak = 0  # it ran well for a long while
                delay = cooldown(runner.config.cooldown, runner.streak)
                runner.streak += 1
                runner.failed_at = now
                runner.proc.next_start = iso(time.time() + delay)
                ev |= {"cooldown": delay, "next_start": runner.proc.next_start}
            self.d.note(ev)
            await self._stop_instances(runner)
            runner.proc.state = "failed"
            self._update(runner)
            if delay and self._nursery is not None:
                self._nursery.start_soon(self._cool_down, runner, delay, runner.cool)
            return
        delay = backoff(runner.intensity.recent(now))
        runner.proc.restarts += 1
        self.d.note(events.restart(name, inst.index, delay, runner.proc.restarts))
        runner.pending += 1
        self._update(runner)
        try:
            await trio.sleep(delay)
        finally:
            runner.pending -= 1
        more = len(runner.instances) < self._size(runner)
        if runner.wanted and not self.shutting_down and inst.index not in runner.instances and more:
            await self._spawn(runner, inst.index)
        self._update(runner)

    async def _cool_down(self, runner: Runner, delay: float, cool: int) -> None:
        """Start a failed agent again once its cool-down has passed."""
        await trio.sleep(delay)
        if runner.cool != cool or self.shutting_down or runner.proc.state != "failed":
            return
        runner.intensity.reset()
        runner.proc.state = "stopped"
        runner.proc.next_start = ""
        self.d.note({"type": "restart", "agent": runner.name, "after": "cooldown"})
        await self._start_all(runner)

    def _give_back(self, runner: Runner, inst: Instance, status: int) -> None:
        """Explicit acks: what the instance held unacked is delivered again; its
        death spends an attempt, unless the supervisor stopped it."""
        stopped = self.stopping_label(inst.label)
        why = "stopped by the supervisor" if stopped else procinfo.explain(status)
        for msg in list(self.d.agents[runner.name].inflight.values()):
            if msg.instance == inst.index:
                self.d.retry(msg, f"reader {why}", counted=not stopped, attempt=msg.delivered)

    def stopping_label(self, label: str | None) -> bool:
        """Whether the supervisor itself lately ended the processes labelled so."""
        if label is None:
            return False
        when = self._stopping.get(label)
        return when is not None and time.monotonic() - when < STOPPING_KEEP

    # -- ending process trees ---------------------------------------------------------

    def _members(self, labels: set[str]) -> set[int]:
        return self.procs.members(labels)

    async def _end_tree(self, labels: set[str], grace: float | None = None) -> None:
        """SIGTERM every process labelled so, SIGKILL what is left after the grace."""
        pids = self._members(labels)
        if not pids:
            return
        stamp = time.monotonic()
        self._stopping.update((label, stamp) for label in labels)
        _signal(pids, signal.SIGTERM)
        with trio.move_on_after(self.grace if grace is None else grace):
            while self._members(labels):
                await trio.sleep(0.02)
        rest = self._members(labels)
        if rest:
            _signal(rest, signal.SIGKILL)
            with trio.move_on_after(5):
                while self._members(labels):
                    await trio.sleep(0.02)

    async def _stop_instances(self, runner: Runner) -> None:
        labels = {f"{runner.name}#{i}" for i in range(MAX_INSTANCES)}
        await self._end_tree(labels)
        with trio.move_on_after(5):
            while runner.instances:
                await self._changed.wait()

    # -- operator commands ------------------------------------------------------------

    def supervises(self, name: str) -> bool:
        """Whether `name` has a command: start, stop, restart and kill apply."""
        return name in self.runners

    def _runner(self, name: str) -> Runner:
        runner = self.runners.get(name)
        if runner is None:
            raise BadInput(f"agent {name!r} has no command to supervise")
        return runner

    async def start(self, name: str) -> None:
        runner = self._runner(name)
        runner.intensity.reset()
        runner.cool += 1
        runner.streak = 0
        runner.proc.next_start = ""
        if runner.proc.state == "failed":
            runner.proc.state = "stopped"
        await self._start_all(runner)

    async def stop(self, name: str) -> None:
        runner = self._runner(name)
        runner.wanted = False
        runner.cool += 1
        runner.proc.next_start = ""
        await self._stop_instances(runner)
        runner.proc.state = "stopped"
        self._update(runner)

    async def restart(self, name: str) -> None:
        await self.stop(name)
        await self.start(name)

    async def kill(self, name: str) -> None:
        """SIGKILL the agent's processes; the restart policy then applies."""
        runner = self._runner(name)
        labels = {f"{name}#{i}" for i in runner.instances}
        _signal(self._members(labels), signal.SIGKILL)

    async def instances(self, name: str) -> None:
        """Start or stop instances until as many run as NAME should run now (ctl
        `instances N`, a reload). Instances that wait idle on the inbox stop first,
        taking nothing; if more must stop, the highest numbers do, and what they
        hold is delivered again (no attempt spent)."""
        runner = self._runner(name)
        if not runner.wanted:
            return  # `start` starts that many
        want, running = self._size(runner), len(runner.instances)
        if running <= want:
            await self._start_all(runner)
            return
        agent = self.d.agents[name]
        victims: list[int] = []
        for i in sorted(self._idle(runner, agent), reverse=True):
            if len(victims) < running - want and self.readers.retire(name, i):
                victims.append(i)
        busy = sorted((i for i in runner.instances if i not in victims), reverse=True)
        victims += busy[: running - want - len(victims)]
        ending = [runner.instances[i] for i in victims]
        for inst in ending:
            inst.retiring = True
        async with trio.open_nursery() as nursery:
            for inst in ending:
                nursery.start_soon(self._end_tree, {inst.label})
        with trio.move_on_after(5):
            while any(runner.instances.get(i.index) is i for i in ending):
                await self._changed.wait()

    # -- pools that size themselves ---------------------------------------------------

    def _idle(self, runner: Runner, agent: Agent) -> dict[int, float]:
        """Its instances that wait on the empty inbox holding nothing: since when."""
        busy = {m.instance for m in agent.inflight.values()}
        return {
            i: since
            for i, since in self.readers.idle(runner.name).items()
            if i in runner.instances and i not in busy and not runner.instances[i].retiring
        }

    def idle(self, name: str) -> dict[int, float]:
        """NAME's instances that wait on the empty inbox holding nothing: since when."""
        runner, agent = self.runners.get(name), self.d.agents.get(name)
        return {} if runner is None or agent is None else self._idle(runner, agent)

    async def grow(self, name: str, want: int, why: str) -> None:
        """One more instance of NAME (a pool that sizes itself): a `scale` event."""
        runner, agent = self._runner(name), self.d.agents[name]
        index = self._free(runner, 1)[0]
        self.d.record([events.scale(name, agent.instances, want, index, why)])
        await self._spawn(runner, index)

    def shrink(self, name: str, index: int, want: int, why: str) -> bool:
        """Stop instance `index` of NAME if it waits idle (a `scale` event): it is
        retired first, so it takes nothing more before its signal."""
        runner, agent = self._runner(name), self.d.agents[name]
        inst = runner.instances.get(index)
        if inst is None or not self.readers.retire(name, index):
            return False
        inst.retiring = True
        try:
            self.d.record([events.scale(name, agent.instances, want, index, why)])
        except OSError:  # not logged: not done
            inst.retiring = False
            self.readers.forget(name, index)
            raise
        assert self._nursery is not None
        self._nursery.start_soon(self._end_tree, {inst.label})
        return True

    # -- a reload ---------------------------------------------------------------------

    def install(self, name: str, ac: AgentConfig | None) -> None:
        """After a reload: NAME runs `ac` from its next start; without a command
        (or removed), no process of its own. Stop it first."""
        old = self.runners.pop(name, None)
        proc = self.table.of(name)
        if ac is None or not ac.command:
            proc.state, proc.pids, proc.next_start = "external", [], ""
            return
        runner = Runner(name, proc, ac, Intensity(ac.max_restarts, ac.restart_window))
        runner.wanted = False
        if old is not None:
            old.cool += 1  # its pending cool-down is void
        if proc.state == "external":
            proc.state = "stopped"
        self.runners[name] = runner

    def reconfigure(self, name: str, ac: AgentConfig) -> None:
        """After a reload that changed only how many instances it runs."""
        runner = self.runners.get(name)
        if runner is not None:
            runner.config = ac

    async def shutdown(self) -> None:
        """End every agent process: supervised ones and those bound by `run`."""
        self.shutting_down = True
        for runner in self.runners.values():
            runner.wanted = False
        self.procs.drain()
        labels = set(self.procs.labels.values())
        await self._end_tree(labels)
        self._reap()


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
