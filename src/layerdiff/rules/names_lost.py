"""Rule: the ONNX file kept no module names (DIVERGENCES #24, informational).

1. Fires when the alignment found no module scopes in the ONNX file
   (``alignment.has_scopes`` is False) and the model did not pass: a divergence had to
   be located by parameter values and graph structure instead of names.
2. Says how the module calls were paired (by method) and how many could not be paired
   (outside fusions): a divergence in one of those is reported at the next paired layer.
3. Silent when the model passes: nothing needs locating then (and clean nameless
   exports stay free of suggestions).
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion, Verdict
from . import Rule
from ._helpers import where

RULE_ID = "names_lost"
TITLE = "The ONNX file has no module names"


def check(d: Diagnosis) -> Suggestion | None:
    a = d.alignment
    if a is None or a.has_scopes or d.verdict == Verdict.PASS:
        return None
    coverage = a.coverage()
    fused = [u for u in a.unmatched_torch if u.fused_into is not None]
    unpaired = [u for u in a.unmatched_torch if u.fused_into is None]
    methods = ", ".join(f"{n} by {m}" for m, n in coverage["by_method"].items())
    detail = (f"The ONNX nodes carry no module names, so layerdiff paired the "
              f"{coverage['modules']} module calls with ONNX tensors by parameter values and "
              f"graph structure: {len(a.pairs)} paired ({methods})"
              + (f", {len(fused)} fused into a neighbour" if fused else "")
              + f", {len(unpaired)} could not be paired"
              + (" (" + ", ".join(u.name for u in unpaired[:5])
                 + (", ..." if len(unpaired) > 5 else "") + ")" if unpaired else "")
              + ".")
    first = d.first_divergence
    if first is not None and first.module:
        method = d.layers[first.layer].method if first.layer is not None else ""
        detail += (f" The first divergence, {first.module}, was paired by {method}"
                   if method else f" The first divergence is reported at {first.module}")
        detail += ("; a fault inside a module that could not be paired shows at the next "
                   "paired layer." if unpaired else ".")
    return Suggestion(
        RULE_ID, TITLE, detail,
        "Export from the nn.Module itself (torch.onnx.export(model, ...)), not through a "
        "function or wrapper that is not an nn.Module (as chaiNNer does), so every node "
        "keeps its module scope; with the dynamo exporter keep opset >= 18, since the "
        "version converter drops the names.",
        where(d))


RULE = Rule(RULE_ID, TITLE, check)
