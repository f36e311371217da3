#!/usr/bin/env python3
"""fetch, in Python: answers each message (a URL) with what the URL returns.

Run twice by examples/net.toml: `fetcher` may connect to one TCP port, and
`offline`, the same program without `net`, may not: the kernel refuses its
connect (EACCES), and it answers with that error and prints it to its output
log (the state folder's output/offline.log).
"""

import json
import os
import sys
import urllib.request


def fetch(url: str) -> dict[str, object]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return {"url": url, "status": r.status, "text": r.read(4096).decode(errors="replace")}
    except OSError as e:
        reason = getattr(e, "reason", e)  # urllib wraps the socket's error
        print(f"fetch {url}: refused: {reason}", file=sys.stderr, flush=True)
        return {"url": url, "error": str(reason)}


def main() -> None:
    inbox = os.open("inbox", os.O_RDONLY)
    outbox = os.open("outbox", os.O_WRONLY)
    while True:
        line = os.read(inbox, 1 << 20)
        if not line:
            return
        url = json.loads(line)["body"]
        os.write(outbox, json.dumps({"body": fetch(str(url))}).encode() + b"\n")


if __name__ == "__main__":
    main()
