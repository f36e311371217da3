"""A test agent with explicit acks: answers each message, then acks it by id.

Bodies: "slow" (work 2 s before answering and acking, saying `progress`
every 0.4 s), "crash" (exit with
status 3 while holding the message). The answer says who took the message and
how its ack went: {"got", "id", "attempt", "instance", "pid", "ack"}.
"""

import errno
import json
import os
import sys
import time


def main() -> None:
    inbox = os.open("inbox", os.O_RDONLY)
    outbox = os.open("outbox", os.O_WRONLY)
    ctl = os.open("ctl", os.O_WRONLY)
    while True:
        msg = json.loads(os.read(inbox, 1 << 21))
        if msg["body"] == "crash":
            sys.exit(3)
        if msg["body"] == "slow":
            for _ in range(5):
                time.sleep(0.4)
                try:
                    os.write(ctl, f"progress {msg['id']}\n".encode())
                except OSError:
                    break  # taken back: the ack below tells
        try:
            os.write(ctl, f"ack {msg['id']}\n".encode())
            ack = "ok"
        except OSError as e:
            ack = errno.errorcode[e.errno or 0]
        answer = {
            "got": msg["body"],
            "id": msg["id"],
            "attempt": msg["attempt"],
            "instance": os.environ.get("OUTHEIS_INSTANCE"),
            "pid": os.getpid(),
            "ack": ack,
        }
        os.write(outbox, json.dumps({"to": "user", "body": answer}).encode() + b"\n")


if __name__ == "__main__":
    main()
