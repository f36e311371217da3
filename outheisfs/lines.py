"""Cutting what writers send into lines [SPEC §4.2].

Data after the last newline of a write waits for the rest of its line. A line
longer than the message limit is refused as soon as it is known to be too long,
and the rest of it (up to its newline) is dropped rather than taken for a new line.
"""

from __future__ import annotations

from .errors import TooBig


class LineBuffer:
    __slots__ = ("limit", "partial", "skipping")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.partial = b""
        self.skipping = False  # inside a line that was already refused as too long

    def feed(self, data: bytes) -> list[bytes]:
        """Complete lines (without newlines) ending in `data`; keep the rest."""
        if self.skipping:
            i = data.find(b"\n")
            if i < 0:
                raise TooBig(f"message is over {self.limit} bytes")
            self.skipping = False
            data = data[i + 1 :]
        if b"\n" not in data:
            self.partial += data
            self._check_partial()
            return []
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        limit = self.limit
        for line in lines:
            if len(line) > limit:
                self.partial = b""
                raise TooBig(f"message of {len(line)} bytes is over {limit}")
        self._check_partial()
        return lines

    def _check_partial(self) -> None:
        if len(self.partial) > self.limit:
            size = len(self.partial)
            self.partial = b""
            self.skipping = True
            raise TooBig(f"message of {size}+ bytes is over {self.limit}")

    def take_rest(self) -> bytes:
        """The unterminated last line, at close."""
        rest, self.partial = self.partial, b""
        return rest

    def reset(self) -> None:
        self.partial = b""
