"""Numeric settings checked before any work: a bad one would give a false verdict.

``--rtol nan`` makes every comparison false, so a faulty model would pass; a negative
tolerance fails a clean one. Each check raises a UsageError naming the flag. The CLI
calls them while parsing (so the error comes at once, without importing torch) and
``diagnose()`` calls them again for library callers.
"""

from __future__ import annotations

import math

from .errors import UsageError

MAX_SAMPLES = 1000
MAX_SEED = 2**32 - 1
MIN_OPSET = 7


def tolerance(value: float | None, flag: str) -> float | None:
    """A finite tolerance in [0, 1] (``None``: the default)."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise UsageError(f"{flag} {value} is not a tolerance",
                         hint=f"give {flag} a finite number from 0 to 1, e.g. 1e-3")
    return float(value)


def integer(value: int | None, flag: str, low: int, high: int) -> int | None:
    """An integer in [low, high] (``None``: the default)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{flag} {value} is out of range",
                         hint=f"give {flag} a whole number from {low} to {high}")
    return value


def check(*, rtol: float | None, atol: float | None, seed: int, samples: int,
          opset: int | None, max_memory: int | None) -> None:
    """Every numeric setting of a diagnosis, or a UsageError for the first bad one."""
    tolerance(rtol, "--rtol")
    tolerance(atol, "--atol")
    integer(seed, "--seed", 0, MAX_SEED)
    integer(samples, "--samples", 1, MAX_SAMPLES)
    integer(opset, "--opset", MIN_OPSET, max_opset())
    if max_memory is not None:
        integer(max_memory, "--max-memory", 1, 2**62)


def max_opset() -> int:
    """The newest opset the installed onnx package knows."""
    from onnx import defs

    return defs.onnx_opset_version()
