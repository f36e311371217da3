"""The kernel's Landlock LSM through its three system calls, by ctypes.

A ruleset lists what a process may still do once it restricts itself; the
restriction holds for the process and everything it starts, and can only be
narrowed further. The ruleset is built in the server (paths opened, rules
added) and the child only calls `landlock_restrict_self` between fork and exec.

Each ABI version adds rights; a ruleset handles only those the kernel knows,
so on an older kernel the rest stays unrestricted (`best-effort`).
"""

from __future__ import annotations

import ctypes
import os
import struct

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # the same on every arch
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights (ABI 1 unless said).
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # the rest apply to folders

# Network rights (ABI 4) and scopes (ABI 6).
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

ABI_NET, ABI_SCOPES = 4, 6
ABI_FULL = ABI_SCOPES  # what `confine = "required"` asks of the kernel
PRETEND_ENV = "OUTHEISFS_LANDLOCK_ABI"  # at most this ABI: to try older kernels' behaviour

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class LandlockError(OSError):
    pass


def fs_rights(abi: int) -> int:
    """Every filesystem right that ABI version `abi` knows."""
    if abi < 1:
        return 0
    last = {1: MAKE_SYM, 2: REFER, 3: TRUNCATE, 4: TRUNCATE}.get(abi, IOCTL_DEV)
    return (last << 1) - 1


def kernel_abi() -> int:
    """The kernel's Landlock ABI version, 0 without Landlock."""
    v = int(_syscall(ctypes.c_long(SYS_CREATE_RULESET), None, ctypes.c_size_t(0), 1))
    return max(v, 0)


def abi() -> int:
    """The ABI this server uses: the kernel's, or less when told to pretend."""
    real = kernel_abi()
    pretend = os.environ.get(PRETEND_ENV)
    if pretend is not None and pretend.isdigit():
        return min(real, int(pretend))
    return real


class Ruleset:
    """One ruleset being built; `restrict()` applies it to the calling process."""

    def __init__(self, abi: int, *, net: bool) -> None:
        self.abi = abi
        self.fs = fs_rights(abi)
        self.net = NET_BIND_TCP | NET_CONNECT_TCP if net and abi >= ABI_NET else 0
        self.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= ABI_SCOPES else 0
        size = 8 if abi < ABI_NET else 16 if abi < ABI_SCOPES else 24
        self._attr = ctypes.create_string_buffer(
            struct.pack("QQQ", self.fs, self.net, self.scoped)[:size]
        )
        fd = int(_syscall(ctypes.c_long(SYS_CREATE_RULESET), self._attr, ctypes.c_size_t(size), 0))
        if fd < 0:
            e = ctypes.get_errno()
            raise LandlockError(e, f"landlock_create_ruleset: {os.strerror(e)}")
        self.fd = fd

    def allow_path(self, path: str, access: int) -> None:
        """Allow `access` beneath `path` (or on the file `path`)."""
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            access &= self.fs
            if not os.path.isdir(f"/proc/self/fd/{fd}"):
                access &= FILE_RIGHTS
            if not access:
                return
            attr = struct.pack("=Qi", access, fd)
            self._add(RULE_PATH_BENEATH, attr, path)
        finally:
            os.close(fd)

    def allow_port(self, port: int, access: int) -> None:
        access &= self.net
        if access:
            self._add(RULE_NET_PORT, struct.pack("QQ", access, port), f"port {port}")

    def _add(self, kind: int, attr: bytes, what: str) -> None:
        buf = ctypes.create_string_buffer(attr)
        r = _syscall(ctypes.c_long(SYS_ADD_RULE), self.fd, kind, buf, 0)
        if r < 0:
            e = ctypes.get_errno()
            raise LandlockError(e, f"landlock_add_rule {what}: {os.strerror(e)}")

    def restrict(self) -> bool:
        """Restrict the calling process (only system calls: runs between fork and exec)."""
        _libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0)  # or CAP_SYS_ADMIN needed
        return bool(_syscall(ctypes.c_long(SYS_RESTRICT_SELF), self.fd, 0) == 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
