"""Rule: shapes frozen at export time (DIVERGENCES #6, #7).

1. Fires when onnxruntime fails on a shape op (Reshape, Expand, Tile, ...) or rejects the
   input's dimensions, or when the graph input has fixed sizes other than the input's.
2. Also fires when the model is right at the main size and diverges only at another
   size (--check-sizes): a mask or constant sized at export no longer fits.
3. The tracer recorded a Python int computed from a tensor's shape (or dynamo
   specialised a dimension), so the graph only works at the export size.
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion
from . import Rule
from ._helpers import where

SHAPE_OPS = {"Reshape", "Expand", "Tile", "Slice", "Split", "Concat", "Add", "Mul", "Sub",
             "Where", "MatMul", "Transpose", "Resize", "ConstantOfShape"}
FIX = ("Export with the dynamo exporter and dynamic_shapes (or the legacy exporter with "
       "dynamic_axes), and compute shapes with tensor ops instead of Python ints "
       "(x.shape[2] kept as a tensor, not int(x.shape[2])). Always check a second resolution.")


def check(d: Diagnosis) -> Suggestion | None:
    first = d.first_divergence
    declared = d.facts.onnx_input_shape
    wanted = d.settings.input_shape
    fixed_mismatch = (len(declared) == len(wanted) and any(
        isinstance(a, int) and a != b for a, b in zip(declared, wanted)))
    other_size = _only_at_another_size(d)
    if other_size is not None:
        return Suggestion(
            "frozen_shape", f"Right at {other_size[0]}, wrong at {other_size[1]}: a shape was frozen at export",
            f"The model passes at {other_size[0]} but at {other_size[1]} the first divergence is "
            f"{first.module or first.onnx_node} ({first.op_type}, {first.kind}): {first.message}. "
            "A size, mask or index computed when the model was traced is stored as a constant "
            "and does not fit other inputs.", FIX, where(d))
    if first is not None and first.kind == "runtime_error":
        text = first.message.lower()
        if "invalid dimensions" in text or fixed_mismatch:
            return Suggestion(
                "frozen_shape", "The ONNX graph accepts only its export size",
                f"The graph input is fixed at {tuple(declared)}, the input is {wanted}: "
                f"{first.message}", FIX, ())
        if first.op_type in SHAPE_OPS or "shape" in text:
            return Suggestion(
                "frozen_shape", "A shape was frozen at export time",
                f"onnxruntime fails at {first.op_type} '{first.onnx_node}' on an input of "
                f"{wanted}: {first.message}. A size computed when the model was traced is "
                "stored as a constant and no longer fits.",
                FIX, where(d))
    return None


def _only_at_another_size(d: Diagnosis) -> tuple[str, str] | None:
    """(main size, failing size) when the main input passes and another size diverges."""
    first = d.first_divergence
    if first is None or not first.case or not d.cases:
        return None
    main = d.cases[0]
    failing = next((c for c in d.cases if c.label == first.case), None)
    if failing is None or failing.kind != "size" or main.verdict != "pass":
        return None
    size = lambda shape: "x".join(str(n) for n in shape[-2:])  # noqa: E731
    return size(main.shape), size(failing.shape)


RULE = Rule("frozen_shape", "A shape was frozen at export time", check)
