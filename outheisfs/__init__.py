"""outheisfs: cooperating agents as files.

How the package fits together (one concept per module):

    cli         the `outheisfs` command: mount, umount, run, replay, bench
    mount       the server's life: checks, replay, mount, serve, shutdown
    ops         the pyfuse3 Operations: requests in, dispatcher calls out
    tree        the file tree as one table of rows, and inode numbering
    views       who sees what: an agent's view of the tree (unveil)
    vault       the vault's backing folder, reached without following symlinks
    vaultops    requests on the vault, with owners and views
    ctl         ctl commands and status text
    dispatcher  agents, queues, in-flight messages: a state machine fed by events
    inbox       one agent's queue: priority classes with aging
    eventlog    the append-only event log, the single source of truth
    models      messages and envelopes, ids, timestamps
    lines       cutting writes into lines
    config      the TOML configuration, checked with pydantic
    parking     requests that wait, and the signals that end them
    procinfo    what /proc says about a process (state, exit, parent)
    procevents  forks and exits from the kernel: which agent a process is
    confine     the seccomp filter agent processes run under
    supervisor  agent processes started, watched, restarted (OTP policies)
    run         `outheisfs run`: a command bound to an agent
    floor       the minimal pyfuse3 filesystem the benchmark compares with
    bench       `outheisfs bench`
    redisref    the bench's reference: the echo round trip through Redis Streams
    errors      domain errors and their errno

Only `ops`, `vault`, `vaultops`, `mount` and `floor` import pyfuse3; the
rest is tested without FUSE.
"""

__version__ = "0.1.0"
