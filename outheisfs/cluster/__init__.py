"""Several hosts on one event log kept by NATS JetStream [the `[cluster]` table].

This package is the layer under the cluster mode, imported only when a config
has a `[cluster]` table (a plain mount never imports it, nor `nats`):

- `bridge`: the asyncio client (nats-py) run in its own thread, called from trio;
- `engine`: the stream as the event log: publish with message ids, read in
  order from a `seq`, read the whole stream;
- `hosts`: who is alive (heartbeats on a subject) and the claim of a host name
  (a lease in a key-value bucket);
- `local`: a cluster of `nats-server` processes on this machine, for tests,
  the example and the benchmark;
- `bench`: the direct nats-py reference figures of `outheisfs bench --cluster`.

The package itself imports nothing from nats-py; its modules do.
"""
