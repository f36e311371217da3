"""Topics, routing rules and the approval gate through a real mount, with shell
tools: echo, cat, head, tail -f, jq [SPEC §12]."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server, outheisfs, parked, read_nonblock, read_one, sh, take, wait_for

pytestmark = pytest.mark.mount

CONFIG = """
[agents.intake]
send = ["topics/desk"]
[agents.all]
send = ["*"]
[agents.audit]
[agents.refunds]
approve = ["*"]
[agents.answers]
[agents.dev]
[agents.cfo]
approve = ["intake"]

[topics.desk]
deliver = ["audit"]

[[topics.desk.rule]]
match = { "body.kind" = "refund" }
deliver = ["refunds"]

[[topics.desk.rule]]
match = { "body.kind" = { in = ["question", "howto"] }, "body.text" = { regex = "(?i)^how" } }
deliver = ["answers"]

[[topics.desk.rule]]
match = { "body.amount" = { gt = 1000 } }
deliver = ["cfo", "audit"]

[topics.bugs]
[[topics.bugs.rule]]
match = { "body.severity" = { exists = true } }
deliver = ["dev"]
"""


@pytest.fixture
def desk(server: Server) -> Server:
    server.write_config(CONFIG)
    server.mount()
    return server


def as_agent(server: Server, name: str, script: str) -> subprocess.CompletedProcess[str]:
    return outheisfs("run", name, "--mount", str(server.mp), "--", "bash", "-c", script)


def queued(server: Server, name: str) -> int:
    return int(server.status(name)["queued"])


# -- topics: fan-out and rules -----------------------------------------------------------


def test_fan_out_and_rules_one_copy_per_destination(desk: Server) -> None:
    mp = desk.mp
    r = as_agent(
        desk,
        "intake",
        f"""echo '{{"body":{{"kind":"refund","amount":5000}}}}' > {mp}/topics/desk""",
    )
    assert r.returncode == 0, r.stderr
    audit = read_one(desk, "audit")
    assert queued(desk, "audit") == 0  # named by the list and a rule: one copy
    assert queued(desk, "answers") == 0
    # refunds and cfo gate intake: their copies wait for the operator
    held = approvals(desk)
    assert sorted(m["to"] for m in held) == ["cfo", "refunds"]
    r = sh(" && ".join(f"echo approve {m['id']} > {mp}/ctl" for m in held))
    assert r.returncode == 0, r.stderr
    got = {"audit": audit} | {name: read_one(desk, name) for name in ("refunds", "cfo")}
    assert len({m["id"] for m in got.values()}) == 3  # each copy its own id
    for name, m in got.items():
        assert m["to"] == name and m["from"] == "intake" and m["topic"] == "desk"
        assert m["body"] == {"kind": "refund", "amount": 5000}


def test_rules_pick_by_fields_plain_text_goes_to_the_list_only(desk: Server) -> None:
    mp = desk.mp
    r = sh(
        f"""set -e
        echo '{{"body":{{"kind":"question","text":"How do I reset?"}}}}' > {mp}/topics/desk
        echo '{{"body":{{"kind":"question","text":"why?"}}}}' > {mp}/topics/desk
        echo 'plain words' > {mp}/topics/desk
        jq -n '{{body:{{kind:"howto",text:"how-to","amount":"9999"}}}}' -c > {mp}/topics/desk
        """
    )
    assert r.returncode == 0, r.stderr
    answers = take(desk, "answers", 2)
    assert [m["body"]["text"] for m in answers] == ["How do I reset?", "how-to"]
    audit = take(desk, "audit", 4)
    assert [m["body"] if isinstance(m["body"], str) else m["body"]["text"] for m in audit] == [
        "How do I reset?", "why?", "plain words", "how-to",
    ]  # fmt: skip
    assert all(m["from"] == "user" and m["topic"] == "desk" for m in audit)
    # "9999" is a string: it does not compare with 1000, so cfo got nothing
    assert desk.status("cfo")["held"] == "0" and queued(desk, "cfo") == 0
    # routing is in the log: the message events name each destination and the topic
    msgs = [e for e in desk.events("message") if e.get("topic") == "desk"]
    assert sorted(e["to"] for e in msgs) == ["answers", "answers", *["audit"] * 4]


def test_a_message_no_destination_takes_is_enoent_and_nothing_is_queued(desk: Server) -> None:
    mp = desk.mp
    before = len(desk.events("message"))
    r = sh(f"""echo '{{"body":{{"title":"no severity"}}}}' > {mp}/topics/bugs""")
    assert r.returncode != 0 and "No such file or directory" in r.stderr
    # all or nothing: the first line would be taken, the second is not
    lines = '{"body":{"severity":1}}\\n{"body":"none"}\\n'
    r = sh(f"printf '{lines}' | cat > {mp}/topics/bugs")  # one write: cat's
    assert r.returncode != 0 and "No such file or directory" in r.stderr
    assert len(desk.events("message")) == before and queued(desk, "dev") == 0
    errors = [e for e in desk.events("error") if e["where"] == "/topics/bugs"]
    assert len(errors) == 2 and all(e["errno"] == "ENOENT" for e in errors)
    assert "no destination takes this message" in errors[0]["why"]
    assert "no destination" in desk.agent("user", "errors").read_text()
    r = sh(f"""echo '{{"body":{{"severity":2}}}}' > {mp}/topics/bugs""")
    assert r.returncode == 0 and read_one(desk, "dev")["topic"] == "bugs"
    # 'to' belongs on an outbox: EINVAL on a topic too
    r = sh(f"""echo '{{"to":"dev","body":{{"severity":2}}}}' > {mp}/topics/bugs""")
    assert r.returncode != 0 and "Invalid argument" in r.stderr


def test_topic_files_are_write_only_and_seen_only_per_send(desk: Server) -> None:
    mp = desk.mp
    assert sorted(os.listdir(mp / "topics")) == ["bugs", "desk"]
    assert oct((mp / "topics" / "desk").stat().st_mode & 0o777) == "0o220"
    r = sh(f"cat {mp}/topics/desk")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # intake: send names topics/desk only
    r = as_agent(desk, "intake", f"ls {mp}/topics; ls {mp}; ls {mp}/topics/bugs")
    assert r.stdout.split() == ["desk", "agents", "topics"], r.stdout
    assert "No such file or directory" in r.stderr
    r = as_agent(desk, "intake", f"cat {mp}/topics/desk")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # all: "*" sees every topic; audit: no send at all, no topics folder
    r = as_agent(desk, "all", f"ls {mp}/topics")
    assert r.stdout.split() == ["bugs", "desk"], r.stderr
    r = as_agent(desk, "audit", f"ls {mp}; ls {mp}/topics")
    assert r.stdout.split() == ["agents"] and "No such file or directory" in r.stderr
    r = as_agent(desk, "audit", f"echo hi > {mp}/topics/desk")
    assert r.returncode != 0 and "No such file or directory" in r.stderr
    assert queued(desk, "audit") == 0
    # the right to write the topic suffices: intake may not send to answers directly
    r = as_agent(desk, "intake", f"echo hi > {mp}/agents/answers/inbox")
    assert r.returncode != 0
    r = as_agent(
        desk, "intake", f"""echo '{{"body":{{"kind":"howto","text":"how"}}}}' > {mp}/topics/desk"""
    )
    assert r.returncode == 0, r.stderr
    assert read_one(desk, "answers")["from"] == "intake"
    denied = [e for e in desk.events("denied") if e["who"] == "audit"]
    assert any(e["path"].startswith("/topics") for e in denied)


# -- the approval gate -------------------------------------------------------------------


def approvals(server: Server) -> list[dict[str, Any]]:
    fd = os.open(server.p("approvals"), os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return [json.loads(line) for line in data.splitlines()]


def test_held_approve_reject_with_echo_and_cat(desk: Server) -> None:
    mp = desk.mp
    # a reader of approvals waits, like an inbox reader, until something is held
    waiter = subprocess.Popen(
        ["head", "-n1", str(mp / "approvals")], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: parked(waiter.pid), timeout=10)
        assert waiter.poll() is None
        r = as_agent(desk, "intake", f"echo 'pay 30 EUR to Ann' > {mp}/agents/refunds/inbox")
        assert r.returncode == 1 and "No such file" in r.stderr  # no send right: hidden
        r = sh(f"echo 'pay 30 EUR to Ann' > {mp}/agents/refunds/inbox")  # the operator
        assert r.returncode == 0, r.stderr
        out, _ = waiter.communicate(timeout=10)
    finally:
        waiter.kill()
    first = json.loads(out)
    assert first["type"] == "held" and first["to"] == "refunds" and first["from"] == "user"
    assert first["body"] == "pay 30 EUR to Ann"
    assert read_nonblock(desk, "refunds") is None  # held: nothing to read
    assert desk.status("refunds")["held"] == "1" and queued(desk, "refunds") == 0
    r = as_agent(
        desk, "intake", f"""echo '{{"body":{{"kind":"refund","amount":12}}}}' > {mp}/topics/desk"""
    )
    assert r.returncode == 0, r.stderr
    second = approvals(desk)[1]
    assert second["from"] == "intake" and second["topic"] == "desk"
    # approve with echo: queued as if just sent, the same id
    r = sh(f"echo approve {first['id']} > {mp}/ctl")
    assert r.returncode == 0, r.stderr
    got = read_one(desk, "refunds")
    assert got["id"] == first["id"] and got["body"] == "pay 30 EUR to Ann"
    # reject: the sender gets a notice with the reason, replying to its message
    r = sh(f"echo 'reject {second['id']} refunds over 10 EUR need a receipt' > {mp}/ctl")
    assert r.returncode == 0, r.stderr
    r = as_agent(desk, "intake", f"head -n1 {mp}/agents/intake/inbox")
    notice = json.loads(r.stdout)
    assert notice["rejected"] == "refunds over 10 EUR need a receipt"
    assert notice["reply_to"] == second["id"] and notice["from"] == "user"
    assert notice["body"]["rejected"] == second["id"] and notice["body"]["to"] == "refunds"
    assert read_nonblock(desk, "refunds") is None and desk.status("refunds")["held"] == "0"
    kinds = [e["type"] for e in desk.events() if e.get("id") in (first["id"], second["id"])]
    assert kinds == ["message", "held", "message", "held", "approved", "deliver", "ack", "rejected"]
    # the log and trace tell the story
    r = outheisfs("trace", second["id"], "--state", str(desk.state))
    assert r.returncode == 0, r.stderr
    assert " held " in r.stdout and " rejected " in r.stdout and "refunds over 10 EUR" in r.stdout
    r = outheisfs("trace", first["id"], "--state", str(desk.state), "--json")
    assert [e["type"] for e in json.loads(r.stdout)["events"]][:3] == [
        "message",
        "held",
        "approved",
    ]


def test_root_ctl_refusals(desk: Server) -> None:
    mp = desk.mp
    desk.send("refunds", "x")
    (held,) = approvals(desk)
    for line, why in [
        ("approve 01JAAAAAAAAAAAAAAAAAAAAAAA", "No such file or directory"),
        ("approve nonsense", "Invalid argument"),
        (f"reject {held['id']}", "Invalid argument"),
        ("start", "Invalid argument"),
    ]:
        r = sh(f"echo '{line}' > {mp}/ctl")
        assert r.returncode != 0 and why in r.stderr, (line, r.stderr)
    assert desk.status("refunds")["held"] == "1"
    # agents: approvals does not exist for them, the root ctl is read-only
    r = as_agent(desk, "all", f"cat {mp}/approvals; ls {mp}")
    assert "No such file or directory" in r.stderr and "approvals" not in r.stdout
    r = as_agent(desk, "all", f"echo approve {held['id']} > {mp}/ctl")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert desk.status("refunds")["held"] == "1"
    # O_NONBLOCK at the end: EAGAIN
    fd = os.open(desk.p("approvals"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.read(fd, 1 << 16)
        with pytest.raises(BlockingIOError) as e:
            os.read(fd, 1 << 16)
        assert e.value.errno == errno.EAGAIN
    finally:
        os.close(fd)


@pytest.mark.parametrize("before", [0, 1])
def test_tail_f_follows_approvals(desk: Server, before: int) -> None:
    for i in range(before):
        desk.send("refunds", f"old {i}")
    with subprocess.Popen(
        ["tail", "-f", str(desk.p("approvals"))], stdout=subprocess.PIPE, text=True
    ) as tail:
        try:
            assert tail.stdout is not None
            for i in range(before):
                assert json.loads(tail.stdout.readline())["body"] == f"old {i}"
            for i in range(2):
                desk.send("refunds", f"new {i}")
                line = tail.stdout.readline()
                assert json.loads(line)["body"] == f"new {i}"
        finally:
            tail.send_signal(signal.SIGINT)
            tail.wait(timeout=10)


@pytest.mark.parametrize("how", ["umount", "kill9"])
def test_held_messages_survive_a_restart(desk: Server, how: str) -> None:
    mp = desk.mp
    desk.send("refunds", "one")
    desk.send("refunds", "two")
    ids = [e["id"] for e in approvals(desk)]
    if how == "umount":
        assert desk.umount().returncode == 0
    else:
        desk.kill9()
    desk.mount()
    assert desk.status("refunds")["held"] == "2" and queued(desk, "refunds") == 0
    assert [e["id"] for e in approvals(desk)] == ids
    # replay from the log alone agrees with the live state
    r = outheisfs("replay", "--state", str(desk.state), "--json")
    assert r.returncode == 0, r.stderr
    replayed = json.loads(r.stdout)["agents"]["refunds"]
    assert [m["id"] for m in replayed["held"]] == ids and replayed["queued"] == []
    r = sh(f"echo approve {ids[1]} > {mp}/ctl && echo 'reject {ids[0]} no' > {mp}/ctl")
    assert r.returncode == 0, r.stderr
    assert read_one(desk, "refunds")["body"] == "two"
    assert read_one(desk, "user")["rejected"] == "no"
    assert desk.status("refunds")["held"] == "0"
    desk.send("cfo", "queued, not held: the operator is not gated by cfo")
    r = as_agent(desk, "intake", f'echo \'{{"body":{{"amount":2000}}}}\' > {mp}/topics/desk')
    assert r.returncode == 0, r.stderr
    # replay from the log alone equals the live state, agent by agent
    r = outheisfs("replay", "--state", str(desk.state), "--json")
    replay = json.loads(r.stdout)["agents"]
    for name, agent in replay.items():
        live = desk.status(name)
        assert (len(agent["queued"]), len(agent["held"])) == (
            int(live["queued"]),
            int(live["held"]),
        ), name
    assert len(replay["cfo"]["held"]) == 1 and len(replay["cfo"]["queued"]) == 1


def test_config_errors_name_the_key(server: Server, tmp_path: Path) -> None:
    cases = [
        ('[topics.t]\ndeliver = ["ghost"]\n', "topics.t.deliver: unknown agent 'ghost'"),
        (
            "[topics.t]\n[[topics.t.rule]]\n"
            'match = { "body.x" = { regex = "[" } }\ndeliver = ["a"]\n',
            "topics.t.rule.0.match.body.x.regex: bad regular expression",
        ),
        (
            '[topics.t]\n[[topics.t.rule]]\nmatch = {}\ndeliver = ["a", "nobody"]\n',
            "topics.t.rule.0.deliver: unknown agent 'nobody'",
        ),
        ('[agents.b]\nsend = ["topics/none"]\n', "agents.b.send: unknown topic 'topics/none'"),
        ('[agents.b]\napprove = ["ghost"]\n', "agents.b.approve: unknown agent 'ghost'"),
    ]
    for text, why in cases:
        server.write_config("[agents.a]\n" + text)
        r = server.mount(check=False)
        assert r.returncode == 2, r.stderr
        assert why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not os.path.ismount(server.mp)


def test_approvals_lists_what_waits_now_and_tail_the_journal(desk: Server) -> None:
    mp = desk.mp
    for body in ("a", "b", "c"):
        desk.send("refunds", body)
    a, b, c = (m["id"] for m in approvals(desk))
    # an open file keeps its lines: offsets stay valid while decisions are made
    fd = os.open(desk.p("approvals"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        first = os.read(fd, 1 << 16)
        r = sh(f"echo approve {a} > {mp}/ctl && echo 'reject {c} no' > {mp}/ctl")
        assert r.returncode == 0, r.stderr
        with pytest.raises(BlockingIOError):
            os.read(fd, 1 << 16)
        assert [json.loads(x)["id"] for x in first.splitlines()] == [a, b, c]
    finally:
        os.close(fd)
    # a new reader sees only what waits: the next to decide is the first line
    r = sh(f"head -n1 {mp}/approvals | jq -r .id")
    assert r.stdout.strip() == b, r.stderr
    assert [m["id"] for m in approvals(desk)] == [b]
    # tail reads the journal of every hold, which only grows
    r = sh(f"tail -n 5 {mp}/approvals | jq -r .id")
    assert r.stdout.split() == [a, b, c]
    assert os.stat(desk.p("approvals")).st_size == len(
        sh(f"tail -c +1 {mp}/approvals").stdout.encode()
    )


def test_run_send_gives_the_right_to_write_a_topic(desk: Server) -> None:
    mp = desk.mp
    script = f'ls {mp}/topics && echo \'{{"body":{{"severity":3}}}}\' > {mp}/topics/bugs'
    r = outheisfs("run", "bob", "--mount", str(mp), "--send", "topics/bugs", "--",
                  "bash", "-c", script)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["bugs"]
    got = read_one(desk, "dev")
    assert got["from"] == "bob" and got["topic"] == "bugs"
    r = outheisfs("run", "bob", "--mount", str(mp), "--send", "topics/nope", "--", "true")
    assert r.returncode == 2 and "--send 'topics/nope': no such topic" in r.stderr
