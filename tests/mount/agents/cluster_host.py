"""A host of the cluster tests in its own process: claims NAME and beats until killed.

argv: SERVERS(comma-separated) STREAM NAME HOST_TIMEOUT. Prints `claimed` once
the name is its own, or `in use: ...` and exits 3.
"""

from __future__ import annotations

import sys

import trio

from outheisfs.cluster.engine import ConnectOptions, open_engine
from outheisfs.cluster.hosts import HostNameInUse, Hosts


async def main(servers: str, stream: str, name: str, timeout: float) -> int:
    async with open_engine(ConnectOptions(servers.split(",")), stream, 3) as engine:
        hosts = Hosts(engine, name, timeout)
        try:
            async with trio.open_nursery() as n:
                await n.start(hosts.run)
                print("claimed", flush=True)
        except HostNameInUse as e:
            print(f"in use: {e}", flush=True)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
