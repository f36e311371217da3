"""Topics' fan-out and the approval gate in the dispatcher: the log decides, a
replay gives the same state, rules are never evaluated again [SPEC §12]."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from outheisfs import gate
from outheisfs.config import Config, TopicConfig
from outheisfs.dispatcher import Dispatcher
from outheisfs.errors import BadInput, NotEmpty, NotFound, NotPermitted
from outheisfs.events import Event
from outheisfs.models import Draft

from .helpers import make_config, open_dispatcher, read_events, replayed, send, snapshot


def config(**changes: object) -> Config:
    topics = {
        "desk": TopicConfig.model_validate(
            {
                "deliver": ["audit"],
                "rule": [
                    {"match": {"body.kind": "refund"}, "deliver": ["refunds"]},
                    {"match": {"body.amount": {"gt": 100}}, "deliver": ["cfo", "audit"]},
                ],
            }
        ),
        "bugs": TopicConfig.model_validate(
            {"rule": [{"match": {"body.kind": "bug"}, "deliver": ["dev"]}]}
        ),
    }
    agents: dict[str, dict[str, object]] = {
        "intake": {"send": ["topics/desk"]},
        "audit": {},
        "refunds": {"approve": ["*"]},
        "cfo": {"approve": ["intake"]},
        "dev": {},
    }
    return make_config(agents, topics=topics, **changes)


def write(d: Dispatcher, sender: str, topic: str, body: object) -> list[Event]:
    planned = d.plan(sender, [Draft(body=body)], None, topic=topic)
    d.deliver(planned)
    return planned


def test_fan_out_one_copy_per_destination(tmp_path: Path) -> None:
    d, log = open_dispatcher(tmp_path, config())
    planned = write(d, "intake", "desk", {"kind": "question", "amount": 500})
    msgs = [e for e in planned if e["type"] == "message"]
    assert [m["to"] for m in msgs] == ["audit", "cfo"]  # audit once, though named twice
    assert len({m["id"] for m in msgs}) == 2
    assert all(m["topic"] == "desk" and m["from"] == "intake" for m in msgs)
    assert all(m["body"] == {"kind": "question", "amount": 500} for m in msgs)
    got = d.take("audit")
    assert got is not None and b'"topic":"desk"' in got.line()
    # cfo gates intake: its copy is held, audit's is not
    assert [e["type"] for e in planned] == ["message", "message", "held"]
    assert d.agents["cfo"].queued == 0 and list(d.agents["cfo"].held) == [msgs[1]["id"]]
    log.close()


def test_nothing_takes_it_enoent_nothing_queued(tmp_path: Path) -> None:
    d, log = open_dispatcher(tmp_path, config())
    before = len(read_events(tmp_path))
    with pytest.raises(NotFound, match="no destination"):
        d.plan(
            "intake", [Draft(body={"kind": "bug"}), Draft(body={"kind": "x"})], None, topic="bugs"
        )
    with pytest.raises(NotFound):
        d.plan("intake", [Draft(body="x")], None, topic="nope")
    assert len(read_events(tmp_path)) == before
    write(d, "intake", "bugs", {"kind": "bug"})
    assert d.agents["dev"].queued == 1
    log.close()


def test_held_approved_rejected_and_replay(tmp_path: Path) -> None:
    d, log = open_dispatcher(tmp_path, config())
    a = send(d, "intake", "refunds", {"n": 1})[0]["id"]
    b = send(d, "user", "refunds", {"n": 2})[0]["id"]  # "*" holds the operator's too
    c = send(d, "dev", "cfo", "not gated for dev")[0]["id"]
    assert d.agents["cfo"].queued == 1 and not d.agents["cfo"].held
    assert set(d.agents["refunds"].held) == {a, b} and d.agents["refunds"].queued == 0
    assert d.take("refunds") is None
    held = read_events(tmp_path, "held")
    assert [(e["id"], e["agent"], e["from"], e["body"]) for e in held] == [
        (a, "refunds", "intake", {"n": 1}),
        (b, "refunds", "user", {"n": 2}),
    ]
    lines = log.read("approvals", 0, 1 << 20).splitlines()
    assert [json.loads(x)["id"] for x in lines] == [a, b]

    gate.run(d, "user", [f"approve {a}".encode()])
    got = d.take("refunds")
    assert got is not None and got.id == a and got.body == {"n": 1}
    d.ack(got, "refunds")
    gate.run(d, "user", [f"reject {b} too much money".encode()])
    assert not d.agents["refunds"].held and b not in d.messages
    notice = d.take("user")
    assert notice is not None
    assert notice.reply_to == b and notice.sender == "user"
    assert notice.extra == {"rejected": "too much money"}
    assert notice.body == {
        "rejected": b,
        "to": "refunds",
        "reason": "too much money",
        "body": {"n": 2},
    }
    assert [e["type"] for e in read_events(tmp_path) if e.get("id") in (a, b)] == [
        "message",
        "held",
        "message",
        "held",
        "approved",
        "deliver",
        "ack",
        "rejected",
    ]
    assert c in d.messages
    live = snapshot(d)
    log.close()
    assert snapshot(replayed(tmp_path, config())) == live


def test_held_survive_a_restart_and_a_changed_config(tmp_path: Path) -> None:
    d, log = open_dispatcher(tmp_path, config())
    write(d, "intake", "desk", {"kind": "refund", "amount": 5})
    held_id = next(iter(d.agents["refunds"].held))
    live = snapshot(d)
    log.close()
    # The same log under a config whose rules and gates differ: history stands.
    other = make_config(
        {"intake": {}, "audit": {}, "refunds": {}, "cfo": {}, "dev": {}},
        topics={"desk": TopicConfig.model_validate({"deliver": ["dev"]})},
    )
    again = replayed(tmp_path, other)
    assert snapshot(again) == live
    d2, log2 = open_dispatcher(tmp_path, other)
    assert list(d2.agents["refunds"].held) == [held_id]
    assert d2.agents["audit"].queued == 1 and d2.agents["dev"].queued == 0
    gate.run(d2, "user", [f"approve {held_id}".encode()])
    assert d2.agents["refunds"].queued == 1
    log2.close()


def test_approved_is_queued_as_if_just_sent(tmp_path: Path) -> None:
    d, log = open_dispatcher(tmp_path, config())
    late = send(d, "intake", "refunds", "held first")[0]["id"]
    send(d, "intake", "cfo", "unrelated")
    d.agents["refunds"].config = d.agents["dev"].config  # later messages pass the gate
    early = send(d, "intake", "refunds", "sent while the other waited")[0]["id"]
    gate.run(d, "user", [f"approve {late}".encode()])
    approved = read_events(tmp_path, "approved")[0]["seq"]
    first, second = d.take("refunds"), d.take("refunds")
    assert first is not None and second is not None
    assert (first.id, second.id) == (early, late)
    assert second.seq == approved and json.loads(second.line())["seq"] == approved
    live = snapshot(d)
    log.close()
    assert snapshot(replayed(tmp_path, config())) == live


def test_root_ctl_commands_are_checked_all_first(tmp_path: Path) -> None:
    d, log = open_dispatcher(tmp_path, config())
    a = send(d, "intake", "refunds", "x")[0]["id"]
    before = len(read_events(tmp_path))
    bad = [
        [f"approve {a}".encode(), b"approve 01JAAAAAAAAAAAAAAAAAAAAAAA"],
        [b"approve"],
        [f"reject {a}".encode()],
        [b"approve nonsense"],
        [b"launch rockets"],
        [f"approve {a}".encode(), f"reject {a} no".encode()],
        [b"\xff"],
    ]
    for lines in bad:
        with pytest.raises((BadInput, NotFound)):
            gate.run(d, "user", lines)
    with pytest.raises(NotPermitted):
        gate.run(d, "intake", [f"approve {a}".encode()])
    assert len(read_events(tmp_path)) == before and a in d.agents["refunds"].held
    log.close()


def test_a_held_message_cannot_be_taken(tmp_path: Path) -> None:
    d, log = open_dispatcher(tmp_path, config())
    a = send(d, "intake", "refunds", "x")[0]["id"]
    with pytest.raises(NotFound):
        d.take_id("refunds", a, "user")
    assert a in d.agents["refunds"].held and d.agents["refunds"].queued == 0
    log.close()


def test_held_messages_take_no_room_and_block_rmdir(tmp_path: Path) -> None:
    d, log = open_dispatcher(tmp_path, config(max_queue=1))
    send(d, "intake", "refunds", "one")
    planned = d.plan("intake", [Draft(body="two")], "refunds")
    assert d.full(planned) is None
    d.deliver(planned)
    assert len(d.agents["refunds"].held) == 2
    with pytest.raises(NotEmpty):
        d.rmdir("refunds", "user")
    log.close()
