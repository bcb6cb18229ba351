"""Rule: GELU exported as the tanh approximation, or vice versa (DIVERGENCES #15).

1. Fires when the first divergence's module is a GELU, or its suspects hold a Gelu /
   FastGelu node or the tanh form, and the two sides use different forms.
2. The tanh approximation differs from the exact (erf) GELU by up to ~5e-4 per layer,
   which accumulates through a deep network.
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion
from . import Rule
from ._helpers import suspects, where


def check(d: Diagnosis) -> Suggestion | None:
    first = d.first_divergence
    if first is None:
        return None
    nodes = suspects(d, "Gelu", "FastGelu", "Tanh", "Erf")
    is_gelu = first.module_type == "GELU" or any(n.op_type in ("Gelu", "FastGelu") for n in nodes)
    if not is_gelu:
        return None
    torch_form = str(first.torch_attrs.get("approximate", "none"))
    onnx_tanh = any(n.op_type == "FastGelu" or n.op_type == "Tanh"
                    or str(n.attrs.get("approximate", "none")) == "tanh" for n in nodes)
    onnx_erf = any(n.op_type == "Erf" or (n.op_type == "Gelu" and
                   str(n.attrs.get("approximate", "none")) == "none") for n in nodes)
    if torch_form == "none" and onnx_tanh:
        detail = "PyTorch computes the exact (erf) GELU; the ONNX file uses the tanh approximation."
    elif torch_form == "tanh" and onnx_erf and not onnx_tanh:
        detail = "PyTorch uses the tanh approximation of GELU; the ONNX file computes the exact (erf) form."
    else:
        return None
    return Suggestion(
        "gelu_approximation", "GELU approximation differs between PyTorch and ONNX",
        detail + " The two differ by up to ~5e-4 per layer, accumulating with depth.",
        "Export the same form the model was trained with: nn.GELU() exports as Erf (or Gelu "
        "at opset 20); do not swap in approximate='tanh' or FastGelu for deployment.",
        where(d))


RULE = Rule("gelu_approximation", "GELU approximation differs between PyTorch and ONNX", check)
