"""examples/team: the support desk, run end to end as its README walks through it
(offline: the answerer's stand-in), with shell tools [SPEC §12]."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server, outheisfs, sh, take, wait_for

pytestmark = pytest.mark.mount

TEAM = Path(__file__).parents[2] / "examples" / "team"
AGENTS = ["intake", "answerer", "refunds", "tracker", "kb"]


@pytest.fixture
def desk(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    for tool in ("node", "jq"):
        if shutil.which(tool) is None:
            pytest.fail(f"the example needs {tool}")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)  # the stand-in answers
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.config = TEAM / "outheis.toml"
    server.mount()
    wait_for(lambda: all(server.status(a)["state"] == "running" for a in AGENTS), timeout=20)
    return server


def by(messages: list[dict[str, Any]], who: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["from"] == who]


def output(server: Server, agent: str) -> str:
    return server.agent(agent, "output").read_text()


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_the_desk_end_to_end(desk: Server) -> None:
    m = desk.mp
    r = sh(
        f"""set -e
        echo 'How do I reset my password?' > {m}/agents/intake/inbox
        echo 'The app crashes when I upload a photo' > {m}/agents/intake/inbox
        echo 'Please refund 30 EUR, I was charged twice' > {m}/agents/intake/inbox
        echo 'URGENT: refund 500 EUR now' > {m}/agents/intake/inbox
        echo '{{"body": {{"customer": "bob", "text": "Do you ship to Mars?"}}}}' \
          > {m}/agents/intake/inbox
        echo 'hello there' > {m}/agents/intake/inbox
        """
    )
    assert r.returncode == 0, r.stderr
    # answers, a filed bug and the urgent copy reach the operator's mailbox
    got = take(desk, "user", 4, timeout=30)
    answers = {a["body"]["customer"]: a["body"] for a in by(got, "answerer")}
    assert (
        answers["user"]["source"] == "password" and "Forgot password" in answers["user"]["answer"]
    )
    assert answers["bob"]["source"] is None and answers["bob"]["drafted_by"] == "stand-in"
    (bug,) = by(got, "tracker")
    filed = json.loads((m / "vault" / "bugs" / f"{bug['body']['ticket']}.json").read_text())
    assert filed["text"] == "The app crashes when I upload a photo" and filed["status"] == "open"
    (urgent,) = by(got, "intake")
    assert urgent["topic"] == "desk" and urgent["body"]["amount"] == 500
    wait_for(lambda: "Mars" in text(m / "vault" / "kb" / "open-questions.md"), timeout=10)
    wait_for(lambda: "not routed (other)" in output(desk, "intake"), timeout=10)
    assert "no destination takes this message" in output(desk, "intake")
    # the two refunds wait at the gate; nothing was paid
    r = sh(f"head -n 2 {m}/approvals | jq -c '{{id, text: .body.text, amount: .body.amount}}'")
    held = [json.loads(line) for line in r.stdout.splitlines()]
    assert [h["amount"] for h in held] == [30, 500], r.stderr
    assert desk.status("refunds")["held"] == "2"
    assert not (m / "vault" / "payouts" / "ledger.jsonl").exists()
    r = sh(
        f"""set -e
        ids=($(head -n 2 {m}/approvals | jq -r .id))
        echo "approve ${{ids[0]}}" > {m}/ctl
        echo "reject ${{ids[1]}} over the limit for one refund" > {m}/ctl
        """
    )
    assert r.returncode == 0, r.stderr
    (paid,) = take(desk, "user", 1, timeout=20)
    assert paid["from"] == "refunds" and paid["body"]["paid"] == 30
    ledger = (m / "vault" / "payouts" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(x)["approved"] for x in ledger] == [held[0]["id"]]
    wait_for(lambda: "rejected: over the limit for one refund" in output(desk, "intake"), 10)
    r = outheisfs("trace", held[0]["id"], "--state", str(desk.state), "--json")
    kinds = [e["type"] for e in json.loads(r.stdout)["events"]]
    assert kinds[:4] == ["message", "held", "approved", "deliver"]
    # kill the answerer while a question waits: the answer still comes
    r = sh(
        f"""echo 'How long does delivery of my parcel take?' > {m}/agents/intake/inbox &&
        kill -9 $(awk '$1=="answerer"{{print $3}}' {m}/ctl)"""
    )
    assert r.returncode == 0, r.stderr
    (parcel,) = take(desk, "user", 1, timeout=30)
    assert parcel["body"]["source"] == "shipping" and "tracking number" in parcel["body"]["answer"]
    wait_for(lambda: desk.status("answerer")["state"] == "running", timeout=20)
    assert int(desk.status("answerer")["restarts"]) >= 1


def test_held_refunds_survive_a_killed_server(desk: Server) -> None:
    m = desk.mp
    sh(f"echo 'refund 12 EUR please' > {m}/agents/intake/inbox")
    wait_for(lambda: desk.status("refunds")["held"] == "1", timeout=20)
    # intake acknowledges its message when it reads the next: then nothing is in flight
    wait_for(lambda: desk.status("intake")["inflight"] == "0", timeout=20)
    desk.kill9()
    desk.mount()
    assert desk.status("refunds")["held"] == "1"
    r = sh(f"echo approve $(head -n 1 {m}/approvals | jq -r .id) > {m}/ctl")
    assert r.returncode == 0, r.stderr
    (paid,) = take(desk, "user", 1, timeout=30)
    assert paid["body"]["paid"] == 12
    # the same ticket again (as a redelivery would bring it): refunds pays it once
    line = json.dumps({"body": paid["body"] | {"amount": 12}})
    r = sh(f"echo '{line}' > {m}/agents/refunds/inbox && echo approve "
           f"$(head -n 1 {m}/approvals | jq -r .id) > {m}/ctl")  # fmt: skip
    assert r.returncode == 0, r.stderr
    (again,) = take(desk, "user", 1, timeout=30)
    assert "paid" not in again["body"] and "already" in again["body"]["answer"]
    assert len((m / "vault" / "payouts" / "ledger.jsonl").read_text().splitlines()) == 1


def test_the_answerer_asks_a_model_when_one_is_configured(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OpenAI-compatible endpoint (a local stand-in here) writes the answer."""
    seen: list[dict[str, Any]] = []

    class Chat(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers["Authorization"], **body})
            reply = {"choices": [{"message": {"content": "Parcels take 3-5 days."}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chat)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{httpd.server_port}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        server.config = TEAM / "outheis.toml"
        server.mount()
        q = "How long does delivery of my parcel take?"
        r = sh(f"echo '{q}' > {server.mp}/agents/intake/inbox")
        assert r.returncode == 0, r.stderr
        (answer,) = take(server, "user", 1, timeout=30)
        assert answer["body"]["answer"] == "Parcels take 3-5 days."
        assert answer["body"]["drafted_by"] == "model"
        (call,) = seen
        assert call["path"] == "/v1/chat/completions" and call["auth"] == "Bearer test-key"
        assert call["messages"][-1] == {"role": "user", "content": q}
        assert "tracking number" in call["messages"][0]["content"]  # the kb article
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
