"""`outheisfs top [MOUNTPOINT]`: a live view of the agents, refreshed every second.

It reads only the mount, as any process that sees it could: the root `ctl` for
the agents, each agent's `ctl` for its counters, and the root `log` from its
end for rates and the last error. It never opens the state folder.

Drawn with rich (a Live display on the terminal's alternate screen); keys are
read in cbreak mode and the terminal is restored on every way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

WINDOW = 5.0  # seconds over which rates are averaged
NOT_AGENTS = {"server", "-"}
PROBLEMS = [f'"type":"{t}"'.encode() for t in ("error", "denied", "failed", "dead", "exit")]


class TopError(Exception):
    pass


@dataclass
class Row:
    name: str
    state: str = "-"
    pids: str = "-"
    host: str = "-"
    queued: int = 0
    inflight: int = 0
    restarts: int = 0
    dead: int = 0
    rate_in: float = 0.0
    rate_out: float = 0.0
    error: str = ""


@dataclass
class Snapshot:
    rows: list[Row]
    events_rate: float
    messages_rate: float
    seq: int
    when: float


@dataclass
class Counters:
    """What the log has said since top started, cumulative."""

    sent_to: dict[str, int] = field(default_factory=dict)
    sent_by: dict[str, int] = field(default_factory=dict)
    events: int = 0
    messages: int = 0


def _ctl(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition(" ")
            out[key] = value
    return out


def _int(v: str | None) -> int:
    try:
        return int(v or 0)
    except ValueError:
        return 0


def _problem(ev: dict[str, Any]) -> tuple[str, str] | None:
    """(agent, text) if the event is something worth showing as its last error."""
    kind = ev.get("type")
    if kind in ("error", "denied"):
        who = ev.get("who")
        where = str(ev.get("where") or ev.get("path") or "")
        if not isinstance(who, str) or who in NOT_AGENTS:
            parts = where.split("/")
            if len(parts) < 3 or parts[1] != "agents":
                return None
            who = parts[2]
        return who, f"{kind}: {ev.get('why', '')}"
    agent = ev.get("agent")
    if not isinstance(agent, str):
        return None
    if kind == "failed":
        return agent, f"failed: {ev.get('restarts')} restarts within {ev.get('window')} s"
    if kind == "dead":
        return agent, f"dead letter: {ev.get('reason', '')}"
    if kind == "exit" and (ev.get("signal") or ev.get("code")):
        how = f"signal {ev['signal']}" if ev.get("signal") else f"status {ev.get('code')}"
        return agent, f"exit: {how}"
    return None


class Source:
    """The mount, read the way top needs it."""

    def __init__(self, mp: Path) -> None:
        self.mp = mp
        try:
            os.getxattr(mp, "user.outheisfs.pid")
        except OSError:
            raise TopError(f"{mp} is not an outheisfs mount") from None
        self.host = socket.gethostname()
        self.log = os.open(mp / "log", os.O_RDONLY)
        self.offset = os.fstat(self.log).st_size  # from its end
        self.rest = b""
        self.seq = 0
        tail = os.pread(self.log, 4096, max(0, self.offset - 4096)).rsplit(b"\n", 2)
        if len(tail) > 1:
            with contextlib.suppress(ValueError):
                self.seq = int(tail[-2][7 : tail[-2].index(b",")])
        self.counters = Counters()
        self.errors: dict[str, str] = {}
        self.history: deque[tuple[float, Counters]] = deque()
        self._last_errors_of_agents()

    def close(self) -> None:
        os.close(self.log)

    def _last_errors_of_agents(self) -> None:
        """What went wrong before top started: the end of each agent's own log."""
        for name in self._names():
            try:
                fd = os.open(self.mp / "agents" / name / "log", os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                tail = os.pread(fd, 65536, max(0, size - 65536))
            finally:
                os.close(fd)
            for raw in tail.split(b"\n")[1:] if size > 65536 else tail.split(b"\n"):
                if any(t in raw[:80] for t in PROBLEMS):
                    self._note(raw)

    def _names(self) -> list[str]:
        try:
            text = (self.mp / "ctl").read_text()
        except OSError as e:
            raise TopError(f"{self.mp}/ctl: {e.strerror}") from None
        return [line.split(" ", 1)[0] for line in text.splitlines() if line]

    def _note(self, raw: bytes) -> dict[str, Any] | None:
        try:
            ev = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(ev, dict):
            return None
        p = _problem(ev)
        if p is not None:
            self.errors[p[0]] = p[1]
        return ev

    def read_log(self) -> None:
        c = self.counters
        while True:
            chunk = os.pread(self.log, 1 << 20, self.offset)
            if not chunk:
                break
            self.offset += len(chunk)
            lines = (self.rest + chunk).split(b"\n")
            self.rest = lines.pop()
            for raw in lines:
                c.events += 1
                head = raw[:80]
                if b'"type":"message"' in head:
                    try:
                        ev = json.loads(raw)
                    except ValueError:
                        continue
                    c.messages += 1
                    to, by = ev.get("to"), ev.get("from")
                    c.sent_to[to] = c.sent_to.get(to, 0) + 1
                    c.sent_by[by] = c.sent_by.get(by, 0) + 1
                elif any(t in head for t in PROBLEMS):
                    self._note(raw)
            if lines:
                last = lines[-1]
                with contextlib.suppress(ValueError):
                    self.seq = int(last[7 : last.index(b",")])

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        self.read_log()
        c = self.counters
        self.history.append((now, Counters(dict(c.sent_to), dict(c.sent_by), c.events, c.messages)))
        while len(self.history) > 2 and now - self.history[1][0] >= WINDOW:
            self.history.popleft()
        t0, old = self.history[0]
        span = now - t0

        def rate(new: int, before: int) -> float:
            return (new - before) / span if span > 0 else 0.0

        rows: list[Row] = []
        for name in self._names():
            try:
                st = _ctl(self.mp / "agents" / name / "ctl")
            except OSError:
                continue  # removed meanwhile
            rows.append(
                Row(
                    name=name,
                    state=st.get("state", "-"),
                    pids=st.get("pid", "-"),
                    host=st.get("host", self.host),
                    queued=_int(st.get("queued")),
                    inflight=_int(st.get("inflight")),
                    restarts=_int(st.get("restarts")),
                    dead=_int(st.get("dead")),
                    rate_in=rate(c.sent_to.get(name, 0), old.sent_to.get(name, 0)),
                    rate_out=rate(c.sent_by.get(name, 0), old.sent_by.get(name, 0)),
                    error=self.errors.get(name, ""),
                )
            )
        return Snapshot(
            rows,
            rate(c.events, old.events),
            rate(c.messages, old.messages),
            self.seq,
            time.time(),
        )


# -- drawing ----------------------------------------------------------------------------

# (header, Row field, right-aligned); drawn in this order
COLUMNS = [
    ("AGENT", "name", False),
    ("HOST", "host", False),
    ("STATE", "state", False),
    ("PIDS", "pids", False),
    ("QUEUED", "queued", True),
    ("INFL", "inflight", True),
    ("IN/S", "rate_in", True),
    ("OUT/S", "rate_out", True),
    ("RESTARTS", "restarts", True),
    ("DEAD", "dead", True),
    ("LAST ERROR", "error", False),
]
# Dropped first when the terminal is too narrow; AGENT always stays.
DROP_ORDER = ["host", "pids", "error", "restarts", "inflight", "rate_out", "dead", "rate_in"]
DROP_ORDER += ["state", "queued"]
SORT_KEYS = ["name", "state", "queued", "inflight", "rate_in", "rate_out", "restarts", "dead"]
ERROR_MIN = 12


def _cell(row: Row, key: str) -> str:
    v = getattr(row, key)
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def fit_columns(rows: list[Row], width: int) -> list[tuple[str, str, bool, int]]:
    """The columns that fit in `width`, with their widths."""
    widths = {
        key: max([len(head)] + [len(_cell(r, key)) for r in rows]) for head, key, _ in COLUMNS
    }
    widths["error"] = max(len("LAST ERROR"), min(widths["error"], ERROR_MIN))
    keep = [key for _, key, _ in COLUMNS]

    def need() -> int:
        return sum(widths[k] for k in keep) + len(keep) - 1

    for key in DROP_ORDER:
        if need() <= width:
            break
        keep.remove(key)
    return [(head, key, right, widths[key]) for head, key, right in COLUMNS if key in keep]


def sort_rows(rows: list[Row], key: str, reverse: bool) -> list[Row]:
    if key == "name" or key == "state":
        return sorted(rows, key=lambda r: (getattr(r, key), r.name), reverse=reverse)
    return sorted(rows, key=lambda r: (-getattr(r, key), r.name), reverse=reverse)


def frame(
    snap: Snapshot, mp: Path, host: str, width: int, height: int, key: str, reverse: bool
) -> Group:
    rows = snap.rows
    running = sum(r.state == "running" for r in rows)
    failed = sum(r.state == "failed" for r in rows)
    order = "ascending" if (key in ("name", "state")) != reverse else "descending"
    clock = time.strftime("%H:%M:%S", time.localtime(snap.when))
    head1 = Text(
        f"outheisfs top  {mp} on {host}  {clock}  sort: {key} {order}"
        "  (< > sort  r reverse  q quit)",
        no_wrap=True,
        overflow="ellipsis",
        style="bold",
    )
    head2 = Text(
        f"agents {len(rows)} ({running} running, {failed} failed)"
        f"  queued {sum(r.queued for r in rows)}"
        f"  in flight {sum(r.inflight for r in rows)}"
        f"  dead {sum(r.dead for r in rows)}"
        f"  messages {snap.messages_rate:.1f}/s"
        f"  log {snap.events_rate:.1f} events/s  seq {snap.seq}",
        no_wrap=True,
        overflow="ellipsis",
    )
    cols = fit_columns(rows, width)
    table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), expand=False)
    table.header_style = "reverse"
    last = cols[-1][1]
    for head, k, right, w in cols:
        flexible = k == "error" or k == last
        table.add_column(
            head,
            justify="right" if right else "left",
            no_wrap=True,
            overflow="ellipsis",
            min_width=min(w, ERROR_MIN) if flexible else w,
            max_width=None if flexible else w,
            ratio=1 if flexible else None,
        )
    shown = sort_rows(rows, key, reverse)
    room = max(1, height - 4)
    more = len(shown) - room
    if more > 0:
        shown = shown[: room - 1]
    for r in shown:
        table.add_row(*(_cell(r, k) for _, k, _, _ in cols))
    parts: list[Any] = [head1, head2, Text(""), table]
    if more > 0:
        parts.append(Text(f"... and {more + 1} more (widen or heighten the terminal)"))
    return Group(*parts)


# -- the terminal -----------------------------------------------------------------------


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """Keys one by one, without echo; the terminal as it was on every way out."""
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def main(mp: Path, interval: float = 1.0) -> int:
    from rich.live import Live

    source = Source(mp)
    try:
        if not (sys.stdout.isatty() and sys.stdin.isatty()):
            # Not a terminal: one frame, as plain text, after one interval of rates.
            source.snapshot()
            time.sleep(interval)
            snap = source.snapshot()
            console = Console(width=200, no_color=True, highlight=False)
            console.print(frame(snap, mp, source.host, 200, 10_000, "name", False))
            return 0
        return _live(source, mp, interval, Live)
    finally:
        source.close()


def _live(source: Source, mp: Path, interval: float, live_cls: Any) -> int:
    console = Console(highlight=False)
    key_i, reverse = 0, False
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)

    def on_resize(signum: int, frame_: Any) -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, b"w")

    old_winch = signal.signal(signal.SIGWINCH, on_resize)
    stdin = sys.stdin.fileno()
    try:
        with (
            cbreak(stdin),
            live_cls(console=console, screen=True, auto_refresh=False, transient=True) as live,
        ):
            snap = source.snapshot()
            next_tick = time.monotonic() + interval
            while True:
                # The terminal's own size, not COLUMNS and LINES of the environment
                # (rich prefers those, and they do not follow a resize).
                w, h = os.get_terminal_size(sys.stdout.fileno())
                console.size = (w, h)
                key = SORT_KEYS[key_i]
                live.update(frame(snap, mp, source.host, w, h, key, reverse), refresh=True)
                wait = max(0.0, next_tick - time.monotonic())
                ready, _, _ = select.select([stdin, wake_r], [], [], wait)
                if wake_r in ready:
                    os.read(wake_r, 64)
                if stdin in ready:
                    ch = os.read(stdin, 1)
                    if ch in (b"q", b"Q", b"\x03", b""):
                        return 0
                    if ch in (b">", b"."):
                        key_i, reverse = (key_i + 1) % len(SORT_KEYS), False
                    elif ch in (b"<", b","):
                        key_i, reverse = (key_i - 1) % len(SORT_KEYS), False
                    elif ch in (b"r", b"R"):
                        reverse = not reverse
                if time.monotonic() >= next_tick:
                    snap = source.snapshot()
                    next_tick = time.monotonic() + interval
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        os.close(wake_r)
        os.close(wake_w)
