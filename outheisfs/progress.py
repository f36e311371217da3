"""A progress line for commands a person waits on: on a terminal only.

`Progress(label)` writes `label: 42% (12.0 of 28.5 MB)` over itself on stderr,
at most ten times a second, and clears it at `done()`. When stderr is not a
terminal (a pipe, a file, a test) it writes nothing at all.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

INTERVAL = 0.1  # seconds between two updates of the line


class Progress:
    def __init__(self, label: str, stream: TextIO | None = None, force: bool = False) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.on = force or self.stream.isatty()
        except (AttributeError, ValueError):
            self.on = False
        self._last = 0.0
        self._shown = False

    def update(self, done: float, total: float = 0, unit: str = "") -> None:
        """Show `done` of `total` (bytes when `unit` is "bytes")."""
        if not self.on:
            return
        now = time.monotonic()
        if now - self._last < INTERVAL:
            return
        self._last = now
        self.show(_format(done, total, unit))

    def show(self, text: str) -> None:
        if not self.on:
            return
        self.stream.write(f"\r{self.label}: {text}\x1b[K")
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def _format(done: float, total: float, unit: str) -> str:
    if unit == "bytes":
        d, t = done / 1e6, total / 1e6
        if total:
            return f"{100 * done / total:3.0f}% ({d:.1f} of {t:.1f} MB)"
        return f"{d:.1f} MB"
    if total:
        return f"{100 * done / total:3.0f}% ({done:g} of {total:g}{' ' + unit if unit else ''})"
    return f"{done:g}{' ' + unit if unit else ''}"
