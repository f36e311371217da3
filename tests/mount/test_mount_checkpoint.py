"""Checkpoints and `retain` through a real mount: a start after a clean stop reads
nothing of the log before its checkpoint; a damaged checkpoint means a full replay
and the same state; a running server writes checkpoints, so a SIGKILLed one also
starts from one; `retain` bounds the log while `replay` gives the same state."""

from __future__ import annotations

import json
from typing import Any

from .conftest import Server, outheisfs, sh, take, wait_for


def send_many(server: Server, to: str, n: int, tag: str = "m") -> None:
    r = sh(f"for i in $(seq {n}); do echo {tag}$i > {server.agent(to, 'inbox')}; done")
    assert r.returncode == 0, r.stderr


def replayed(server: Server, *extra: str) -> dict[str, Any]:
    r = outheisfs("replay", "--state", str(server.state), "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def checkpoints(server: Server) -> list[int]:
    folder = server.state / "checkpoints"
    return sorted(int(p.name.split(".")[0]) for p in folder.glob("*.ckpt"))


def test_a_start_after_a_clean_stop_reads_nothing_before_the_checkpoint(
    server: Server,
) -> None:
    server.write_config("[agents.worker]\n")
    server.mount()
    send_many(server, "worker", 40)
    assert len(take(server, "worker", 10)) == 10
    assert server.umount().returncode == 0
    umount = server.events("umount")[-1]["seq"]
    assert checkpoints(server) == [umount]
    before = replayed(server)
    assert before["checkpoint"] == umount and before["events"] == 0

    server.mount()
    mount = server.events("mount")[-1]
    assert (mount["checkpoint"], mount["replayed"]) == (umount, 0)
    assert server.status("worker")["queued"] == "30"
    first = take(server, "worker", 1)[0]
    assert first["body"] == "m11"
    assert server.umount().returncode == 0
    # `replay` from the checkpoints and from the log alone agree, at the end and before.
    with_ck = replayed(server)
    (server.state / "checkpoints").rename(server.root / "aside")
    alone = replayed(server)
    assert alone["checkpoint"] == 0 and alone["agents"] == with_ck["agents"]
    assert alone["agents"]["worker"]["delivered"] == 11
    (server.root / "aside").rename(server.state / "checkpoints")
    assert replayed(server, "--until", str(umount))["agents"] == before["agents"]


def test_a_damaged_checkpoint_means_a_full_replay_and_the_same_state(server: Server) -> None:
    server.write_config("[agents.worker]\n")
    server.mount()
    send_many(server, "worker", 20)
    assert server.umount().returncode == 0
    (path,) = (server.state / "checkpoints").glob("*.ckpt")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    lines = len(server.events())

    server.mount()
    mount = server.events("mount")[-1]
    assert (mount["checkpoint"], mount["replayed"]) == (0, lines)
    assert server.status("worker")["queued"] == "20"
    assert [m["body"] for m in take(server, "worker", 20)] == [f"m{i}" for i in range(1, 21)]


def test_a_killed_server_starts_from_the_checkpoint_it_wrote_while_running(
    server: Server,
) -> None:
    server.write_config("checkpoint_every = 20\n[agents.worker]\n")
    server.mount()
    send_many(server, "worker", 30)
    wait_for(lambda: checkpoints(server), timeout=30)
    server.kill9()
    ck = checkpoints(server)[-1]
    lines = len(server.events())

    server.mount()
    mount = server.events("mount")[-1]
    assert mount["checkpoint"] == ck >= 20
    assert mount["replayed"] == lines - ck < lines
    assert server.status("worker")["queued"] == "30"
    # The agent's own log file is whole: every message, once.
    sent = [e["seq"] for e in server.events("message")]
    log = [json.loads(x) for x in server.agent("worker", "log").read_text().splitlines()]
    assert [e["seq"] for e in log if e["type"] == "message"] == sent


def test_retain_bounds_the_log_and_replay_gives_the_same_state(server: Server) -> None:
    server.write_config("retain = 50\n[agents.worker]\n")
    server.mount()
    send_many(server, "worker", 100, "a")
    assert server.umount().returncode == 0
    base = server.events("umount")[-1]["seq"]
    server.mount()
    send_many(server, "worker", 100, "b")
    assert len(take(server, "worker", 5)) == 5
    assert server.umount().returncode == 0
    assert server.events()[0]["seq"] == 1  # nothing dropped yet: the newest checkpoint is too new
    want = replayed(server)
    size = (server.state / "events.jsonl").stat().st_size
    worker_log = (server.state / "streams" / "worker.log.idx").stat().st_size

    server.mount()
    head = sh(f"head -n1 {server.p('log')}")
    assert json.loads(head.stdout)["seq"] == base + 1
    assert (server.state / "events.jsonl").stat().st_size < size * 0.6
    agent_log = [json.loads(x) for x in server.agent("worker", "log").read_text().splitlines()]
    assert agent_log[0]["seq"] > base
    assert (server.state / "streams" / "worker.log.idx").stat().st_size < worker_log * 0.6
    assert server.status("worker")["queued"] == "195"
    assert take(server, "worker", 1)[0]["body"] == "a6"  # what dropped events said stays
    assert server.umount().returncode == 0

    got = replayed(server)
    worker = got["agents"]["worker"]
    assert worker["delivered"] == want["agents"]["worker"]["delivered"] + 1
    assert [m["body"] for m in worker["queued"]] == [
        m["body"] for m in want["agents"]["worker"]["queued"]
    ][1:]
    # Before the log's new beginning, replay says why it cannot.
    r = outheisfs("replay", "--state", str(server.state), "--until", "5")
    assert r.returncode == 1
    assert f"begins at seq {base + 1}" in r.stderr and "retain" in r.stderr
    # And the server still starts from its checkpoints.
    server.mount()
    assert server.events("mount")[-1]["checkpoint"] > base
    assert server.status("worker")["queued"] == "194"
