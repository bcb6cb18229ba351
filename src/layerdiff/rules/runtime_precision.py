"""Rule: the runtime computed the model at a lower precision than the file's (DIVERGENCES #19).

1. Fires when the model diverges on a runtime that chose its own precision below the
   file's (OpenVINO's CPU plugin takes bfloat16 by default on CPUs with bfloat16
   instructions, below float32 and float16 alike; its GPU plugin float16, below float32).
2. The graph may be right: the runtime rounds every op's result to 8 (bfloat16) or 11
   (float16) bits of mantissa, which a float32 tolerance does not admit.
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion, Verdict
from . import Rule
from ._helpers import where

NAMES = {"bf16": "bfloat16", "f16": "float16"}


def check(d: Diagnosis) -> Suggestion | None:
    lower = NAMES.get(d.facts.runtime_precision)
    if lower is None or d.verdict != Verdict.DIVERGED or (d.settings.fp16 and lower == "float16"):
        return None
    what = "float16" if d.settings.fp16 else "float32"
    runtime = d.settings.provider
    detail = (f"{runtime} computed this {what} model in {lower}: OpenVINO picks its inference "
              f"precision per device, and its CPU plugin takes bfloat16 on CPUs with bfloat16 "
              f"instructions (AVX512-BF16, AMX). {lower} keeps "
              f"{8 if lower == 'bfloat16' else 11} bits of mantissa, so layers differ "
              f"from PyTorch by more than rtol={d.settings.rtol:g} allows; the graph "
              f"itself may be right.")
    return Suggestion(
        "runtime_precision", f"{runtime} ran the model in {lower}", detail,
        f"Check the graph at float32 with --provider {runtime.replace('openvino', 'openvino-fp32', 1)} "
        "(INFERENCE_PRECISION_HINT=f32). Deploy with that hint in compile_model where "
        f"accuracy matters, or accept {lower}'s error with a tolerance that admits it "
        f"({lower} rounds each result to about "
        f"{'4e-3' if lower == 'bfloat16' else '5e-4'} of its value).", where(d))


RULE = Rule("runtime_precision", "the runtime computed the model at a lower precision", check)
