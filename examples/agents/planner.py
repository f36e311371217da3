#!/usr/bin/env python3
"""planner, in Python: scatter a job over a pool, gather the replies, answer.

A request {"numbers": [...]} is split into one part per number, sent to the
`squarer` pool; the replies are gathered, and the sum of squares goes back to
whoever asked. It uses explicit acks (`ack = "explicit"` in the config): the
request and every reply stay in flight, unacked, until the answer is sent, so
a crash of the planner (or of the server) loses nothing: they are delivered
again, and the planner picks the job up where it was. What must not happen
twice (sending the parts) is written down in the vault before it happens.

  echo '{"body": {"numbers": [1, 2, 3]}}' > agents/planner/inbox
  head -n1 agents/user/inbox      # {"sum": 14, ...} from planner
"""

import json
import os
import sys
from pathlib import Path

MOUNT = Path(os.environ["OUTHEIS_MOUNT"])
PLANS = MOUNT / "vault" / "plans"  # owned by the planner (see [vault] in the config)


def why(e: OSError, mine: Path) -> str:
    """A refusal's reason: the errno, and the last line of the agent's errors file."""
    try:
        last = mine.read_text().splitlines()[-1]
        return f"{e.strerror}: {json.loads(last)['why']}"
    except (OSError, IndexError, ValueError, KeyError):
        return str(e.strerror)


class Planner:
    def __init__(self) -> None:
        self.outbox = os.open("outbox", os.O_WRONLY)
        self.ctl = os.open("ctl", os.O_WRONLY)
        self.jobs: dict[str, dict] = {}  # request id -> {"request": msg, "parts": {i: reply}}
        self.early: dict[str, list[dict]] = {}  # replies seen before their request

    def command(self, line: str) -> None:
        try:
            os.write(self.ctl, (line + "\n").encode())
        except OSError as e:
            print(f"planner: {line}: {why(e, Path('errors'))}", file=sys.stderr, flush=True)

    def send(self, lines: list[dict]) -> None:
        data = "".join(json.dumps(x) + "\n" for x in lines).encode()
        try:
            os.write(self.outbox, data)
        except OSError as e:
            print(f"planner: send refused: {why(e, Path('errors'))}", file=sys.stderr, flush=True)
            raise

    def request(self, msg: dict) -> None:
        job = msg["id"]
        numbers = msg["body"]["numbers"]
        self.jobs[job] = {"request": msg, "parts": {}}
        plan = PLANS / f"{job}.json"
        if not plan.exists() or not json.loads(plan.read_text())["sent"]:
            # Not scattered yet (or a crash came between sending and noting it:
            # then the parts go twice, and the duplicates are dropped below).
            parts = [
                {"to": "squarer", "body": {"job": job, "part": i, "n": n}}
                for i, n in enumerate(numbers)
            ]
            self.send(parts)  # one write: all parts or none
            tmp = plan.with_suffix(".tmp")
            tmp.write_text(json.dumps({"numbers": numbers, "from": msg["from"], "sent": True}))
            tmp.rename(plan)
        for reply in self.early.pop(job, []):
            self.part(reply)
        self.finish(job)

    def part(self, msg: dict) -> None:
        job = msg["body"]["job"]
        state = self.jobs.get(job)
        if state is None:
            self.early.setdefault(job, []).append(msg)
            return
        i = msg["body"]["part"]
        if i in state["parts"]:  # a duplicate (at-least-once): done with it
            self.command(f"ack {msg['id']}")
            return
        state["parts"][i] = msg
        self.finish(job)

    def finish(self, job: str) -> None:
        state = self.jobs[job]
        request = state["request"]
        numbers = request["body"]["numbers"]
        if len(state["parts"]) < len(numbers):
            return
        squares = [state["parts"][i]["body"]["square"] for i in range(len(numbers))]
        answer = {"sum": sum(squares), "squares": squares}
        self.send([{"reply_to": request["id"], "body": answer}])
        # Only now is anything acknowledged: the parts, then the request.
        for reply in state["parts"].values():
            self.command(f"ack {reply['id']}")
        self.command(f"ack {request['id']}")
        (PLANS / f"{job}.json").unlink(missing_ok=True)
        del self.jobs[job]

    def run(self) -> None:
        inbox = os.open("inbox", os.O_RDONLY)
        while True:
            msg = json.loads(os.read(inbox, 1 << 21))
            if msg["from"] == "squarer":
                self.part(msg)
            elif isinstance(msg["body"], dict) and isinstance(msg["body"].get("numbers"), list):
                self.request(msg)
            else:
                self.command(f'term {msg["id"]} not a request: give {{"numbers": [...]}}')


if __name__ == "__main__":
    Planner().run()
