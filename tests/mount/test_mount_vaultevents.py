"""`vault_events = "off"` through a real mount: an editor's atomic saves leave the
log alone; refusals are still `denied` events."""

from __future__ import annotations

from .conftest import Server, outheisfs

SAVE = """
for i in 1 2 3; do
  printf 'draft %s\\n' "$i" > vault/notes/.a.md.tmp && mv vault/notes/.a.md.tmp vault/notes/a.md
done
mkdir vault/notes/sub && touch vault/notes/sub/b.md && rm -r vault/notes/sub
cat vault/notes/a.md
"""


def test_vault_events_off_logs_no_change_but_every_refusal(server: Server) -> None:
    server.write_config(
        'vault_events = "off"\n[agents.owner]\n[agents.reader]\n'
        'unveil = { "/vault/notes" = "r" }\n[vault]\nnotes = "owner"\n'
    )
    server.mount()
    before, mp = len(server.events()), str(server.mp)
    r = outheisfs("run", "owner", "--mount", mp, "--", "bash", "-c", SAVE, cwd=server.mp)
    assert r.returncode == 0 and r.stdout == "draft 3\n", r.stderr
    server.p("vault", "notes", "op.md").write_text("the operator's\n")
    r = outheisfs("run", "reader", "--mount", mp, "--", "touch", "vault/notes/x.md", cwd=server.mp)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert server.events("vault") == []
    denied = server.events("denied")
    assert [(e["who"], e["path"]) for e in denied] == [("reader", "/vault/notes/x.md")]
    # What was logged meanwhile is the runs' own (agents bound, processes ended, the refusal).
    later = {e["type"] for e in server.events()[before:]}
    assert "vault" not in later and "denied" in later
    assert server.p("vault", "notes", "a.md").read_text() == "draft 3\n"
