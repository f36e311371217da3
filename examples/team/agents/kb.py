#!/usr/bin/env python3
"""kb, in Python: the owner of the knowledge base, vault/kb.

Only kb (and the operator) may change the domain; the others read it and ask
kb by message:
  {"missing": QUESTION, "ticket": ID}   noted in open-questions.md
  {"add": NAME, "text": TEXT}           written as NAME.md
On its first start it fills an empty domain with the articles next to this
file (examples/team/kb), which agents may read: the config's folder is.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

KB = Path(os.environ["OUTHEIS_MOUNT"]) / "vault" / "kb"
SEED = Path(os.environ["OUTHEIS_HOME"]) / "kb"
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")


def seed() -> None:
    if not any(KB.iterdir()):
        for article in sorted(SEED.glob("*.md")):
            (KB / article.name).write_text(article.read_text())


def handle(msg: dict[str, object]) -> str:
    body = msg["body"]
    if not isinstance(body, dict):
        return f"ignored a message from {msg['from']}: not a request"
    if "missing" in body:
        with open(KB / "open-questions.md", "a") as f:
            f.write(f"- {body['missing']} (ticket {body.get('ticket')}, from {msg['from']})\n")
        return f"noted an open question from {msg['from']}"
    name, text = body.get("add"), body.get("text")
    if isinstance(name, str) and NAME.fullmatch(name) and isinstance(text, str):
        (KB / f"{name}.md").write_text(text if text.endswith("\n") else text + "\n")
        return f"wrote {name}.md for {msg['from']}"
    return f"ignored a request from {msg['from']}: {body}"


def main() -> None:
    seed()
    with open("inbox", "rb", buffering=0) as inbox:
        for line in inbox:
            print(handle(json.loads(line)), flush=True)


if __name__ == "__main__":
    main()
