"""Rule: exposing intermediate tensors changed the final output (DIVERGENCES #17).

1. Fires when the final output of the instrumented run (every aligned tensor exposed)
   differs from a plain run of the same file (``facts.instrumentation_delta``) by at
   least a tenth of an output's tolerance, atol + rtol * its range.
2. onnxruntime fuses fewer nodes when their outputs are exposed (a Conv with the Mul or
   Add after it, ...), so the per-layer figures and the output verdict describe a
   computation slightly different from the deployed one; the plain run's error lies
   within max_abs +- delta.
3. Silent for a smaller change: rounding-level differences far inside the tolerance do
   not change any verdict.
4. Silent when the file has random nodes: a plain run draws other numbers, so the
   change measures the draws (rule random_ops), not the exposed tensors.
"""

from __future__ import annotations

from ..records import Diagnosis, Side, Suggestion
from . import Rule

RULE_ID = "instrumentation_changed_result"
TITLE = "Exposing intermediate tensors changed the final output"
SHARE = 0.1  # of an output's tolerance


def check(d: Diagnosis) -> Suggestion | None:
    delta = d.facts.instrumentation_delta
    if not delta or not d.outputs or any(r.side == Side.ONNX for r in d.facts.random_ops):
        return None
    s = d.settings
    tolerance = {o.name: s.atol + s.rtol * o.metrics.scale for o in d.outputs}
    name = max(tolerance, key=lambda n: delta / tolerance[n] if tolerance[n] else float("inf"))
    if delta < SHARE * tolerance[name]:
        return None
    out = next(o for o in d.outputs if o.name == name)
    low, high = max(0.0, out.metrics.max_abs - delta), out.metrics.max_abs + delta
    share = f"{delta / tolerance[name]:.0%} of" if tolerance[name] else "more than"
    detail = (f"Exposing the aligned tensors as outputs changed the final output '{name}' by "
              f"up to {delta:.3g}, {share} its tolerance atol + rtol * range = "
              f"{tolerance[name]:.3g} (level '{s.ort_level}'): onnxruntime fuses fewer nodes "
              "when their outputs are exposed. The layer figures and the output verdict come "
              "from the instrumented run; the plain run's error against PyTorch lies between "
              f"{low:.3g} and {high:.3g}.")
    return Suggestion(
        RULE_ID, TITLE, detail,
        "Localise with onnxruntime's graph optimisations off (--ort-level disable), where "
        "exposing tensors changes nothing, and judge the deployed model by its plain run; "
        "or use a tolerance well above this effect.",
        ())


RULE = Rule(RULE_ID, TITLE, check)
