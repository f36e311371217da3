"""What an agent's processes may not do to hide their descent.

Identity follows the kernel's fork events, which name a child's real parent.
`clone(CLONE_PARENT)` makes the caller's parent the child's parent: from an
agent's first process (whose parent is the server or the operator's shell) it
would give a child that descends from no agent. So every agent process runs
under a seccomp filter, installed before exec and inherited by everything it
starts, that refuses `clone` with CLONE_PARENT (EPERM) and `clone3` (ENOSYS,
whose flags a filter cannot see; C libraries then fall back to `clone`).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from collections.abc import Callable

PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
CLONE_PARENT = 0x00008000
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
EPERM, ENOSYS = 1, 38

# BPF: LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, JMP|JGE|K, RET|K
LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
NR, ARCH, ARG0 = 0, 4, 16  # offsets in struct seccomp_data (little-endian)

# arch -> (audit arch, clone, clone3)
ARCHES = {
    "x86_64": [(0xC000003E, 56, 435), (0x40000003, 120, 435)],  # x86-64, i386
    "aarch64": [(0xC00000B7, 220, 435)],
}
X32_BIT = 0x40000000


def _program(arches: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """A block per architecture; a call of another architecture skips it."""
    prog: list[tuple[int, int, int, int]] = []
    for audit, clone, clone3 in arches:
        block = [(LD, 0, 0, NR)]
        if audit == 0xC000003E:  # x86-64: its x32 ABI is refused whole
            block += [(JGE, 0, 1, X32_BIT), (RET, 0, 0, RET_ERRNO | ENOSYS)]
        block += [
            (JEQ, 0, 1, clone3),
            (RET, 0, 0, RET_ERRNO | ENOSYS),
            (JEQ, 0, 3, clone),
            (LD, 0, 0, ARG0),
            (JSET, 0, 1, CLONE_PARENT),
            (RET, 0, 0, RET_ERRNO | EPERM),
            (RET, 0, 0, RET_ALLOW),
        ]
        prog += [(LD, 0, 0, ARCH), (JEQ, 0, len(block), audit), *block]
    prog.append((RET, 0, 0, RET_ALLOW))
    return prog


def installer() -> Callable[[], bool]:
    """A function that installs the filter in the process calling it, for its
    exec'd program and all its descendants. Everything is prepared here, so the
    function only makes system calls (it runs between fork and exec)."""
    arches = ARCHES.get(platform.machine())
    if not arches:
        return lambda: False
    prog = _program(arches)
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    fprog = ctypes.create_string_buffer(
        struct.pack("HxxxxxxP", len(prog), ctypes.addressof(filters))
    )
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    zero, one = ctypes.c_ulong(0), ctypes.c_ulong(1)
    mode, ref = ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog)
    need_nnp = os.geteuid() != 0  # without CAP_SYS_ADMIN the kernel asks for no_new_privs

    def install() -> bool:
        _keep = (filters, fprog)  # alive as long as this function
        if need_nnp:
            prctl(PR_SET_NO_NEW_PRIVS, one, zero, zero, zero)
        return bool(prctl(PR_SET_SECCOMP, mode, ref, zero, zero) == 0) and bool(_keep)

    return install


def forbid_clone_parent() -> bool:
    """Install the filter in this process now."""
    return installer()()
