#!/usr/bin/env python3
"""notes, in Python: the owner of the vault's `notes` domain.

Only the owner knows who may read what of its domain, so others ask it by
message, and it answers by changing their view through its own ctl:

  {"want": "projects"}  ->  `grant FROM /vault/notes/projects r`, then the reply
                           {"granted": "/vault/notes/projects", ...}
  {"done": "projects"}  ->  `revoke FROM /vault/notes/projects` (no reply)

A folder not named in $SHARE (comma-separated) is refused, with the reason. A
grant is only ever `r`: the domain keeps its one writer. The grant is an event
in the log, so it lasts across restarts until it is revoked.
"""

import json
import os
from pathlib import Path

DOMAIN = Path(os.environ["OUTHEIS_MOUNT"]) / "vault" / "notes"
SHARE = {f for f in os.environ.get("SHARE", "").split(",") if f}
SEED = {
    "projects/launch.md": "# Launch\nship on monday\ntell the users\n",
    "projects/budget.md": "# Budget\n1200 EUR\n",
    "private/diary.md": "# Diary\nnot for planners\n",
}


def seed() -> None:
    """Something to share: the domain's first files (the owner alone may write them)."""
    for name, text in SEED.items():
        path = DOMAIN / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def why(e: OSError) -> str:
    """A refused write gives only an errno; the reason is the last line of errors."""
    try:
        return json.loads(Path("errors").read_text().splitlines()[-1])["why"]
    except (OSError, IndexError, ValueError, KeyError):
        return str(e.strerror)


def command(line: str) -> str | None:
    """Write one command to the own ctl; None if done, else why it was refused."""
    try:
        with open("ctl", "w") as ctl:
            ctl.write(line + "\n")
    except OSError as e:
        return why(e)
    return None


def messages(fd: int):
    while True:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return
            line += chunk
        yield json.loads(line)


def answer(msg: dict) -> dict | None:
    body = msg["body"] if isinstance(msg["body"], dict) else {}
    asker = msg["from"]
    folder = str(body.get("want") or body.get("done") or "")
    path = f"/vault/notes/{folder}"
    if not folder or "/" in folder or folder.startswith("."):
        return {"refused": folder, "why": 'ask {"want": FOLDER} for one folder of notes'}
    if "done" in body:
        failed = command(f"revoke {asker} {path}")
        if failed:
            print(f"notes: revoke {asker} {path}: {failed}", flush=True)
        return None
    if folder not in SHARE:
        return {"refused": path, "why": f"notes does not share {folder}", **body}
    failed = command(f"grant {asker} {path} r")
    if failed:
        return {"refused": path, "why": failed, **body}
    return {"granted": path, **body}


def main() -> None:
    seed()
    inbox = os.open("inbox", os.O_RDONLY)
    outbox = os.open("outbox", os.O_WRONLY)
    for msg in messages(inbox):
        reply = answer(msg)
        if reply is not None:
            os.write(outbox, json.dumps({"reply_to": msg["id"], "body": reply}).encode() + b"\n")


if __name__ == "__main__":
    main()
