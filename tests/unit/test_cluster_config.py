"""The `[cluster]` table, the agent key `host`, `mount --host`, and what a plain
install imports: without `[cluster]`, nothing of the cluster layer, nor nats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from outheisfs.config import parse_config
from outheisfs.errors import ConfigError


def outheisfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outheisfs", *args], capture_output=True, text=True, timeout=60
    )


CLUSTER = """
[cluster]
servers = ["nats://10.0.0.1:4222", "tls://10.0.0.2:4222"]
stream = "team"
replicas = 5
host_timeout = 2.5
credentials = "nats.creds"
"""


def parse(text: str) -> object:
    return parse_config(text, Path("/cfg"), "outheis.toml")


def test_cluster_table_and_host_are_read() -> None:
    c = parse_config(
        CLUSTER + '[agents.model]\ncommand = ["m"]\nhost = ["gpu1", "gpu2.lan"]\n'
        '[agents.tool]\ncommand = ["t"]\nhost = "tools"\n[agents.mailbox]\n',
        Path("/cfg"),
    )
    assert c.cluster is not None
    assert c.cluster.servers == ["nats://10.0.0.1:4222", "tls://10.0.0.2:4222"]
    assert (c.cluster.stream, c.cluster.replicas, c.cluster.host_timeout) == ("team", 5, 2.5)
    assert c.agents["model"].hosts == ["gpu1", "gpu2.lan"]
    assert c.agents["tool"].hosts == ["tools"]
    assert c.agents["mailbox"].hosts == []  # no process: no host needed


def test_cluster_defaults() -> None:
    c = parse_config('[cluster]\nservers = ["nats://127.0.0.1:4222"]\n', Path("/cfg"))
    assert c.cluster is not None
    assert (c.cluster.stream, c.cluster.replicas, c.cluster.host_timeout) == ("outheis", 3, 10.0)
    assert parse_config("", Path("/cfg")).cluster is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[cluster]\nservers = ["nats://a:1"]\nreplicas = 0\n', "cluster.replicas"),
        ('[cluster]\nservers = ["nats://a:1"]\nreplicas = 6\n', "cluster.replicas"),
        ('[cluster]\nservers = ["nats://a:1"]\nhost_timeout = 0\n', "cluster.host_timeout"),
        ('[cluster]\nservers = ["nats://a:1"]\nstream = "a.b"\n', "cluster.stream"),
        ('[cluster]\nservers = ["nats://a:1"]\nreplica = 3\n', "cluster.replica: unknown key"),
        ("[cluster]\nservers = []\n", "cluster.servers"),
        ('[cluster]\nservers = ["http://a:1"]\n', "cluster.servers"),
        ("[cluster]\nreplicas = 3\n", "cluster.servers"),
        ('[agents.a]\nhost = "no such/host"\n', "agents.a.host"),
        ("[agents.a]\nhost = []\n", "agents.a.host"),
        ("[agents.a]\nhost = 3\n", "agents.a.host"),
        (
            '[cluster]\nservers = ["nats://a:1"]\n[agents.a]\ncommand = ["x"]\n',
            "agents.a.host: missing",
        ),
    ],
)
def test_bad_cluster_keys_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^outheis.toml: {key}"):
        parse(text)


PLAIN_MODULES = [
    "outheisfs.cli",
    "outheisfs.mount",
    "outheisfs.ops",
    "outheisfs.dispatcher",
    "outheisfs.supervisor",
    "outheisfs.eventlog",
    "outheisfs.config",
    "outheisfs.access",
    "outheisfs.openfile",
    "outheisfs.ctl",
    "outheisfs.bench",
    "outheisfs.run",
]


def test_a_plain_mount_imports_nothing_of_the_cluster(tmp_path: Path) -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {PLAIN_MODULES!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if e.name != m: raise\n"  # a module moved by a restructuring: skip it
        "from outheisfs.config import load_config\n"
        "from outheisfs.cli import build_parser\n"
        "build_parser().parse_args(['mount', 'mp', '--host', 'h1'])\n"
        f"load_config(__import__('pathlib').Path({str(tmp_path / 'c.toml')!r}))\n"
        "bad = sorted(m for m in sys.modules if m == 'nats' or m.startswith(('nats.', "
        "'outheisfs.cluster')))\n"
        "print(bad)\n"
    )
    (tmp_path / "c.toml").write_text('[agents.a]\ncommand = ["x"]\n')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_mount_host_must_be_a_valid_name(tmp_path: Path) -> None:
    r = outheisfs("mount", str(tmp_path / "mp"), "--host", "a/b")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--host" in r.stderr
