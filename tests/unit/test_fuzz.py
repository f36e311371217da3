"""Fuzzing what writers send: message lines, envelopes, ctl commands [SPEC §4.2, §4.5].

Whatever the bytes, a parser either accepts them or refuses them with BadInput
(EINVAL), never anything else; what it accepts it keeps exactly. Through the
handlers, every refusal is a clear errno (never EIO, which would mean a crash
inside) with one `error` event, and an accepted body comes back to the reader
unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outheisfs import ctl
from outheisfs.config import PRIORITIES
from outheisfs.errors import BadInput
from outheisfs.models import Draft, parse_line

from .helpers import OpsEnv, errno_of, make_config, make_ops_env

SOAK = int(os.environ.get("OUTHEISFS_SOAK", "0"))
FUZZ = settings(
    max_examples=300 * (SOAK or 1),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
keys = st.sampled_from(["body", "priority", "reply_to", "to"]) | st.text(max_size=6)
envelopes = st.dictionaries(keys, json_values | st.sampled_from(["interactive", "a", ["a"]]))


def parsed(line: bytes, outbox: bool) -> Draft | None:
    """parse_line, with a refusal as None: anything but BadInput fails the test."""
    try:
        return parse_line(line, outbox)
    except BadInput as e:
        assert e.errno == errno.EINVAL and e.reason
        return None


@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_any_bytes_are_a_message_or_einval(line: bytes, outbox: bool) -> None:
    d = parsed(line, outbox)
    try:
        text = line.removesuffix(b"\r").decode()
    except UnicodeDecodeError:
        assert d is None  # not UTF-8: refused
        return
    if not text.lstrip().startswith("{"):
        assert d == Draft(body=text)  # plain text: the line itself is the body


@FUZZ
@given(envelopes, st.booleans())
def test_any_json_object_is_an_envelope_or_einval(obj: dict[str, Any], outbox: bool) -> None:
    d = parsed(json.dumps(obj).encode(), outbox)
    if d is None:
        return
    assert set(obj) <= {"body", "priority", "reply_to", "to"}
    assert d.body == obj["body"]
    assert d.priority == obj.get("priority") and d.priority in (None, *PRIORITIES)
    if not outbox:
        assert d.to is None
    elif "to" in obj and obj["to"] is not None:
        assert d.to == ([obj["to"]] if isinstance(obj["to"], str) else obj["to"])


@FUZZ
@given(st.text(max_size=60) | st.sampled_from(sorted(ctl.COMMANDS)).map(lambda c: c + " x y"))
def test_any_ctl_line_is_a_command_or_einval(line: str) -> None:
    try:
        cmd = ctl.parse(line)
    except BadInput as e:
        assert e.errno == errno.EINVAL and e.reason
        return
    assert cmd.name in ctl.COMMANDS
    assert ctl.parse(str(cmd)) == cmd  # what was taken is what is logged


# -- through the handlers ------------------------------------------------------------


def with_env(fn: Any, *args: Any) -> None:
    """Run `fn(env, *args)` on a fresh server below FUSE."""

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            env = make_ops_env(Path(tmp), make_config({"echo": {}}, max_queue=8))
            try:
                await fn(env, *args)
            finally:
                env.log.close()
                env.ops.procs.close()

    trio.run(main)


async def refusal(env: OpsEnv, coro: Any) -> int | None:
    """The errno of a refused request, checked to have its one `error` event."""
    before = len(env.events("error"))
    code = await errno_of(coro)
    assert code != errno.EIO, "a crash inside the server"
    assert len(env.events("error")) == before + (code is not None)
    return code


@FUZZ
@given(
    st.lists(st.binary(max_size=80), min_size=1, max_size=4),
    st.sampled_from(["inbox", "outbox", "ctl"]),
)
def test_random_writes_are_taken_or_refused_with_an_error_event(
    chunks: list[bytes], file: str
) -> None:
    async def run(env: OpsEnv) -> None:
        fh = await env.open(f"agents/echo/{file}", os.O_WRONLY | os.O_NONBLOCK)
        for chunk in chunks:
            err = await refusal(env, env.ops.write(fh, 0, chunk))
            assert err in (None, errno.EINVAL, errno.ENOENT, errno.EAGAIN, errno.EMSGSIZE)
        await refusal(env, env.ops.flush(fh))
        await env.ops.release(fh)

    with_env(run)


@FUZZ
@given(json_values, st.sampled_from([None, "interactive", "background"]))
def test_an_accepted_body_is_read_back_unchanged(body: Any, priority: str | None) -> None:
    async def run(env: OpsEnv) -> None:
        line = json.dumps({"body": body, "priority": priority}).encode() + b"\n"
        assert await env.write("agents/echo/inbox", line) == len(line)
        fh = await env.open("agents/echo/inbox", os.O_RDONLY)
        got = json.loads(await env.ops.read(fh, 0, 1 << 20))
        await env.ops.release(fh)
        assert got["body"] == body and got["priority"] == (priority or "normal")
        assert json.dumps(got["body"]) == json.dumps(body)  # same types: 1 is not 1.0 or True

    with_env(run)
