"""Rule: the model was left in training mode (DIVERGENCES #8).

1. Fires when a BatchNorm / Dropout / InstanceNorm module is in training mode during the
   reference run, or the ONNX file holds training-mode nodes (BatchNormalization with
   training_mode=1, Dropout with training_mode true).
2. BatchNorm then normalises with batch statistics and Dropout is random, so the two
   sides cannot agree; the fix is model.eval() before export and before comparing.
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion
from . import Rule


def check(d: Diagnosis) -> Suggestion | None:
    modules, nodes = d.facts.training_modules, d.facts.onnx_training_nodes
    if not modules and not nodes:
        return None
    parts = []
    if modules:
        parts.append(f"{len(modules)} module(s) run in training mode in PyTorch "
                     f"({', '.join(modules[:4])}): BatchNorm uses the batch's statistics "
                     "and Dropout drops random elements.")
    if nodes:
        parts.append(f"The ONNX file has {len(nodes)} node(s) exported in training mode "
                     f"({', '.join(nodes[:4])}).")
    return Suggestion(
        rule="training_mode",
        title="Model left in training mode",
        detail=" ".join(parts),
        fix="Call model.eval() before exporting and before running the PyTorch reference "
            "(torch.onnx.export(..., training=torch.onnx.TrainingMode.EVAL) for the legacy exporter).",
        layers=tuple(modules) + tuple(nodes),
    )


RULE = Rule("training_mode", "Model left in training mode", check)
