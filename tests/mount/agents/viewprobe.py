"""A test agent for views [SPEC §6]: runs file operations on request and reports
what each one gave, so that a test can see the mount through an agent's eyes.

Driven over two FIFOs outside the mount, named by $PROBE_IN and $PROBE_OUT: each
line read from PROBE_IN is a JSON list of operations, and the answer is one JSON
line on PROBE_OUT with one result per operation. EOF on PROBE_IN ends the probe.
With `--ops JSON` it runs that list once and prints the results (used after exec).

An operation is a list [NAME, ARG...]; its result is "OK", a value (listdir,
mode, take, ids, ...) or the errno name it failed with (e.g. "ENOENT"); any
other failure is "error: ..." rather than the end of the probe.

    stat P | lstat P | mode P (st_mode & 0o777) | listdir P (sorted)
    read P | write P        open O_RDONLY / O_WRONLY (with O_NONBLOCK), then close
    mkdir P | rmdir P | unlink P | truncate P (to 0)
    rename P Q | link P Q | symlink TARGET P
    access P MODE           os.access with MODE "r", "w" or "rw": a bool
    send P TEXT             open P for writing, write TEXT, close
    take                    read one message from $OUTHEIS_MOUNT/agents/$OUTHEIS_AGENT/inbox
                            and hold it in flight (the inbox stays open): the message
    done                    close the inbox held by `take` (acknowledges the message)
    ids                     {"pid", "tid", "ppid", "sid"} of the caller
    thread OPS              run OPS in a second thread
    fork OPS                run OPS in a forked child
    exec OPS                fork, exec this script with --ops OPS
    spawn OPS               the same through subprocess (vfork or posix_spawn)
    cmd ARGV                run a command: {"rc", "stdout", "stderr"}
    daemon OPS              fork, setsid, fork again; the grandchild waits until its
                            parent is gone (re-parented), then execs --ops OPS
    thread_exec OPS         fork a child whose second thread execs --ops OPS;
                            the result is {"tid": the thread's id, "results": ...}
    orphan OPS FILE         fork a child that waits until this process has ended,
                            then runs OPS and writes the results to FILE
    exit                    (alone on its line) answer "OK", then exit with status 0
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.abspath(__file__)
held: dict[str, int] = {}  # "inbox" -> the fd `take` keeps open


def err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def run_ops(ops: list[Any]) -> list[Any]:
    return [run_op(op) for op in ops]


def run_op(op: list[Any]) -> Any:
    name, args = op[0], op[1:]
    try:
        return OPS[name](*args)
    except OSError as e:
        return err(e)
    except Exception as e:
        return f"error: {e!r}"


def _open_close(path: str, flags: int) -> str:
    os.close(os.open(path, flags | os.O_NONBLOCK))
    return "OK"


def _ok(fn: Any, *args: Any) -> str:
    fn(*args)
    return "OK"


def _send(path: str, text: str) -> str:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return "OK"


def _take() -> Any:
    if "inbox" not in held:
        mount, me = os.environ["OUTHEIS_MOUNT"], os.environ["OUTHEIS_AGENT"]
        held["inbox"] = os.open(f"{mount}/agents/{me}/inbox", os.O_RDONLY)
    return json.loads(os.read(held["inbox"], 1 << 21))


def _done() -> str:
    os.close(held.pop("inbox"))
    return "OK"


def _ids() -> dict[str, int]:
    return {
        "pid": os.getpid(),
        "tid": threading.get_native_id(),
        "ppid": os.getppid(),
        "sid": os.getsid(0),
    }


def _access(path: str, mode: str) -> bool:
    bits = (os.R_OK if "r" in mode else 0) | (os.W_OK if "w" in mode else 0)
    return os.access(path, bits)


def _thread(ops: list[Any]) -> list[Any]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.extend(run_ops(ops)))
    t.start()
    t.join()
    return out


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    os.close(fd)
    return data


def _fork(ops: list[Any]) -> Any:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.write(w, json.dumps(run_ops(ops)).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = _read_all(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def _exec_self(ops: list[Any], out_fd: int) -> None:
    """In a child: exec this script with --ops, its stdout going to out_fd."""
    os.dup2(out_fd, 1)
    os.execv(sys.executable, [sys.executable, HERE, "--ops", json.dumps(ops)])


def _exec(ops: list[Any]) -> Any:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _exec_self(ops, w)
        finally:
            os._exit(127)
    os.close(w)
    data = _read_all(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def _spawn(ops: list[Any]) -> Any:
    cmd = [sys.executable, HERE, "--ops", json.dumps(ops)]
    return json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout)


def _cmd(argv: list[str]) -> dict[str, Any]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def _wait_orphaned(parent: int) -> None:
    deadline = time.monotonic() + 10
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.005)


def _daemon(ops: list[Any]) -> Any:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            middle = os.getpid()
            if os.fork() == 0:
                _wait_orphaned(middle)
                _exec_self(ops, w)
        finally:
            os._exit(0)  # the middle process ends at once; the grandchild only if exec failed
    os.close(w)
    os.waitpid(pid, 0)
    return json.loads(_read_all(r))


def _thread_exec(ops: list[Any]) -> Any:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)

            def then_exec() -> None:
                os.write(w, json.dumps(threading.get_native_id()).encode() + b"\n")
                _exec_self(ops, w)

            t = threading.Thread(target=then_exec)
            t.start()
            t.join()
        finally:
            os._exit(127)
    os.close(w)
    data = _read_all(r)
    os.waitpid(pid, 0)
    first, _, rest = data.partition(b"\n")
    return {"tid": json.loads(first), "results": json.loads(rest) if rest else None}


def _orphan(ops: list[Any], path: str) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            _wait_orphaned(parent)
            data = json.dumps({"ids": _ids(), "results": run_ops(ops)})
            with open(path + ".tmp", "w") as f:
                f.write(data)
            os.rename(path + ".tmp", path)
        finally:
            os._exit(0)
    return pid


OPS: dict[str, Any] = {
    "stat": lambda p: _ok(os.stat, p),
    "lstat": lambda p: _ok(os.lstat, p),
    "mode": lambda p: os.stat(p).st_mode & 0o777,
    "listdir": lambda p: sorted(os.listdir(p)),
    "read": lambda p: _open_close(p, os.O_RDONLY),
    "write": lambda p: _open_close(p, os.O_WRONLY),
    "mkdir": lambda p: _ok(os.mkdir, p),
    "rmdir": lambda p: _ok(os.rmdir, p),
    "unlink": lambda p: _ok(os.unlink, p),
    "truncate": lambda p: _ok(os.truncate, p, 0),
    "rename": lambda p, q: _ok(os.rename, p, q),
    "link": lambda p, q: _ok(os.link, p, q),
    "symlink": lambda t, p: _ok(os.symlink, t, p),
    "access": _access,
    "send": _send,
    "take": _take,
    "done": _done,
    "ids": _ids,
    "thread": _thread,
    "fork": _fork,
    "exec": _exec,
    "spawn": _spawn,
    "cmd": _cmd,
    "daemon": _daemon,
    "thread_exec": _thread_exec,
    "orphan": _orphan,
}


def serve(path_in: str, path_out: str) -> None:
    with open(path_in) as inp, open(path_out, "w") as out:
        for line in inp:
            ops = json.loads(line)
            if ops == [["exit"]]:
                out.write('["OK"]\n')
                out.flush()
                return
            out.write(json.dumps(run_ops(ops)) + "\n")
            out.flush()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--ops":
        sys.stdout.write(json.dumps(run_ops(json.loads(sys.argv[2]))))
        sys.stdout.flush()
        return
    serve(os.environ["PROBE_IN"], os.environ["PROBE_OUT"])


if __name__ == "__main__":
    main()
