"""Domain errors, and the one table that maps them to errno.

Everything below the FUSE layer raises an `OutheisError` subclass with a message
meant for people; `ops` turns it into `FUSEError(errno)` and records an `error`
event. Nothing else in the package knows about errno numbers for domain cases.
"""

from __future__ import annotations

import errno


class OutheisError(Exception):
    """A refusal that users see: an errno and a reason."""

    errno: int = errno.EIO
    recorded = False  # set once its `error` or `denied` event is in the log

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadInput(OutheisError):
    """A malformed line, envelope, command or name."""

    errno = errno.EINVAL


class NotFound(OutheisError):
    """An unknown agent, message or path."""

    errno = errno.ENOENT


class NoRight(OutheisError):
    """Visible, but not allowed for this caller."""

    errno = errno.EACCES


class Hidden(OutheisError):
    """A path outside the caller's view: for it, it does not exist."""

    errno = errno.ENOENT


class NotPermitted(OutheisError):
    """An operation the caller may never do (e.g. widening its own view)."""

    errno = errno.EPERM


class TooBig(OutheisError):
    """A message over the size limit."""

    errno = errno.EMSGSIZE


class WouldBlock(OutheisError):
    """O_NONBLOCK and nothing to read, or no room to write."""

    errno = errno.EAGAIN


class Interrupted(OutheisError):
    """The caller has a signal pending: give up so that it can act."""

    errno = errno.EINTR


class OverLimit(OutheisError):
    """An agent already holds its share of the server: parked requests or
    unfinished lines (`max_waiting`, `max_unfinished`)."""

    errno = errno.ENOBUFS


class Busy(OutheisError):
    """The agent has a process (rmdir)."""

    errno = errno.EBUSY


class NotEmpty(OutheisError):
    """The agent still has queued messages (rmdir)."""

    errno = errno.ENOTEMPTY


class Exists(OutheisError):
    """mkdir of an agent that exists."""

    errno = errno.EEXIST


class NotLogged(OutheisError):
    """The event log could not be written (a full disk, an I/O error), so nothing
    of the request is kept. The errno is the log's own (ENOSPC, EIO, ...)."""

    def __init__(self, reason: str, errno_: int = errno.EIO) -> None:
        super().__init__(reason)
        self.errno = errno_


class Stale(OutheisError):
    """An ack of a message that was taken back (`ack_wait`) from the acker."""

    errno = errno.ESTALE


class LogDamaged(Exception):
    """The event log is damaged before its end: refuse to start."""

    def __init__(self, path: str, offset: int, line: int, why: str) -> None:
        super().__init__(f"{path}: damaged at byte {offset} (line {line}): {why}")
        self.offset = offset
        self.line = line


class ConfigError(Exception):
    """A bad configuration; the message names the key."""
