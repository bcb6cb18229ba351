"""Rule: reflect padding by as much as the padded dimension, or more (DIVERGENCES #21).

1. Fires when onnxruntime fails at a Pad node whose mode is reflect (from the node's
   attributes among the first divergence's suspects, or "Pad reflect" in the message):
   onnxruntime refuses a reflect pad >= the dimension ("pre-pad (4) exceeds maximum
   allowed (3) for axis 2"), other runtimes wrap around and fill the border bands with
   wrong values.
2. Also fires when the first diverging layer's output is itself a reflect Pad (a
   padding module whose segment fails numerically): the pads are a runtime input in
   opset >= 11, so the record does not hold their size; the message says to check it.
3. torch refuses reflect padding with pad >= dim too, so the torch side pads another
   way here (its padding module and settings are named when the layer is one).
"""

from __future__ import annotations

import re

from ..records import Diagnosis, DivergenceKind, Suggestion
from . import Rule
from ._helpers import suspects, where

RULE_ID = "reflect_pad"
TITLE = "Reflect padding by as much as the padded dimension"

_ORT_MESSAGE = re.compile(r"(pre|post)-pad \((\d+)\) exceeds maximum allowed \((\d+)\) for axis (\d+)")
_PADDING_MODULES = {"ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d",
                    "ConstantPad3d", "ReplicationPad1d", "ReplicationPad2d", "ReplicationPad3d",
                    "ReflectionPad1d", "ReflectionPad2d", "ReflectionPad3d", "CircularPad1d",
                    "CircularPad2d", "CircularPad3d"}


def check(d: Diagnosis) -> Suggestion | None:
    first = d.first_divergence
    if first is None or first.op_type != "Pad":
        return None
    node = next((n for n in suspects(d, "Pad") if n.name == first.onnx_node), None)
    mode = str(node.attrs.get("mode", "")) if node is not None else ""
    says_reflect = "pad reflect" in first.message.lower()
    if mode != "reflect" and not says_reflect:
        return None
    torch_side = ""
    if first.module_type in _PADDING_MODULES:
        padding = first.torch_attrs.get("padding")
        torch_side = (f" The PyTorch layer {first.module} is a {first.module_type}"
                      + (f" with padding {tuple(padding)}" if padding is not None else "") + ".")
        if not first.module_type.startswith("Reflection"):
            torch_side += (" It does not pad by reflection: the ONNX Pad's mode differs from "
                           "the model's.")
    if first.kind == DivergenceKind.RUNTIME_ERROR:
        found = _ORT_MESSAGE.search(first.message)
        if found:
            side, pad, allowed, axis = found.groups()
            size = int(allowed) + 1
            amount = (f"a {side}-pad of {pad} on axis {axis}, whose size is {size} "
                      f"(reflection allows at most {allowed})")
        else:
            amount = "a pad at least as large as the dimension it pads"
        detail = (f"onnxruntime refuses the reflect Pad '{first.onnx_node}': {amount}. "
                  "Reflect padding mirrors the tensor without repeating its edge, so it can "
                  "add at most size - 1 values per side; torch refuses the same pad too, and "
                  "runtimes that accept it fill the border bands with wrong values."
                  + torch_side)
    else:
        detail = (f"The first diverging layer is the reflect Pad '{first.onnx_node}' "
                  f"({first.message}). Its pads are a runtime input, so their size is not in "
                  "the record: reflect padding needs pad < the padded dimension, and a pad "
                  "as large as the dimension gives wrong border bands." + torch_side)
    return Suggestion(
        RULE_ID, TITLE, detail,
        "Keep every reflect pad smaller than the dimension it pads: pad inputs this small "
        "with mode 'replicate' or 'constant', pad in several reflect steps each below the "
        "size, or run the model on larger inputs. If the model pads another way, export the "
        "mode it uses.",
        where(d))


RULE = Rule(RULE_ID, TITLE, check)
