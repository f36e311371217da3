"""Answers each message to its sender with its MODE, pid and instance (reload tests)."""

import json
import os
import time

WORK_SECONDS = float(os.environ.get("WORK_SECONDS", "0"))


def main() -> None:
    inbox = os.open("inbox", os.O_RDONLY)
    outbox = os.open("outbox", os.O_WRONLY)
    while True:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(inbox, 1 << 20)
            if not chunk:
                return
            line += chunk
        msg = json.loads(line)
        time.sleep(WORK_SECONDS)
        answer = {
            "job": msg["body"],
            "mode": os.environ.get("MODE", ""),
            "pid": os.getpid(),
            "instance": int(os.environ["OUTHEIS_INSTANCE"]),
        }
        os.write(outbox, json.dumps({"body": answer}).encode() + b"\n")


if __name__ == "__main__":
    main()
