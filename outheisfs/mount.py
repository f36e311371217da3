"""The server's life: check, replay, mount, serve, and shut down cleanly.

`serve` runs in the foreground process. `mount` (the CLI's default) starts it as a
detached child and returns only once the filesystem answers, passing errors back
through a pipe so that the user sees one clear line and the right exit status.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from . import checkpoint, events, procinfo, retain
from .config import Config
from .dispatcher import Dispatcher
from .errors import LogDamaged, OutheisError
from .eventlog import EventLog
from .mounts import fsname, hint
from .names import SERVER, XATTR_PID
from .ops import Operations
from .pools import Pools
from .procevents import ProcEvents
from .procstate import Processes
from .progress import Progress
from .reload import Parts, Reloader
from .supervisor import Supervisor

log = logging.getLogger(__name__)
PROFILE_ENV = "OUTHEISFS_PROFILE"  # a file: the server's CPU profile (cProfile) at its end
MAX_TASKS = 10_000  # each parked read or write holds one pyfuse3 worker task


class MountError(Exception):
    """One line for the user, and the exit status (2: usage/config, 1: the rest)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Options:
    config: Config
    mountpoint: Path
    state: Path
    durability: str
    host: str | None = None  # --host: this mount's name in a cluster (not used alone)
    config_file: Path | None = None  # what `reload` reads again (None: ./outheis.toml)


# -- checks before mounting ----------------------------------------------------------


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("no usable FUSE: /dev/fuse does not exist (modprobe fuse?)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError("no usable FUSE: fusermount3 not found (apt-get install fuse3)")


def unmount_stale(mp: Path) -> None:
    """Detach a mount whose server is gone (it answers ENOTCONN)."""
    if shutil.which("fusermount3"):
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)
    else:
        subprocess.run(["umount", "-l", str(mp)], capture_output=True, check=False)


def check_mountpoint(mp: Path) -> None:
    try:
        st = os.stat(mp)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mp} does not exist", 2) from None
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            unmount_stale(mp)
            try:
                st = os.stat(mp)
            except OSError as e2:
                raise MountError(
                    f"mountpoint {mp}: stale mount could not be cleaned: {e2}"
                ) from None
        else:
            raise MountError(f"mountpoint {mp}: {e.strerror}") from None
    import stat as stat_

    if not stat_.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mp} is not a directory", 2)
    if os.path.ismount(mp):
        raise MountError(f"mountpoint {mp} is busy: something is mounted there")


def lock_state(state: Path) -> int:
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise MountError(f"state folder {state}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise MountError(
            f"state folder {state} is in use by another server (pid {other})"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:  # a full disk
        os.close(fd)
        raise MountError(f"state folder {state}: {e.strerror}") from None
    return fd


# -- the server ----------------------------------------------------------------------


def recover(
    config: Config,
    state: Path,
    durability: str,
    mountpoint: Path,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Dispatcher, EventLog]:
    """What every start does: bound the log (`retain`), load the newest checkpoint,
    replay the log after it (cutting a torn tail), install the config, record the
    mount, and queue again what was in flight."""
    elog = EventLog(state, durability)
    t0 = time.monotonic()
    try:
        if config.retain is not None:
            retain.apply(state, config.retain, time.time())
        d, start = checkpoint.restore(state, config, elog)
        t1 = time.monotonic()
        report = elog.open(d.apply, progress=progress, start=start)
    except LogDamaged as e:
        raise MountError(f"event log refused: {e}") from None
    except OSError as e:
        raise MountError(f"event log {elog.path}: {e.strerror}") from None
    d.install_config()
    log.info(
        "start-up: checkpoint at seq %d loaded in %.3f s, %d events read in %.3f s",
        report.checkpoint,
        t1 - t0,
        report.events,
        time.monotonic() - t1,
    )
    if report.torn:
        offset, size = report.torn
        why = f"torn last record cut off at byte {offset} ({size} bytes)"
        d.note(events.error("/log", errno.EIO, why))
    agents = {n: a.priority for n, a in config.agents.items()}
    mount_event = events.mount(str(mountpoint), os.getpid(), durability, agents)
    # How start-up went: the checkpoint it began from, and the log lines it read.
    mount_event["checkpoint"] = report.checkpoint
    mount_event["replayed"] = report.events
    try:
        d.record([mount_event])
        d.requeue_inflight()
    except OSError as e:  # a full disk: say so, rather than a traceback in server.log
        elog.close()
        raise MountError(f"event log {elog.path} cannot be written: {e.strerror}") from None
    if report.events >= config.checkpoint_every:  # not the same long replay again
        checkpoint.Checkpoints(d, elog, state, config.checkpoint_every).write_now()
    return d, elog


async def serve(opts: Options, ready: Ready) -> None:
    """Mount and serve until unmounted or told to stop (SIGTERM, SIGINT); SIGHUP
    reads the config again (`reload`)."""
    check_fuse()
    check_mountpoint(opts.mountpoint)
    lock_fd = lock_state(opts.state)
    procinfo.raise_nofile()
    if opts.config.cluster is None:
        d, elog = recover(opts.config, opts.state, opts.durability, opts.mountpoint, ready.progress)
        await _serve(opts, ready, d, elog, lock_fd)
        return
    from .cluster import node  # only with [cluster]: nothing of NATS is loaded otherwise
    from .cluster.engine import EngineError
    from .cluster.hosts import default_host

    host = opts.host or default_host()
    try:
        async with node.joined(
            opts.config, host, opts.state, opts.mountpoint, ready.progress
        ) as joined:
            await _serve(opts, ready, joined.d, joined.log, lock_fd, joined.attach)
    except EngineError as e:
        raise MountError(f"[cluster]: {e}") from None


async def _serve(
    opts: Options,
    ready: Ready,
    d: Dispatcher,
    elog: EventLog,
    lock_fd: int,
    attach: Callable[[Supervisor], Callable[[str], str]] | None = None,
) -> None:
    # Checkpoints beside the log file: one host alone (a cluster's log is the stream).
    checkpoints = None
    if opts.config.cluster is None:
        checkpoints = checkpoint.Checkpoints(d, elog, opts.state, opts.config.checkpoint_every)
    procs = ProcEvents()
    table = Processes(opts.config)
    ops = Operations(d, elog, procs, table)
    supervisor = Supervisor(
        d,
        procs,
        opts.mountpoint,
        opts.state,
        opts.config.home,
        opts.config.stop_grace,
        table,
        ops.files.output,
        ops.files.readers,
    )
    ops.commands.supervisor = supervisor
    if attach is not None:
        # A cluster: the supervisor runs only the agents placed on this host; ctl
        # shows where each runs.
        ops.commands.host_of = attach(supervisor)
    parts = Parts(supervisor, table, ops.tree, ops.store, ops.vault, ops.rights, ops.files.output)
    reloader = Reloader(d, parts, opts.state, opts.config_file)
    ops.commands.reload = reloader.reload
    # The source shows the state folder: `mount` and `df` tell servers apart.
    options = {fsname(opts.state), "subtype=outheisfs", "noatime"}
    if os.geteuid() == 0:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, str(opts.mountpoint), options)
    except RuntimeError as e:
        elog.close()
        raise MountError(f"cannot mount {opts.mountpoint}: {e}") from None
    try:
        async with trio.open_nursery() as nursery:
            ops.files.nursery = nursery

            def later(delay: float, fn: Callable[[], None]) -> None:
                async def after() -> None:
                    await trio.sleep(delay)
                    fn()

                nursery.start_soon(after)

            ops.rights.later = later

            async def fuse_main() -> None:
                await pyfuse3.main(min_tasks=4, max_tasks=MAX_TASKS)
                nursery.cancel_scope.cancel()  # unmounted from outside

            nursery.start_soon(fuse_main)
            nursery.start_soon(ops.files.parking.run)
            nursery.start_soon(ops.files.timers)
            if checkpoints is not None:
                await nursery.start(checkpoints.run)
            await nursery.start(procs.run)
            await trio.to_thread.run_sync(os.stat, opts.mountpoint / "ctl")
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                await nursery.start(supervisor.run)
                nursery.start_soon(Pools(d, supervisor).run)
                ready.ok()
                async for signum in sigs:
                    if signum == signal.SIGHUP:  # read the config again, as daemons do
                        nursery.start_soon(_reload, d, reloader)
                        continue
                    log.info("signal %d: shutting down", signum)
                    break
            # Agents go first, while the mount still answers them.
            await supervisor.shutdown()
            # Readers that closed within the close grace: settled now, not lost
            # with the tasks that wait out the grace.
            ops.files.settle_all()
            nursery.cancel_scope.cancel()
    finally:
        ops.files.settle_all()  # also when serving failed: before the `umount` event
        d.note(events.umount(str(opts.mountpoint)))
        ops.files.output.close()
        if checkpoints is not None:
            checkpoints.write_now()  # the next start reads nothing of the log before it
        elog.close()
        pyfuse3.close(unmount=True)
        os.ftruncate(lock_fd, 0)  # no pid left behind for someone to signal later
        os.close(lock_fd)


async def _reload(d: Dispatcher, reloader: Reloader) -> None:
    """SIGHUP: a reload by the server; a refusal is an `error` event, nothing changes."""
    try:
        await reloader.reload(SERVER)
    except OutheisError as e:
        d.note(events.error("/ctl", e.errno, e.reason))


class Ready:
    """Tells the waiting `outheisfs mount` how starting went, through a pipe."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.line = Progress("mount: replaying the event log")  # in the foreground

    def progress(self, done: int, total: int) -> None:
        """How far start-up has read the log: to the waiting `mount`, whose
        terminal shows it; a foreground server shows it itself."""
        if self.fd is None:
            self.line.update(done, total, "bytes")
            return
        try:
            os.write(self.fd, f"progress {done} {total}\n".encode())
        except OSError:
            pass

    def _send(self, text: str) -> None:
        self.line.done()
        if self.fd is None:
            return
        try:
            os.write(self.fd, text.encode())
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    def ok(self) -> None:
        self._send("ok\n")

    def fail(self, message: str, status: int) -> None:
        self._send(f"{status} {message}\n")


def run_foreground(opts: Options, ready_fd: int | None) -> int:
    ready = Ready(ready_fd)
    try:
        profile = os.environ.get(PROFILE_ENV)
        if profile:  # for measuring only: see docs/performance.md
            import cProfile

            cProfile.runctx("trio.run(serve, opts, ready)", globals(), locals(), profile)
        else:
            trio.run(serve, opts, ready)
    except MountError as e:
        ready.fail(str(e), e.status)  # first: stderr may be a file on a full disk
        try:
            print(f"outheisfs: {e}", file=sys.stderr)
        except OSError:
            pass
        return e.status
    return 0


def start_background(argv: list[str], state: Path) -> int:
    """Start the server detached; return once it answers, or report why not."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    r, w = os.pipe()
    logf = open(state / "server.log", "ab")
    cmd = [sys.executable, "-m", "outheisfs", *argv, "--foreground", "--ready-fd", str(w)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=logf,
        pass_fds=(w,),
        start_new_session=True,
    )
    os.close(w)
    logf.close()
    line = Progress("mount: replaying the event log")
    with os.fdopen(r, "rb") as f:
        answer = f.readline().decode().strip()
        while answer.startswith("progress "):
            done, total = answer.split()[1:3]
            line.update(int(done), int(total), "bytes")
            answer = f.readline().decode().strip()
    line.done()
    if answer == "ok":
        return 0
    if answer:
        status, _, message = answer.partition(" ")
        print(f"outheisfs: {message}", file=sys.stderr)
        proc.wait()
        return int(status)
    code = proc.wait()
    print(
        f"outheisfs: server exited with status {code} before mounting; see {state / 'server.log'}",
        file=sys.stderr,
    )
    return 1


# -- umount --------------------------------------------------------------------------


def umount(mp: Path, timeout: float = 60.0) -> int:
    """Ask the server of `mp` to stop, and wait until it has."""
    try:
        pid = int(os.getxattr(mp, XATTR_PID.decode()))
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            unmount_stale(mp)
            print(f"outheisfs: {mp}: server was gone; stale mount removed", file=sys.stderr)
            return 0
        if e.errno == errno.ENOENT:
            print(f"outheisfs: {mp} does not exist", file=sys.stderr)
            return 2
        print(f"outheisfs: {mp} is not an outheisfs mount{hint(mp)}", file=sys.stderr)
        return 1
    st = procinfo.stat(pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        unmount_stale(mp)
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = procinfo.stat(pid)
        gone = now is None or (st and now.start != st.start) or now.state == "Z"
        if gone and not os.path.ismount(mp):
            return 0
        time.sleep(0.02)
    print(f"outheisfs: server {pid} did not stop within {timeout:.0f} s", file=sys.stderr)
    return 1
