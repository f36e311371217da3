"""What /proc tells about a caller: pending signals, exiting state, exit code.

pyfuse3 cannot see FUSE interrupts and its flush/release carry no caller, so the
server looks at the caller itself (see docs/design.md, "Who closes").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PF_EXITING = 0x4


@dataclass(frozen=True, slots=True)
class Stat:
    state: str
    ppid: int
    start: int  # start time in clock ticks since boot: with the pid, names a process
    flags: int
    exit_code: int  # as wait(2) reports it: 768 = exit(3), 9 = killed by SIGKILL

    @property
    def exiting(self) -> bool:
        return bool(self.flags & PF_EXITING) or self.state in ("Z", "X")


def stat(tid: int) -> Stat | None:
    """Parse /proc/TID/stat, or None if the task is gone."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 of proc(5).
    return Stat(
        state=fields[0].decode(),
        ppid=int(fields[1]),
        start=int(fields[19]),
        flags=int(fields[6]),
        exit_code=int(fields[49]) if len(fields) > 49 else 0,
    )


def tgid(tid: int) -> int:
    """The process (thread group) a thread belongs to; `tid` itself if unknown."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line[5:])
    except OSError:
        pass
    return tid


def command_name(pid: int) -> str:
    """The process's command name (`comm`), "" if it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def writers_of(tid: int, ino: int, suffix: str, at_most: int | None = None) -> int:
    """How many descriptors the process of TID has open for writing on the file
    numbered `ino` whose path ends with `suffix`, counting no further than
    `at_most`. Only /proc is read (the links' text and fdinfo), never the file
    itself: asking the mount from its own server would wait for itself. The cost
    grows with the process's descriptors: call it off the event loop."""
    base = f"/proc/{tid}"
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        return 0
    n = 0
    for fd in fds:
        try:
            if not os.readlink(f"{base}/fd/{fd}").endswith(suffix):
                continue
            with open(f"{base}/fdinfo/{fd}", "rb") as f:
                info = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
            if int(info[b"ino"]) == ino and int(info[b"flags"], 8) & (os.O_WRONLY | os.O_RDWR):
                n += 1
                if n == at_most:
                    break
        except (OSError, KeyError, ValueError):
            continue
    return n


def abnormal(exit_code: int) -> bool:
    """Killed by a signal, or exited with a non-zero status."""
    return exit_code != 0


def killed_by_signal(exit_code: int) -> bool:
    return (exit_code & 0x7F) != 0


def describe(exit_code: int) -> dict[str, int]:
    """An exit status as the log shows it: {"signal": N} or {"code": N}."""
    if exit_code & 0x7F:
        return {"signal": exit_code & 0x7F}
    return {"code": exit_code >> 8}


def explain(exit_code: int) -> str:
    """An exit status in words, for a `reason`."""
    if exit_code & 0x7F:
        return f"killed by signal {exit_code & 0x7F}"
    return f"exited with status {exit_code >> 8}"


def raise_nofile() -> None:
    """Allow as many open files as the hard limit (two stream files per agent)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


__all__ = [
    "Stat",
    "abnormal",
    "describe",
    "explain",
    "killed_by_signal",
    "stat",
    "tgid",
    "writers_of",
]
