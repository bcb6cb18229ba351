"""Rule: layers that break in float16 (DIVERGENCES #10, #13).

1. Fires when the ONNX file is float16 and the fp16 analysis found layers beyond
   float16's range (above 65504), inf/NaN in the ONNX values, or norms and softmaxes fed
   values whose squares overflow.
2. Names the layers to keep in float32; with --fix-fp16 says whether the
   mixed-precision file written passes.
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion, Verdict
from . import Rule


def check(d: Diagnosis) -> Suggestion | None:
    findings = d.facts.fp16
    if findings is None or not findings.keep:
        return None
    keep = [k.module for k in findings.keep]
    detail = findings.summary()
    if d.facts.fp16_fix is not None:
        path, verdict = d.facts.fp16_fix
        detail += f" The mixed-precision model written to {path} {'passes' if verdict == Verdict.PASS else 'still diverges'}."
    return Suggestion(
        "fp16_precision", "Keep these layers in float32",
        detail,
        f"Keep {', '.join(keep[:6])}{' ...' if len(keep) > 6 else ''} in float32 "
        "(onnxconverter-common: node_block_list=[...], keep_io_types=True), or rescale the "
        "activations; `layerdiff report ... --fix-fp16 OUT.onnx` writes and checks that file.",
        tuple(keep))


RULE = Rule("fp16_precision", "Keep these layers in float32", check)
