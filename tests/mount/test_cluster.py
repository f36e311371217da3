"""The cluster engine layer through real `nats-server` processes.

Each test gets three servers of its own (JetStream, routes, replicas 3,
fsync on every store) on loopback; see `cluster_helpers.py`.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

pytest.importorskip("nats")

from outheisfs.cluster.engine import (
    ConnectOptions,
    Engine,
    EngineError,
    EngineUnavailable,
    connect_options,
    open_engine,
)
from outheisfs.cluster.hosts import Change, HostClaimLost, HostNameInUse, Hosts
from outheisfs.cluster.local import LocalCluster
from outheisfs.config import ClusterConfig

from .cluster_helpers import HOST_SCRIPT, Proxy, make_certs

pytestmark = pytest.mark.cluster
STREAM = "t"


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Three nats-server processes (JetStream, routes) on free loopback ports, with a
    leader; always stopped afterwards (only the pids started here)."""
    with LocalCluster(tmp_path / "nats") as cluster:
        yield cluster


def opts(cluster: LocalCluster | list[str]) -> ConnectOptions:
    return ConnectOptions(cluster.urls if isinstance(cluster, LocalCluster) else cluster)


def batch(prefix: str, n: int) -> list[tuple[str, bytes]]:
    return [(f"{prefix}-{i}", json.dumps({"n": i, "p": prefix}).encode()) for i in range(n)]


async def stream_ids(engine: Engine) -> list[tuple[int, str | None]]:
    async with engine.read_all() as events:
        return [(ev.seq, ev.msg_id) async for ev in events]


async def test_publish_returns_seqs_and_followers_see_one_order(
    nats_cluster: LocalCluster,
) -> None:
    async with (
        open_engine(opts(nats_cluster), STREAM, 3) as h1,
        open_engine(opts(nats_cluster), STREAM, 3) as h2,
    ):
        assert await h1.publish(batch("a", 3)) == [1, 2, 3]
        # Two hosts publishing at once: one order, the same on every follower.
        async with trio.open_nursery() as n:
            n.start_soon(h1.publish, batch("b", 50))
            n.start_soon(h2.publish, batch("c", 50))
        seen: dict[str, list[tuple[int, str | None, bytes]]] = {}
        for name, eng in (("h1", h1), ("h2", h2)):
            async with eng.follow(1) as f:
                got: list[tuple[int, str | None, bytes]] = []
                async for ev in f:
                    got.append((ev.seq, ev.msg_id, ev.data))
                    if ev.seq == 103:
                        break
            seen[name] = got
        assert seen["h1"] == seen["h2"]
        assert [s for s, _, _ in seen["h1"]] == list(range(1, 104))
        ids = [m for _, m, _ in seen["h1"]]
        for p in "bc":  # each batch in its own order
            mine = [m for m in ids if m and m.startswith(p)]
            assert mine == [f"{p}-{i}" for i in range(50)]
        assert json.loads(seen["h1"][0][2]) == {"n": 0, "p": "a"}
        # Following from the middle, then the events stored afterwards as they come.
        async with h2.follow(102) as f:
            first = await f.next_batch()
            assert [e.seq for e in first] == [102, 103]
            seqs = await h1.publish(batch("d", 1))
            assert seqs == [104]
            with trio.fail_after(10):
                assert [e.msg_id for e in await f.next_batch()] == ["d-0"]
        assert await h1.last_seq() == 104
        assert [s for s, _ in await stream_ids(h2)] == list(range(1, 105))


async def test_a_retried_publish_is_stored_once(nats_cluster: LocalCluster) -> None:
    async with open_engine(opts(nats_cluster), STREAM, 3) as e:
        first = await e.publish(batch("x", 4))
        again = await e.publish(batch("x", 4)[1:3] + batch("y", 1))
        assert again == [first[1], first[2], 5]
        assert await e.last_seq() == 5
        assert Counter(m for _, m in await stream_ids(e)) == Counter(
            [f"x-{i}" for i in range(4)] + ["y-0"]
        )


async def test_events_gone_from_the_stream_are_skipped_not_waited_for(
    nats_cluster: LocalCluster,
) -> None:
    async with open_engine(opts(nats_cluster), STREAM, 3) as e:
        assert await stream_ids(e) == []  # an empty stream reads as nothing
        await e.publish(batch("x", 6))

        async def remove(*seqs: int) -> None:
            for seq in seqs:
                await e.js.delete_msg(STREAM, seq)

        await e.bridge.call(remove, 1, 2, 4)
        async with e.follow(1) as f:
            got = [ev.seq for ev in await f.next_batch()]
            with trio.fail_after(10):
                while got[-1] < 6:
                    got += [ev.seq for ev in await f.next_batch()]
            assert got == [3, 5, 6]
            assert f.skipped == 3
        assert [s for s, _ in await stream_ids(e)] == [3, 5, 6]


async def test_an_event_over_max_payload_fails_at_once(nats_cluster: LocalCluster) -> None:
    async with open_engine(opts(nats_cluster), STREAM, 3) as e:
        with trio.fail_after(5), pytest.raises(EngineError, match="max_payload"):
            await e.publish([("big", b"x" * (2 << 20))])
        assert await e.publish(batch("small", 1)) == [1]


async def test_stream_is_made_with_the_replicas_asked_for(nats_cluster: LocalCluster) -> None:
    async with open_engine(opts(nats_cluster), STREAM, 3) as e:

        async def replicas() -> int:
            info = await e.js.stream_info(STREAM)
            return info.config.num_replicas or 0

        assert await e.bridge.call(replicas) == 3
    async with open_engine(opts(nats_cluster), STREAM, 2) as e:
        assert await e.bridge.call(replicas) == 2


async def test_member_killed_during_four_publishers_loses_and_doubles_nothing(
    nats_cluster: LocalCluster,
) -> None:
    acked: dict[str, int] = {}
    failed: list[str] = []
    attempted: set[str] = set()
    async with open_engine(opts(nats_cluster), STREAM, 3, publish_timeout=20) as e:

        async def leader() -> str:
            info = await e.js.stream_info(STREAM)
            assert info.cluster is not None and info.cluster.leader is not None
            return info.cluster.leader

        async def publisher(p: int, stop: trio.Event) -> None:
            i = 0
            while not stop.is_set():
                mid = f"p{p}-{i}"
                attempted.add(mid)
                try:
                    (acked[mid],) = await e.publish([(mid, b"%d" % i)])
                except EngineUnavailable:
                    failed.append(mid)
                i += 1

        stop = trio.Event()
        async with trio.open_nursery() as n:
            for p in range(4):
                n.start_soon(publisher, p, stop)
            with trio.fail_after(20):
                while len(acked) < 200:
                    await trio.sleep(0.01)
            victim = int((await e.bridge.call(leader))[1:]) - 1  # the stream leader
            await trio.to_thread.run_sync(nats_cluster.kill, victim)
            before = len(acked)
            with trio.fail_after(20):  # writes go on with the other two
                while len(acked) < before + 200:
                    await trio.sleep(0.01)
            await trio.to_thread.run_sync(nats_cluster.start, victim)
            await trio.to_thread.run_sync(nats_cluster.wait_ready)
            before = len(acked)
            with trio.fail_after(20):
                while len(acked) < before + 200:
                    await trio.sleep(0.01)
            stop.set()
        stored = await stream_ids(e)
    counts = Counter(m for _, m in stored)
    lost = [m for m in acked if counts[m] == 0]
    doubled = [m for m, c in counts.items() if c > 1]
    invented = [m for m in counts if m not in attempted]
    print(
        f"failover: {len(acked)} acknowledged, {len(failed)} failed, lost {len(lost)}, "
        f"duplicated {len(doubled)}, invented {len(invented)}"
    )
    assert (lost, doubled, invented, failed) == ([], [], [], [])
    assert [s for s, _ in stored] == list(range(1, len(stored) + 1))
    assert all(dict(stored)[seq] == m for m, seq in acked.items())


async def test_unreachable_engine_publish_waits_then_fails_and_follower_catches_up(
    nats_cluster: LocalCluster,
) -> None:
    proxies = [Proxy(s.client) for s in nats_cluster.servers]
    async with trio.open_nursery() as n:
        for p in proxies:
            await n.start(p.run)
        cut = ConnectOptions([p.url for p in proxies], reconnect_wait=0.1)
        async with (
            open_engine(cut, STREAM, 3, publish_timeout=2.0) as h1,
            open_engine(opts(nats_cluster), STREAM, 3) as h2,
        ):
            assert await h1.publish(batch("before", 2)) == [1, 2]
            async with h1.follow(1) as f:
                assert [e.seq for e in await f.next_batch()] == [1, 2]
                for p in proxies:
                    p.stop()
                t0 = trio.current_time()
                with pytest.raises(EngineUnavailable, match="did not store 1 of 1 events"):
                    await h1.publish(batch("cut", 1))
                waited = trio.current_time() - t0
                assert 1.9 <= waited < 6, waited
                # The world goes on without h1.
                assert await h2.publish(batch("meanwhile", 3)) == [3, 4, 5]
                for p in proxies:
                    await n.start(p.run)
                # h1 catches up: what it missed, in order, nothing twice.
                got: list[str | None] = []
                with trio.fail_after(20):
                    while "meanwhile-2" not in got:
                        got += [e.msg_id for e in await f.next_batch()]
                # The failed publish was sent before it failed: it may be stored late,
                # never twice; retried with its id it gets its one seq.
                (seq,) = await h1.publish(batch("cut", 1))
                with trio.fail_after(20):
                    while "cut-0" not in got:
                        got += [e.msg_id for e in await f.next_batch()]
            assert Counter(got) == Counter(["meanwhile-0", "meanwhile-1", "meanwhile-2", "cut-0"])
            ids = dict(await stream_ids(h2))
            assert ids[seq] == "cut-0" and list(ids.values()).count("cut-0") == 1
        n.cancel_scope.cancel()


async def test_no_engine_at_all_is_one_clear_error(tmp_path: Path) -> None:
    t0 = trio.current_time()
    with pytest.raises(EngineUnavailable, match="cannot reach the NATS servers"):
        async with open_engine(
            ConnectOptions(["nats://127.0.0.1:9"]), STREAM, 1, publish_timeout=1.0
        ):
            pass
    assert trio.current_time() - t0 < 5


# -- hosts: liveness and the host-name claim ---------------------------------------------


def start_host(cluster: LocalCluster, name: str, timeout: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(HOST_SCRIPT), ",".join(cluster.urls), STREAM, name, str(timeout)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("claimed"):
        end_host(proc)
        raise AssertionError(f"host {name} did not start: {line!r}")
    return proc


def end_host(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def test_a_host_that_stops_beating_is_gone_after_host_timeout(
    nats_cluster: LocalCluster,
) -> None:
    timeout = 1.0
    other = await trio.to_thread.run_sync(start_host, nats_cluster, "h2", timeout)
    try:
        async with open_engine(opts(nats_cluster), STREAM, 3) as e, trio.open_nursery() as n:
            hosts = Hosts(e, "h1", timeout)
            await n.start(hosts.run)
            with trio.fail_after(5):
                assert await hosts.changes.receive() == Change("h2", True)
            assert hosts.alive() == {"h1", "h2"}
            await trio.sleep(2 * timeout)  # h2 keeps beating: still alive
            assert hosts.alive() == {"h1", "h2"}
            other.send_signal(signal.SIGKILL)
            t0 = trio.current_time()
            with trio.fail_after(5):
                assert await hosts.changes.receive() == Change("h2", False)
            now = trio.current_time()
            assert now - hosts.last_seen["h2"] >= timeout  # from its last word, not sooner
            assert now - t0 < timeout * 3
            assert hosts.alive() == {"h1"}
            hosts.stop()
    finally:
        end_host(other)


async def claim(engine: Engine, name: str, timeout: float) -> str | None:
    """Claim NAME and give it back at once: None, or why it was refused."""
    refused: list[str] = []
    try:
        async with trio.open_nursery() as n:
            hosts = Hosts(engine, name, timeout)
            await n.start(hosts.run)
            hosts.stop()
    except* HostNameInUse as group:
        refused += [str(e) for e in group.exceptions]
    return refused[0] if refused else None


async def test_a_host_name_is_refused_while_live_and_free_after(
    nats_cluster: LocalCluster,
) -> None:
    timeout = 1.0
    first = await trio.to_thread.run_sync(start_host, nats_cluster, "alpha", timeout)
    try:
        async with open_engine(opts(nats_cluster), STREAM, 3) as e:
            why = await claim(e, "alpha", timeout)
            assert why is not None and "host name 'alpha' is in use" in why
            await trio.sleep(1.5 * timeout)  # a live holder keeps its name
            assert await claim(e, "alpha", timeout) is not None
            assert await claim(e, "beta", timeout) is None  # other names are free
            first.send_signal(signal.SIGKILL)
            first.wait()
            t0 = trio.current_time()
            with trio.fail_after(10):  # its lease lapses after host_timeout
                while await claim(e, "alpha", timeout) is not None:
                    await trio.sleep(0.1)
            assert trio.current_time() - t0 < 5 * timeout
            # A clean stop gives the name back at once.
            assert await claim(e, "alpha", timeout) is None
    finally:
        end_host(first)


async def test_a_host_cut_off_past_its_lease_learns_it_lost_the_name(
    nats_cluster: LocalCluster,
) -> None:
    timeout = 1.0
    proxies = [Proxy(s.client) for s in nats_cluster.servers]
    async with trio.open_nursery() as outer:
        for p in proxies:
            await outer.start(p.run)
        cut = ConnectOptions([p.url for p in proxies], reconnect_wait=0.1)
        async with (
            open_engine(cut, STREAM, 3) as h1,
            open_engine(opts(nats_cluster), STREAM, 3) as h2,
        ):
            hosts = Hosts(h1, "alpha", timeout)
            with pytest.RaisesGroup(pytest.RaisesExc(HostClaimLost, match="'alpha': the lease")):
                async with trio.open_nursery() as n:
                    await n.start(hosts.run)
                    for p in proxies:
                        p.stop()
                    with trio.fail_after(10):  # the other takes the name once it lapsed
                        while await claim(h2, "alpha", timeout) is not None:
                            await trio.sleep(0.1)
                    # Keep "alpha" taken while h1 comes back.
                    await n.start(Hosts(h2, "alpha", timeout).run)
                    for p in proxies:
                        await outer.start(p.run)
                    with trio.fail_after(10):
                        await trio.sleep_forever()
        outer.cancel_scope.cancel()


async def test_a_rewrite_whose_answer_was_lost_does_not_lose_the_name(
    nats_cluster: LocalCluster,
) -> None:
    async with open_engine(opts(nats_cluster), STREAM, 3) as e, trio.open_nursery() as n:
        hosts = Hosts(e, "alpha", 60.0)
        await n.start(hosts.run)

        async def rewrite(value: bytes) -> None:  # stored, but the host never heard back
            assert hosts._kv is not None
            await hosts._kv.update("alpha", value, last=hosts._rev)

        await e.bridge.call(rewrite, hosts._value())
        await e.bridge.call(hosts._refresh)  # still ours: goes on
        other = json.dumps({"host": "alpha", "claim": "someone else"}).encode()
        await e.bridge.call(rewrite, other)
        with pytest.raises(HostClaimLost):
            await e.bridge.call(hosts._refresh)
        hosts.stop()


# -- the reference figures ---------------------------------------------------------------

BENCH = [sys.executable, "-m", "outheisfs", "bench", "--cluster"]


def test_bench_cluster_prints_the_direct_nats_py_rows(nats_cluster: LocalCluster) -> None:
    r = subprocess.run(
        [*BENCH, ",".join(nats_cluster.urls), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["replicas"] == 3 and "direct nats-py" in out["label"]
    rows = {row["key"]: row for row in out["direct"]}
    assert rows["cluster_writes"]["value"] > 0
    assert 0 < rows["cluster_roundtrip"]["value"] <= rows["cluster_roundtrip"]["p99"]
    assert out["note"] is None
    fs = {row["key"]: row for row in out["outheisfs"]}
    assert fs["fs_writes"]["value"] > 0
    assert 0 < fs["fs_roundtrip"]["value"] <= fs["fs_roundtrip"]["p99"]
    assert set(out["ratios"]) == {"fs_writes", "fs_roundtrip"}
    text = subprocess.run(
        [*BENCH, ",".join(nats_cluster.urls), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "writes/s, one publish at a time" in text.stdout
    assert "outheisfs: two hosts mounted" in text.stdout and "ratio" in text.stdout


def test_bench_cluster_without_servers_is_one_line() -> None:
    r = subprocess.run(
        [*BENCH, "nats://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "bench --cluster" in r.stderr


# -- TLS, passed through to the client -------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_options_reach_the_client(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    cluster = LocalCluster(
        tmp_path / "nats", tls=(certs["server"], certs["server-key"], certs["ca"])
    )
    with cluster:
        table = ClusterConfig(
            servers=cluster.urls, tls_ca="certs/ca.pem", tls_cert="certs/client.pem",
            tls_key="certs/client-key.pem",
        )  # fmt: skip
        good = connect_options(table, tmp_path)  # relative paths: against the config's folder
        async with open_engine(good, STREAM, 3) as e:
            assert await e.publish(batch("tls", 2)) == [1, 2]
        # The servers verify clients: without a certificate, no connection.
        no_cert = ConnectOptions(cluster.urls, tls_ca=str(certs["ca"]))
        with pytest.raises(EngineUnavailable, match="cannot reach"):
            async with open_engine(no_cert, STREAM, 3, publish_timeout=2.0):
                pass


def test_the_bridge_measurement_runs() -> None:
    """docs/design.md's figures come from this script: keep it working (short run)."""
    r = subprocess.run(
        [sys.executable, "-m", "outheisfs.bench.bridge", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "trio, thread bridge, 64 writers" in r.stdout
    assert "asyncio, no bridge, 1 writer" in r.stdout
