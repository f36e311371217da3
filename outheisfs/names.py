"""The names every module agrees on, each defined once.

Who a request acts for is an agent's name, the operator, or nobody; the mount's
root carries the server's pid in an extended attribute that `outheisfs umount`
reads to know whom to stop.
"""

from __future__ import annotations

OPERATOR = "user"  # the operator: the person (and processes) who mounted; also a mailbox
NOBODY = "-"  # a caller attributed to no agent with certainty: the least rights
UNKNOWN = NOBODY  # the label of a process known to be some agent's, but not whose
SERVER = "server"  # `who` of events the server records on its own behalf
XATTR_PID = b"user.outheisfs.pid"  # on the mount's root: the serving process
XATTR_SENT = b"user.outheisfs.sent"  # on an inbox or outbox: ids of the caller's last write
XATTR_POLICY = b"user.outheisfs.confine"  # on the root: the calling agent's confinement
