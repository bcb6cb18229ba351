"""Rule: ordinary float drift, nothing to fix (DIVERGENCES #20).

1. Fires when some layer's accumulated error fails while its own ONNX segment passes
   (status "propagated"), no layer's own computation fails (no "fail", no ignored layer
   that fails on its own), onnxruntime ran the whole graph (no runtime error, nothing
   "not_run") and no tensor differs in shape, NaN or Inf.
2. Every error is then fp32 rounding that each layer adds within tolerance and that
   grows with depth. Also fires when the final output still passes but intermediate
   layers exceed the tolerance.
3. Suggests a tolerance that would pass, from the Metrics of every failing layer and
   output (compare.py's rule: max_abs <= atol + rtol * scale, and at most 1% of elements
   beyond atol + rtol * |x|):
   - criterion 1 needs rtol >= (max_abs - atol) / scale: the lower bound;
   - criterion 2 already holds at the current rtol for a tensor whose outlier share is
     <= 1% (raising rtol only removes outliers). When every failing tensor is such, the
     lower bound is the answer (exact without the float64 referee, which only raises a
     layer's atol to 3x its noise floor, so the bound stays sufficient with it);
   - otherwise the record does not hold the share of outliers at other tolerances: rtol
     = max_rel suffices when max_rel <= 1, but near zero (atol = 0) relative error is
     unbounded, so the rule suggests atol = the largest max_abs (every element then
     passes, at any rtol) and states the rtol bounds.
4. Silent when the model draws random numbers in forward (``facts.random_ops``): the
   error then comes from different draws, not rounding (rule random_ops).
"""

from __future__ import annotations

import math

from ..compare import NOISE_FACTOR, OUTLIER_SHARE
from ..records import Diagnosis, LayerStatus, Metrics, Suggestion, Verdict
from . import Rule

RULE_ID = "float_drift"
TITLE = "Ordinary float drift: nothing to fix"
# max_rel bounds an rtol that clears every outlier when it is <= 1; above 1% such an rtol
# would hide real faults, so the rule suggests an atol instead.
MAX_SUGGESTED_RTOL = 1e-2


def nice_up(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is >= ``value`` (a tolerance to type)."""
    if value <= 0:
        return 0.0
    exponent = math.floor(math.log10(value))
    for mantissa in (1, 2, 5, 10):
        candidate = float(f"{mantissa}e{exponent}")
        if candidate >= value * (1 - 1e-12):
            return candidate
    return float(f"1e{exponent + 1}")


def _tensors(d: Diagnosis) -> list[tuple[str, Metrics, float]]:
    """(name, accumulated metrics, effective atol) of every counted layer and output."""
    atol = d.settings.atol
    found = []
    for layer in d.layers:
        if layer.metrics is None or layer.ignored:
            continue
        noise = layer.referee.torch_error if layer.referee else 0.0
        found.append((layer.module, layer.metrics, max(atol, NOISE_FACTOR * noise)))
    found += [(f"output {o.name}", o.metrics, atol) for o in d.outputs]
    return found


def suggested_tolerance(d: Diagnosis) -> tuple[float, float, str]:
    """(rtol, atol) that make every layer and output pass, and what they rest on."""
    rtol, atol = d.settings.rtol, d.settings.atol
    failing = [(name, m, a) for name, m, a in _tensors(d) if not m.passed]
    if not failing:
        return rtol, atol, "every tensor passes already"
    need = {name: max(0.0, (m.max_abs - a) / m.scale) if m.scale > 0 else math.inf
            for name, m, a in failing}
    bound_at = max(need, key=need.get)
    lower = need[bound_at]
    outliers = [(name, m) for name, m, _ in failing if m.outlier_share > OUTLIER_SHARE]
    basis = (f"rtol >= {lower:.3g} so that no element is off by more than atol + rtol * range "
             f"(from {bound_at}: max error / range)")
    if not outliers and math.isfinite(lower):
        return nice_up(max(lower, rtol)), atol, basis + "; no tensor has more than 1% of its " \
            "elements outside the elementwise bound, so that is the smallest rtol"
    upper = max(m.max_rel for _, m in outliers)
    worst = max(outliers, key=lambda t: t[1].outlier_share)
    basis += (f"; {len(outliers)} tensor(s) also have more than 1% of their elements outside "
              f"atol + rtol * |x| (up to {worst[1].outlier_share:.1%} at {worst[0]}): elements "
              "near zero, whose relative error the record bounds only by the largest one "
              f"(max_rel {upper:.3g})")
    if upper <= MAX_SUGGESTED_RTOL and math.isfinite(lower):
        return nice_up(max(upper, lower, rtol)), atol, basis + \
            "; rtol = that largest relative error clears them"
    largest = max(m.max_abs for _, m, _ in failing)
    return rtol, nice_up(largest), basis + \
        (f"; no element of any layer or output differs by more than {largest:.3g}, so "
         "atol at that value passes everything at any rtol")


def check(d: Diagnosis) -> Suggestion | None:
    if d.verdict == Verdict.ERROR or d.first_divergence is not None or d.facts.random_ops:
        return None
    counted = [l for l in d.layers if not l.ignored]
    if any(l.status in (LayerStatus.FAIL, LayerStatus.NOT_RUN) for l in counted):
        return None
    if any(l.ignored and l.local is not None and not l.local.passed for l in d.layers):
        return None
    drifting = [l for l in counted if l.status == LayerStatus.PROPAGATED]
    if not drifting:
        return None
    if any(m.shape_torch != m.shape_onnx or m.nonfinite_differs
           for _, m, _ in _tensors(d) if not m.passed):
        return None

    rel = lambda l: l.metrics.max_abs / l.metrics.scale if l.metrics.scale else 0.0  # noqa: E731
    own = lambda l: l.local.max_abs / l.local.scale if l.local and l.local.scale else 0.0  # noqa: E731
    worst = max(drifting, key=rel)
    worst_own = max(counted, key=own)
    failing_outputs = [o for o in d.outputs if not o.passed]
    rtol, atol, basis = suggested_tolerance(d)
    s = d.settings
    where = ("the final output differs by up to "
             f"{max(o.metrics.max_abs for o in failing_outputs):.3g}" if failing_outputs
             else "the final output still passes")
    detail = (f"{len(drifting)} of {len(counted)} layers exceed rtol={s.rtol:g}, atol={s.atol:g} "
              "only through error carried from upstream, and no layer's own computation fails "
              f"(largest own error {own(worst_own):.2g} of the range, at {worst_own.module}); "
              f"{where}. The accumulated error reaches {rel(worst):.2g} of the range at "
              f"{worst.module}: fp32 rounding that every layer adds within tolerance and that "
              "grows with depth, not a conversion fault. Suggested tolerance: "
              f"rtol={rtol:g}, atol={atol:g} ({basis}).")
    fix = (f"Nothing to fix in the model. Compare with rtol={rtol:g} and atol={atol:g} "
           f"(--rtol {rtol:g} --atol {atol:g}), or keep the float64 referee on "
           "(--reference float64) so each layer is judged against PyTorch's own rounding.")
    return Suggestion(RULE_ID, TITLE, detail, fix, (worst.module,))


RULE = Rule(RULE_ID, TITLE, check)
