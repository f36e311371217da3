"""The `outheisfs` command. Errors are one line and an exit status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import mounts
from .errors import ConfigError, LogDamaged

# The server's modules (pydantic, trio) are imported by the commands that need them:
# `ask`, `trace` and `top` start in a fraction of the time without them.


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, status 2
        self.exit(2, f"outheisfs: {message} (see outheisfs --help)\n")


WHICH = "default: $OUTHEIS_MOUNT, else the only outheisfs mount, else ./mount"


def build_parser() -> Parser:
    p = Parser(prog="outheisfs", description="Cooperating agents as files.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    m = sub.add_parser("mount", help="mount the tree (in the background unless --foreground)")
    m.add_argument("mountpoint", nargs="?", help="default: $OUTHEIS_MOUNT, else ./mount")
    m.add_argument("--config", type=Path)
    m.add_argument("--state", type=Path, default=Path(".outheis"))
    m.add_argument("--foreground", action="store_true")
    m.add_argument("--durability", choices=["process", "disk"])
    m.add_argument("--host", help="this mount's host name in a cluster (default: hostname)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = sub.add_parser("umount", help="stop the server and unmount")
    u.add_argument("mountpoint", nargs="?", help=WHICH)

    rl = sub.add_parser("reload", help="read the config again and apply the difference")
    rl.add_argument("mountpoint", nargs="?", help=WHICH)

    r = sub.add_parser(
        "run",
        help="run COMMAND as agent NAME",
        usage="outheisfs run NAME [--mount MP] [--unveil PATH=PERMS]... [--send NAME]... "
        "-- COMMAND",
    )
    r.add_argument("name")
    r.add_argument("--mount", help=WHICH)
    r.add_argument(
        "--unveil",
        action="append",
        default=[],
        metavar="PATH=PERMS",
        help="add PATH (absolute in the mount) to its view with r, w, rw or -",
    )
    r.add_argument(
        "--send", action="append", default=[], metavar="NAME", help="let it send to NAME (*: all)"
    )
    r.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)

    f = sub.add_parser("follow", help="print the log as it grows, across remounts")
    f.add_argument("mountpoint", nargs="?", help=WHICH)
    f.add_argument("--since", type=int, metavar="SEQ", help="from event SEQ (default: the end)")
    f.add_argument("--agent", action="append", default=[], metavar="NAME",
                   help="only events that concern NAME (repeat, or NAME,NAME)")  # fmt: skip
    f.add_argument("--type", action="append", default=[], metavar="TYPE",
                   help="only events of TYPE (repeat, or TYPE,TYPE)")  # fmt: skip

    rp = sub.add_parser("replay", help="rebuild the state from the log and print it")
    rp.add_argument("--state", type=Path, default=Path(".outheis"))
    rp.add_argument("--until", type=int)
    rp.add_argument("--full", action="store_true", help="read the whole log, no checkpoint")
    rp.add_argument("--json", action="store_true")
    rp.add_argument("--cluster", action="store_true", help="from the [cluster] stream")
    rp.add_argument("--config", type=Path, help="a config with [cluster]: replay its stream")

    b = sub.add_parser("bench", help="measure against a minimal pyfuse3 filesystem")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--json", action="store_true")

    t = sub.add_parser("top", help="live view of the agents of a mount")
    t.add_argument("mountpoint", nargs="?", help=WHICH)
    t.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)

    tr = sub.add_parser("trace", help="the events of one message and its replies")
    tr.add_argument("id")
    where = tr.add_mutually_exclusive_group()
    where.add_argument("--state", type=Path, help="read STATE/events.jsonl (default ./.outheis)")
    where.add_argument("--mount", help="read the mount's log")
    tr.add_argument("--json", action="store_true")

    a = sub.add_parser("ask", help="send as the operator and print the reply")
    a.add_argument("name")
    a.add_argument("body", nargs="*", help="the message (default: standard input)")
    a.add_argument("--mount", help=WHICH)
    a.add_argument("--timeout", type=float, default=30.0)
    a.add_argument("--json", action="store_true")

    c = sub.add_parser("completion", help="print a shell completion script")
    c.add_argument("shell", choices=["bash"])
    b.add_argument("--cluster", metavar="URL,...", help="NATS servers: the cluster rows")
    return p


COMMANDS = {
    "mount", "umount", "reload", "run", "follow", "replay", "bench", "top", "trace", "ask",
    "completion",
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from . import helper

    if helper.is_helper_call(argv, COMMANDS | {"-h", "--help"}):
        try:  # `mount -t fuse.outheisfs CONFIG MOUNTPOINT -o state=DIR`
            argv = helper.mount_argv(argv)
        except helper.HelperError as e:
            print(f"outheisfs: {e}", file=sys.stderr)
            return 2
    command: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:  # what follows `--` is the command, untouched
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "ask" and not any(w.startswith("-") for w in extra):
        args.body = args.body + extra  # words of BODY after an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run":
        args.cmd = args.cmd + command
    try:
        handler = {
            "mount": cmd_mount,
            "umount": cmd_umount,
            "reload": cmd_reload,
            "replay": cmd_replay,
            "run": cmd_run,
            "bench": cmd_bench,
            "top": cmd_top,
            "trace": cmd_trace,
            "ask": cmd_ask,
            "completion": cmd_completion,
            "follow": cmd_follow,
        }[args.command]
        return handler(args)
    except ConfigError as e:
        print(f"outheisfs: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `outheisfs trace ID | head`: the reader has had enough
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141


def cmd_mount(args: argparse.Namespace) -> int:
    from . import mount, sandbox
    from .config import HOST_RE, load_config

    config = load_config(args.config)
    if args.host is not None and not HOST_RE.fullmatch(args.host):
        raise ConfigError(f"--host: {args.host!r} must match {HOST_RE.pattern}")
    durability = args.durability or config.durability
    mp = Path(args.mountpoint or os.environ.get("OUTHEIS_MOUNT") or "mount").absolute()
    state = args.state.absolute()
    try:
        sandbox.check(config, state)
    except sandbox.ConfineError as e:
        print(f"outheisfs: {e}", file=sys.stderr)
        return 1
    if not args.foreground:
        try:
            mount.check_fuse()
            mount.check_mountpoint(mp)
        except mount.MountError as e:
            print(f"outheisfs: {e}", file=sys.stderr)
            return e.status
        argv = ["mount", str(mp), "--state", str(state), "--durability", durability]
        if args.host is not None:
            argv += ["--host", args.host]
        if args.config is not None:
            argv += ["--config", str(args.config.absolute())]
        elif Path("outheis.toml").exists():
            argv += ["--config", str(Path("outheis.toml").absolute())]
        try:
            return mount.start_background(argv, state)
        except OSError as e:
            print(f"outheisfs: state folder {state}: {e.strerror}", file=sys.stderr)
            return 1
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    opts = mount.Options(
        config=config,
        mountpoint=mp,
        state=state,
        durability=durability,
        host=args.host,
        config_file=args.config.absolute() if args.config is not None else None,
    )
    return mount.run_foreground(opts, args.ready_fd)


def cmd_umount(args: argparse.Namespace) -> int:
    from . import mount

    return mount.umount(mounts.mountpoint(args.mountpoint))


def cmd_reload(args: argparse.Namespace) -> int:
    """Write `reload` to the root ctl; print what changed, or why nothing did."""
    import errno

    from .names import XATTR_PID
    from .run import reasons

    mp = mounts.mountpoint(args.mountpoint)
    try:
        os.getxattr(mp, XATTR_PID.decode())
    except OSError as e:
        where = "does not exist" if e.errno == errno.ENOENT else "is not an outheisfs mount"
        print(f"outheisfs: reload: {mp} {where}{mounts.hint(mp)}", file=sys.stderr)
        return 2 if e.errno == errno.ENOENT else 1
    errors, log = mp / "agents" / "user" / "errors", mp / "log"
    start, seen = os.stat(errors).st_size, os.stat(log).st_size
    try:  # one write(2), not a buffered file that writes again at close
        fd = os.open(mp / "ctl", os.O_WRONLY)
        try:
            os.write(fd, b"reload\n")
        finally:
            os.close(fd)
    except OSError as e:
        why = reasons(errors, start)
        text = why[-1].split(": ", 1)[-1] if why else os.strerror(e.errno or errno.EIO)
        print(f"outheisfs: {text}", file=sys.stderr)
        return 2 if e.errno == errno.EINVAL else 1
    with open(log, "rb") as f:
        f.seek(seen)
        done = [ev for ev in map(json.loads, f.read().splitlines()) if ev["type"] == "reload"]
    if done:
        ev = done[-1]
        keys = ("added", "changed", "resized", "removed", "kept")
        said = [f"{k} {', '.join(ev[k])}" for k in keys if ev[k]]
        print("reloaded: " + ("; ".join(said) or "nothing changed"))
        if ev["remount"]:
            print(f"not before the next mount: {', '.join(ev['remount'])}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import RunError, run

    try:
        return run(mounts.mountpoint(args.mount), args.name, args.cmd, args.unveil, args.send)
    except RunError as e:
        print(f"outheisfs: {e}", file=sys.stderr)
        return e.status


def cmd_follow(args: argparse.Namespace) -> int:
    from .follow import follow

    if args.since is not None and args.since < 0:
        print("outheisfs: follow: --since takes a seq, 0 or more", file=sys.stderr)
        return 2
    mp = mounts.mountpoint(args.mountpoint)
    if not mp.is_dir() and not os.path.ismount(mp):
        print(f"outheisfs: follow: mountpoint {mp} does not exist", file=sys.stderr)
        return 2
    return follow(mp, args.since, args.agent, args.type)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.cluster is not None:
        from .cluster.bench import main as cluster_bench

        return cluster_bench(args.cluster.split(","), args.quick, args.json)
    from . import bench

    return bench.main(args.quick, args.json)


def cmd_top(args: argparse.Namespace) -> int:
    from .top import TopError, main

    try:
        return main(mounts.mountpoint(args.mountpoint), args.interval)
    except TopError as e:
        print(f"outheisfs: {e}", file=sys.stderr)
        return 1


def cmd_trace(args: argparse.Namespace) -> int:
    from .trace import as_json, follow, is_id, render

    if not is_id(args.id):
        print(f"outheisfs: trace: {args.id!r} is not a message id", file=sys.stderr)
        return 2
    path = (
        Path(args.mount) / "log"
        if args.mount
        else (args.state or Path(".outheis")) / "events.jsonl"
    )
    try:
        with open(path, "rb") as f:
            root = follow(f, args.id)
    except OSError as e:
        print(f"outheisfs: trace: {path}: {e.strerror}", file=sys.stderr)
        return 1
    if root is None:
        print(f"outheisfs: trace: no message {args.id} in {path}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(as_json(root), ensure_ascii=False))
    else:
        print("\n".join(render(root)))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from .ask import AskError, main

    try:
        return main(mounts.mountpoint(args.mount), args.name, args.body, args.timeout, args.json)
    except AskError as e:
        print(f"outheisfs: {e}", file=sys.stderr)
        return e.status


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import BASH

    sys.stdout.write(BASH)
    return 0


def replay_state(state: Path, until: int | None, full: bool = False) -> dict[str, Any]:
    """The state as of the end of the log (or of event `until`), for printing."""
    from . import checkpoint
    from .config import Config
    from .dispatcher import Dispatcher
    from .eventlog import EventLog
    from .progress import Progress

    elog = EventLog(state, readonly=True)
    if full:
        d, start = Dispatcher(Config(), None), None
    else:
        d, start = checkpoint.restore(state, Config(), elog, until)
    line = Progress("replay")  # on a terminal only
    try:
        report = elog.open(
            d.apply, until, lambda done, total: line.update(done, total, "bytes"), start
        )
    finally:
        line.done()
    return summary(d, report.events, report.torn, report.checkpoint)


def summary(
    d: Any, read: int, torn: tuple[int, int] | None = None, checkpoint: int = 0
) -> dict[str, Any]:
    """A replayed dispatcher's state, for printing."""
    agents: dict[str, Any] = {}
    for name, a in sorted(d.agents.items()):
        agents[name] = {
            "priority": a.priority,
            "queued": [_msg(m) for m in a.inbox.messages()],
            "inflight": [_msg(m) for m in a.inflight.values()],
            "held": [_msg(m) for m in a.held.values()],  # waiting for approval
            "delivered": a.delivered,
            "dead": a.dead,
        }
    return {
        "seq": d.seq,
        "events": read,
        "checkpoint": checkpoint,
        "torn": None if torn is None else {"offset": torn[0], "bytes": torn[1]},
        "agents": agents,
        "grants": d.granted,  # grantee -> path -> the owner who granted it (read access)
    }


def replay_cluster(config_path: Path | None, until: int | None) -> dict[str, Any]:
    """The state as of the end of the cluster's stream (or of event `until`)."""
    import trio

    from .cluster import node
    from .config import load_config

    config = load_config(config_path)
    if config.cluster is None:
        raise ConfigError(f"replay --cluster: {config_path or 'outheis.toml'} has no [cluster]")
    d = trio.run(node.replay, config, until)
    return summary(d, d.seq)


def _msg(m: Any) -> dict[str, Any]:
    return {
        "id": m.id,
        "seq": m.seq,
        "from": m.sender,
        "to": m.to,
        "priority": m.priority,
        "attempts": m.delivered,
        "body": m.body,
    }


def cmd_replay(args: argparse.Namespace) -> int:
    from .config import load_config

    state: Path = args.state
    if args.cluster or (args.config is not None and load_config(args.config).cluster):
        from .cluster.engine import EngineError

        try:
            s = replay_cluster(args.config, args.until)
        except EngineError as e:
            print(f"outheisfs: [cluster]: {e}", file=sys.stderr)
            return 1
    elif not (state / "events.jsonl").exists():
        print(f"outheisfs: no event log in {state}", file=sys.stderr)
        return 1
    else:
        try:
            s = replay_state(state, args.until, args.full)
        except LogDamaged as e:
            print(f"outheisfs: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(s))
        return 0
    since = f", after the checkpoint at seq {s['checkpoint']}" if s["checkpoint"] else ""
    print(f"state as of seq {s['seq']} ({s['events']} events read{since})")
    if s["torn"]:
        print(f"torn last record: {s['torn']['bytes']} bytes at byte {s['torn']['offset']}")
    print(
        f"{'AGENT':20} {'PRIORITY':12} {'QUEUED':>7} {'INFLIGHT':>8} {'DELIVERED':>9} {'DEAD':>5}"
    )
    for name, a in s["agents"].items():
        print(
            f"{name:20} {a['priority']:12} {len(a['queued']):7} {len(a['inflight']):8} "
            f"{a['delivered']:9} {a['dead']:5}"
        )
    for name, a in s["agents"].items():
        for label in ("inflight", "queued", "held"):
            for m in a[label]:
                body = json.dumps(m["body"])
                body = body if len(body) <= 60 else body[:57] + "..."
                print(
                    f"  {name} {label} seq {m['seq']} {m['id']} from {m['from']} "
                    f"{m['priority']} attempts {m['attempts']}: {body}"
                )
    for grantee, given in sorted(s["grants"].items()):
        for path, owner in sorted(given.items()):
            print(f"  {grantee} unveil {path} r (granted by {owner})")
    return 0
