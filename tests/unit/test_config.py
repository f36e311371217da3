"""The configuration file [SPEC §3]: every key, every refusal names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from outheisfs.config import AgentConfig, Config, load_config, parse_config
from outheisfs.errors import ConfigError

FULL = """
durability = "disk"
max_queue = 7
max_message = 4096
max_attempts = 2
aging = 2.5

[agents.echo]
command = ["python3", "./agents/echo.py"]
priority = "interactive"
restart = "transient"
max_restarts = 9
restart_window = 7.5
instances = 4
send = ["notes", "user"]
unveil = { "/vault/notes" = "r", "/vault/drafts" = "rw", "/vault/out" = "w" }
env = { MODEL = "small", DEPTH = "3" }

[agents.notes]

[agents.all]
send = ["*"]
priority = "background"
restart = "temporary"

[vault]
notes = "notes"
"""


def parse(text: str, home: Path = Path("/home/x")) -> Config:
    return parse_config(text, home, "outheis.toml")


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse(text)
    msg = str(e.value)
    assert "\n" not in msg, "one line"
    return msg


def test_every_key_parsed() -> None:
    c = parse(FULL)
    assert c.durability == "disk"
    assert (c.max_queue, c.max_message, c.max_attempts, c.aging) == (7, 4096, 2, 2.5)
    assert list(c.agents) == ["echo", "notes", "all"]
    echo = c.agents["echo"]
    assert echo.command == ["python3", "./agents/echo.py"]
    assert echo.priority == "interactive"
    assert echo.restart == "transient"
    assert echo.max_restarts == 9
    assert echo.restart_window == 7.5
    assert echo.instances == 4
    assert echo.send == ["notes", "user"]
    assert echo.unveil == {"/vault/notes": "r", "/vault/drafts": "rw", "/vault/out": "w"}
    assert echo.env == {"MODEL": "small", "DEPTH": "3"}
    assert c.agents["notes"].command is None
    assert c.agents["all"].send == ["*"]
    assert c.agents["all"].priority == "background"
    assert c.agents["all"].restart == "temporary"
    assert c.vault == {"notes": "notes"}
    assert c.home == Path("/home/x")


def test_spec_example_parses() -> None:
    # The example of SPEC §3, with the agent it sends to.
    text = """
durability = "process"
[agents.echo]
command = ["python3", "./agents/echo.py"]
priority = "normal"
restart = "permanent"
max_restarts = 3
restart_window = 5.0
instances = 1
send = ["notes"]
unveil = { "/vault/notes" = "r" }
env = { MODEL = "small" }
[agents.notes]
[vault]
notes = "notes"
"""
    c = parse(text)
    assert c.agents["echo"].send == ["notes"]
    assert c.vault["notes"] == "notes"


def test_defaults() -> None:
    c = parse("")
    assert c.durability == "process"
    assert c.max_queue == 10_000
    assert c.max_message == 1 << 20
    assert c.max_attempts == 5
    assert c.aging == 10.0
    assert c.max_waiting == 64 and c.max_unfinished == 16 << 20
    assert c.agents == {} and c.vault == {}
    a = parse("[agents.echo]\n").agents["echo"]
    assert a == AgentConfig()
    assert a.command is None
    assert a.priority == "normal"
    assert a.restart == "permanent"
    assert a.max_restarts == 3
    assert a.restart_window == 5.0
    assert a.instances == 1
    assert a.send == [] and a.unveil == {} and a.env == {}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        # unknown keys
        ("bogus = 1", "bogus"),
        ("[agents.echo]\nbogus = 1", "agents.echo.bogus"),
        ("[agents.echo]\ncomand = ['x']", "agents.echo.comand"),
        ("[agent.echo]\n", "agent"),
        # bad values
        ('durability = "always"', "durability"),
        ("max_queue = 0", "max_queue"),
        ("max_attempts = 0", "max_attempts"),
        ("aging = 0", "aging"),
        ("max_waiting = 0", "max_waiting"),
        ("max_unfinished = 100", "max_unfinished"),  # less than max_message
        ('[agents.echo]\npriority = "urgent"', "agents.echo.priority"),
        ('[agents.echo]\nrestart = "sometimes"', "agents.echo.restart"),
        ("[agents.echo]\nmax_restarts = -1", "agents.echo.max_restarts"),
        ("[agents.echo]\nmax_restarts = 1.5", "agents.echo.max_restarts"),
        ("[agents.echo]\nrestart_window = 0", "agents.echo.restart_window"),
        ("[agents.echo]\ninstances = 0", "agents.echo.instances"),
        ("[agents.echo]\ncommand = []", "agents.echo.command"),
        ('[agents.echo]\ncommand = "python3 echo.py"', "agents.echo.command"),
        ('[agents.echo]\nsend = "user"', "agents.echo.send"),
        ('[agents.echo]\nunveil = { "/vault/x" = "x" }', "agents.echo.unveil"),
        ('[agents.echo]\nunveil = { "vault/x" = "r" }', "agents.echo.unveil"),
        ("[agents.echo]\nenv = { A = 1 }", "agents.echo.env.A"),
        # unknown agents in send and [vault]
        ('[agents.echo]\nsend = ["nobody"]', "agents.echo.send"),
        ('[agents.echo]\n[vault]\nnotes = "nobody"', "vault.notes"),
        ('[vault]\nnotes = "User"', "vault.notes"),
        ('[agents.echo]\n[vault]\n"Bad Domain" = "echo"', "vault.Bad Domain"),
        # confinement
        ('confine = "maybe"', "confine"),
        ("confine = true", "confine"),
        ('vault_events = "some"', "vault_events"),
        ("vault_events = false", "vault_events"),
        ('[agents.echo]\nfiles = { "/srv" = "rx" }', "agents.echo.files./srv"),
        ('[agents.echo]\nfiles = { "srv" = "r" }', "agents.echo.files"),
        ('[agents.echo]\nfiles = { "/srv/../etc" = "r" }', "agents.echo.files"),
        ('[agents.echo]\nnet = "some"', "agents.echo.net"),
        ('[agents.echo]\nnet = ["connect"]', "agents.echo.net"),
        ('[agents.echo]\nnet = ["connect:http"]', "agents.echo.net"),
        ('[agents.echo]\nnet = ["connect:65536"]', "agents.echo.net"),
        ('[agents.echo]\nnet = ["listen:80"]', "agents.echo.net"),
        ("[agents.echo]\nnet = [443]", "agents.echo.net"),
    ],
)
def test_refusal_names_the_key(text: str, key: str) -> None:
    msg = refused(text)
    assert key in msg
    assert "outheis.toml" in msg


def test_unknown_agent_in_send_is_named() -> None:
    msg = refused('[agents.echo]\nsend = ["notes", "nobody"]\n[agents.notes]\n')
    assert "agents.echo.send" in msg and "nobody" in msg


def test_send_to_star_and_user_allowed() -> None:
    c = parse('[agents.a]\nsend = ["*"]\n[agents.b]\nsend = ["user", "a"]\n')
    assert c.agents["b"].send == ["user", "a"]


@pytest.mark.parametrize("name", ["Echo", "bad name", "-x", ".x", "_x", "a/b", "x" * 65, "é"])
def test_bad_agent_name_refused(name: str) -> None:
    msg = refused(f'[agents."{name}"]\n')
    assert name in msg
    assert "agents" in msg


@pytest.mark.parametrize("name", ["a", "0", "a.b-c_d", "x" * 64])
def test_good_agent_names(name: str) -> None:
    assert name in parse(f'[agents."{name}"]\n').agents


def test_user_is_reserved() -> None:
    msg = refused("[agents.user]\n")
    assert "user" in msg and "reserved" in msg


@pytest.mark.parametrize("name", ["user", "Bad"])
def test_agent_name_error_names_the_full_key(name: str) -> None:
    assert f"agents.{name}:" in refused(f"[agents.{name}]\n")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[agents.echo]\ninstances = "2"', "agents.echo.instances"),
        ("[agents.echo]\nmax_restarts = true", "agents.echo.max_restarts"),
        ('aging = "10"', "aging"),
    ],
)
def test_wrongly_typed_values_refused(text: str, key: str) -> None:
    assert key in refused(text)


def test_not_toml() -> None:
    msg = refused("[agents.echo\n")
    assert "outheis.toml" in msg and "TOML" in msg


def test_load_config_default_file_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    c = load_config(None)
    assert c.agents == {}
    assert c.durability == "process"
    assert c.home.resolve() == tmp_path.resolve()


def test_load_config_default_file_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "outheis.toml").write_text('[agents.echo]\ncommand = ["./echo.py"]\n')
    monkeypatch.chdir(tmp_path)
    c = load_config(None)
    assert list(c.agents) == ["echo"]
    assert c.home.resolve() == tmp_path.resolve()


def test_load_config_default_file_bad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "outheis.toml").write_text('[agents.echo]\nrestart = "never"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(None)
    assert "outheis.toml" in str(e.value) and "agents.echo.restart" in str(e.value)


def test_load_config_explicit_path(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "my.toml").write_text("[agents.a]\n[agents.b]\n")
    c = load_config(sub / "my.toml")
    assert list(c.agents) == ["a", "b"]
    # Relative commands resolve against the config file's folder [SPEC §3].
    assert c.home.resolve() == sub.resolve()


def test_load_config_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.toml")
    assert "nope.toml" in str(e.value)


def test_home_is_not_a_key() -> None:
    assert "home: unknown key" in refused('home = "/tmp"\n')


def test_confinement_keys() -> None:
    c = parse(
        'confine = "best-effort"\n[agents.a]\nfiles = { "/srv" = "rw", "/opt/x" = "x" }\n'
        'net = ["connect:443", "bind:0"]\n[agents.b]\nnet = "all"\n[agents.c]\n'
    )
    assert c.confine == "best-effort"
    assert c.agents["a"].files == {"/srv": "rw", "/opt/x": "x"}
    assert c.agents["a"].net == ["connect:443", "bind:0"]
    assert c.agents["b"].net == "all"
    assert c.agents["c"].net == [] and c.agents["c"].files == {}
    assert parse("").confine == "required"


def test_vault_events() -> None:
    assert parse("").vault_events == "all"
    assert parse('vault_events = "off"\n').vault_events == "off"
    assert parse('vault_events = "all"\n').vault_events == "all"
