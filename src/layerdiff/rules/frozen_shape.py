"""Rule: shapes frozen at export time (DIVERGENCES #6, #7).

1. Fires when onnxruntime fails on a shape op (Reshape, Expand, Tile, ...) or rejects the
   input's dimensions, or when the graph input has fixed sizes other than the input's.
2. Also fires when the model is right at the main size and diverges only at another
   size (--check-sizes): a mask or constant sized at export no longer fits.
3. The tracer recorded a Python int computed from a tensor's shape (or dynamo
   specialised a dimension), so the graph only works at the export size.
"""

from __future__ import annotations

from ..records import CaseKind, CaseVerdict, Diagnosis, DivergenceKind, Suggestion
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
        main, failing, case = other_size
        if first is not None and first.case == case.label:
            what = (f"the first divergence is {first.module or first.onnx_node} "
                    f"({first.op_type}, {first.kind}): {first.message}")
        else:
            what = "the final output differs" + (f" ({case.first_divergence})" if case.first_divergence else "")
        return Suggestion(
            "frozen_shape", f"Right at {main}, wrong at {failing}: a shape was frozen at export",
            f"The model passes at {main} but at {failing} {what}. A size, padding, crop or mask "
            "computed when the model was traced is stored as a constant and does not fit other "
            "inputs.", FIX, where(d) if first is not None and first.case == case.label else ())
    if first is not None and first.kind == DivergenceKind.RUNTIME_ERROR:
        text = first.message.lower()
        if "invalid dimensions" in text or fixed_mismatch:
            return Suggestion(
                "frozen_shape", "The ONNX graph accepts only its export size",
                f"The graph input is fixed at {tuple(declared)}, the input is {wanted}: "
                f"{first.message}", FIX, ())
        if first.op_type in SHAPE_OPS:
            return Suggestion(
                "frozen_shape", "A shape was frozen at export time",
                f"onnxruntime fails at {first.op_type} '{first.onnx_node}' on an input of "
                f"{wanted}: {first.message}. A size computed when the model was traced is "
                "stored as a constant and no longer fits.",
                FIX, where(d))
    return None


def _only_at_another_size(d: Diagnosis):
    """(main size, failing size, its case) when the main input passes and a size diverges."""
    if not d.cases or d.cases[0].verdict != CaseVerdict.PASS:
        return None
    first = d.first_divergence
    failing = [c for c in d.cases if c.kind == CaseKind.SIZE and c.verdict == CaseVerdict.DIVERGED]
    if not failing:
        return None
    case = next((c for c in failing if first is not None and c.label == first.case), failing[0])
    size = lambda shape: "x".join(str(n) for n in shape[-2:])  # noqa: E731
    return size(d.cases[0].shape), size(case.shape), case


RULE = Rule("frozen_shape", "A shape was frozen at export time", check)
