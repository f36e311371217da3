"""The rules of confinement, apart from processes: what a policy grants, the
narrowing around the state folder, the checks at mount, the seccomp program."""

from __future__ import annotations

from pathlib import Path

import pytest

from outheisfs import confine, landlock, sandbox
from outheisfs.config import parse_config
from outheisfs.errors import ConfigError


def policy(tmp_path: Path, text: str = "[agents.a]\n", state: str = "state") -> sandbox.Policy:
    config = parse_config(text, tmp_path)
    return sandbox.policy(config, "a", tmp_path / state, tmp_path / "mnt")


def test_the_config_folder_is_narrowed_around_the_state_folder(tmp_path: Path) -> None:
    for name in ("mnt", "state/tmp/a", "state/vault", "agents", "deep/er/state2"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "outheis.toml").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "state" / "vault")
    p = policy(tmp_path)
    got = dict(sandbox.rules(p))
    assert str(tmp_path) not in got, "the folder itself would reach the state folder"
    for name in ("mnt", "agents", "deep", "outheis.toml"):
        assert got[str(tmp_path / name)] & landlock.READ_FILE
    assert str(tmp_path / "link") not in got, "a link into the state folder is no way in"
    assert not [p for p in got if p.startswith(str(tmp_path / "state") + "/vault")]
    assert got[str(tmp_path / "state" / "tmp" / "a")] == sandbox.ALL
    assert got[str(tmp_path / "mnt")] == sandbox.ALL
    assert got["/usr"] == sandbox.RX and got["/etc"] == sandbox.R


def test_a_state_folder_deep_inside_a_grant_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "state").mkdir(parents=True)
    (tmp_path / "a" / "b" / "other").mkdir()
    (tmp_path / "a" / "side").mkdir()
    p = policy(tmp_path, state="a/b/state")
    got = dict(sandbox.rules(p))
    assert str(tmp_path / "a" / "side") in got and str(tmp_path / "a" / "b" / "other") in got
    assert str(tmp_path / "a") not in got and str(tmp_path / "a" / "b") not in got


def test_files_rights(tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    text = (
        f'[agents.a]\nfiles = {{ "{tmp_path / "srv"}" = "w", "/opt" = "x" }}\n'
        'net = ["connect:443", "bind:8080"]\n'
    )
    p = policy(tmp_path, text)
    got = dict(sandbox.rules(p))
    assert got[str(tmp_path / "srv")] == sandbox.W
    assert sandbox.net_ports(p) == [(443, landlock.NET_CONNECT_TCP), (8080, landlock.NET_BIND_TCP)]
    assert sandbox.describe(p, 7) == [
        ("confined", "full"),
        ("files", f"/opt:x,{tmp_path / 'srv'}:w"),
        ("net", "connect:443,bind:8080"),
        ("tmpdir", str(tmp_path / "state" / "tmp" / "a")),
    ]
    assert sandbox.describe(p, 3)[:3] == [
        ("confined", "partial"),
        ("files", f"/opt:x,{tmp_path / 'srv'}:w"),
        ("net", "all"),
    ]
    assert sandbox.describe(p, 0)[:3] == [("confined", "no"), ("files", "all"), ("net", "all")]


def test_the_policy_travels_as_json(tmp_path: Path) -> None:
    p = policy(tmp_path, '[agents.a]\nfiles = { "/srv" = "r" }\nnet = "all"\n')
    assert sandbox.Policy.from_json(p.to_json()) == p


def test_check_refuses_files_in_the_state_folder_and_a_kernel_too_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    config = parse_config(f'[agents.a]\nfiles = {{ "{state}/vault" = "r" }}\n', tmp_path)
    with pytest.raises(ConfigError, match=r"agents\.a\.files"):
        sandbox.check(config, state)
    monkeypatch.setenv(landlock.PRETEND_ENV, "4")
    with pytest.raises(sandbox.ConfineError, match=r"ABI 6.*ABI 4"):
        sandbox.check(parse_config("", tmp_path), state)
    sandbox.check(parse_config('confine = "best-effort"', tmp_path), state)
    sandbox.check(parse_config('confine = "off"', tmp_path), state)


def test_fs_rights_per_abi() -> None:
    assert landlock.fs_rights(0) == 0
    assert landlock.fs_rights(1) == (1 << 13) - 1
    assert landlock.fs_rights(3) == landlock.fs_rights(4) == (1 << 15) - 1
    assert landlock.fs_rights(7) == (1 << 16) - 1


def test_seccomp_program_jumps_land_inside() -> None:
    for arches in confine.ARCHES.values():
        for net_all in (True, False):
            prog = confine.program(arches, net_all)
            for i, (code, jt, jf, _) in enumerate(prog):
                if code & 0x07 == 0x05:  # a jump
                    assert i + 1 + max(jt, jf) < len(prog)
            assert prog[-1] == (confine.RET, 0, 0, confine.RET_ALLOW)


def test_agent_path_puts_the_servers_python_first() -> None:
    import os
    import sys

    bindir = os.path.dirname(sys.executable)
    assert sandbox.agent_path("/usr/bin:/bin").split(":")[0] in (bindir, "/usr/bin")
    assert sandbox.agent_path(f"/x:{bindir}") == f"/x:{bindir}"
