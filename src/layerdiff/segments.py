"""Run an ONNX graph segment by segment, so its exposed tensors never all coexist.

Marking every aligned tensor as a graph output makes onnxruntime keep all of them until
the run ends: for ESRGAN at 256x256 that is some 12 GB. Instead the nodes, in
topological order, are cut into segments whose exposed tensors fit a byte budget. Each
segment is a small model of its own: its inputs are the values that cross into it (fed
from the segments before), its outputs the aligned tensors it computes and the values
that later segments need. One pass over the segments costs about one forward of the
whole model; the caller compares each segment's tensors and drops them before the next.

Cuts are made only where every value that crosses is exposed anyway (an aligned
tensor), a graph input, a constant or an integer (shape arithmetic). Such a "clean" cut
changes nothing onnxruntime may fuse, since the whole-graph run exposes those values
too, and lets a layer's local run (its consumers fed PyTorch's values) start from a
segment's inputs alone. A value computed from the graph inputs in a few cheap nodes (an
SR model's upscaled input, added back at the end) does not block a cut either: the
segment that reads it computes it again from the inputs, as a value computed from
constants alone is recomputed where it is read. Without that, a model whose input skip
spans the whole body (Real-ESRGAN Compact) ran as one segment holding every exposed
tensor. A stretch with no clean cut stays one segment, even above the budget; the caller
measures and reports what memory was really used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .capture_onnx import OnnxGraph, RuntimeFailure, _failure, _needed
from .runtimes import Runtime


@dataclass(frozen=True)
class Segment:
    first: int  # node indices [first, stop) in the graph's topological order
    stop: int
    inputs: tuple[str, ...]  # values from earlier segments or graph inputs
    # Earlier nodes that compute, from constants alone, values this segment reads: run
    # again here so onnxruntime folds them into constants as in the whole graph; and
    # those computing, in a few cheap nodes from the graph inputs, values read here.
    prelude: tuple[int, ...]
    marks: tuple[str, ...]  # exposed tensors computed here
    carry: tuple[str, ...]  # values computed here that later segments or outputs need
    marked_bytes: int  # the exposed tensors' size, as far as known
    # Nodes in [first, stop) not run here: they compute only values recomputed by the
    # later segments that read them (so they are neither carried nor computed twice).
    skipped: tuple[int, ...] = ()


@dataclass
class SegmentRun:
    values: dict[str, np.ndarray]  # marked tensors computed
    carry: dict[str, np.ndarray]  # values for the segments after
    failure: RuntimeFailure | None = None


def plan(graph: OnnxGraph, marks: list[str], sizes: Mapping[str, int],
         budget: int) -> list[Segment]:
    """Cut ``graph`` into segments whose marked tensors (``sizes``: bytes) fit ``budget``."""
    nodes = graph.nodes
    count = len(nodes)
    marked = set(marks)
    last_use = _last_use(graph)
    static = _constant_derived(graph)
    if count < 2 or _has_subgraphs(graph.model) or sum(sizes.get(m, 0) for m in marked) <= budget:
        return [_segment(graph, 0, count, marked, last_use, sizes, static, set())]

    cheap = _input_derived(graph, marked, static)
    free = {t for t in last_use if t in static or t in cheap or _is_free(graph, t, marked)}
    cuts: list[int] = []
    start, used, crossing = 0, 0, 0  # crossing: non-free values live after node i
    clean_at: int | None = None  # the latest clean cut since ``start``
    ending: dict[int, int] = {}  # node index -> non-free values it reads last
    # The last node is looked at too: a cut before it can take it out of a segment that
    # exposes a large tensor (an SR model's final residual add, three outputs' worth).
    for i, node in enumerate(nodes):
        crossing -= ending.pop(i, 0)
        for out in node.outputs:
            if last_use.get(out, -1) > i and out not in free:
                crossing += 1
                ending[last_use[out]] = ending.get(last_use[out], 0) + 1
        used += sum(sizes.get(out, 0) for out in node.outputs if out in marked)
        if crossing:
            continue
        position = i + 1  # a clean cut before node i + 1
        if used > budget:
            # Cut at the last clean point within budget; with none, this stretch overshoots.
            cut = clean_at if clean_at is not None else position
            if cut >= count:
                break
            cuts.append(cut)
            start = cut
            used = sum(sizes.get(o, 0) for n in nodes[start:position] for o in n.outputs
                       if o in marked)
        clean_at = position if position > start else None
    bounds = [0, *cuts, count]
    return [_segment(graph, a, b, marked, last_use, sizes, static, cheap)
            for a, b in zip(bounds, bounds[1:])]


def _last_use(graph: OnnxGraph) -> dict[str, int]:
    """Tensor -> index of its last consumer (past the end for graph outputs)."""
    last: dict[str, int] = {}
    for node in graph.nodes:
        for name in node.inputs:
            if name:
                last[name] = node.index
    for name in graph.outputs:
        last[name] = len(graph.nodes)
    return last


def _constant_derived(graph: OnnxGraph) -> set[str]:
    """Tensors computed from constants alone (masks, position biases): input-independent."""
    derived = set(graph.constants)
    for node in graph.nodes:
        if node.inputs and all(not i or i in derived for i in node.inputs):
            derived.update(node.outputs)
    return derived


# A value is recomputed in the segments that read it when it takes at most this many
# nodes from the graph inputs, none of them a heavy op: a resize or a normalisation of
# the input costs little next to carrying a full-size tensor through every segment.
RECOMPUTE_NODES = 4
_HEAVY = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "Attention", "LSTM", "GRU", "RNN"}


def _input_derived(graph: OnnxGraph, marked: set[str], static: set[str]) -> set[str]:
    """Unexposed values computed from the graph inputs (and constants) by at most
    RECOMPUTE_NODES light nodes."""
    graph_inputs = {i[0] for i in graph.inputs}
    cost: dict[str, int] = {}  # value -> nodes that compute it (shared ones counted twice)
    for node in graph.nodes:
        sources = [i for i in node.inputs if i and i not in static]
        if (not sources or node.op_type in _HEAVY or any(o in marked for o in node.outputs)
                or any(i not in graph_inputs and i not in cost for i in sources)):
            continue
        nodes = 1 + sum(cost.get(i, 0) for i in sources)
        if nodes <= RECOMPUTE_NODES:
            cost.update((o, nodes) for o in node.outputs)
    return {t for t in cost if t not in graph.outputs}


def _is_free(graph: OnnxGraph, name: str, marked: set[str]) -> bool:
    """Values that may cross a cut: exposed anyway, inputs, constants, integers."""
    if (name in marked or name in graph.outputs or name in graph.constants
            or name not in graph.producer):
        return True
    dtype = graph.dtypes.get(name)
    return dtype is not None and not np.issubdtype(dtype, np.floating)


def _segment(graph: OnnxGraph, first: int, stop: int, marked: set[str],
             last_use: dict[str, int], sizes: Mapping[str, int], static: set[str],
             cheap: set[str]) -> Segment:
    # Values recomputed where they are read: computed here only for readers in here.
    recomputed = static | cheap
    skipped = [n.index for n in graph.nodes[first:stop]
               if n.outputs and all(o in cheap and not _read_in(graph, o, first, stop)
                                    for o in n.outputs)]
    produced: set[str] = set()
    inputs: dict[str, None] = {}
    prelude: set[int] = set()
    graph_inputs = {i[0] for i in graph.inputs}
    for node in graph.nodes[first:stop]:
        if node.index in skipped:
            continue
        for name in node.inputs:
            if (not name or name in produced or name in inputs
                    or not _crosses_in(graph, name, first, graph_inputs)):
                continue
            if name in recomputed:
                ancestors = _ancestors(graph, name)
                prelude |= ancestors
                inputs.update((i, None) for a in ancestors for i in graph.nodes[a].inputs
                              if i in graph_inputs)
            else:
                inputs[name] = None
        produced.update(node.outputs)
    marks = tuple(t for n in graph.nodes[first:stop] for t in n.outputs if t in marked)
    carry = tuple(t for n in graph.nodes[first:stop] for t in n.outputs
                  if last_use.get(t, -1) >= stop and (t not in recomputed or t in graph.outputs))
    return Segment(first, stop, tuple(inputs), tuple(sorted(prelude)), marks, carry,
                   sum(sizes.get(m, 0) for m in marks), tuple(skipped))


def _read_in(graph: OnnxGraph, name: str, first: int, stop: int) -> bool:
    return any(first <= c < stop for c in graph.consumers.get(name, ()))


def _ancestors(graph: OnnxGraph, name: str) -> set[int]:
    """Indices of the nodes that ``name`` is computed from (itself included)."""
    found: set[int] = set()
    stack = [name]
    while stack:
        index = graph.producer.get(stack.pop())
        if index is None or index in found:
            continue
        found.add(index)
        stack.extend(i for i in graph.nodes[index].inputs if i)
    return found


def _crosses_in(graph: OnnxGraph, name: str, first: int, graph_inputs: set[str]) -> bool:
    producer = graph.producer.get(name)
    if producer is None:  # a graph input, or an initializer (which stays in the segment)
        return name in graph_inputs
    return producer < first


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    """If/Loop/Scan bodies may read outer values that a cut would not see."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


class Runner:
    """Builds and runs the segments of one graph on one runtime and configuration."""

    def __init__(self, graph: OnnxGraph, segments: list[Segment], *, level: str,
                 runtime: Runtime, config: tuple[tuple[str, str], ...] = ()) -> None:
        self.graph, self.segments = graph, segments
        self.level, self.runtime, self.config = level, runtime, config
        self._g = gs.import_onnx(graph.model)
        by_outputs = {tuple(t.name for t in n.outputs): n for n in self._g.nodes}
        self._nodes = [by_outputs[n.outputs] for n in graph.nodes]
        self._tensors = self._g.tensors()
        self._graph_inputs = {i[0] for i in graph.inputs}
        self._declared = {name: tuple(t.shape) if t.shape is not None else None
                          for name, t in self._tensors.items()}

    def run(self, index: int, feeds: Mapping[str, np.ndarray]) -> SegmentRun:
        """Segment ``index`` on ``feeds`` (its inputs)."""
        segment = self.segments[index]
        marks = list(segment.marks)
        outputs = list(dict.fromkeys([*marks, *segment.carry]))
        if not outputs:  # only constants, each recomputed where it is read
            return SegmentRun({}, {}, None)
        session = self._session(self._export(segment, outputs, feeds))
        names = [o.name for o in session.get_outputs()]
        try:
            values = dict(zip(names, session.run(names, _needed(session, feeds))))
        except Exception as exc:
            failure = _failure(exc)
            return SegmentRun(self._upstream(segment, marks, feeds, failure), {}, failure)
        # Carried values are copied: they outlive this run, and must not keep its memory.
        return SegmentRun({m: values[m] for m in marks},
                          {c: np.array(values[c]) for c in segment.carry}, None)

    def run_local(self, index: int, feeds: Mapping[str, np.ndarray],
                  references: Mapping[str, np.ndarray], want: set[str]) -> dict[str, np.ndarray]:
        """The ``want`` tensors of segment ``index``, each computed from reference values.

        Every consumer of a tensor in ``references`` reads the reference instead (the
        segment's inputs come from ``feeds``, which should hold references where there
        are some). So one run gives each wanted layer's output on correct inputs: its
        local error, free of what came in from upstream. Empty if onnxruntime fails.
        """
        segment = self.segments[index]
        sub = self._subgraph(segment, sorted(want), feeds).copy()
        tensors = sub.tensors()
        extra = {}
        for name, value in references.items():
            tensor = tensors.get(name)
            if tensor is None or isinstance(tensor, gs.Constant) or name in segment.inputs:
                continue
            dtype = tensor.dtype if tensor.dtype is not None else self.graph.dtypes.get(name, value.dtype)
            # Only the rank is declared: a shape recorded at export time may not fit this
            # input's size (and OpenVINO needs the rank).
            cut = gs.Variable(f"{name}__layerdiff_reference", dtype=dtype,
                              shape=[None] * np.ndim(value))
            for consumer in list(tensor.outputs):
                for i, inp in enumerate(consumer.inputs):
                    if inp is tensor:
                        consumer.inputs[i] = cut
            sub.inputs.append(cut)
            extra[cut.name] = np.asarray(value, dtype=np.dtype(dtype))
        session = self._session(gs.export_onnx(sub).SerializeToString())
        names = [o.name for o in session.get_outputs()]
        try:
            values = session.run(names, _needed(session, {**feeds, **extra}))
        except Exception:
            return {}
        return dict(zip(names, values))

    def _session(self, model: bytes):
        return self.runtime.session(model, level=self.level, config=self.config, arena=False)

    def _subgraph(self, segment: Segment, outputs: list[str],
                  feeds: Mapping[str, np.ndarray]) -> gs.Graph:
        inputs = [self._typed(name) for name in segment.inputs]
        for tensor in inputs:
            if tensor.name in feeds and tensor.name not in self._graph_inputs:
                tensor.shape = self._shape_for(tensor.name, feeds[tensor.name].shape)
        outs = [self._typed(name) for name in outputs]
        g = self._g
        nodes = [self._nodes[i] for i in segment.prelude] + [
            self._nodes[i] for i in range(segment.first, segment.stop) if i not in segment.skipped]
        return gs.Graph(nodes=nodes, inputs=inputs,
                        outputs=outs, name=g.name, opset=g.opset,
                        import_domains=g.import_domains, functions=g.functions,
                        producer_name=g.producer_name, producer_version=g.producer_version,
                        ir_version=getattr(g, "ir_version", None))

    def _typed(self, name: str) -> gs.Tensor:
        """The tensor, with a dtype (graph inputs and outputs must have one)."""
        tensor = self._tensors[name]
        if tensor.dtype is None:
            tensor.dtype = self.graph.dtypes.get(name, np.float32)
        return tensor

    def _shape_for(self, name: str, actual: tuple[int, ...]) -> list | None:
        """The shape a value fed between segments is declared with: what the whole graph
        knows of it (its inferred or recorded shape), so that onnxruntime optimises each
        segment as it would the whole graph, with any size this input contradicts
        (one recorded at export time, at another size) left unknown."""
        known = self.graph.shapes.get(name) or self._declared.get(name)
        if known is None or len(known) != len(actual):
            return [None] * len(actual)
        return [d if isinstance(d, str) or d == a else None for d, a in zip(known, actual)]

    def _export(self, segment: Segment, outputs: list[str],
                feeds: Mapping[str, np.ndarray]) -> bytes:
        return gs.export_onnx(self._subgraph(segment, outputs, feeds)).SerializeToString()

    def _upstream(self, segment: Segment, marks: list[str], feeds: Mapping[str, np.ndarray],
                  failure: RuntimeFailure) -> dict[str, np.ndarray]:
        """The marks of ``segment`` that do not depend on the failed node, computed."""
        start = next((n for n in self.graph.nodes[segment.first:segment.stop]
                      if n.name == failure.node), None)
        if start is None:
            return {}
        tainted = self.graph.descendants(start.index)
        upstream = [m for m in marks if m not in tainted]
        if not upstream:
            return {}
        sub = self._subgraph(segment, upstream, feeds).copy()
        sub.cleanup()
        session = self._session(gs.export_onnx(sub).SerializeToString())
        try:
            return dict(zip([o.name for o in session.get_outputs()],
                            session.run(None, _needed(session, feeds))))
        except Exception:
            return {}


def walk(runner: Runner, feeds: Mapping[str, np.ndarray], *, start: int = 0,
         carried: Mapping[str, np.ndarray] | None = None,
         tick: Callable[[int], None] | None = None,
         ) -> Iterator[tuple[int, dict[str, np.ndarray], SegmentRun]]:
    """Run the segments in order from ``start``, carrying values between them
    (``tick(segments done)`` after each).

    Yields (segment index, the values available to it and every later segment, its
    run) and stops after a failure. The values dict is never changed afterwards, so a
    caller may keep it to resume a walk there later (``start``, ``carried``). A run's
    ``values`` are emptied when the walk moves on, so that two segments' tensors never
    coexist: keep an array itself to hold on to it.
    """
    known: dict[str, np.ndarray] = {**feeds, **(carried or {})}
    later = _read_after(runner.segments)
    for index in range(start, len(runner.segments)):
        segment = runner.segments[index]
        result = runner.run(index, {name: known[name] for name in segment.inputs})
        if tick is not None:
            tick(index + 1)
        yield index, known, result
        result.values.clear()
        if result.failure is not None:
            return
        known = {k: v for k, v in {**known, **result.carry}.items()
                 if k in later[index] or k in feeds}


def _read_after(plan: list[Segment]) -> list[set[str]]:
    """For each segment, the values some later segment reads."""
    found: list[set[str]] = []
    reads: set[str] = set()
    for segment in reversed(plan):
        found.append(set(reads))
        reads |= set(segment.inputs)
    return found[::-1]
