"""Rule: the model draws random numbers in its forward pass.

1. Fires when the diagnosis did not pass and random ops ran on either side
   (``facts.random_ops``): PyTorch aten ops such as randn_like, rand, normal_,
   bernoulli or multinomial recorded during the captured forward, or ONNX nodes
   RandomNormal(Like), RandomUniform(Like), Multinomial, Bernoulli. Dropout in training
   mode is the training_mode rule's.
2. The two sides draw different numbers (their generators differ, and so does every
   run), so every value computed from a draw differs however right the conversion is;
   neither the exposed tensors nor float rounding explain it, so instrumentation_changed_result
   and float_drift stay silent. The first divergence is the first layer that reads a
   draw.
3. The model can be verified only with the randomness taken out of forward: seeded
   noise passed in as an input, or the noise disabled while verifying.
"""

from __future__ import annotations

from ..records import Diagnosis, Side, Suggestion, Verdict
from . import Rule

RULE_ID = "random_ops"
TITLE = "The model draws random numbers in forward"


def check(d: Diagnosis) -> Suggestion | None:
    ops = d.facts.random_ops
    if not ops or d.verdict == Verdict.PASS:
        return None
    parts = []
    torch_side = [r for r in ops if r.side == Side.TORCH]
    onnx_side = [r for r in ops if r.side == Side.ONNX]
    if torch_side:
        parts.append("PyTorch draws random numbers in forward ("
                     + ", ".join(f"{r.op} in {r.where}" for r in torch_side[:4]) + ")")
    if onnx_side:
        parts.append("the ONNX file has random nodes ("
                     + ", ".join(f"{r.op} '{r.where}'" for r in onnx_side[:4]) + ")")
    else:
        parts.append("the ONNX file has no random node (the exporter may have frozen one "
                     "draw into a constant)")
    first = d.first_divergence
    where = (f" The first divergence, {first.module or first.onnx_node}, is the first "
             "compared layer that reads a draw." if first is not None else
             " No compared layer isolates the draw (it happens outside the modules that "
             "could be paired), so only the outputs show it.")
    detail = ("; ".join(parts) + ". The two sides draw different numbers, so every value "
              "computed from a draw differs even when the conversion is right: this is "
              "not a conversion fault, not float rounding and not the effect of exposing "
              "intermediate tensors." + where)
    fix = ("Take the randomness out of forward to verify the model: make the noise a "
           "forward argument (draw it outside with a fixed seed, e.g. "
           "noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)), and "
           "export with it as an input), or verify with the noise disabled (a flag or a "
           "zero noise scale) and add it back afterwards.")
    layers = tuple(dict.fromkeys(
        ((first.module or first.onnx_node,) if first is not None else ())
        + tuple(r.where for r in ops)))
    return Suggestion(RULE_ID, TITLE, detail, fix, layers)


RULE = Rule(RULE_ID, TITLE, check)
