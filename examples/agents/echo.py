#!/usr/bin/env python3
"""py-echo, in Python: answers every message with its body.

One read of the inbox returns one whole message (a line), and blocks while the
inbox is empty. The next read acknowledges the message before it, so a message
in hand when this process dies is delivered again.
"""

import json
import os


def messages(fd: int):
    while True:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return
            line += chunk
        yield json.loads(line)


def main() -> None:
    inbox = os.open("inbox", os.O_RDONLY)
    outbox = os.open("outbox", os.O_WRONLY)
    for msg in messages(inbox):
        # No "to": a reply to the message in hand, sent back to its sender.
        os.write(outbox, json.dumps({"body": msg["body"]}).encode() + b"\n")


if __name__ == "__main__":
    main()
