"""A test agent that tries what an agent must not do outside the mount.

Each argument is one attempt, `WHAT:TARGET`; the result, one JSON object, maps
each attempt to "ok" or the errno's name, e.g. {"read:/root": "EACCES"}.
"""

import ctypes
import errno
import json
import mmap
import os
import platform
import socket
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {
    "x86_64": {"ptrace": 101, "pidfd_open": 434, "pidfd_getfd": 438, "vm_readv": 310},
    "aarch64": {"ptrace": 117, "pidfd_open": 434, "pidfd_getfd": 438, "vm_readv": 270},
}[platform.machine()] | {"io_uring_setup": 425, "io_uring_enter": 426}  # the same on both
PTRACE_ATTACH, PTRACE_DETACH = 16, 17


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def check(r: int) -> None:
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def attempt(what: str, target: str) -> None:
    if what == "read":
        if os.path.isdir(target):
            os.listdir(target)
        else:
            with open(target, "rb") as f:
                f.read(1)
    elif what == "write":
        with open(target, "w") as f:
            f.write("x")
    elif what == "connect":
        host, port = target.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()
    elif what == "bind":
        s = socket.socket()
        s.bind(("127.0.0.1", int(target)))
        s.close()
    elif what == "udp":
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
    elif what == "unix":
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
    elif what == "socketpair":
        a, b = socket.socketpair()
        a.close()
        b.close()
    elif what == "netlink":
        socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, int(target)).close()
    elif what == "ptrace":
        check(libc.syscall(NR["ptrace"], PTRACE_ATTACH, int(target), 0, 0))
        libc.syscall(NR["ptrace"], PTRACE_DETACH, int(target), 0, 0)
    elif what == "pidfd_getfd":
        pidfd = libc.syscall(NR["pidfd_open"], int(target), 0)
        check(pidfd)
        check(libc.syscall(NR["pidfd_getfd"], pidfd, 0, 0))
    elif what == "vm_readv":
        buf = ctypes.create_string_buffer(8)
        local = Iovec(ctypes.addressof(buf), 8)
        remote = Iovec(0x400000, 8)
        r = libc.syscall(
            NR["vm_readv"], int(target), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0
        )
        if r < 0 and ctypes.get_errno() not in (errno.EFAULT, errno.EIO):
            check(r)
    elif what == "mem":
        with open(f"/proc/{target}/mem", "rb"):
            pass
    elif what == "environ":
        with open(f"/proc/{target}/environ", "rb") as f:
            f.read(1)
    elif what == "signal":
        os.kill(int(target), 0)
    elif what == "uring_socket":  # a socket made without socket(2): DOMAIN,TYPE,PROTO
        domain, type_, proto = (int(x) for x in target.split(","))
        os.close(uring_socket(domain, type_, proto))
    elif what == "inotify":
        fd = libc.inotify_init1(0)
        check(fd)
        check(libc.inotify_add_watch(fd, target.encode(), 0xFFF))
    else:
        raise SystemExit(f"unknown attempt {what!r}")


def uring_socket(domain: int, type_: int, proto: int) -> int:
    """IORING_OP_SOCKET through a ring of one entry; the new descriptor."""
    params = ctypes.create_string_buffer(120)  # struct io_uring_params
    fd = libc.syscall(NR["io_uring_setup"], 4, params)
    check(fd)
    try:
        entries = struct.unpack_from("2I", params.raw, 0)
        sq = struct.unpack_from("7IIQ", params.raw, 40)  # head tail mask entries ... array
        cq = struct.unpack_from("7IIQ", params.raw, 80)  # head tail mask entries overflow cqes
        size = max(sq[6] + entries[0] * 4, cq[5] + entries[1] * 16)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        ring = mmap.mmap(fd, size, mmap.MAP_SHARED, rw, offset=0)
        sqes = mmap.mmap(fd, entries[0] * 64, mmap.MAP_SHARED, rw, offset=0x10000000)
        sqe = bytearray(64)
        struct.pack_into("BBHi", sqe, 0, 45, 0, 0, domain)  # IORING_OP_SOCKET; fd: domain
        struct.pack_into("Q", sqe, 8, type_)
        struct.pack_into("I", sqe, 24, proto)
        sqes[0:64] = bytes(sqe)
        tail, mask = struct.unpack_from("2I", ring, sq[1])
        struct.pack_into("I", ring, sq[6] + (tail & mask) * 4, 0)
        struct.pack_into("I", ring, sq[1], tail + 1)
        check(libc.syscall(NR["io_uring_enter"], fd, 1, 1, 1, None, 0))  # GETEVENTS
        head = struct.unpack_from("I", ring, cq[0])[0]
        cmask = struct.unpack_from("I", ring, cq[2])[0]
        res = struct.unpack_from("QiI", ring, cq[5] + (head & cmask) * 16)[1]
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        return int(res)
    finally:
        os.close(fd)


def main() -> None:
    out = {}
    for arg in sys.argv[1:]:
        what, _, target = arg.partition(":")
        target = os.path.expandvars(target)
        try:
            attempt(what, target)
            out[arg] = "ok"
        except OSError as e:
            out[arg] = errno.errorcode.get(e.errno or 0, str(e))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
