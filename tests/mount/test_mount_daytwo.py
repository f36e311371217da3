"""Day-two operations through a real mount: `follow`, agent output, rights given to
`run` up front, the operator's vault domains, finding the mount, one `denied`
event per refused lookup."""

from __future__ import annotations

import time

from .conftest import PY, Server, outheisfs, sh

# -- a refused lookup is one `denied` event --------------------------------------------

PROBE = """
import os, sys
for p in sys.argv[1:]:
    try:
        os.stat(p)
        print("ok")
    except OSError as e:
        print(e.errno)
"""


def test_a_refused_lookup_of_a_name_the_kernel_holds_is_one_denied_event(
    server: Server,
) -> None:
    server.write_config('[agents.alice]\n[agents.secret]\n[vault]\nnotes = "secret"\n')
    server.mount()
    mp = server.mp
    paths = [f"{mp}/agents/secret", f"{mp}/log", f"{mp}/vault/notes", f"{mp}/agents/secret/ctl"]
    # The operator's lookups and listings leave the names in the kernel's cache,
    # so an agent's lookup first revalidates them: the case that logged twice.
    assert sh(f"ls -R {mp} >/dev/null && stat {' '.join(paths)} >/dev/null").returncode == 0
    before = len(server.events("denied"))
    r = outheisfs("run", "alice", "--mount", str(mp), "--", PY, "-c", PROBE, *paths)
    assert r.stdout.split() == ["2"] * 4, r.stderr
    time.sleep(0.4)  # past the hold-back of a lookup that no fresh lookup followed
    denied = [(e["who"], e["op"], e["path"]) for e in server.events("denied")[before:]]
    assert denied == [
        ("alice", "lookup", "/agents/secret"),
        ("alice", "lookup", "/log"),
        ("alice", "lookup", "/vault"),
        ("alice", "lookup", "/agents/secret"),
    ]
