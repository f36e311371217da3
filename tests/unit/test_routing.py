"""Rule matching for topics: each test, missing paths, types that do not compare,
bad rules as config errors naming the key [SPEC §12]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from outheisfs.config import parse_config
from outheisfs.errors import ConfigError
from outheisfs.routing import compile_tests, compile_topic, envelope, lookup, same

ENV = envelope(
    "intake", "desk", "normal", {"amount": 120, "kind": "refund", "tags": ["a", "b"]}, None
)


def holds(match: dict[str, Any], env: Any = ENV) -> bool:
    return all(t.holds(env) for t in compile_tests(match, "m"))


def test_paths_reach_into_objects_and_lists() -> None:
    assert lookup(ENV, "body.amount") == 120
    assert lookup(ENV, "body.tags.1") == "b"
    assert lookup(ENV, "from") == "intake"
    assert lookup(ENV, "topic") == "desk"
    for missing in ("body.nope", "body.tags.5", "body.amount.x", "nope", "body.tags.x"):
        assert not holds({missing: {"exists": True}})
        assert holds({missing: {"exists": False}})


def test_equality_is_json_equality() -> None:
    assert holds({"body.kind": "refund"})
    assert holds({"body.kind": {"eq": "refund"}})
    assert not holds({"body.kind": "question"})
    assert holds({"body.amount": 120.0})  # 120 is 120.0
    assert not holds({"body.amount": "120"})  # a string is not a number
    assert same(True, True) and not same(True, 1) and not same(1, True)
    assert not holds({"flag": True}, {"flag": 1})
    assert holds({"body.tags": ["a", "b"]})
    assert holds({"body": {"eq": {"x": [1, True]}}}, {"body": {"x": [1.0, True]}})
    assert not holds({"body": {"eq": {"x": [1, True]}}}, {"body": {"x": [1, 1]}})


def test_in() -> None:
    assert holds({"body.kind": {"in": ["refund", "bug"]}})
    assert not holds({"body.kind": {"in": ["question"]}})
    assert not holds({"body.amount": {"in": ["120", True]}})


def test_gt_lt_compare_numbers_with_numbers_and_strings_with_strings() -> None:
    assert holds({"body.amount": {"gt": 100}})
    assert not holds({"body.amount": {"gt": 120}})
    assert holds({"body.amount": {"gt": 100, "lt": 200}})  # all tests of a table hold
    assert not holds({"body.amount": {"gt": 100, "lt": 110}})
    assert holds({"body.amount": {"lt": 120.5}})
    assert holds({"body.kind": {"gt": "a", "lt": "s"}})
    # types that do not compare: no match, never an error
    assert not holds({"body.kind": {"gt": 1}})
    assert not holds({"body.amount": {"lt": "z"}})
    assert not holds({"flag": {"gt": 0}}, {"flag": True})
    assert not holds({"body.tags": {"gt": 0}})
    assert not holds({"body.missing": {"lt": 10}})


def test_regex_on_strings_only() -> None:
    assert holds({"body.kind": {"regex": "^ref"}})
    assert holds({"body.kind": {"regex": "fun"}})  # searched, not anchored
    assert not holds({"body.kind": {"regex": "^fun"}})
    assert not holds({"body.amount": {"regex": "1"}})  # a number is not a string
    assert not holds({"body.missing": {"regex": "."}})
    assert holds({"body.kind": {"matches": "^ref"}})  # the plumber's word, the same test
    assert not holds({"body.kind": {"matches": "^fun"}})


def test_several_paths_must_all_hold() -> None:
    assert holds({"body.kind": "refund", "from": "intake"})
    assert not holds({"body.kind": "refund", "from": "someone"})
    assert holds({})  # a rule without match takes everything


def test_destinations_fan_out_once_each_in_order() -> None:
    topic = compile_topic(
        "desk",
        ["audit"],
        [
            ({"body.kind": "refund"}, ["refunds", "audit"]),
            ({"body.amount": {"gt": 100}}, ["cfo"]),
            ({"body.kind": "bug"}, ["dev"]),
        ],
    )
    assert topic.destinations(ENV) == ["audit", "refunds", "cfo"]
    small = envelope("x", "desk", "normal", {"kind": "question", "amount": 5}, None)
    assert topic.destinations(small) == ["audit"]
    assert topic.targets() == {"audit", "refunds", "cfo", "dev"}
    empty = compile_topic("desk", [], [({"body.kind": "bug"}, ["dev"])])
    assert empty.destinations(ENV) == []


@pytest.mark.parametrize(
    ("match", "key", "why"),
    [
        (
            '{ "body.text" = { regex = "(" } }',
            "topics.desk.rule.0.match.body.text.regex",
            "bad regular expression",
        ),
        (
            '{ "body.n" = { between = 3 } }',
            "topics.desk.rule.0.match.body.n.between",
            "unknown test",
        ),
        (
            '{ "body.n" = { gt = true } }',
            "topics.desk.rule.0.match.body.n.gt",
            "number or a string",
        ),
        ('{ "body.n" = { in = 3 } }', "topics.desk.rule.0.match.body.n.in", "list"),
        (
            '{ "body.n" = { exists = "yes" } }',
            "topics.desk.rule.0.match.body.n.exists",
            "true or false",
        ),
        (
            '{ "body.n" = { regex = 3 } }',
            "topics.desk.rule.0.match.body.n.regex",
            "regular expression",
        ),
        ('{ "body.n" = {} }', "topics.desk.rule.0.match.body.n", "empty test"),
        ('{ "body..n" = 1 }', "topics.desk.rule.0.match.body..n", "JSON path"),
        ('{ "at" = 1979-05-27 }', "topics.desk.rule.0.match.at", "not a JSON value"),
    ],
)
def test_bad_rules_are_config_errors_naming_the_key(
    tmp_path: Path, match: str, key: str, why: str
) -> None:
    text = f"""
[agents.a]
[topics.desk]
deliver = ["a"]
[[topics.desk.rule]]
match = {match}
deliver = ["a"]
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, tmp_path, "outheis.toml")
    assert key in str(e.value) and why in str(e.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[topics.desk]\ndeliver = ["ghost"]', "topics.desk.deliver: unknown agent 'ghost'"),
        (
            '[topics.desk]\n[[topics.desk.rule]]\nmatch = {}\ndeliver = ["ghost"]',
            "topics.desk.rule.0.deliver: unknown agent 'ghost'",
        ),
        (
            "[topics.desk]\n[[topics.desk.rule]]\nmatch = {}\ndeliver = []",
            "topics.desk.rule.0.deliver",
        ),
        ('[topics.desk]\nsend = ["a"]', "topics.desk.send: unknown key"),
        ('[topics."Bad Name"]', "topics.Bad Name: topic name"),
        ('[agents.b]\nsend = ["topics/nope"]', "agents.b.send: unknown topic 'topics/nope'"),
        ('[agents.b]\napprove = ["ghost"]', "agents.b.approve: unknown agent 'ghost'"),
        ('[agents.b]\napprove = "all"', "agents.b.approve"),
    ],
)
def test_topic_and_gate_config_errors(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("[agents.a]\n" + text, tmp_path, "outheis.toml")
    assert key in str(e.value)


def test_a_good_config(tmp_path: Path) -> None:
    config = parse_config(
        """
[agents.a]
send = ["topics/desk", "b"]
[agents.b]
approve = ["a", "user"]
[agents.c]
approve = "*"
[topics.desk]
deliver = ["a", "user"]
[[topics.desk.rule]]
match = { "body.amount" = { gt = 10000 }, "from" = { in = ["a", "b"] } }
deliver = ["b"]
""",
        tmp_path,
    )
    assert config.agents["b"].gated("a") and config.agents["b"].gated("user")
    assert not config.agents["b"].gated("c")
    assert config.agents["c"].gated("anyone")
    assert not config.agents["a"].gated("b")
    assert config.topics["desk"].compiled("desk").targets() == {"a", "b", "user"}
