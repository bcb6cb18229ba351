"""What a diagnosis is asked to do (``Options``), and the numeric settings checked before
any work: a bad one would give a false verdict.

``--rtol nan`` makes every comparison false, so a faulty model would pass; a negative
tolerance fails a clean one. Each check raises a UsageError naming the flag. The CLI
calls them while parsing (so the error comes at once, without importing torch) and
``diagnose()`` calls them again for library callers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Options:
    """Everything ``diagnose()`` can be asked, with the CLI's defaults. The inputs:

    ``input_shape``: the plain N,C,H,W of the first image input, or shapes by input name
    (``{"input_ids": (1, 32)}``; the key None is the plain form). ``input_range``:
    ``{name: (low, high)}``, values drawn from [low, high). ``input_data``: an .npz of
    real values for every input, run as one more input. ``input_files``: images or .npy
    arrays for the image input, each run as one more input. ``photo``: when no real values
    are given, the bundled photograph runs as one more input of an image model.

    The rest as the CLI's flags of the same names (README: layerdiff report).
    """

    input_shape: tuple[int, ...] | dict[str | None, tuple[int, ...]] | None = None
    input_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    input_data: str | Path | None = None
    input_files: tuple[str, ...] = ()
    photo: bool = True  # the bundled photo as one more input for an image model given none
    seed: int = 0
    samples: int = 1
    check_sizes: tuple[tuple[int, ...], ...] | None = None  # None: one other size, if free
    reference: str = "float64"
    rtol: float | None = None  # None: 1e-3, or 1e-2 for fp16
    atol: float | None = None  # None: 1e-5, or 1e-3 for fp16
    fp16: bool = False
    fp16_method: str = "convert"
    fix_fp16: str | Path | None = None
    ignore: tuple[str, ...] = ()
    exporter: str = "dynamo"
    opset: int | None = None
    output_dir: str | Path = "layerdiff_report"
    trust_pickle: bool = False
    weights: str | Path | None = None
    ort_level: str = "all"
    ort_config: dict[str, str] | None = None
    # One runtime, or several (each diagnosed, then compared); "all": every one here.
    provider: str | tuple[str, ...] = "CPUExecutionProvider"
    reproducer_for: str | Path | None = None  # the report's path: reproducer beside it
    max_memory: int | None = None  # bytes; None: store.default_max_memory()

    def check(self) -> None:
        check(rtol=self.rtol, atol=self.atol, seed=self.seed, samples=self.samples,
              opset=self.opset, max_memory=self.max_memory)
        for name, bounds in self.input_range.items():
            input_range(bounds, name)

    def shapes(self) -> dict[str | None, tuple[int, ...]]:
        """``input_shape`` by input name (None: the plain form)."""
        if self.input_shape is None:
            return {}
        if isinstance(self.input_shape, dict):
            return {k: tuple(v) for k, v in self.input_shape.items()}
        return {None: tuple(self.input_shape)}


def input_range(bounds: Any, name: str) -> tuple[float, float]:
    """A finite, non-empty half-open range [low, high)."""
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"--input-range {name}:{','.join(map(str, bounds)) if isinstance(bounds, (tuple, list)) else bounds} "
                         "is not a range",
                         hint=f"give --input-range {name}:LOW,HIGH with LOW < HIGH (values drawn "
                              "from [LOW, HIGH))")
    return low, high

