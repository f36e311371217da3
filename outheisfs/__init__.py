"""outheisfs: cooperating agents as files.

How the package fits together (one concept per module; each uses only the
modules listed below it, and `bench` stands apart):

    cli         the `outheisfs` command: mount, umount, run, follow, replay, ...
    helper      `outheisfs CONFIG MOUNTPOINT -o ...`, as `mount -t fuse.outheisfs` runs it
    top         `outheisfs top`: the live view, drawn with rich, from the mount alone
    trace       `outheisfs trace`: one message and its replies, in one pass over the log
    ask         `outheisfs ask`: send as the operator, take exactly the reply
    completion  the bash completion script
    mount       the server's life: checks, replay, mount, serve, clean stop
    run         `outheisfs run`: a command bound to an agent
    follow      `outheisfs follow`: the log as it grows, across remounts
    reload      `outheisfs reload`, SIGHUP: the config again, only the difference applied
    pools       pools that size themselves: the service that applies `scaling`
    ops         the pyfuse3 adapter: one documented handler per FUSE request
    vaultops    the vault's requests, with owners and views (the vault's adapter)
    openfile    an open agent file: reads, writes, parked requests, close grace
    ctl         ctl commands (parsed, checked, carried out) and status text
    supervisor  agent processes started, watched, restarted (OTP policies)
    output      agents' stdout and stderr, stamped line by line, rotated
    access      who a caller is, what it may see, refusals and `denied` events
    dentries    names the kernel holds: one refused lookup, one `denied` event
    procevents  forks and exits from the kernel: which agent a process is
    parking     requests that wait, and the signals that end them
    cluster.node   one host of a cluster: the log on the stream, the state folder
                its cache; cluster.order: what the stream's order lets take effect
    retain      a bounded log: events older than the rule and held by a checkpoint go
    checkpoint  the dispatcher's state as of one seq, so that start-up reads only the rest
    readers     which instances wait idle on their inbox; retired ones take nothing
    scaling     how many instances a pool that sizes itself runs: the pure rule
    dispatcher  agents, queues, in-flight messages: a pure state machine of events
    gate        the approval gate: held messages, the operator's approve/reject
    approvals   the root `approvals` file: what waits at the gate, and tail's journal
    grants      owners' grants of read access to their vault domains (state machine part)
    eventlog    the append-only event log, the single source of truth
    streamindex agents' log and outbox as an index into the event log, not copies
    events      the event vocabulary: one constructor per event type
    inbox       one agent's queue: priority classes with aging
    procstate   what each agent's processes are doing (state, pids, restarts)
    vault       the vault's backing folder, reached without following symlinks
    views       who sees what: an agent's view of the tree (unveil)
    tree        the file tree as one table of rows (rights, content), inodes
    cluster     several hosts on NATS JetStream (hosts, engine, bridge, local
                servers, bench); imported only with [cluster]
    models      messages and envelopes, ids, timestamps
    lines       cutting writes into lines
    config      the TOML configuration, checked with pydantic
    routing     topics' rules: JSON paths of the envelope, tests, destinations
    operators   who acts as the operator: the mounting user, root, `operators`
    confine     the seccomp filter agent processes run under
    procinfo    what /proc says about a process; exit statuses in words
    mounts      which mount a command means; the mount's source names its state
    names       the names every module agrees on (operator, nobody, pid xattr)
    progress    a progress line on a terminal
    errors      domain errors and their errno
    bench       `outheisfs bench`, with `bench.floor` (the minimal pyfuse3
                filesystem it compares with) and `bench.redisref` (the
                reference round trip through Redis Streams)

Only `ops`, `vaultops`, `mount` and `bench.floor` import pyfuse3; the dispatcher
reaches neither trio nor pyfuse3. docs/design.md has the map with the reasons.
"""

__version__ = "0.1.0"
