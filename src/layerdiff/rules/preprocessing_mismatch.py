"""Rule: the ONNX graph changes the input before the first layer (DIVERGENCES #23).

1. Fires when the first divergence is numeric and at the first compared layer (no
   counted layer comes before it: nothing upstream was aligned, its inputs are the
   graph input), and the earliest of its suspects is not the layer's own op but one
   that rescales or shifts the input (Mul, Div, Add, Sub) or reorders or selects its
   channels (Gather, Slice, Split, Concat on axis 1, Transpose).
2. The record cannot show that the ONNX values are a channel permutation or a constant
   multiple of torch's: only the op that does it, and the first layer's metrics. For a
   scale it reports the factor the metrics point to (|k - 1| ~ max error / range when
   the first layer's bias is small; cosine near 1 when it has none).
3. Typical causes: the file was exported from a wrapper that normalises (x255, BGR)
   while the checkpoint expects [0, 1] RGB, or the other way round.
"""

from __future__ import annotations

from ..records import Diagnosis, DivergenceKind, Suggestion
from . import Rule
from ._helpers import where

RULE_ID = "preprocessing_mismatch"
TITLE = "The ONNX graph preprocesses the input differently"

SCALE_OPS = {"Mul", "Div", "Add", "Sub"}
CHANNEL_OPS = {"Gather", "Slice", "Split", "Concat", "Transpose"}


def check(d: Diagnosis) -> Suggestion | None:
    first = d.first_divergence
    if first is None or first.kind != DivergenceKind.NUMERIC or not first.region:
        return None
    layer = d.layers[first.layer]
    if any(l.order < layer.order for l in d.layers if not l.ignored):
        return None
    pre = first.region[0]
    if pre.name == first.onnx_node:
        return None
    axis = pre.attrs.get("axis")
    rescales = pre.op_type in SCALE_OPS
    if rescales:
        kind = "rescales or shifts"
    elif pre.op_type in CHANNEL_OPS and (axis in (None, 1) or pre.op_type == "Transpose"):
        kind = "reorders or selects the channels of"
    else:
        return None
    m = layer.local or layer.metrics
    ratio = m.max_abs / m.scale if m.scale else float("inf")
    detail = (f"The first divergence is the first compared layer, {first.module}, and before "
              f"its own op the ONNX graph {kind} the input with {pre.op_type} '{pre.name}'. "
              f"Its output is off by {ratio:.3g} times its range (cosine {m.cosine:.3f}).")
    if rescales and ratio > 2:
        factor = 1 + ratio
        detail += (f" The ONNX values are roughly {factor:.3g} times torch's"
                   + (" (an input scaled to 0-255 where the model expects 0-1)"
                      if 150 < factor < 400 else "") + ".")
    elif not rescales:
        detail += " A channel order swapped between RGB and BGR shows like this."
    detail += (" The checkpoint and the ONNX file expect differently prepared inputs; the "
               "record cannot prove the values are a permutation or a multiple of torch's.")
    return Suggestion(
        RULE_ID, TITLE, detail,
        "Feed both models identically prepared inputs: remove the preprocessing from the "
        "exported wrapper (or add the same step in front of the PyTorch model), matching "
        "the value range (0-1 vs 0-255) and the channel order (RGB vs BGR).",
        where(d))


RULE = Rule(RULE_ID, TITLE, check)
