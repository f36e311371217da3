"""outheisfs: cooperating agents as files.

How the package fits together (one concept per module):

    cli         the `outheisfs` command: mount, umount, run, replay, bench
    mount       the server's life: checks, replay, mount, serve, shutdown
    ops         the pyfuse3 Operations: requests in, dispatcher calls out
    tree        the file tree as one table of rows, and inode numbering
    ctl         ctl commands and status text
    dispatcher  agents, queues, in-flight messages: a state machine fed by events
    inbox       one agent's queue: priority classes with aging
    eventlog    the append-only event log, the single source of truth
    models      messages and envelopes, ids, timestamps
    lines       cutting writes into lines
    config      the TOML configuration, checked with pydantic
    procinfo    what /proc says about a caller (signals, exit)
    exitwatch   how processes end (proc connector)
    errors      domain errors and their errno

Only `ops` and `mount` import pyfuse3; everything else is tested without FUSE.
"""

__version__ = "0.1.0"
