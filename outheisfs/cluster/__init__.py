"""Several hosts on one event log kept by NATS JetStream [the `[cluster]` table].

Imported only when a config has a `[cluster]` table (a plain mount never
imports it, nor `nats`):

- `node`: one host in the cluster: the dispatcher's log on the stream, the
  state folder as its cache, the host's life from its claim to its `umount`;
- `order`: what the stream's order lets take effect (pure, as the dispatcher);
- `bridge`: the asyncio client (nats-py) run in its own thread, called from trio;
- `engine`: the stream as the event log: publish with message ids, read in
  order from a `seq`, read the whole stream;
- `hosts`: who is alive (heartbeats on a subject) and the claim of a host name
  (a lease in a key-value bucket);
- `local`: a cluster of `nats-server` processes on this machine, for tests,
  the example and the benchmark;
- `bench`: `outheisfs bench --cluster`: direct nats-py figures and outheisfs beside them.

The package itself imports nothing from nats-py; its modules do.
"""
