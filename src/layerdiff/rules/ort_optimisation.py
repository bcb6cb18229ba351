"""Rule: the divergence comes from onnxruntime's graph optimisations (DIVERGENCES #16).

1. Fires when the model diverges at the chosen optimisation level and the same
   comparison passes with every optimisation off (ORT_DISABLE_ALL).
2. A fusion or rewrite (GELU approximation, fused Conv, layout transforms) changes the
   numbers, not the exported graph.
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion
from . import Rule
from ._helpers import where


def check(d: Diagnosis) -> Suggestion | None:
    if d.facts.vanishes_without_ort_optimisation is not True:
        return None
    config = ", ".join(f"{k}={v}" for k, v in d.settings.ort_config)
    detail = (f"The divergence appears with onnxruntime's graph optimisation level "
              f"'{d.facts.ort_optimisation_level}'"
              + (f" and session config {config}" if config else "")
              + " and vanishes with every optimisation off (ORT_DISABLE_ALL): the exported "
                "graph is right, a runtime rewrite of it changes the numbers.")
    if d.facts.ort_rewrite and d.first_divergence is not None:
        detail += (f" onnxruntime replaced what computes '{d.first_divergence.onnx_node}' with "
                   f"{d.facts.ort_rewrite}.")
    if any("gelu_approximation" in k for k, v in d.settings.ort_config if v not in ("0", "")):
        detail += " optimization.enable_gelu_approximation swaps exact GELU for its tanh form."
    return Suggestion(
        "ort_optimisation", "onnxruntime's graph optimisation causes the divergence", detail,
        "Deploy with a lower graph_optimization_level or without the session option that "
        "enables the rewrite, and ship the unoptimised model rather than one saved after "
        "optimisation.", where(d))


RULE = Rule("ort_optimisation", "onnxruntime's graph optimisation causes the divergence", check)
