"""Cutting what writers send into lines.

Data after the last newline of a write waits for the rest of its line. The
kernel cuts a large write(2) into several requests; when one of them is refused,
the writer sees a short write and retries with the rest, maybe more than once
(Python's buffered files retry again at close). The rest of a refused line must
never be taken for a new line, so an open file that refused a request beginning
in the middle of a line refuses every later write: the writer opens it again.
A refused request that began at a line start leaves the file usable.
"""

from __future__ import annotations

import errno

from .errors import OutheisError, TooBig


class LineBuffer:
    __slots__ = ("before", "continued", "limit", "partial", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.partial = b""
        self.continued = False  # the request being handled began mid-line
        self.before = b""  # `partial` as it was before that request
        self.refused: OutheisError | None = None  # set once a line was refused midway

    def feed(self, data: bytes) -> list[bytes]:
        """Complete lines (without newlines) ending in `data`; keep the rest."""
        if self.refused is not None:
            reason = self.refused
            self.continued = False
            again = type(reason)(f"an earlier part of this line was refused: {reason.reason}")
            again.errno = reason.errno
            raise again
        self.continued = bool(self.partial)
        self.before = self.partial
        if b"\n" not in data:
            self.partial += data
            if len(self.partial) > self.limit:
                raise TooBig(f"message of {len(self.partial)}+ bytes is over {self.limit}")
            return []
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        limit = self.limit
        for line in lines:
            if len(line) > limit:
                raise TooBig(f"message of {len(line)} bytes is over {limit}")
        if len(self.partial) > limit:
            raise TooBig(f"message of {len(self.partial)}+ bytes is over {limit}")
        return lines

    def failed(self, reason: OutheisError) -> None:
        """The request just fed was refused: drop what it brought."""
        if reason.errno in (errno.EAGAIN, errno.EINTR):
            # Not refused, only not now: the writer sends the same bytes again.
            self.partial = self.before
        else:
            # If it continued a line, the writer's retry begins with the rest of
            # that line: from now on this open file refuses everything.
            if self.continued:
                self.refused = reason
            self.partial = b""
        self.continued = False

    def take_rest(self) -> bytes:
        """The unterminated last line, at close."""
        rest, self.partial = self.partial, b""
        return rest

    def reset(self) -> None:
        self.partial = b""
        self.refused = None
