"""Where a run is: its stages, and the steps within the long ones.

Library callers pass ``progress=`` a callable that takes a stage's name ("input 1: random
(seed 0)"); one that also has a ``step(done, total, unit)`` method hears the steps within
a stage as well: PyTorch's module calls and onnxruntime's graph segments (``total`` is 0
while unknown). The command line's TerminalProgress draws both on a terminal as one line
that updates in place.
"""

from __future__ import annotations

import time
from typing import Callable, TextIO

Progress = Callable[[str], None]

BAR = 24  # characters
REDRAW = 0.1  # seconds between two redraws of the same stage's line


def silent(_stage: str) -> None:
    """A Progress that says nothing."""


def stepper(progress: Progress, unit: str, total: int = 0) -> Callable[[int], None] | None:
    """``progress``'s steps of ``unit`` as a function of the count done; None when it
    does not take steps."""
    step = getattr(progress, "step", None)
    if step is None:
        return None
    return lambda done: step(done, total, unit)


class TerminalProgress:
    """Stages and steps on a terminal: ``layerdiff: [  12 s] input 1: random (seed 0)
    ####------ 120/351 PyTorch calls``, redrawn in place (at most every REDRAW s)."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream, self._clock = stream, clock
        self._start = clock()
        self._stage = ""
        self._drawn = 0.0  # when the line was last drawn
        self._width = 0  # of the line on screen, to blank what a shorter one leaves

    def __call__(self, stage: str) -> None:
        self._stage = stage
        self._draw("", force=True)

    def step(self, done: int, total: int, unit: str) -> None:
        if total:
            filled = min(BAR, BAR * done // total)
            detail = f"{'#' * filled}{'-' * (BAR - filled)} {done}/{total} {unit}"
        else:
            detail = f"{done} {unit}"
        self._draw(detail, force=bool(total) and done >= total)

    def close(self) -> None:
        """End the line (before anything else is printed)."""
        if self._width:
            self._stream.write("\n")
            self._stream.flush()
            self._width = 0

    def _draw(self, detail: str, force: bool) -> None:
        now = self._clock()
        if not force and now - self._drawn < REDRAW:
            return
        self._drawn = now
        line = f"layerdiff: [{now - self._start:5.0f} s] {self._stage}"
        if detail:
            line += f"  {detail}"
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)
