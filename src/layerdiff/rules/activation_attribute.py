"""Rule: an exported op's attribute disagrees with its module's setting.

1. Fires when the first diverging layer pairs a module with a one-op ONNX node whose
   attribute carries the same setting with another value: LeakyReLU.negative_slope vs
   LeakyRelu.alpha, ELU.alpha, PixelShuffle.upscale_factor vs DepthToSpace.blocksize.
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion
from . import Rule
from ._helpers import where

# module type -> (module attribute, ONNX op, ONNX attribute)
CORRESPONDING = {
    "LeakyReLU": ("negative_slope", "LeakyRelu", "alpha"),
    "ELU": ("alpha", "Elu", "alpha"),
    "PixelShuffle": ("upscale_factor", "DepthToSpace", "blocksize"),
    "PixelUnshuffle": ("downscale_factor", "SpaceToDepth", "blocksize"),
}


def check(d: Diagnosis) -> Suggestion | None:
    first = d.first_divergence
    if first is None or first.module_type not in CORRESPONDING:
        return None
    module_attr, op, onnx_attr = CORRESPONDING[first.module_type]
    node = next((n for n in first.region if n.op_type == op), None)
    if node is None or module_attr not in first.torch_attrs or onnx_attr not in node.attrs:
        return None
    torch_value, onnx_value = first.torch_attrs[module_attr], node.attrs[onnx_attr]
    if abs(float(torch_value) - float(onnx_value)) <= 1e-6 * max(1.0, abs(float(torch_value))):
        return None
    return Suggestion(
        "attribute_mismatch", f"{op} {onnx_attr} differs from the module's {module_attr}",
        f"{first.module} ({first.module_type}) has {module_attr}={torch_value:g}, but ONNX node "
        f"'{node.name}' has {onnx_attr}={float(onnx_value):g}.",
        f"Re-export, or set {onnx_attr}={torch_value:g} on '{node.name}'.", where(d))


RULE = Rule("attribute_mismatch", "An exported attribute differs from the module's", check)
