#!/usr/bin/env python3
"""answerer, in Python: drafts an answer to a customer's question.

It looks in the knowledge base (vault/kb, which it may read) for the article
that shares the most words with the question. With OPENAI_BASE_URL and
OPENAI_API_KEY set, a language model behind that OpenAI-compatible chat
endpoint writes the answer from the article (OPENAI_MODEL, default
gpt-4o-mini); without them, or if the call fails, a small deterministic
stand-in quotes the article, so the desk runs offline and in tests.

The answer goes to the customer's desk (the operator's mailbox). A question
the knowledge base does not cover is also sent to kb, which keeps a list of
open questions: agents ask the owner of a domain to change it, by message.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request
from pathlib import Path

KB = Path(os.environ["OUTHEIS_MOUNT"]) / "vault" / "kb"
WORD = re.compile(r"[a-z]{4,}")


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def best_article(question: str) -> tuple[str, str] | None:
    """(name, text) of the article sharing most words with the question."""
    best, score = None, 0
    for path in sorted(KB.glob("*.md")):
        if path.name == "open-questions.md":
            continue
        text = path.read_text()
        shared = len(words(question) & words(text))
        if shared > score:
            best, score = (path.stem, text), shared
    return best if score >= 2 else None


def stand_in(question: str, article: tuple[str, str] | None) -> str:
    if article is None:
        return "Thanks for asking. We do not know yet; a colleague will come back to you."
    lines = [line for line in article[1].splitlines() if line and not line.startswith("#")]
    return " ".join(lines)


def model(question: str, article: tuple[str, str] | None) -> str:
    base = os.environ["OPENAI_BASE_URL"].rstrip("/")
    context = article[1] if article else "(no article matches)"
    request = {
        "model": os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
        "messages": [
            {
                "role": "system",
                "content": "You answer customers of a shop in two sentences, only "
                "from this knowledge base article:\n" + context,
            },
            {"role": "user", "content": question},
        ],
    }
    req = urllib.request.Request(
        base + "/chat/completions",
        data=json.dumps(request).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
        },
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(json.load(r)["choices"][0]["message"]["content"]).strip()


def draft(question: str, article: tuple[str, str] | None) -> tuple[str, str]:
    """The answer and what wrote it."""
    if os.environ.get("OPENAI_BASE_URL") and os.environ.get("OPENAI_API_KEY"):
        try:
            return model(question, article), "model"
        except Exception as e:  # no network, a bad key: the stand-in answers
            print(f"model not reached ({e}); the stand-in answers", file=sys.stderr)
    return stand_in(question, article), "stand-in"


def main() -> None:
    inbox = open("inbox", "rb", buffering=0)
    with open("outbox", "w") as outbox:
        for line in inbox:
            msg = json.loads(line)
            req = msg["body"]
            question = req["text"]
            article = best_article(question)
            answer, writer = draft(question, article)
            body = {
                "ticket": req["ticket"],
                "customer": req["customer"],
                "by": "answerer",
                "answer": answer,
                "source": article[0] if article else None,
                "drafted_by": writer,
            }
            outbox.write(json.dumps({"to": "user", "body": body}) + "\n")
            if article is None:
                ask = {"missing": question, "ticket": req["ticket"]}
                outbox.write(json.dumps({"to": "kb", "body": ask}) + "\n")
            outbox.flush()
            print(f"ticket {req['ticket']}: answered by the {writer}", flush=True)


if __name__ == "__main__":
    main()
