"""Shared by the atheris harnesses: feed bytes through a loader as a file; any exception
other than LayerdiffError is a finding.

With LAYERDIFF_FUZZ_COLLECT=FILE a finding is appended to FILE (type, message, the
innermost layerdiff frame) and fuzzing goes on, so one run lists every class of crash;
without it the first finding stops the run, as libFuzzer expects.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path
from typing import Callable

_FOLDER = Path(tempfile.mkdtemp(prefix="layerdiff-fuzz-"))
_SEEN: set[str] = set()


def run_one(data: bytes, suffix: str, load: Callable[[Path], object], expected: type) -> None:
    path = _FOLDER / f"input{suffix}"
    path.write_bytes(data)
    try:
        load(path)
    except expected:
        pass
    except Exception as error:
        collect = os.environ.get("LAYERDIFF_FUZZ_COLLECT")
        if not collect:
            raise
        frames = traceback.extract_tb(error.__traceback__)
        ours = [f for f in frames if "layerdiff" in f.filename] or frames
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}"
        key = f"{type(error).__name__} at {where}"
        if key not in _SEEN:
            _SEEN.add(key)
            sample = Path(collect).with_suffix(f".{len(_SEEN)}{suffix}")
            sample.write_bytes(data)
            with open(collect, "a") as log:
                log.write(f"{key}: {str(error)[:200]!r} -> {sample}\n")
