#!/usr/bin/env python3
"""worker, in Python: one of a pool (`instances = 3`) sharing one inbox.

Each message goes to exactly one of the processes that read the inbox. A job
is a text (or {"job": text, "for": name} from intake); the answer counts its
words and says which process did the work.
"""

import json
import os
import time

WORK_SECONDS = float(os.environ.get("WORK_SECONDS", "0.05"))


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
        body = msg["body"]
        job = body.get("job") if isinstance(body, dict) else body
        time.sleep(WORK_SECONDS)  # the work
        answer = {
            "words": len(str(job).split()),
            "instance": int(os.environ["OUTHEIS_INSTANCE"]),
            "pid": os.getpid(),
        }
        if isinstance(body, dict) and "for" in body:
            answer["for"] = body["for"]
        # No "to": a reply to the message this process holds, even with the
        # other instances holding theirs.
        os.write(outbox, json.dumps({"body": answer}).encode() + b"\n")
        # What an agent prints goes to agents/worker/output, stamped per line.
        print(f"job of {msg['from']}: {answer['words']} words", flush=True)


if __name__ == "__main__":
    main()
