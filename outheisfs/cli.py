"""The `outheisfs` command [SPEC §2]. Errors are one line and an exit status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .config import HOST_RE, load_config
from .dispatcher import Dispatcher
from .errors import ConfigError, LogDamaged
from .eventlog import EventLog


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, status 2
        self.exit(2, f"outheisfs: {message} (see outheisfs --help)\n")


def build_parser() -> Parser:
    p = Parser(prog="outheisfs", description="Cooperating agents as files.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    m = sub.add_parser("mount", help="mount the tree (in the background unless --foreground)")
    m.add_argument("mountpoint", nargs="?", default="mount")
    m.add_argument("--config", type=Path)
    m.add_argument("--state", type=Path, default=Path(".outheis"))
    m.add_argument("--foreground", action="store_true")
    m.add_argument("--durability", choices=["process", "disk"])
    m.add_argument("--host", help="this mount's host name in a cluster (default: hostname)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = sub.add_parser("umount", help="stop the server and unmount")
    u.add_argument("mountpoint", nargs="?", default="mount")

    r = sub.add_parser(
        "run", help="run COMMAND as agent NAME", usage="outheisfs run NAME [--mount MP] -- COMMAND"
    )
    r.add_argument("name")
    r.add_argument("--mount", default="mount")
    r.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)

    rp = sub.add_parser("replay", help="rebuild the state from the log and print it")
    rp.add_argument("--state", type=Path, default=Path(".outheis"))
    rp.add_argument("--until", type=int)
    rp.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="measure against a minimal pyfuse3 filesystem")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--json", action="store_true")
    b.add_argument("--cluster", metavar="URL,...", help="NATS servers: the cluster rows")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:  # what follows `--` is the command, untouched
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if args.command == "run":
        args.cmd = args.cmd + command
    try:
        handler = {
            "mount": cmd_mount,
            "umount": cmd_umount,
            "replay": cmd_replay,
            "run": cmd_run,
            "bench": cmd_bench,
        }[args.command]
        return handler(args)
    except ConfigError as e:
        print(f"outheisfs: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_mount(args: argparse.Namespace) -> int:
    from . import mount

    config = load_config(args.config)
    if args.host is not None and not HOST_RE.fullmatch(args.host):
        raise ConfigError(f"--host: {args.host!r} must match {HOST_RE.pattern}")
    if config.cluster is not None:  # honest until the dispatcher runs on the stream
        print(
            "outheisfs: [cluster]: mounting on several hosts is not wired in yet "
            "(see docs/cluster.md); without the [cluster] table this host mounts alone",
            file=sys.stderr,
        )
        return 1
    durability = args.durability or config.durability
    mp = Path(args.mountpoint).absolute()
    state = args.state.absolute()
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
        config=config, mountpoint=mp, state=state, durability=durability, host=args.host
    )
    return mount.run_foreground(opts, args.ready_fd)


def cmd_umount(args: argparse.Namespace) -> int:
    from . import mount

    return mount.umount(Path(args.mountpoint).absolute())


def cmd_run(args: argparse.Namespace) -> int:
    from .run import RunError, run

    try:
        return run(Path(args.mount).absolute(), args.name, args.cmd)
    except RunError as e:
        print(f"outheisfs: {e}", file=sys.stderr)
        return e.status


def cmd_bench(args: argparse.Namespace) -> int:
    if args.cluster is not None:
        from .cluster.bench import main as cluster_bench

        return cluster_bench(args.cluster.split(","), args.quick, args.json)
    from . import bench

    return bench.main(args.quick, args.json)


def replay_state(state: Path, until: int | None) -> dict[str, Any]:
    """The state as of the end of the log (or of event `until`), for printing."""
    from .config import Config

    elog = EventLog(state, readonly=True)
    d = Dispatcher(Config(), None)
    report = elog.open(d.apply, until)
    agents: dict[str, Any] = {}
    for name, a in sorted(d.agents.items()):
        agents[name] = {
            "priority": a.priority,
            "queued": [_msg(m) for m in a.inbox.messages()],
            "inflight": [_msg(m) for m in a.inflight.values()],
            "delivered": a.delivered,
            "dead": a.dead,
        }
    return {
        "seq": d.seq,
        "events": report.events,
        "torn": None
        if report.torn is None
        else {"offset": report.torn[0], "bytes": report.torn[1]},
        "agents": agents,
    }


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
    state: Path = args.state
    if not (state / "events.jsonl").exists():
        print(f"outheisfs: no event log in {state}", file=sys.stderr)
        return 1
    try:
        s = replay_state(state, args.until)
    except LogDamaged as e:
        print(f"outheisfs: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(s))
        return 0
    print(f"state as of seq {s['seq']} ({s['events']} events read)")
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
        for label in ("inflight", "queued"):
            for m in a[label]:
                body = json.dumps(m["body"])
                body = body if len(body) <= 60 else body[:57] + "..."
                print(
                    f"  {name} {label} seq {m['seq']} {m['id']} from {m['from']} "
                    f"{m['priority']} attempts {m['attempts']}: {body}"
                )
    return 0
