"""Coverage-guided fuzzing of layerdiff.models.load_model (atheris / libFuzzer).

    python fuzz/fuzz_model_loader.py fuzz/corpus/model -max_total_time=300

The input bytes become a model file. Its name ends in .pth, .safetensors, .pt, .ckpt or
.bin, picked from the input's length, because the extension steers some decisions.
load_model must return or raise LayerdiffError; anything else is a crash.
"""

from __future__ import annotations

import sys
import warnings

import atheris

with atheris.instrument_imports(include=["layerdiff", "zipfile", "safetensors", "spandrel"]):
    from layerdiff.errors import LayerdiffError
    from layerdiff.models import load_model

from _harness import run_one

SUFFIXES = (".pth", ".safetensors", ".pt", ".ckpt", ".bin")


def TestOneInput(data: bytes) -> None:
    run_one(data, SUFFIXES[len(data) % len(SUFFIXES)], load_model, LayerdiffError)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
