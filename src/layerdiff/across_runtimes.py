"""Several runtimes: each one's outcome, and where they first disagree.

Each runtime (runtimes/) is diagnosed on its own, on the same ONNX file, inputs and
tolerances. CUDA, TensorRT and DirectML fail in float16 in ways the CPU provider hides,
and OpenVINO's CPU plugin computes in bfloat16 where the CPU has it; the question then
is not only whether each one matches PyTorch but where one departs while another holds.
``departure`` answers it: the first layer, in execution order, whose total error fails on
some runtimes and passes on others (then the outputs, when the layers all agree).
"""

from __future__ import annotations

from dataclasses import replace

from .errors import LayerdiffError
from .records import (
    Diagnosis, LayerStatus, OnnxSource, RuntimeDeparture, RuntimeResult, Verdict,
)

_WORSE = {Verdict.PASS: 0, Verdict.DIVERGED: 1, Verdict.ERROR: 2}
_DEPARTED = (LayerStatus.FAIL, LayerStatus.PROPAGATED, LayerStatus.NOT_RUN)


def outcome(name: str, run: Diagnosis | LayerdiffError) -> RuntimeResult:
    """One runtime's line in the comparison."""
    if isinstance(run, LayerdiffError):
        return RuntimeResult(name, Verdict.ERROR, summary=run.message)
    fd = run.first_divergence
    errors = [o.metrics.max_abs for o in run.outputs]
    return RuntimeResult(
        name, run.verdict,
        first_divergence="" if fd is None else f"{fd.module} ({fd.onnx_node})",
        onnx_node="" if fd is None else fd.onnx_node,
        max_output_error=max(errors) if errors else None,
        failing_layers=sum(1 for l in run.layers if not l.ignored and l.status in _DEPARTED),
        summary=run.error or run.summary,
        detail=run.facts.runtime_detail)


def departure(runs: list[tuple[str, Diagnosis]]) -> RuntimeDeparture | None:
    """The first layer (execution order) where some runtimes fail and others pass; then
    the first output; None when every runtime agrees everywhere."""
    table: dict[tuple[str, str], dict[str, object]] = {}
    order: dict[tuple[str, str], int] = {}
    for name, d in runs:
        for layer in d.layers:
            if layer.ignored:
                continue
            key = (layer.module, layer.onnx_tensor)
            table.setdefault(key, {})[name] = layer
            order.setdefault(key, layer.order)
    names = [name for name, _ in runs]
    for key in sorted(table, key=order.__getitem__):
        rows = table[key]
        departs = tuple(n for n in names if n in rows and rows[n].status in _DEPARTED)
        holds = tuple(n for n in names if n in rows and rows[n].status == LayerStatus.PASS)
        if departs and holds:
            some = next(iter(rows.values()))
            return RuntimeDeparture(
                some.module, some.onnx_node, some.op_type, departs, holds,
                tuple((n, None if rows[n].metrics is None else rows[n].metrics.max_abs)
                      for n in names if n in rows))
    outputs: dict[str, dict[str, object]] = {}
    for name, d in runs:
        for out in d.outputs:
            outputs.setdefault(out.name, {})[name] = out
    for out_name, rows in outputs.items():
        departs = tuple(n for n in names if n in rows and not rows[n].passed)
        holds = tuple(n for n in names if n in rows and rows[n].passed)
        if departs and holds:
            return RuntimeDeparture(f"output {out_name}", out_name, "", departs, holds,
                                    tuple((n, rows[n].metrics.max_abs) for n in names if n in rows))
    return None


def combine(runs: list[tuple[str, Diagnosis | LayerdiffError]],
            source: OnnxSource | None = None) -> Diagnosis:
    """One Diagnosis for several runtimes: the first diagnosis with the worst verdict,
    with every runtime's outcome and their first disagreement. ``source``: the file as
    the first run described it (it exported or converted it; later runs were given it)."""
    results = tuple(outcome(name, run) for name, run in runs)
    diagnosed = [(name, run) for name, run in runs if isinstance(run, Diagnosis)]
    worst = max((r.verdict for r in results), key=_WORSE.__getitem__)
    primary = next((d for _, d in diagnosed if d.verdict == worst), diagnosed[0][1])
    where = departure(diagnosed)
    said = [f"{r.runtime}: {r.verdict.value}" for r in results]
    lead = f"Runtimes: {', '.join(said)}."
    if where is not None:
        lead += (f" {' and '.join(where.departs)} depart{'s' if len(where.departs) == 1 else ''} "
                 f"from PyTorch first at {where.module} (ONNX {where.onnx_node}) while "
                 f"{' and '.join(where.holds)} {'does' if len(where.holds) == 1 else 'do'} not.")
    notes = primary.notes + (
        f"Each of the {len(results)} runtimes was diagnosed in a run of its own (PyTorch "
        f"ran again for each); the layers, suggestions and figures shown are those of "
        f"{primary.settings.provider}.",)
    combined = replace(primary, verdict=worst, summary=f"{lead} {primary.summary}",
                       runtimes=results, runtime_departure=where, notes=notes)
    return combined if source is None else replace(combined, onnx=source)
