"""From compared layers to a verdict: ignore patterns, first divergence, summary.

Each layer has two errors. The accumulated error compares the ONNX model's tensor with
PyTorch's; it grows downstream of any fault. The local error compares what the layer's
own ONNX segment computes from PyTorch's values of its inputs; only that segment's error
remains. A layer whose local error fails is a cause ("fail"); one whose accumulated error
fails while its local error passes only carries error from upstream ("propagated").

The first divergence is, in ONNX execution (topological) order, the first non-ignored
layer that fails locally. When onnxruntime fails on a node, that node is the first
divergence unless a layer before it already failed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from collections.abc import Mapping, Sequence

import numpy as np

from .capture_onnx import OnnxGraph, RuntimeFailure
from .compare import compare
from .records import (
    Alignment, DivergenceKind, FirstDivergence, LayerResult, LayerStatus, Metrics, OnnxNodeInfo,
    OutputResult, Referee, TorchCall, Verdict,
)

REGION_LIMIT = 40  # suspects listed for a first divergence


def is_ignored(patterns: Sequence[str], module: str, onnx_node: str, op_type: str) -> bool:
    """fnmatch globs over module paths and ONNX node names; ``op:Resize`` for op types."""
    for pattern in patterns:
        if pattern.startswith("op:"):
            if fnmatch.fnmatchcase(op_type, pattern[3:]):
                return True
        elif fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(onnx_node, pattern):
            return True
    return False


def layer_results(
    alignment: Alignment,
    calls: Sequence[TorchCall],
    metrics: Mapping[int, Metrics],
    *, ignore: Sequence[str],
    local: Mapping[int, Metrics] | None = None,
    referees: Mapping[int, Referee] | None = None,
) -> list[LayerResult]:
    """One result per pair of ``alignment``, from the figures measured for it (keyed by
    the pair's position): its accumulated error, its local error and the referee's."""
    layers = []
    for k, pair in enumerate(alignment.pairs):
        call = calls[pair.call]
        total = metrics.get(k)
        own = (local or {}).get(k)
        ignored = is_ignored(ignore, call.label, pair.onnx_node, pair.op_type)
        layers.append(LayerResult(
            module=call.label, module_type=call.module_type, onnx_tensor=pair.onnx_tensor,
            onnx_node=pair.onnx_node, op_type=pair.op_type, order=pair.order,
            method=pair.method, metrics=total, ignored=ignored,
            status=_status(total, own, ignored), local=own, referee=(referees or {}).get(k),
        ))
    return _first_failure_is_a_cause(layers)


JUMP = 10.0  # an error this many times what came before is made here, not carried


def _first_failure_is_a_cause(layers: list[LayerResult]) -> list[LayerResult]:
    """The first layer whose accumulated error fails is a cause, even when its segment
    passes on its own, if every layer before it passes and its error jumps: more than JUMP
    times the largest error before it and its own segment's error. Its inputs were right
    in the real run; cutting the graph can change what onnxruntime fuses, so the local run
    may miss a fault that only a fusion across the cut produces. Slow growth past the
    tolerance is drift, not a cause."""
    for i, layer in enumerate(layers):
        if layer.metrics is None or layer.metrics.passed or layer.ignored:
            continue
        earlier = layers[:i]
        if layer.status == LayerStatus.PROPAGATED and all(l.metrics is not None and l.metrics.passed
                                                for l in earlier):
            error = _normalised(layer.metrics)
            before = max((_normalised(l.metrics) for l in earlier), default=0.0)
            own = _normalised(layer.local) if layer.local is not None else 0.0
            if error > JUMP * max(before, own):
                layers[i] = replace(layer, status=LayerStatus.FAIL)
        break
    return layers


def _normalised(metrics: Metrics) -> float:
    return metrics.max_abs / max(metrics.scale, 1e-30)


def _status(metrics: Metrics | None, local: Metrics | None, ignored: bool) -> LayerStatus:
    if metrics is None:
        return LayerStatus.NOT_RUN
    if ignored:
        return LayerStatus.IGNORED
    if local is not None:
        if not local.passed:
            return LayerStatus.FAIL
        return LayerStatus.PASS if metrics.passed else LayerStatus.PROPAGATED
    return LayerStatus.PASS if metrics.passed else LayerStatus.FAIL


def output_results(torch_outputs: Sequence[np.ndarray], onnx_outputs: Sequence[np.ndarray] | None,
                   names: Sequence[str], *, rtol: float, atol: float,
                   noise: Sequence[float] = (), models: Sequence[str] = ()) -> list[OutputResult]:
    """Each output compared, by its ONNX name; ``models`` names what forward() returned
    there ("logits", "0.hidden")."""
    if onnx_outputs is None:
        return []
    floors = list(noise) + [0.0] * (len(names) - len(noise))
    models = list(models) + [""] * (len(names) - len(models))
    return [OutputResult(name, compare(t, o, rtol=rtol, atol=atol, noise=floor), model)
            for name, t, o, floor, model in zip(names, torch_outputs, onnx_outputs, floors, models)]


def first_divergence(
    layers: Sequence[LayerResult],
    graph: OnnxGraph,
    alignment: Alignment,
    calls: Sequence[TorchCall],
    failure: RuntimeFailure | None,
) -> FirstDivergence | None:
    failing = next((i for i, l in enumerate(layers) if l.status == LayerStatus.FAIL), None)
    failed_node = next((n for n in graph.nodes if failure and n.name == failure.node), None)
    if failing is not None and (failed_node is None or layers[failing].order < failed_node.index):
        return _numeric(failing, layers, graph, alignment, calls)
    if failure is not None:
        return _runtime(failure, failed_node, layers, graph, alignment, calls)
    return None


def _numeric(index: int, layers, graph, alignment, calls) -> FirstDivergence:
    layer = layers[index]
    metrics: Metrics = layer.metrics  # type: ignore[assignment]
    message = metrics.reason
    if layer.local is not None and not layer.local.passed:
        metrics = layer.local  # its own failure is the evidence
        message = metrics.reason
    elif layer.local is not None:
        message += ("; its ONNX segment passes when run alone, so the error appears only in "
                    "the whole graph (an onnxruntime fusion across layers, say)")
    if metrics.shape_torch != metrics.shape_onnx:
        kind = DivergenceKind.SHAPE_MISMATCH
    elif metrics.nonfinite_differs:
        kind = DivergenceKind.NONFINITE
    else:
        kind = DivergenceKind.NUMERIC
    call = _call_for(layer.module, calls)
    region = _region(graph, graph.producer[layer.onnx_tensor], alignment)
    return FirstDivergence(
        module=layer.module, onnx_node=layer.onnx_node, op_type=layer.op_type, kind=kind,
        max_abs=metrics.max_abs, message=message, layer=index, region=region,
        module_type=layer.module_type, torch_attrs=dict(call.attrs) if call else {},
        downstream_of_ignored=_ignored_failing_ancestors(layer, layers, graph),
    )


def _runtime(failure, node, layers, graph, alignment, calls) -> FirstDivergence:
    module, module_type, attrs, index = "", "", {}, None
    if node is not None:
        # The module whose output is the first aligned tensor computed from the failing node.
        tainted = graph.descendants(node.index)
        index = next((i for i, l in enumerate(layers) if l.onnx_tensor in tainted), None)
        if index is not None:
            owner = layers[index]
            module, module_type = owner.module, owner.module_type
            call = _call_for(owner.module, calls)
            attrs = dict(call.attrs) if call else {}
    region = _region(graph, node.index, alignment) if node is not None else ()
    summary = failure.message.strip().splitlines()[0] if failure.message.strip() else "failed"
    return FirstDivergence(
        module=module, onnx_node=failure.node, op_type=failure.op_type or (node.op_type if node else ""),
        kind=DivergenceKind.RUNTIME_ERROR, max_abs=None, message=summary, layer=index, region=region,
        module_type=module_type, torch_attrs=attrs,
    )


def _call_for(label: str, calls: Sequence[TorchCall]) -> TorchCall | None:
    return next((c for c in calls if c.label == label), None)


def _region(graph: OnnxGraph, start: int, alignment: Alignment) -> tuple[OnnxNodeInfo, ...]:
    """Nodes that computed ``start``'s output from aligned tensors, inputs and constants."""
    aligned = {p.onnx_tensor for p in alignment.pairs}
    seen, stack = {start}, [start]
    while stack and len(seen) < REGION_LIMIT:
        node = graph.nodes[stack.pop()]
        for name in node.inputs:
            producer = graph.producer.get(name)
            if producer is None or name in aligned or producer in seen:
                continue
            seen.add(producer)
            stack.append(producer)
    return tuple(OnnxNodeInfo(graph.nodes[i].name, graph.nodes[i].op_type, graph.nodes[i].attrs)
                 for i in sorted(seen) if graph.nodes[i].op_type != "Constant")


def _ignored_failing_ancestors(layer: LayerResult, layers, graph: OnnxGraph) -> tuple[str, ...]:
    suspects = [l for l in layers if l.ignored and l.order < layer.order and not _own_pass(l)]
    return tuple(l.module for l in suspects
                 if layer.onnx_tensor in graph.descendants(graph.producer[l.onnx_tensor]))


def _own_pass(layer: LayerResult) -> bool:
    """Whether the layer's own computation is right (local error when measured)."""
    judged = layer.local or layer.metrics
    return judged is None or judged.passed


def ignored_failures(layers: Sequence[LayerResult]) -> list[LayerResult]:
    return [l for l in layers if l.ignored and not _own_pass(l)]


def verdict(layers: Sequence[LayerResult], outputs: Sequence[OutputResult],
            first: FirstDivergence | None) -> tuple[Verdict, bool]:
    """("pass" | "diverged", masked): masked when a layer fails but every output passes.

    Layers count through their own error: one that only carries error from upstream
    ("propagated") is not a divergence by itself; the layer it came from is.
    """
    layer_failed = any(l.status == LayerStatus.FAIL for l in layers)
    output_failed = any(not o.passed for o in outputs) or not outputs
    if first is None and not layer_failed and outputs and not output_failed:
        return Verdict.PASS, False
    masked = bool(outputs) and not output_failed and (layer_failed or first is not None)
    return Verdict.DIVERGED, masked


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def summarise(verdict_: Verdict, layers: Sequence[LayerResult], outputs: Sequence[OutputResult],
              first: FirstDivergence | None, masked: bool, rtol: float, atol: float,
              unmatched: int) -> str:
    compared = [l for l in layers if l.metrics is not None]
    counted = [l for l in compared if not l.ignored]
    tolerance = f"rtol={rtol:g}, atol={atol:g}"
    if verdict_ == Verdict.PASS:
        carried = sum(1 for l in counted if l.status == LayerStatus.PROPAGATED)
        if carried:
            text = (f"The ONNX model agrees with PyTorch: no layer's own computation fails and "
                    f"the {len(outputs)} output(s) are within {tolerance}; {carried} of "
                    f"{len(counted)} layers exceed it only through rounding carried from upstream.")
        else:
            text = (f"The ONNX model agrees with PyTorch: all {len(counted)} compared layers and "
                    f"{len(outputs)} output(s) are within {tolerance}.")
    elif first is not None and first.kind == DivergenceKind.RUNTIME_ERROR:
        where = f" ({first.module})" if first.module else ""
        ran = sum(1 for l in layers if l.metrics is not None)
        if first.onnx_node:
            text = f"onnxruntime fails at {first.op_type} node '{first.onnx_node}'{where}: {first.message}."
        else:
            text = f"onnxruntime refuses to run the model on this input: {first.message}."
        text += (f" The {ran} layer(s) before it were compared; nothing after it ran."
                 if ran else " No layer could be compared.")
    elif first is not None:
        causes = sum(1 for l in counted if l.status == LayerStatus.FAIL)
        carried = sum(1 for l in counted if l.status == LayerStatus.PROPAGATED)
        metrics = layers[first.layer].metrics
        rel = metrics.max_abs / metrics.scale if metrics and metrics.scale else float("nan")
        how = (f"{first.message}" if first.kind in (DivergenceKind.SHAPE_MISMATCH, DivergenceKind.NONFINITE)
               else f"max error {first.max_abs:.3g}, {rel:.1%} of that layer's range")
        at = f" on input {first.case}" if first.case else ""
        text = (f"The ONNX model diverges from PyTorch. The first divergence is at "
                f"{first.module} ({first.module_type}, ONNX {first.op_type} '{first.onnx_node}')"
                f"{at}: {how}. Of {len(counted)} compared layers, "
                f"{_count(causes, 'fails', 'fail')} on {'its' if causes == 1 else 'their'} own and "
                f"{_count(carried, 'only carries', 'only carry')} error from upstream ({tolerance}).")
        if first.downstream_of_ignored:
            text += (" It lies downstream of ignored layers that fail ("
                     + ", ".join(first.downstream_of_ignored[:3])
                     + "), so part of its error may come from them.")
    else:
        worst = max(outputs, key=lambda o: o.metrics.max_abs, default=None)
        error = f" (max error {worst.metrics.max_abs:.3g})" if worst else ""
        ignored = ignored_failures(layers)
        drifting = [l for l in counted if l.status == LayerStatus.PROPAGATED]
        if ignored:
            text = (f"The final output differs from PyTorch{error}. The only layers whose "
                    "own computation fails are ignored: "
                    + ", ".join(l.module for l in ignored[:3]) + ".")
        elif drifting:
            text = (f"The final output differs from PyTorch{error}, but no layer's own "
                    f"computation fails: the error grows slowly across {len(drifting)} layers "
                    "(ordinary float rounding drift, no single jump).")
        elif worst is not None and worst.metrics.shape_torch != worst.metrics.shape_onnx:
            text = (f"The final output's shape differs from PyTorch's ({worst.metrics.reason}) "
                    "while every compared layer passes: the cause lies in operations outside "
                    "the modules (a final crop or pad in forward(), say).")
        else:
            text = (f"The final output differs from PyTorch{error} but no aligned layer "
                    "fails: the cause lies in operations outside the modules or in layers "
                    "that could not be aligned.")
    if masked:
        text += " The final output still passes: the divergence is masked downstream."
    elif verdict_ != Verdict.PASS and outputs:
        worst = max(outputs, key=lambda o: o.metrics.max_abs)
        if not worst.passed and worst.metrics.shape_torch == worst.metrics.shape_onnx:
            text += f" The final output differs by up to {worst.metrics.max_abs:.3g}."
    if unmatched:
        text += f" {unmatched} module call(s) could not be aligned (listed in the report)."
    return text
