"""The seccomp filter every agent process runs under, beside its Landlock ruleset.

Installed before exec and inherited by everything an agent's process starts, it
refuses what would let an agent hide its descent, forge the server's view of
processes, reach other processes, or watch the mount:

- `clone` with CLONE_PARENT (EPERM) and `clone3` (ENOSYS, whose flags a filter
  cannot see; C libraries then fall back to `clone`). Identity follows the
  kernel's fork events, which name a child's real parent: CLONE_PARENT from an
  agent's first process would give a child that descends from no agent.
- netlink connector sockets (EACCES): the server learns forks and exits from
  the kernel's process-events connector, and a process that can open one can
  also send on it.
- `ptrace`, `process_vm_readv`/`writev`, `pidfd_getfd`, `kcmp` (EPERM): no
  agent reads, writes or steals from another process, even where Landlock is
  off or too old to scope it (Landlock already refuses tracing a process
  outside the tracer's domain).
- `inotify_*` and `fanotify_*` (EPERM): a watch on a folder of the mount would
  name entries the agent may not see. Tools fall back to polling (`tail -f`).
- `io_uring_setup`, `io_uring_enter`, `io_uring_register` (ENOSYS, as on a
  kernel without io_uring, so programs fall back to plain system calls): a ring
  does its work without the system calls this filter sees (IORING_OP_SOCKET
  makes any socket, a netlink connector one included). Landlock still rules
  what a ring would open or connect to; the filter's socket rules would not hold.
- Unless the agent has `net = "all"`: every socket but a TCP one (EACCES).
  Landlock (up to ABI 7) rules TCP ports but neither UDP, raw, packet or
  netlink sockets (a root agent could reconfigure the host's network), nor
  connecting to a UNIX socket file; `socketpair` stays allowed.

The x32 ABI is refused whole, and i386's `socketcall` (whose arguments a filter
cannot see) too.

With the filter, the capabilities that reach past any filesystem or process rule
(loading kernel modules, raw I/O, `bpf`, administration, ...) leave the bounding
set: a root agent's programs start without them, and nothing gets them back. The
process also gets `no_new_privs`: no setuid program or file capability widens it.
"""

from __future__ import annotations

import ctypes
import platform
import struct
from collections.abc import Callable
from dataclasses import dataclass

PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
CLONE_PARENT = 0x00008000
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
EPERM, EACCES, ENOSYS = 1, 13, 38
AF_UNIX, AF_INET, AF_NETLINK, AF_INET6 = 1, 2, 16, 10
SOCK_STREAM, SOCK_TYPE_MASK = 1, 0xF
IPPROTO_TCP = 6
NETLINK_CONNECTOR = 11

# BPF: LD|W|ABS, ALU|AND|K, JMP|JEQ|K, JMP|JSET|K, JMP|JGE|K, RET|K
LD, AND, JEQ, JSET, JGE, RET = 0x20, 0x54, 0x15, 0x45, 0x35, 0x06
NR, ARCH = 0, 4  # offsets in struct seccomp_data (little-endian)
ARG = (16, 24, 32)  # low words of the first three arguments
X32_BIT = 0x40000000
AUDIT_X86_64 = 0xC000003E

# Capabilities no agent keeps (numbers of linux/capability.h): DAC_READ_SEARCH
# (open_by_handle_at), NET_ADMIN, NET_RAW, IPC_OWNER, SYS_MODULE, SYS_RAWIO,
# SYS_PTRACE, SYS_PACCT, SYS_ADMIN, SYS_BOOT, SYS_TIME, SYS_TTY_CONFIG, MKNOD,
# AUDIT_CONTROL, MAC_OVERRIDE, MAC_ADMIN, SYSLOG, WAKE_ALARM, BLOCK_SUSPEND,
# AUDIT_READ, PERFMON, BPF, CHECKPOINT_RESTORE.
DROPPED_CAPS = (2, 12, 13, 15, 16, 17, 19, 20, 21, 22, 25, 26, 27, 30, 32, 33, 34, 35, 36,
                37, 38, 39, 40)  # fmt: skip


@dataclass(frozen=True)
class Arch:
    audit: int
    clone: int
    clone3: int
    socket: int
    refused: tuple[int, ...]  # EPERM: ptrace and friends, inotify, fanotify
    gone: tuple[int, ...] = ()  # ENOSYS


# io_uring_setup, _enter, _register (one number on every architecture): a ring
# makes sockets, connects and opens without the system calls the filter sees.
URING = (425, 426, 427)

ARCHES = {
    "x86_64": [
        # ptrace, process_vm_readv/writev, kcmp, pidfd_getfd; inotify_init/_add_watch/_init1;
        # fanotify_init/_mark
        Arch(AUDIT_X86_64, 56, 435, 41, (101, 310, 311, 312, 438, 253, 254, 294, 300, 301), URING),
        Arch(  # i386
            0x40000003,
            120,
            435,
            359,
            (26, 347, 348, 349, 438, 291, 292, 332, 338, 339),
            (102, *URING),
        ),
    ],
    "aarch64": [
        Arch(0xC00000B7, 220, 435, 198, (117, 270, 271, 272, 438, 26, 27, 262, 263), URING)
    ],
}

Insn = tuple[int, int | str, int | str, int]  # code, jt, jf, k; jumps may name a label


def _block(a: Arch, net_all: bool, n: int) -> list[Insn | str]:
    """The checks for one architecture; labels are suffixed with `n`."""
    nxt, deny, gone, refuse, ok = (f"{x}{n}" for x in ("next", "eperm", "enosys", "eacces", "ok"))
    prog: list[Insn | str] = [(LD, 0, 0, ARCH), (JEQ, 0, nxt, a.audit), (LD, 0, 0, NR)]
    if a.audit == AUDIT_X86_64:
        prog.append((JGE, gone, 0, X32_BIT))
    prog += [(JEQ, gone, 0, a.clone3), (JEQ, f"clone{n}", 0, a.clone)]
    prog += [(JEQ, deny, 0, nr) for nr in a.refused]
    prog += [(JEQ, gone, 0, nr) for nr in a.gone]
    prog += [(JEQ, f"socket{n}", ok, a.socket)]
    prog += [f"clone{n}", (LD, 0, 0, ARG[0]), (JSET, deny, ok, CLONE_PARENT)]
    prog += [f"socket{n}", (LD, 0, 0, ARG[0])]
    if net_all:
        prog += [(JEQ, 0, ok, AF_NETLINK), (LD, 0, 0, ARG[2]), (JEQ, refuse, ok, NETLINK_CONNECTOR)]
    else:
        prog += [
            (JEQ, f"ip{n}", 0, AF_INET),
            (JEQ, f"ip{n}", refuse, AF_INET6),
            f"ip{n}",
            (LD, 0, 0, ARG[1]),
            (AND, 0, 0, SOCK_TYPE_MASK),
            (JEQ, 0, refuse, SOCK_STREAM),
            (LD, 0, 0, ARG[2]),
            (JEQ, ok, 0, 0),
            (JEQ, ok, refuse, IPPROTO_TCP),
        ]
    prog += [
        ok,
        (RET, 0, 0, RET_ALLOW),
        deny,
        (RET, 0, 0, RET_ERRNO | EPERM),
        gone,
        (RET, 0, 0, RET_ERRNO | ENOSYS),
        refuse,
        (RET, 0, 0, RET_ERRNO | EACCES),
        nxt,
    ]
    return prog


def _assemble(items: list[Insn | str]) -> list[tuple[int, int, int, int]]:
    """Resolve label names in jumps to the offsets BPF wants."""
    where: dict[str, int] = {}
    insns: list[Insn] = []
    for item in items:
        if isinstance(item, str):
            where[item] = len(insns)
        else:
            insns.append(item)
    out = []
    for i, (code, jt, jf, k) in enumerate(insns):
        t = where[jt] - i - 1 if isinstance(jt, str) else jt
        f = where[jf] - i - 1 if isinstance(jf, str) else jf
        assert 0 <= t < 256 and 0 <= f < 256
        out.append((code, t, f, k))
    return out


def program(arches: list[Arch], net_all: bool) -> list[tuple[int, int, int, int]]:
    """A block per architecture; a call of another architecture skips it."""
    items: list[Insn | str] = []
    for n, a in enumerate(arches):
        items += _block(a, net_all, n)
    items.append((RET, 0, 0, RET_ALLOW))
    return _assemble(items)


def installer(*, net_all: bool = True) -> Callable[[], bool]:
    """A function that installs the filter in the process calling it, for its
    exec'd program and all its descendants. Everything is prepared here, so the
    function only makes system calls (it runs between fork and exec).
    `net_all` False also refuses every socket but TCP."""
    arches = ARCHES.get(platform.machine())
    if not arches:
        return lambda: False
    prog = program(arches, net_all)
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    fprog = ctypes.create_string_buffer(
        struct.pack("HxxxxxxP", len(prog), ctypes.addressof(filters))
    )
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    zero, one = ctypes.c_ulong(0), ctypes.c_ulong(1)
    mode, ref = ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog)
    drop, caps = ctypes.c_ulong(PR_CAPBSET_DROP), [ctypes.c_ulong(c) for c in DROPPED_CAPS]

    def install() -> bool:
        _keep = (filters, fprog)  # alive as long as this function
        prctl(PR_SET_NO_NEW_PRIVS, one, zero, zero, zero)
        ok = prctl(PR_SET_SECCOMP, mode, ref, zero, zero) == 0
        for cap in caps:  # needs CAP_SETPCAP: done by a root server, skipped otherwise
            prctl(drop, cap, zero, zero, zero)
        return ok and bool(_keep)

    return install
