"""Topics and their rules: which agents a message written to `topics/NAME` goes to.

A pure function of the topic's table and the message's envelope, as the Plan 9
plumber's rules are of a plumb message: the rules only pick destinations, they
never change the message. A rule's `match` maps JSON paths of the envelope
(`body.amount`, `from`, `priority`; dots go into objects, numbers into lists) to
a condition: a plain value (equality), or a table of tests that must all hold:

    eq = VALUE        the value at the path equals VALUE
    in = [V, ...]     it equals one of them
    gt = X, lt = X    it is greater / less than X (numbers with numbers, strings
                      with strings; anything else does not compare: no match)
    exists = BOOL     the path is there (or not)
    regex = "RE"      it is a string that RE matches (Python's re.search);
                      `matches`, the plumber's word for it, is the same test

A path that is not there matches nothing (but `exists = false`). JSON types are
kept apart: `true` is not `1`, `1` is `1.0`. Everything is checked when the
config is loaded: a bad test, a bad regular expression, an unknown key is a
`ConfigError` naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

OPS = ("eq", "in", "gt", "lt", "exists", "regex", "matches")
_MISSING = object()


def lookup(envelope: Any, path: str) -> Any:
    """The value at a dotted path, or _MISSING."""
    value = envelope
    for part in path.split("."):
        if isinstance(value, dict):
            if part not in value:
                return _MISSING
            value = value[part]
        elif isinstance(value, list) and part.isdigit():
            i = int(part)
            if i >= len(value):
                return _MISSING
            value = value[i]
        else:
            return _MISSING
    return value


def same(a: Any, b: Any) -> bool:
    """JSON equality: booleans are not numbers, 1 equals 1.0, containers deep."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _comparable(a: Any, b: Any) -> bool:
    return (_number(a) and _number(b)) or (isinstance(a, str) and isinstance(b, str))


@dataclass(frozen=True, slots=True)
class Test:
    """One condition on one path."""

    path: str
    op: str
    arg: Any

    def holds(self, envelope: Any) -> bool:
        value = lookup(envelope, self.path)
        if self.op == "exists":
            return (value is not _MISSING) is self.arg
        if value is _MISSING:
            return False
        if self.op == "eq":
            return same(value, self.arg)
        if self.op == "in":
            return any(same(value, v) for v in self.arg)
        if self.op == "gt":
            return _comparable(value, self.arg) and value > self.arg
        if self.op == "lt":
            return _comparable(value, self.arg) and value < self.arg
        # regex: compiled when the config was loaded
        return isinstance(value, str) and self.arg.search(value) is not None


@dataclass(frozen=True, slots=True)
class Rule:
    tests: tuple[Test, ...]
    deliver: tuple[str, ...]

    def matches(self, envelope: Any) -> bool:
        return all(t.holds(envelope) for t in self.tests)


@dataclass(frozen=True, slots=True)
class Topic:
    name: str
    deliver: tuple[str, ...]
    rules: tuple[Rule, ...]

    def destinations(self, envelope: Any) -> list[str]:
        """Every destination of the message, in order, each once: the topic's
        `deliver` list, then each matching rule's."""
        out: dict[str, None] = dict.fromkeys(self.deliver)
        for rule in self.rules:
            if rule.matches(envelope):
                out.update(dict.fromkeys(rule.deliver))
        return list(out)

    def targets(self) -> set[str]:
        """Every agent the topic may ever deliver to."""
        return set(self.deliver).union(*(r.deliver for r in self.rules))


def compile_tests(match: Mapping[str, Any], key: str) -> tuple[Test, ...]:
    """A rule's `match` table as tests; ConfigError naming `key.PATH[.OP]` if bad."""
    tests: list[Test] = []
    for path, cond in match.items():
        where = f"{key}.{path}"
        if not path or any(not p for p in path.split(".")):
            raise ConfigError(f"{where}: not a JSON path like body.amount")
        if not isinstance(cond, dict):
            tests.append(Test(path, "eq", _json(cond, where)))
            continue
        if not cond:
            raise ConfigError(f"{where}: an empty test; give one of {', '.join(OPS)}")
        for op, arg in cond.items():
            tests.append(_test(path, op, arg, f"{where}.{op}"))
    return tuple(tests)


def _test(path: str, op: str, arg: Any, where: str) -> Test:
    if op not in OPS:
        raise ConfigError(f"{where}: unknown test; known: {', '.join(OPS)}")
    if op == "eq":
        return Test(path, op, _json(arg, where))
    if op == "in":
        if not isinstance(arg, list):
            raise ConfigError(f"{where}: must be a list of values")
        return Test(path, op, tuple(_json(v, where) for v in arg))
    if op in ("gt", "lt"):
        if not (_number(arg) or isinstance(arg, str)):
            raise ConfigError(f"{where}: must be a number or a string")
        return Test(path, op, arg)
    if op == "exists":
        if not isinstance(arg, bool):
            raise ConfigError(f"{where}: must be true or false")
        return Test(path, op, arg)
    if not isinstance(arg, str):
        raise ConfigError(f"{where}: must be a regular expression (a string)")
    try:
        return Test(path, "regex", re.compile(arg))
    except re.error as e:
        raise ConfigError(f"{where}: bad regular expression {arg!r}: {e}") from None


def _json(v: Any, where: str) -> Any:
    """TOML values that JSON has (dates and times it has not)."""
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    if isinstance(v, list):
        return [_json(x, where) for x in v]
    if isinstance(v, dict):
        return {k: _json(x, where) for k, x in v.items()}
    raise ConfigError(f"{where}: {type(v).__name__} is not a JSON value")


def compile_topic(
    name: str, deliver: Sequence[str], rules: Iterable[tuple[Mapping[str, Any], Sequence[str]]]
) -> Topic:
    """A topic of the config: `rules` as (match, deliver) pairs, in order."""
    compiled = tuple(
        Rule(compile_tests(match, f"topics.{name}.rule.{i}.match"), tuple(to))
        for i, (match, to) in enumerate(rules)
    )
    return Topic(name, tuple(deliver), compiled)


def envelope(
    sender: str, topic: str, priority: str, body: Any, reply_to: str | None
) -> dict[str, Any]:
    """What rules match on: the message as it will be read, but for `to`, `id`
    and `seq`, which each copy gets of its own."""
    return {
        "from": sender,
        "topic": topic,
        "priority": priority,
        "body": body,
        "reply_to": reply_to,
    }
