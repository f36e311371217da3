"""A test agent: answers each message with what it saw, and misbehaves on request.

Bodies, on their first attempt only: "hang" (hold the message and sleep),
"exit N" (exit with status N while holding the message). Anything else: answer
{"got", "attempt", "pid", "instance", "cwd", "env", "nice"}.
"""

import json
import os
import sys
import time


def main() -> None:
    print(f"probe {os.getpid()} starting", flush=True)
    print("probe stderr line", file=sys.stderr, flush=True)
    inbox = os.open("inbox", os.O_RDONLY)
    outbox = os.open("outbox", os.O_WRONLY)
    while True:
        line = os.read(inbox, 1 << 21)
        if not line:
            return
        msg = json.loads(line)
        body = msg["body"]
        if body == "hang" and msg["attempt"] == 1:
            time.sleep(1000)
        if isinstance(body, str) and body.startswith("exit ") and msg["attempt"] == 1:
            sys.exit(int(body.split()[1]))
        answer = {
            "got": body,
            "attempt": msg["attempt"],
            "pid": os.getpid(),
            "instance": os.environ.get("OUTHEIS_INSTANCE"),
            "cwd": os.getcwd(),
            "env": {
                k: v for k, v in os.environ.items() if k.startswith("OUTHEIS_") or k == "MODEL"
            },
            "nice": os.nice(0),
        }
        os.write(outbox, json.dumps({"body": answer}).encode() + b"\n")


if __name__ == "__main__":
    main()
