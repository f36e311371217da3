#!/usr/bin/env python3
"""A worker of a pool that sizes itself: one job per message, answered to its sender.

Each job takes WORK_SECONDS (sleeping stands for the work, so more workers make
more jobs per second even on one core). The answer says which instance did it.
"""

import json
import os
import time

WORK_SECONDS = float(os.environ.get("WORK_SECONDS", "0.05"))


def main() -> None:
    inbox = os.open("inbox", os.O_RDONLY)  # one open file: the next read acks the last job
    outbox = os.open("outbox", os.O_WRONLY)
    while True:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(inbox, 1 << 20)
            if not chunk:
                return
            line += chunk
        msg = json.loads(line)
        time.sleep(WORK_SECONDS)  # the work
        answer = {"job": msg["body"], "instance": int(os.environ["OUTHEIS_INSTANCE"])}
        # No "to": the answer goes back to whoever sent the job.
        os.write(outbox, json.dumps({"body": answer}).encode() + b"\n")


if __name__ == "__main__":
    main()
