"""Rule: the runtime computed the float32 model at a lower precision (DIVERGENCES #19).

1. Fires when the model diverges on a runtime that chose its own precision below
   float32 (OpenVINO's CPU plugin takes bfloat16 by default on CPUs with bfloat16
   instructions; its GPU plugin float16) for a file that is not float16.
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
    if lower is None or d.verdict != Verdict.DIVERGED or d.settings.fp16:
        return None
    runtime = d.settings.provider
    detail = (f"{runtime} computed this float32 model in {lower}: OpenVINO picks its inference "
              f"precision per device, and its CPU plugin takes bfloat16 on CPUs with bfloat16 "
              f"instructions (AVX512-BF16, AMX). {lower} keeps "
              f"{8 if lower == 'bfloat16' else 11} bits of mantissa, so every layer drifts "
              f"from PyTorch's float32 by more than rtol={d.settings.rtol:g} allows; the graph "
              f"itself may be right.")
    return Suggestion(
        "runtime_precision", f"{runtime} ran the model in {lower}", detail,
        f"Check the graph at float32 with --provider {runtime.replace('openvino', 'openvino-fp32', 1)} "
        "(INFERENCE_PRECISION_HINT=f32). Deploy with that hint in compile_model where "
        f"accuracy matters, or accept {lower}'s error with a tolerance that admits it "
        "(--rtol 1e-2 or wider).", where(d))


RULE = Rule("runtime_precision", "the runtime computed the model at a lower precision", check)
