"""Rule: the model changes its input in place (DIVERGENCES #9).

1. Fires when the input tensor differs after the PyTorch forward (spandrel's RCAN does
   ``x *= 255``).
2. Comparing with the same tensor on both sides would then compare different inputs;
   layerdiff already gives each side its own copy, so this is a warning for the user's
   own scripts, not a conversion fault.
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion
from . import Rule


def check(d: Diagnosis) -> Suggestion | None:
    if not d.facts.input_mutated:
        return None
    return Suggestion(
        rule="input_mutation",
        title="The model mutates its input",
        detail="The PyTorch forward changed the input tensor in place. A script that feeds "
               "the same tensor to PyTorch and then to ONNX compares different inputs and "
               "sees a false mismatch. layerdiff gave each side its own copy.",
        fix="Pass a copy (x.clone()) to the PyTorch model, or remove the in-place operation "
            "on the input (e.g. `x = x * 255` instead of `x *= 255`).",
    )


RULE = Rule("input_mutation", "The model mutates its input", check)
