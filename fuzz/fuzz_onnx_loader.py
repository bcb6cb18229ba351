"""Coverage-guided fuzzing of the ONNX readers: exporting.describe_onnx, then
capture_onnx.load_graph (atheris / libFuzzer).

    python fuzz/fuzz_onnx_loader.py fuzz/corpus/onnx -max_total_time=300

Both must return or raise LayerdiffError; anything else is a crash.
"""

from __future__ import annotations

import sys
import warnings

import atheris

with atheris.instrument_imports(include=["layerdiff", "onnx", "onnx_graphsurgeon"]):
    from layerdiff.capture_onnx import load_graph
    from layerdiff.errors import LayerdiffError
    from layerdiff.exporting import describe_onnx

from _harness import run_one


def _read(path) -> None:
    describe_onnx(path)
    load_graph(path)


def TestOneInput(data: bytes) -> None:
    run_one(data, ".onnx", _read, LayerdiffError)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR  # one warning per odd attribute floods the log
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
