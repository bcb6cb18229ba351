"""Half precision: make fp16 ONNX files, find what breaks in fp16, keep those layers in fp32.

This module owns everything specific to float16 (DIVERGENCES.md rows 10-13):

- ``make_fp16_onnx``: an fp16 model made the way tools in the field make one: the
  onnxconverter-common conversion of an fp32 ONNX file (neosr), or ``model.half()``
  exported with the legacy exporter (chaiNNer), the latter isolated in a forked child
  like every export (exporting.py).
- ``analyse``: from one fp32 PyTorch run (``capture_torch.capture``) and the layers of a
  diagnosis of the fp16 file, the layers whose values leave fp16's range (above 65504:
  overflow; non-zero values that round to 0: underflow), the first layer whose ONNX
  values are inf/NaN, and the layers to keep in fp32, with their ONNX node names and a
  reason each.
- ``keep_in_fp32``: a mixed-precision file, fp16 except the given nodes.
- ``is_fp16`` and ``CPU_PROVIDER_NOTE``: whether a file holds fp16 at all, and what to
  say about verdicts reached with onnxruntime's CPU provider.

It reads records and graphs; it runs no comparison and no onnxruntime session itself.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from . import exporting
from .capture_onnx import OnnxGraph, load_graph
from .errors import ExportError, UsageError
from .files import atomic_write
from .records import LayerResult, LoadedModel, TorchCall

FP16_MAX = 65504.0  # largest finite float16
FP16_TINY = 2.0 ** -24  # smallest float16 subnormal (~6e-8)
FLUSH_LIMIT = FP16_TINY / 2  # |x| <= 2**-25 rounds to 0 in float16 (ties to even)
# (x - mean)**2 of a norm's input overflows fp16 once |x - mean| passes sqrt(65504).
NORM_INPUT_LIMIT = float(np.sqrt(FP16_MAX))
# onnxconverter-common clamps constants beyond this (its max_finite_val) when it converts them.
CONVERTER_MAX = 1e4
# A layer "underflows" when at least this share of its non-zero values becomes 0 in fp16.
UNDERFLOW_SHARE = 0.1
# A layer's own fp16 segment is "broken" below this cosine with PyTorch (zeros, garbage).
BROKEN_COSINE = 0.99

METHODS = ("convert", "half")
HALF_OPSET = 17  # what chaiNNer exports fp16 models with

DESCRIPTIONS = {
    "convert": "onnxconverter-common float16 conversion (keep_io_types)",
    "half": "model.half() exported with the legacy exporter",
}

CPU_PROVIDER_NOTE = (
    "This float16 model was checked with onnxruntime's CPU provider, which has no float16 "
    "kernels for many ops and runs them in float32 behind Casts it inserts; on a GPU "
    "provider (CUDA, DirectML, TensorRT) those ops run in float16, so the verdict there "
    "may differ: check on the target provider too."
)

# ONNX ops that square, sum or exponentiate their input (DIVERGENCES.md row 13).
NORM_OPS = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization",
    "LpNormalization", "MeanVarianceNormalization", "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "Pow", "Sqrt",
})
# Module types that normalise (BatchNorm at inference is a plain affine map: not one).
_NORM_MODULE = re.compile(r"(?<!Batch)Norm|Softmax", re.IGNORECASE)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Fp16Layer:
    """One PyTorch call and how its fp32 values sit in fp16's range."""

    module: str  # TorchCall.label
    module_type: str
    onnx_node: str  # the aligned node as diagnosed; "" when the layer was not aligned
    max_abs: float  # largest finite |fp32 PyTorch value|
    tiny_share: float  # share of its non-zero values that become 0 in fp16


@dataclass(frozen=True)
class KeepFp32:
    """A layer to keep in fp32, the ONNX nodes that compute it, and why."""

    module: str  # TorchCall.label, or the ONNX node name for nodes between layers
    nodes: tuple[str, ...]  # node names in the graph given to analyse()
    reason: str


@dataclass(frozen=True)
class Fp16Findings:
    overflow: tuple[Fp16Layer, ...]  # fp32 values above FP16_MAX, in call order
    underflow: tuple[Fp16Layer, ...]  # UNDERFLOW_SHARE or more of non-zero values become 0
    first_nonfinite: LayerResult | None  # first layer (ONNX order) with ONNX inf/NaN
    keep: tuple[KeepFp32, ...]  # suggested fp32 layers, in ONNX order
    notes: tuple[str, ...] = ()

    @property
    def node_names(self) -> list[str]:
        """Every node to keep in fp32, once each: what ``keep_in_fp32`` takes."""
        return list(dict.fromkeys(n for k in self.keep for n in k.nodes))

    @property
    def clean(self) -> bool:
        return not (self.overflow or self.underflow or self.first_nonfinite or self.keep)

    def summary(self) -> str:
        if self.clean:
            return "No layer leaves float16's range and no ONNX value is inf/NaN."
        parts = []
        if self.overflow:
            worst = max(self.overflow, key=lambda l: l.max_abs)
            parts.append(f"{len(self.overflow)} layer(s) exceed float16's maximum {FP16_MAX:g} "
                         f"in fp32 (largest: {worst.module}, {worst.max_abs:.3g})")
        if self.first_nonfinite is not None:
            parts.append(f"the first inf/NaN in the fp16 model is at "
                         f"{self.first_nonfinite.module} ({self.first_nonfinite.onnx_node})")
        if self.underflow:
            parts.append(f"{len(self.underflow)} layer(s) have {UNDERFLOW_SHARE:.0%} or more "
                         f"of their non-zero values flush to 0 in float16")
        if self.keep:
            parts.append(f"keep {len(self.keep)} layer(s) ({len(self.node_names)} ONNX nodes) "
                         f"in fp32: " + ", ".join(k.module for k in self.keep))
        return "; ".join(parts) + "."


# --------------------------------------------------------------------------- making fp16 files


def make_fp16_onnx(module: Any, example: torch.Tensor, fp32_onnx: str | Path | None,
                   out_path: str | Path, method: str = "convert", *,
                   timeout_s: float = 900) -> tuple[Path, str]:
    """Write an fp16 ONNX model to ``out_path``; return its path and how it was made.

    ``method="convert"``: onnxconverter-common's float16 conversion of ``fp32_onnx`` with
    ``keep_io_types=True`` (fp32 input and output; ``module`` and ``example`` unused).
    ``method="half"``: a copy of ``module`` (an nn.Module or LoadedModel) in half
    precision exported with the legacy exporter at opset 17, dynamic height and width,
    traced on ``example`` in half precision (``fp32_onnx`` unused); its graph input and
    output are float16. Raises UsageError for an unknown method, ExportError when the
    export or conversion fails. The file appears at ``out_path`` only when complete.
    """
    if method not in METHODS:
        raise UsageError(f"unknown fp16 method '{method}'",
                         hint="use one of: " + ", ".join(METHODS))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if method == "half":
        _export_half_isolated(module, example, out_path, timeout_s)
        return out_path, DESCRIPTIONS["half"]
    if fp32_onnx is None:
        raise UsageError("the 'convert' fp16 method needs an fp32 ONNX file")
    clamped = _convert(onnx.load(str(fp32_onnx)), out_path, node_block_list=())
    return out_path, DESCRIPTIONS["convert"] + _clamp_mention(clamped)


def keep_in_fp32(fp32_onnx: str | Path, node_names: Sequence[str], out_path: str | Path) -> Path:
    """Write a mixed-precision model: ``fp32_onnx`` in fp16 except ``node_names``.

    onnxconverter-common's conversion with ``node_block_list=node_names`` and
    ``keep_io_types=True``: the named nodes keep fp32 weights and compute in fp32,
    with Casts at the borders of each fp32 region (Cast pairs between two kept nodes
    are removed, so values above 65504 pass between them). Written atomically.
    Raises UsageError when a name is not a node of ``fp32_onnx``.
    """
    model = onnx.load(str(fp32_onnx))
    known = {n.name for n in model.graph.node}
    missing = [n for n in node_names if n not in known]
    if missing:
        raise UsageError(f"{len(missing)} node(s) to keep in fp32 are not in {fp32_onnx}: "
                         + ", ".join(missing[:5]) + ("..." if len(missing) > 5 else ""),
                         hint="take the node names from analyse() run with this fp32 file's graph")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _convert(model, out_path, node_block_list=tuple(node_names), fp32_paths=True)
    return out_path


def is_fp16(onnx_file: str | Path | onnx.ModelProto) -> bool:
    """Whether the model holds any float16: an initializer, a typed tensor, a Constant, a Cast."""
    model = onnx_file if isinstance(onnx_file, onnx.ModelProto) else \
        onnx.load(str(onnx_file), load_external_data=False)
    return any(_graph_has_fp16(g) for g in _graphs(model.graph))


def provider_note(onnx_file: str | Path | onnx.ModelProto,
                  provider: str = "CPUExecutionProvider") -> str | None:
    """CPU_PROVIDER_NOTE when an fp16 model was run on the CPU provider, else None."""
    return CPU_PROVIDER_NOTE if provider == "CPUExecutionProvider" and is_fp16(onnx_file) else None


def _convert(model: onnx.ModelProto, out_path: Path, node_block_list: Sequence[str],
             fp32_paths: bool = False) -> int:
    """Convert with onnxconverter-common and save atomically; return how many values it clamped.

    ``fp32_paths``: also remove the fp32 -> fp16 -> fp32 Cast round trips the converter
    leaves between kept nodes (see ``drop_fp16_round_trips``).
    """
    from onnxconverter_common import float16

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            converted = float16.convert_float_to_float16(
                model, keep_io_types=True, node_block_list=list(node_block_list))
        except Exception as error:  # the converter raises ValueError, AssertionError...
            raise ExportError(f"onnxconverter-common could not convert the model to float16: "
                              f"{type(error).__name__}: {error}",
                              hint="check that the input file is an fp32 ONNX model") from None
    if fp32_paths:
        drop_fp16_round_trips(converted.graph)
    atomic_write(out_path, lambda handle: handle.write(converted.SerializeToString()))
    return sum(1 for w in caught if _LARGE_CLAMP.search(str(w.message)))


_LARGE_CLAMP = re.compile(r"truncated to -?10000(\.0)?$")


def drop_fp16_round_trips(graph: onnx.GraphProto) -> int:
    """Let fp32 values reach fp32 consumers without passing through fp16; return how many.

    onnxconverter-common puts ``Cast(to fp16)`` after every kept (blocked) node and
    ``Cast(to fp32)`` before every kept consumer, and removes the pair only when the
    fp16 tensor has a single consumer (with several, its check compares the Cast
    targets with 32 and 16 instead of the TensorProto codes 1 and 10, so it never
    matches). Values above 65504 then still turn into inf between two kept nodes, for
    instance between a kept layer and the ReduceMean and Sub of the norm after it.
    Here every ``Cast(to fp32)`` of a ``Cast(to fp16)`` of an fp32 tensor reads that
    fp32 tensor instead; fp16 Casts left without consumers are removed.
    """
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    types = _elem_types(graph)
    to16 = {n.output[0]: n for n in graph.node if _cast_to(n) == float16 and n.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dropped = []
    for node in graph.node:
        back = to16.get(node.input[0]) if _cast_to(node) == float32 and node.input else None
        if back is None or types.get(back.input[0]) != float32 or node.output[0] in outputs:
            continue
        rename[node.output[0]] = back.input[0]
        dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in graph.node for i in n.input} | outputs
    for cast in to16.values():
        if cast.output[0] not in used:
            graph.node.remove(cast)
    gone = set(rename) | {c.output[0] for c in to16.values() if c.output[0] not in used}
    kept_info = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return len(dropped)


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = value.data_type
        elif _cast_to(node) is not None and node.output:
            types[node.output[0]] = _cast_to(node)
    return types


def _clamp_mention(clamped: int) -> str:
    if not clamped:
        return ""
    return f"; it clamped {clamped} weight/constant tensor(s) to +-{CONVERTER_MAX:g}"


def _export_half_isolated(module: Any, example: torch.Tensor, out_path: Path,
                          timeout_s: float) -> None:
    if isinstance(module, LoadedModel):
        module = module.module
    export = functools.partial(_export_half, module, example, HALF_OPSET)
    failure = exporting._run_isolated(export, out_path, "half", timeout_s)
    if failure is not None:
        log = f"; its output is in {failure.log}" if failure.log else ""
        raise ExportError(f"exporting model.half() with the legacy exporter {failure.reason}",
                          hint="use the 'convert' fp16 method (onnxconverter-common) instead" + log)


def _export_half(module: Any, example: Any, opset: int, target: Path) -> None:
    """Runs in the forked child: the half copy never exists in the caller."""
    half = copy.deepcopy(module).half()
    if isinstance(example, torch.Tensor):
        example = exporting.Example.image(example)
    halve = lambda t: t.half() if t.is_floating_point() else t  # noqa: E731
    example = dataclasses.replace(example, args=tuple(halve(a) for a in example.args),
                                  kwargs={k: halve(v) for k, v in example.kwargs.items()})
    exporting._export_legacy(half, example, opset, target)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _graph_has_fp16(graph: onnx.GraphProto) -> bool:
    fp16 = onnx.TensorProto.FLOAT16
    if any(t.data_type == fp16 for t in graph.initializer):
        return True
    typed = (*graph.input, *graph.output, *graph.value_info)
    if any(v.type.tensor_type.elem_type == fp16 for v in typed):
        return True
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == fp16:
                return True
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == fp16:
                return True
    return False


# --------------------------------------------------------------------------- analysis


def analyse(
    calls: Sequence[TorchCall],
    activations: Mapping[int, np.ndarray],
    layers: Sequence[LayerResult],
    graph: OnnxGraph | str | Path,
) -> Fp16Findings:
    """What breaks in fp16 and which layers to keep in fp32.

    ``calls`` and ``activations`` come from one fp32 PyTorch run
    (``capture_torch.capture``); ``layers`` from diagnosing an fp16 ONNX file of that
    model on the same input. ``graph`` is the ONNX graph whose node names the
    suggestion uses: the fp32 file that ``keep_in_fp32`` will convert (or the diagnosed
    fp16 file when there is no fp32 one; converter-inserted Casts are never listed).

    Kept: every overflowing layer, the layers between it and the first one back in
    fp16's range (all nodes on the way, which then pass values above 65504 in fp32),
    the first layer with ONNX inf/NaN, norm/softmax layers that are fed values whose
    squares overflow or whose own fp16 segment is broken (DIVERGENCES.md row 13), and
    nodes with weights or constants beyond +-1e4, which the converter would clamp (seen
    only in an fp32 graph).
    """
    graph = graph if isinstance(graph, OnnxGraph) else load_graph(graph)
    ranges = _ranges(calls, activations, layers)
    view = _GraphView(graph, calls, layers, ranges)
    overflow = tuple(r for r in ranges.values() if r.max_abs > FP16_MAX)
    underflow = tuple(r for r in ranges.values() if r.tiny_share >= UNDERFLOW_SHARE)
    nonfinite = first_nonfinite(layers)

    keep: dict[str, KeepFp32] = {}
    for layer in overflow:
        _add(keep, view.keep_overflowing(layer))
    if nonfinite is not None:
        _add(keep, view.keep_layer(nonfinite.module, "the first layer whose fp16 ONNX values "
                                   "are inf/NaN"))
    for entry in view.keep_norms(ranges) + view.keep_large_constants():
        _add(keep, entry)
    ordered = tuple(sorted(keep.values(), key=view.position))
    return Fp16Findings(overflow=overflow, underflow=underflow, first_nonfinite=nonfinite,
                        keep=ordered, notes=tuple(dict.fromkeys(view.notes)))


def first_nonfinite(layers: Sequence[LayerResult]) -> LayerResult | None:
    """The first layer, in ONNX order, whose ONNX values hold inf/NaN that PyTorch's do not."""
    bad = [l for l in layers if l.metrics is not None
           and l.metrics.nan_onnx + l.metrics.inf_onnx > l.metrics.nan_torch + l.metrics.inf_torch]
    return min(bad, key=lambda l: l.order, default=None)


def value_range(values: np.ndarray) -> tuple[float, float]:
    """(largest finite |value|, share of non-zero values that become 0 in float16)."""
    array = np.asarray(values)
    if array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        return 0.0, 0.0
    magnitude = np.abs(array)
    finite = np.isfinite(magnitude)
    if not finite.all():
        magnitude = magnitude[finite]
    nonzero = np.count_nonzero(magnitude)
    if nonzero == 0:
        return 0.0, 0.0
    flushed = np.count_nonzero((magnitude > 0) & (magnitude <= FLUSH_LIMIT))
    return float(magnitude.max()), flushed / nonzero


def _ranges(calls: Sequence[TorchCall], activations: Mapping[int, np.ndarray],
            layers: Sequence[LayerResult]) -> dict[int, Fp16Layer]:
    """Call index -> its range; calls that only alias another call's tensor are left out."""
    nodes = {l.module: l.onnx_node for l in layers}
    ranges = {}
    for call in calls:
        values = activations.get(call.index)
        if values is None or call.alias_of is not None:
            continue
        biggest, tiny = value_range(values)
        ranges[call.index] = Fp16Layer(call.label, call.module_type, nodes.get(call.label, ""),
                                       biggest, tiny)
    return ranges


def _add(keep: dict[str, KeepFp32], entries) -> None:
    for entry in entries if isinstance(entries, list) else [entries]:
        if entry is None or not entry.nodes:
            continue
        held = keep.get(entry.module)
        if held is None:
            keep[entry.module] = entry
        else:
            nodes = tuple(dict.fromkeys(held.nodes + entry.nodes))
            reason = (held.reason if entry.reason in held.reason
                      else f"{held.reason}; {entry.reason}")
            keep[entry.module] = KeepFp32(held.module, nodes, reason)


class _GraphView:
    """The aligned layers located in ``graph``: their tensors, segments and consumers."""

    def __init__(self, graph: OnnxGraph, calls: Sequence[TorchCall],
                 layers: Sequence[LayerResult], ranges: dict[int, Fp16Layer]) -> None:
        self.graph, self.calls, self.notes = graph, calls, []
        self.by_name = {n.name: n for n in graph.nodes}
        self.call_of = {c.label: c for c in calls}
        self.layers = {l.module: l for l in layers}
        self.tensor_of: dict[str, str] = {}  # layer label -> its tensor in this graph
        for layer in layers:
            tensor = self._locate(layer)
            if tensor is None:
                self.notes.append(f"{layer.module}: ONNX node '{layer.onnx_node}' is not in the "
                                  f"graph the fp32 layers are chosen from")
            else:
                self.tensor_of[layer.module] = tensor
        self.layer_at = {t: label for label, t in self.tensor_of.items()}
        self.max_abs = {r.module: r.max_abs for r in ranges.values()}
        self._segments: dict[str, tuple[str, ...]] = {}

    # -- locating

    def _locate(self, layer: LayerResult) -> str | None:
        """The layer's tensor here: same tensor name, else the output of the same-named node.

        onnxconverter-common keeps tensor and node names, but moves a kept node's output
        behind a Cast (the diagnosed tensor is then the Cast's) or renames it.
        """
        if layer.onnx_tensor in self.graph.producer:
            return layer.onnx_tensor
        node = self.by_name.get(layer.onnx_node)
        return node.outputs[0] if node is not None and node.outputs else None

    def position(self, entry: KeepFp32) -> int:
        """Where the entry's first computing node (not a Constant) runs."""
        nodes = [self.by_name[n] for n in entry.nodes if n in self.by_name]
        return min((n.index for n in nodes if n.op_type != "Constant"), default=10**9)

    # -- what to keep

    def keep_layer(self, label: str, reason: str) -> KeepFp32 | None:
        tensor = self.tensor_of.get(label)
        if tensor is None:
            return None
        return KeepFp32(label, self.segment(tensor), reason)

    def keep_overflowing(self, layer: Fp16Layer) -> list[KeepFp32]:
        """The layer, and every node from it to the layers that bring its values back in range."""
        reason = (f"its fp32 values reach {layer.max_abs:.3g}, above float16's maximum "
                  f"{FP16_MAX:g}")
        own = self.keep_layer(layer.module, reason)
        if own is None:
            self.notes.append(f"{layer.module} overflows float16 but is not aligned with an ONNX "
                              f"tensor: its nodes cannot be named")
            return []
        entries = [own]
        tensor = self.tensor_of[layer.module]
        between, landing = self.downstream_until_in_range(tensor)
        for label in landing:
            entries.append(KeepFp32(label, self.segment(self.tensor_of[label]),
                                    f"takes values up to {layer.max_abs:.3g} from {layer.module} "
                                    f"and brings them back into float16's range"))
        if between:
            entries.append(KeepFp32(f"{layer.module} (nodes after it)", tuple(between),
                                    f"carry values above {FP16_MAX:g} from {layer.module}"))
        return entries

    def keep_norms(self, ranges: dict[int, Fp16Layer]) -> list[KeepFp32]:
        """Norm/softmax layers fed values whose squares overflow, or broken in fp16 on their own."""
        entries = []
        for label, layer in self.layers.items():
            tensor = self.tensor_of.get(label)
            if tensor is None or not self._is_norm(layer, tensor):
                continue
            fed = self._input_max(label, ranges)
            if fed is not None and fed > NORM_INPUT_LIMIT:
                entries.append(KeepFp32(label, self.segment(tensor),
                                        f"normalises inputs up to {fed:.3g}: their squares pass "
                                        f"float16's maximum (above |x| = {NORM_INPUT_LIMIT:.0f})"))
            elif _broken(layer):
                entries.append(KeepFp32(label, self.segment(tensor),
                                        "a norm/softmax whose own fp16 segment gives inf/NaN or "
                                        "values unlike PyTorch's"))
        return entries

    def keep_large_constants(self) -> list[KeepFp32]:
        """Nodes reading a weight or constant that onnxconverter-common would clamp."""
        entries = []
        for node in self.graph.nodes:
            if node.op_type in ("Constant", "Cast"):
                continue
            big = max((_finite_max(self.graph.constants[i]) for i in node.inputs
                       if i in self.graph.constants), default=0.0)
            if big > CONVERTER_MAX:
                entries.append(KeepFp32(self._layer_of(node.name), self._names([node.index]),
                                        f"reads a weight or constant up to {big:.3g}; converting "
                                        f"it clamps that to {CONVERTER_MAX:g}"))
        return entries

    def _layer_of(self, node_name: str) -> str:
        """The layer whose segment holds the node (the innermost), else the node's name."""
        owners = [label for label, tensor in self.tensor_of.items()
                  if node_name in self.segment(tensor)]
        return min(owners, key=lambda l: len(self.segment(self.tensor_of[l])), default=node_name)

    def _is_norm(self, layer: LayerResult, tensor: str) -> bool:
        if _NORM_MODULE.search(layer.module_type or ""):
            return True
        return any(self.by_name[n].op_type in NORM_OPS for n in self.segment(tensor))

    def _input_max(self, label: str, ranges: dict[int, Fp16Layer]) -> float | None:
        call = self.call_of.get(label)
        if call is None:
            return None
        fed = [self._range_of(p, ranges) for p in call.producers if p is not None and p >= 0]
        fed = [f for f in fed if f is not None]
        return max(fed) if fed else None

    def _range_of(self, index: int, ranges: dict[int, Fp16Layer]) -> float | None:
        seen = set()
        while index not in ranges and index not in seen and 0 <= index < len(self.calls):
            seen.add(index)
            alias = self.calls[index].alias_of
            if alias is None or alias < 0:
                return None
            index = alias
        return ranges[index].max_abs if index in ranges else None

    # -- graph walks

    def segment(self, tensor: str) -> tuple[str, ...]:
        """The nodes that compute ``tensor`` from the tensors of other layers (and constants)."""
        if tensor not in self._segments:
            self._segments[tensor] = self._walk_back(tensor)
        return self._segments[tensor]

    def _walk_back(self, tensor: str) -> tuple[str, ...]:
        graph, stops = self.graph, set(self.layer_at) - {tensor}
        found: dict[int, None] = {}
        pending = [tensor]
        while pending:
            name = pending.pop()
            index = graph.producer.get(name)
            if index is None or index in found or name in graph.constants:
                continue
            found[index] = None
            pending += [i for i in graph.nodes[index].inputs
                        if i and i not in stops and i not in graph.constants]
        return self._names(found)

    def downstream_until_in_range(self, tensor: str) -> tuple[list[str], list[str]]:
        """Nodes reached from ``tensor`` before a layer whose fp32 values fit float16.

        Returns the unaligned nodes on the way (``between``) and the first in-range
        layers reached (``landing``). Overflowing layers met on the way are kept on their
        own account; the walk goes on through them.
        """
        graph = self.graph
        between: dict[int, None] = {}
        landing: dict[str, None] = {}
        pending, seen = [tensor], {tensor}
        while pending:
            name = pending.pop()
            for index in graph.consumers.get(name, []):
                node = graph.nodes[index]
                floats = [o for o in node.outputs if o and _is_float(graph, o)]
                aligned = [self.layer_at[o] for o in floats if o in self.layer_at]
                if not floats or (aligned and all(self.max_abs.get(a, 0.0) <= FP16_MAX
                                                   for a in aligned)):
                    landing.update(dict.fromkeys(aligned))
                    continue
                if not aligned:
                    between[index] = None
                for out in floats:
                    if out not in seen:
                        seen.add(out)
                        pending.append(out)
        landed = {n for label in landing for n in self.segment(self.tensor_of[label])}
        return [n for n in self._names(between) if n not in landed], list(landing)

    def _names(self, indices) -> tuple[str, ...]:
        """Node names in graph order, with the Constant nodes that feed them; no Casts.

        A Constant feeding a kept node is kept too: the converter would otherwise store
        it in fp16, clamped to +-1e4.
        """
        graph = self.graph
        chosen = set(indices)
        for index in list(chosen):
            for name in graph.nodes[index].inputs:
                source = graph.producer.get(name)
                if source is not None and graph.nodes[source].op_type == "Constant":
                    chosen.add(source)
        return tuple(graph.nodes[i].name for i in sorted(chosen)
                     if graph.nodes[i].op_type != "Cast")


def _is_float(graph: OnnxGraph, tensor: str) -> bool:
    dtype = graph.dtypes.get(tensor)
    return dtype is None or np.issubdtype(dtype, np.floating)


def _finite_max(values: np.ndarray) -> float:
    array = np.asarray(values)
    if array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        return 0.0
    finite = np.abs(array[np.isfinite(array)])
    return float(finite.max()) if finite.size else 0.0


def _broken(layer: LayerResult) -> bool:
    own = layer.local or layer.metrics
    if own is None or own.passed:
        return False
    nonfinite = own.nan_onnx + own.inf_onnx > own.nan_torch + own.inf_torch
    return nonfinite or own.cosine < BROKEN_COSINE
