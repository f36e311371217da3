"""Owners grant access: ctl `grant` and `revoke` below FUSE [SPEC §17, §6, §7].

The commands are checked, logged as events and applied by the dispatcher's
state machine; the grantee's view follows at once and after replay, restarts
(`start`, `bind`) and remounts; refusals have their errno and their reason.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from outheisfs import ctl, events, grants
from outheisfs.access import Access
from outheisfs.dispatcher import Dispatcher
from outheisfs.errors import OutheisError
from outheisfs.procevents import ProcEvents
from outheisfs.views import View

from .helpers import (
    OpsEnv,
    Token,
    errno_of,
    fake_readdir_reply,
    make_config,
    make_ops_env,
    open_dispatcher,
    read_events,
    replayed,
)

AGENTS: dict[str, dict[str, Any]] = {
    "notes": {},
    "planner": {"unveil": {"/vault/public": "r"}},
    "other": {},
    "archive": {},
}
VAULT = {"notes": "notes", "archive": "archive", "shared": "user"}
PLANS = "/vault/notes/plans"


def config(**vault: str) -> Any:
    return make_config(AGENTS, vault=vault or VAULT)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def d(state: Path) -> Iterator[Dispatcher]:
    disp, log = open_dispatcher(state, config())
    yield disp
    log.close()


def command(d: Dispatcher, who: str, owner: str, line: str) -> None:
    """Check and carry out one ctl line the way `ctl.Commands` does (no FUSE)."""
    cmd = ctl.parse(line)
    grants.check(d, who, owner, cmd.name, cmd.args)
    d.record([events.ctl(owner, who, line), grants.event(d, who, owner, cmd.name, cmd.args)])


def perms(d: Dispatcher, name: str, path: str) -> str | None:
    return View(name, d.agents[name].grants).perms(path)


def refusal(d: Dispatcher, who: str, owner: str, line: str) -> tuple[int, str]:
    try:
        command(d, who, owner, line)
    except OutheisError as e:
        return e.errno, e.reason
    raise AssertionError(f"{line!r} by {who} was accepted")


# -- the commands ------------------------------------------------------------------------


def test_parse_takes_grant_and_revoke() -> None:
    assert ctl.parse("grant planner /vault/notes/plans r").args == ("planner", PLANS, "r")
    assert ctl.parse("revoke planner /vault/notes/plans").args == ("planner", PLANS)
    for bad in ("grant planner /vault/notes", "grant planner", "revoke planner", "revoke a b c"):
        with pytest.raises(OutheisError) as e:
            ctl.parse(bad)
        assert e.value.errno == errno.EINVAL and "usage" in e.value.reason


@pytest.mark.parametrize(
    ("who", "owner", "line", "code", "why"),
    [
        # Outside the granter's domain: EPERM, whoever writes it.
        ("notes", "notes", "grant planner /vault/archive/x r", errno.EPERM, "outside the domain"),
        ("user", "notes", "grant planner /vault/misc r", errno.EPERM, "in no vault domain"),
        ("user", "user", "grant planner /agents/notes r", errno.EPERM, "in no vault domain"),
        ("notes", "notes", "grant planner /vault r", errno.EPERM, "its domain is /vault/notes"),
        ("notes", "notes", "grant planner /agents/notes r", errno.EPERM, "outside the domain"),
        ("notes", "notes", "grant planner /vault/notesx r", errno.EPERM, "outside the domain"),
        ("other", "other", "grant planner /vault/notes r", errno.EPERM, "owns no vault domain"),
        # Only the owner itself and the operator write it to the owner's ctl.
        ("planner", "notes", "grant planner /vault/notes r", errno.EPERM, "only notes"),
        ("other", "notes", "revoke planner /vault/notes", errno.EPERM, "only notes"),
        # Only r: the domain keeps its one writer.
        ("notes", "notes", "grant planner /vault/notes w", errno.EPERM, "only r"),
        ("notes", "notes", "grant planner /vault/notes rw", errno.EPERM, "only r"),
        ("notes", "notes", "grant planner /vault/notes x", errno.EINVAL, "only r"),
        ("notes", "notes", "grant planner /vault/notes -", errno.EINVAL, "only r"),
        # Unknown agents, bad paths.
        ("notes", "notes", "grant ghost /vault/notes r", errno.ENOENT, "no agent 'ghost'"),
        ("notes", "notes", "revoke ghost /vault/notes", errno.ENOENT, "no agent 'ghost'"),
        ("notes", "notes", "grant planner vault/notes r", errno.EINVAL, "not an absolute path"),
        ("notes", "notes", "grant planner /vault/notes/../x r", errno.EINVAL, "absolute path"),
        ("notes", "notes", "grant planner /vault/./notes r", errno.EINVAL, "absolute path"),
        # Pointless grants.
        ("notes", "notes", "grant notes /vault/notes r", errno.EINVAL, "owns /vault/notes"),
        ("notes", "notes", "grant user /vault/notes r", errno.EINVAL, "operator"),
        # A revoke of what was never granted.
        ("notes", "notes", "revoke planner /vault/notes", errno.ENOENT, "has not granted"),
    ],
)
def test_refusals(d: Dispatcher, who: str, owner: str, line: str, code: int, why: str) -> None:
    before = read_events(d.log.state)  # type: ignore[union-attr]
    got, reason = refusal(d, who, owner, line)
    assert (errno.errorcode[got], why in reason) == (errno.errorcode[code], True), reason
    assert read_events(d.log.state) == before  # type: ignore[union-attr]
    assert d.granted == {}


def test_a_grant_opens_the_path_read_only_and_a_revoke_closes_it(d: Dispatcher) -> None:
    assert perms(d, "planner", PLANS) is None
    assert perms(d, "planner", "/vault/notes") is None
    command(d, "notes", "notes", "grant planner /vault/notes/plans r")
    assert d.granted == {"planner": {PLANS: "notes"}}
    assert perms(d, "planner", PLANS) == "r"
    assert perms(d, "planner", PLANS + "/week.md") == "r"
    assert perms(d, "planner", "/vault/notes") == ""  # walked through, lists only plans
    assert perms(d, "planner", "/vault/notes/diary") is None
    assert perms(d, "other", PLANS) is None  # nobody else's view changed
    command(d, "notes", "notes", "revoke planner /vault/notes/plans")
    assert d.granted == {}
    assert perms(d, "planner", PLANS) is None
    assert perms(d, "planner", "/vault/notes") is None
    assert perms(d, "planner", "/vault/public") == "r"  # the config's grants stay


def test_the_events_say_who_granted_what_to_whom(d: Dispatcher) -> None:
    command(d, "user", "notes", "grant planner //vault/notes/plans/ r")
    ctl_ev, grant = read_events(d.log.state)[-2:]  # type: ignore[union-attr]
    assert ctl_ev["type"] == "ctl" and ctl_ev["command"] == "grant planner //vault/notes/plans/ r"
    assert {k: grant[k] for k in ("type", "agent", "who", "to", "path", "perms")} == {
        "type": "grant",
        "agent": "notes",
        "who": "user",
        "to": "planner",
        "path": PLANS,
        "perms": "r",
    }
    command(d, "user", "notes", "revoke planner /vault/notes/plans")
    revoke = read_events(d.log.state)[-1]  # type: ignore[union-attr]
    assert (revoke["type"], revoke["to"], revoke["path"]) == ("revoke", "planner", PLANS)


def test_a_grant_does_not_narrow_what_the_config_gives(state: Path) -> None:
    cfg = make_config(
        {"notes": {}, "planner": {"unveil": {"/vault/notes/plans": "rw"}}}, vault={"notes": "notes"}
    )
    d, log = open_dispatcher(state, cfg)
    command(d, "notes", "notes", "grant planner /vault/notes/plans r")
    assert d.agents["planner"].grants[PLANS] == "rw"
    command(d, "notes", "notes", "revoke planner /vault/notes/plans")
    assert d.agents["planner"].grants[PLANS] == "rw"  # what the config gave stays
    log.close()


def test_grants_survive_restarts_of_both_agents_and_bind(d: Dispatcher) -> None:
    command(d, "notes", "notes", "grant planner /vault/notes/plans r")
    # The grantee narrowing itself works on the granted path too.
    d.record([events.ctl("planner", "planner", "unveil /vault/notes/plans -")])
    assert perms(d, "planner", PLANS) is None
    d.record([events.start("planner", 4242, 0)])  # a restart: back to config + grants
    assert perms(d, "planner", PLANS) == "r"
    d.record([events.start("notes", 4243, 0)])
    d.record([events.ctl("planner", "user", "bind 4244")])
    assert perms(d, "planner", PLANS) == "r"
    assert d.granted == {"planner": {PLANS: "notes"}}


def test_replay_and_a_remount_give_the_same_grants(state: Path) -> None:
    d, log = open_dispatcher(state, config())
    command(d, "notes", "notes", "grant planner /vault/notes/plans r")
    command(d, "notes", "notes", "grant other /vault/notes r")
    command(d, "archive", "archive", "grant planner /vault/archive/2025 r")
    command(d, "notes", "notes", "revoke other /vault/notes")
    want = (d.granted, dict(d.agents["planner"].grants), dict(d.agents["other"].grants))
    log.close()
    again = replayed(state, config())
    again.install_config()
    assert (again.granted, again.agents["planner"].grants, again.agents["other"].grants) == want
    d2, log2 = open_dispatcher(state, config())  # a remount: replay, then the config
    assert d2.granted == want[0] and d2.agents["planner"].grants == want[1]
    log2.close()


def test_a_grant_lapses_when_its_giver_no_longer_owns_the_domain(state: Path) -> None:
    d, log = open_dispatcher(state, config())
    command(d, "notes", "notes", "grant planner /vault/notes/plans r")
    log.close()
    moved = config(notes="archive")  # the domain has another owner now
    d2, log2 = open_dispatcher(state, moved)
    assert d2.granted == {}
    assert PLANS not in d2.agents["planner"].grants
    log2.close()


def test_a_lapsed_grant_leaves_the_view_of_an_agent_outside_the_config(state: Path) -> None:
    d, log = open_dispatcher(state, config())
    d.mkdir("bob", "user")  # not in the config: install_config does not reset its view
    command(d, "notes", "notes", "grant bob /vault/notes/plans r")
    log.close()
    d2, log2 = open_dispatcher(state, config(notes="archive"))  # notes lost the domain
    assert d2.granted == {} and perms(d2, "bob", PLANS) is None
    log2.close()


def test_removing_an_agent_drops_the_grants_it_held_and_gave(d: Dispatcher) -> None:
    d.mkdir("temp", "user")
    command(d, "notes", "notes", "grant temp /vault/notes r")
    command(d, "notes", "notes", "grant planner /vault/notes/plans r")
    d.rmdir("temp", "user")
    assert d.granted == {"planner": {PLANS: "notes"}}
    d.mkdir("temp", "user")  # the same name again starts with nothing granted
    assert perms(d, "temp", "/vault/notes") is None
    grants.forget(d, "notes")  # the giver gone: what it gave leaves the views too
    assert d.granted == {} and perms(d, "planner", PLANS) is None


def test_an_agent_gone_from_the_config_takes_its_grants_along(state: Path) -> None:
    d, log = open_dispatcher(state, config())
    d.record([events.mount("/m", 1, "process", {n: "normal" for n in AGENTS})])
    command(d, "notes", "notes", "grant other /vault/notes r")
    command(d, "notes", "notes", "grant planner /vault/notes/plans r")
    log.close()
    fewer = make_config({k: v for k, v in AGENTS.items() if k != "other"}, vault=VAULT)
    d2, log2 = open_dispatcher(state, fewer)
    d2.record([events.mount("/m", 1, "process", {n: "normal" for n in fewer.agents})])
    assert "other" not in d2.agents and d2.granted == {"planner": {PLANS: "notes"}}
    d2.mkdir("other", "user")  # the name again: nothing granted to it
    assert perms(d2, "other", "/vault/notes") is None
    log2.close()


def test_the_operator_acts_for_the_owner_of_the_domain_whichever_ctl(d: Dispatcher) -> None:
    command(d, "user", "user", "grant other /vault/shared/docs r")  # its own domain
    command(d, "user", "user", "grant other /vault/notes/plans r")  # for notes
    command(d, "user", "planner", "grant other /vault/archive r")  # for archive
    assert d.granted == {
        "other": {
            "/vault/shared/docs": "user",
            "/vault/notes/plans": "notes",
            "/vault/archive": "archive",
        }
    }
    assert perms(d, "other", "/vault/shared/docs") == "r"
    assert perms(d, "other", PLANS) == "r"
    grant = read_events(d.log.state, "grant")[-1]  # type: ignore[union-attr]
    assert (grant["agent"], grant["who"]) == ("archive", "user")
    # It takes a grant back whoever gave it; an owner only its own.
    code, why = refusal(d, "archive", "archive", "revoke other /vault/notes/plans")
    assert code == errno.EPERM and "outside the domain of archive" in why
    command(d, "user", "other", "revoke other /vault/notes/plans")
    revoke = read_events(d.log.state, "revoke")[-1]  # type: ignore[union-attr]
    assert (revoke["agent"], revoke["who"], revoke["path"]) == ("notes", "user", PLANS)
    assert perms(d, "other", PLANS) is None
    code, why = refusal(d, "user", "user", "revoke other /vault/notes/plans")
    assert code == errno.ENOENT and "notes has not granted" in why


def test_ctl_shows_the_grants_on_both_sides(d: Dispatcher) -> None:
    command(d, "notes", "notes", "grant planner /vault/notes/plans r")
    command(d, "notes", "notes", "grant other /vault/notes/plans r")
    command(d, "notes", "notes", "grant planner /vault/notes/later r")
    exists = lambda path: not path.endswith("later")  # noqa: E731
    procs = ProcEvents()
    try:
        from outheisfs.procstate import Processes

        c = ctl.Commands(d, procs, Processes(d.config), d.log.state)  # type: ignore[union-attr]
        c.exists = exists
        planner = c.status("planner").decode().splitlines()
        owner = c.status("notes").decode().splitlines()
    finally:
        procs.close()
    assert "unveil /vault/notes/plans r (granted by notes)" in planner
    assert "unveil /vault/notes/later r (granted by notes) (missing)" in planner
    summary = next(line for line in planner if line.startswith("unveil /"))
    assert "/vault/notes/plans:r(granted by notes)" in summary
    assert "/vault/public:r" in summary
    assert [line for line in owner if line.startswith("granted ")] == [
        "granted other /vault/notes/plans r",
        "granted planner /vault/notes/later r",
        "granted planner /vault/notes/plans r",
    ]
    assert not any(line.startswith("granted ") for line in planner)


# -- through the FUSE handlers ----------------------------------------------------------


@pytest.fixture
def env(state: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpsEnv]:
    monkeypatch.setattr(pyfuse3, "readdir_reply", fake_readdir_reply)
    e = make_ops_env(state, config())
    (e.ops.store.root / "notes" / "plans").mkdir()
    (e.ops.store.root / "notes" / "plans" / "week.md").write_text("plan\n")
    (e.ops.store.root / "notes" / "diary").mkdir()
    yield e
    e.log.close()
    e.ops.procs.close()


def act_as(env: OpsEnv, name: str | None) -> None:
    if name is None:
        env.ops.procs.labels.pop(os.getpid(), None)
    else:
        env.ops.procs.labels[os.getpid()] = name


async def names(env: OpsEnv, path: str) -> list[str]:
    fh = await env.ops.opendir(await env.ino(path), env.ctx)
    token = Token()
    await env.ops.readdir(fh, 0, token)
    await env.ops.releasedir(fh)
    return sorted(n.decode() for n, _, _ in token)


async def test_through_the_handlers_the_view_follows_at_once(env: OpsEnv) -> None:
    act_as(env, "planner")
    assert await errno_of(env.ino("vault/notes")) == errno.ENOENT
    act_as(env, "notes")
    await env.write("agents/notes/ctl", b"grant planner /vault/notes/plans r\n")
    act_as(env, "planner")
    assert await names(env, "vault") == ["notes"]
    assert await names(env, "vault/notes") == ["plans"]
    assert await names(env, "vault/notes/plans") == ["week.md"]
    folder = await env.ino("vault/notes/plans")
    attr = await env.ops.getattr(folder, env.ctx)
    assert attr.st_mode & 0o222 == 0  # read only: the owner stays the one writer
    assert await errno_of(env.ops.mkdir(folder, b"x", 0o755, env.ctx)) == errno.EACCES
    act_as(env, None)  # the operator takes it back through the owner's ctl
    await env.write("agents/notes/ctl", b"revoke planner /vault/notes/plans\n")
    act_as(env, "planner")
    assert await errno_of(env.ops.getattr(folder, env.ctx)) == errno.ENOENT
    assert await errno_of(env.ops.opendir(folder, env.ctx)) == errno.ENOENT
    assert await errno_of(env.ino("vault/notes")) == errno.ENOENT
    assert "notes" not in await names(env, "vault")


async def test_a_refused_grant_is_an_error_event_in_the_granters_errors(env: OpsEnv) -> None:
    act_as(env, "notes")
    code = await errno_of(env.write("agents/notes/ctl", b"grant planner /vault/archive r\n"))
    assert code == errno.EPERM
    error = env.events("error")[-1]
    assert (error["who"], error["where"], error["errno"]) == ("notes", "/agents/notes/ctl", "EPERM")
    assert "outside the domain of notes" in error["why"]
    assert env.events("grant") == []
    code = await errno_of(env.write("agents/notes/ctl", b"grant nobody-here /vault/notes r\n"))
    assert code == errno.ENOENT
    act_as(env, None)
    errors = (await env.read_all("agents/notes/errors")).decode()
    assert "outside the domain of notes" in errors and "no agent 'nobody-here'" in errors


def test_access_answers_from_the_merged_view(d: Dispatcher) -> None:
    procs = ProcEvents()
    try:
        access = Access(d, procs)
        command(d, "notes", "notes", "grant planner /vault/notes/plans r")
        assert access.perms("planner", PLANS) == "r"
        assert access.granted_below("planner", "/vault/notes")
    finally:
        procs.close()


async def test_a_file_opened_before_a_revoke_keeps_its_attributes(env: OpsEnv) -> None:
    """The kernel asks for the attributes of a file it reads: the holder still gets them."""
    act_as(env, "notes")
    await env.write("agents/notes/ctl", b"grant planner /vault/notes/plans r\n")
    act_as(env, "planner")
    week = await env.ino("vault/notes/plans/week.md")
    folder = await env.ino("vault/notes/plans")
    fh = (await env.ops.open(week, os.O_RDONLY, env.ctx)).fh
    act_as(env, "notes")
    await env.write("agents/notes/ctl", b"revoke planner /vault/notes/plans\n")
    act_as(env, "planner")
    try:
        attr = await env.ops.getattr(week, env.ctx)
        assert attr.st_size == len("plan\n") and attr.st_mode & 0o222 == 0
        assert await env.ops.read(fh, 0, 100) == b"plan\n"
        assert await errno_of(env.ops.getattr(folder, env.ctx)) == errno.ENOENT
        act_as(env, "other")  # another agent gets nothing from planner's open file
        assert await errno_of(env.ops.getattr(week, env.ctx)) == errno.ENOENT
    finally:
        await env.ops.release(fh)
    act_as(env, "planner")
    assert await errno_of(env.ops.getattr(week, env.ctx)) == errno.ENOENT


def test_grants_of_an_agent_the_log_and_config_no_longer_know_lapse_at_mount(
    state: Path,
) -> None:
    d, log = open_dispatcher(state, config())  # no mount event: the agents are the config's
    command(d, "notes", "notes", "grant other /vault/notes r")
    log.close()
    fewer = make_config({k: v for k, v in AGENTS.items() if k != "other"}, vault=VAULT)
    d2, log2 = open_dispatcher(state, fewer)
    assert "other" not in d2.agents and d2.granted == {}
    log2.close()
