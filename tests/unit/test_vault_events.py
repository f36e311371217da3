"""`vault_events`: "all" logs each change in the vault as a `vault` event, "off"
none of them; refusals are `denied` events either way."""

from __future__ import annotations

import os
from pathlib import Path

import pyfuse3
import pytest

from outheisfs.tree import VAULT_INODE

from .helpers import OpsEnv, make_config, make_ops_env


async def changes(env: OpsEnv) -> None:
    """An atomic save in the operator's domain: a temporary file, written, renamed."""
    notes = (await env.ops.lookup(VAULT_INODE, b"notes", env.ctx)).st_ino
    fi, _ = await env.ops.create(notes, b".a.md.tmp", 0o644, os.O_WRONLY, env.ctx)
    await env.ops.write(fi.fh, 0, b"text\n")
    await env.ops.release(fi.fh)
    await env.ops.rename(notes, b".a.md.tmp", notes, b"a.md", 0, env.ctx)


@pytest.mark.parametrize("setting", ["all", "off"])
async def test_vault_events(tmp_path: Path, setting: str) -> None:
    config = make_config({"echo": {}}, vault={"notes": "user"}, vault_events=setting)
    env = make_ops_env(tmp_path, config)
    try:
        await changes(env)
        assert (tmp_path / "vault" / "notes" / "a.md").read_text() == "text\n"
        ops = [(e["op"], e["path"]) for e in env.events("vault")]
        if setting == "all":
            assert ops == [
                ("create", "/vault/notes/.a.md.tmp"),
                ("write", "/vault/notes/.a.md.tmp"),
                ("rename", "/vault/notes/.a.md.tmp"),
            ]
        else:
            assert ops == []
        # A refusal is a `denied` event whatever the setting.
        env.ops.procs.labels[os.getpid()] = "echo"
        with pytest.raises(pyfuse3.FUSEError):
            await env.ops.lookup(VAULT_INODE, b"notes", env.ctx)
        assert [e["who"] for e in env.events("denied")] == ["echo"]
    finally:
        env.log.close()
        env.ops.procs.close()
