"""Rule: the ONNX layer's weights are not the checkpoint's.

1. Fires when the first diverging layer was paired by weights that are close to, but
   not equal to, the module's parameters (alignment method "weights~"), or was paired
   by name with a node whose weights are not the module's and that no folding explains
   (``alignment.changed_weights``; a layer scale or BatchNorm folded in is not a change).
2. The file was exported from another checkpoint, or edited after export; fp32 export
   copies weights bit for bit.
"""

from __future__ import annotations

from ..records import Diagnosis, PairMethod, Suggestion
from . import Rule
from ._helpers import where


def check(d: Diagnosis) -> Suggestion | None:
    first = d.first_divergence
    if first is None:
        return None
    layer = d.layers[first.layer] if first.layer is not None else None
    changed = d.alignment.changed_weights if d.alignment else ()
    if layer is None or not (layer.method == PairMethod.CLOSE_WEIGHTS
                             or any(d.calls[i].label == first.module for i in changed)):
        return None
    return Suggestion(
        "changed_weights", "This layer's ONNX weights differ from the checkpoint's",
        f"The weights of ONNX node '{first.onnx_node}' are close to {first.module}'s "
        "parameters but not equal: an fp32 export copies them exactly, so the file was made "
        "from another checkpoint or changed after export.",
        "Re-export from this checkpoint, or diagnose the ONNX against the checkpoint it "
        "was exported from.", where(d))


RULE = Rule("changed_weights", "This layer's ONNX weights differ from the checkpoint's", check)
