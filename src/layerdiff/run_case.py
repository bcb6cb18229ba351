"""One input through both models, within a memory budget.

PyTorch runs once with hooks; its activations go into a store that keeps them in RAM
up to a budget and on disk beyond (store.py). onnxruntime then runs the graph segment by
segment (segments.py), and each segment's aligned tensors are compared with PyTorch's
as they arrive and dropped: only the figures stay. So the whole diagnosis costs about
one PyTorch forward, one onnxruntime forward and the comparison arithmetic.

Only when a layer fails the tolerance is more work done, and only where it is needed:
- its segment runs again at once on PyTorch's inputs (its local error: a cause, or error
  carried from upstream);
- the float64 referee runs PyTorch once more in float64 and keeps, for the failing
  layers only, float64 minus float32 (each layer's noise floor, and which side is off),
  as far as the first layer that fails with any floor;
- the walk resumes at the first failing segment to judge the layers the referee reached
  against their noise floor, and to hold the ONNX values of the first divergence, and
  stops there.
A layer that passes the fixed tolerance passes with any noise floor, since the floor
only widens it, so skipping this for passing layers changes no result.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import capture_onnx, capture_torch, divergence as judge, inputs as cases_, preflight, segments
from . import footprint as forward_memory
from .align import align, misfit, unpair
from .compare import CHUNK, NOISE_FACTOR, compare
from .errors import LayerdiffError, UsageError
from .footprint import Budget
from .progress import Progress, stepper
from .runtimes import Runtime
from .records import (
    Alignment, CaseResult, DivergenceKind, FirstDivergence, ImageQuality, InputSpec, LayerResult,
    LoadedModel,
    Metrics, OutputResult, Referee, RefereeSide, Settings, TorchCall, Unmatched,
)
from .store import Spill, StoredList, TensorStore, current_rss, human_bytes

@dataclass
class CaseRun:
    """One input through both models: layer by layer, or (``screened``) its outputs only."""

    label: str
    kind: str
    tensor: torch.Tensor
    feeds: dict[str, np.ndarray]
    calls: list[TorchCall]
    activations: Mapping[int, np.ndarray]  # a TensorStore: read one at a time
    alignment: Alignment
    layers: list[LayerResult]
    outputs: list[OutputResult]
    first: FirstDivergence | None
    failure: capture_onnx.RuntimeFailure | None
    final_outputs: Sequence[np.ndarray] | None  # StoredLists: read one at a time
    torch_outputs: Sequence[np.ndarray]
    input_mutated: bool
    training_modules: tuple[str, ...]
    notes: list[str]
    # ONNX value of this input's first diverging tensor, for previews (in the store).
    kept: Mapping[str, np.ndarray] = field(default_factory=dict)
    plan: list[segments.Segment] = field(default_factory=list)
    noise: dict[int, float] = field(default_factory=dict)  # call -> fp32 noise floor
    output_noise: list[float] = field(default_factory=list)
    random_ops: tuple[tuple[str, str], ...] = ()  # capture_torch.TorchCapture.random_ops
    screened: bool = False  # only the outputs were compared (CaseRunner.screen)
    images: tuple[ImageQuality, ...] = ()  # its image outputs as pictures (pictures.measure)

    @property
    def first_onnx(self) -> np.ndarray | None:
        return self.kept.get("first")

    @property
    def passed(self) -> bool:
        return self.failure is None and self.first is None and all(o.passed for o in self.outputs)

    def summary(self, note: str = "") -> CaseResult:
        verdict, _ = judge.verdict(self.layers, self.outputs, self.first)
        worst = max((o.metrics.max_abs for o in self.outputs), default=None)
        where = f"{self.first.module or self.first.onnx_node} ({self.first.kind})" if self.first else ""
        return CaseResult(self.label, tuple(self.tensor.shape), verdict, self.kind, where, worst,
                          note=note, layer_by_layer=not self.screened, images=self.images)


@dataclass
class _FirstPass:
    metrics: dict[int, Metrics]  # pair position -> accumulated error, fixed tolerance
    dropped: dict[int, Unmatched]
    outputs: dict[str, np.ndarray]
    failure: capture_onnx.RuntimeFailure | None
    resume: tuple[int, dict[str, np.ndarray]] | None  # first segment with a failing layer
    # pair position -> local error (fixed tolerance) of each failing layer, and the
    # segment each failing layer is in
    local: dict[int, Metrics] = field(default_factory=dict)
    segment_of: dict[int, int] = field(default_factory=dict)


@dataclass
class _SecondPass:
    metrics: dict[int, Metrics] = field(default_factory=dict)
    local: dict[int, Metrics] = field(default_factory=dict)
    referees: dict[int, Referee] = field(default_factory=dict)
    # ONNX values of the two candidates for first divergence: the first failing layer
    # and the first whose own segment fails (see divergence.first_divergence), in the
    # store by role; here, by role, the order and tensor name of each.
    kept: dict[str, tuple[int, str]] = field(default_factory=dict)
    values: TensorStore | None = None


class CaseRunner:
    """Runs inputs through both models; holds what every input shares."""

    def __init__(self, loaded: LoadedModel, graph: capture_onnx.OnnxGraph, settings: Settings,
                 say: Progress, spill: Spill, budget: Budget, runtime: Runtime) -> None:
        self.loaded, self.graph, self.settings, self.say = loaded, graph, settings, say
        self.spill, self.budget, self.runtime = spill, budget, runtime
        self._model64: Any = None
        # Checks left out because they would not fit --max-memory: check -> why.
        self.skipped: dict[str, str] = {}
        self._plain_runner: capture_onnx.PlainRunner | None = None
        self._calls = 0  # module calls of the last PyTorch run: a progress total

    def _stage(self, number: int, case: cases_.Case, what: str) -> None:
        self.say(f"input {number + 1} ({case.label}): {what}")

    def run(self, case: cases_.Case, number: int) -> CaseRun:
        s, graph = self.settings, self.graph
        specs = s.input_specs
        feeds = feeds_for(graph, specs, case.values)
        store = TensorStore(self.spill, ("torch", number))
        self._stage(number, case, "PyTorch")
        captured = capture_torch.capture(self.loaded.module, cases_.as_call(specs, case.values),
                                         store=store, tick=stepper(self.say, "calls", self._calls))
        self._calls = len(captured.calls)
        notes: list[str] = []
        self._pair_outputs(captured, notes if number == 0 else [])
        alignment = align(captured.calls, captured.parameters, graph,
                          [spec.onnx_name for spec in specs])
        captured.parameters.clear()
        plan = segments.plan(graph, [p.onnx_tensor for p in alignment.pairs],
                             _sizes(alignment, captured.calls, graph), self.budget.segment)
        runner = self._runner(plan, s.ort_level)
        self._stage(number, case, "onnxruntime")
        # Full-size outputs (GBs for an SR model at 4096 px) go into the store, within
        # its budget like the activations, instead of being held by every case.
        held = TensorStore(self.spill, ("outputs", number))
        captured.outputs = StoredList(held, "torch", captured.outputs)
        first = self._first_pass(runner, feeds, alignment, captured)
        kept = {k: p for k, p in enumerate(alignment.pairs) if k not in first.dropped}
        final_outputs = (None if first.failure is not None
                         else StoredList(held, "onnx", (first.outputs[n] for n in graph.outputs)))
        first.outputs.clear()
        outputs = judge.output_results(captured.outputs, final_outputs, graph.outputs,
                                       rtol=s.rtol, atol=s.atol, models=captured.output_names)
        failing = {k for k, m in first.metrics.items() if not m.passed}
        noise: dict[int, float] = {}
        output_noise: list[float] = []
        second = _SecondPass()
        if failing or any(not o.passed for o in outputs):
            wanted = {kept[k].call: (kept[k].order, first.metrics[k]) for k in failing}
            self._stage(number, case, "PyTorch in float64 (the referee)")
            noise, residuals, output_noise = self._referee(case, captured, wanted, notes, number)
            if output_noise:
                outputs = judge.output_results(captured.outputs, final_outputs, graph.outputs,
                                               rtol=s.rtol, atol=s.atol, noise=output_noise,
                                               models=captured.output_names)
            if failing and first.resume is not None:
                self._stage(number, case, "the failing layers against their noise floor")
                second = self._second_pass(runner, feeds, kept, first, captured, noise,
                                           residuals, TensorStore(self.spill, ("kept", number)))
            if residuals is not None:
                residuals.clear()
        metrics = {**first.metrics, **second.metrics}
        # Local errors: the second pass's where it judged a layer again, the first's after.
        local = {k: m for k, m in first.local.items()
                 if k not in second.metrics and not metrics[k].passed}
        local.update(second.local)
        final = unpair(alignment, first.dropped)
        position = {k: i for i, k in enumerate(sorted(kept))}  # old -> new pair position
        layers = judge.layer_results(
            final, captured.calls, {position[k]: m for k, m in metrics.items() if k in position},
            ignore=s.ignore, local={position[k]: m for k, m in local.items() if k in position},
            referees={position[k]: r for k, r in second.referees.items()})
        divergence = judge.first_divergence(layers, graph, final, captured.calls, first.failure)
        result = CaseRun(case.label, case.kind, case.tensor, feeds, captured.calls,
                         captured.activations, final, layers, outputs, divergence, first.failure,
                         final_outputs, captured.outputs, captured.input_mutated,
                         captured.training_modules, notes, plan=plan, noise=noise,
                         output_noise=output_noise, random_ops=captured.random_ops)
        first_onnx = None
        if divergence is not None and divergence.kind != DivergenceKind.RUNTIME_ERROR:
            layer = layers[divergence.layer]  # a failing layer
            first_onnx = next((second.values[role] for role, (_, t) in second.kept.items()
                               if t == layer.onnx_tensor), None)
        if second.values is not None:
            second.values.clear()
        if first_onnx is not None:
            result.kept = TensorStore(self.spill, ("first", number))
            result.kept.keep("first", first_onnx)
        return result

    def screen(self, case: cases_.Case, number: int) -> CaseRun | None:
        """``case`` by its outputs alone: one plain forward on each side, no hooks and no
        exposed tensors (its own forwards' cost). None when that cannot be had: the
        whole-graph run would not fit --max-memory, or onnxruntime fails on it (the walk
        then says where)."""
        s, graph = self.settings, self.graph
        if self._room(1, tuple(case.tensor.shape[-2:]))[0] is False:
            return None
        feeds = feeds_for(graph, s.input_specs, case.values)
        captured = capture_torch.capture(self.loaded.module,
                                         cases_.as_call(s.input_specs, case.values),
                                         hooks=False, parameters=False)
        self._pair_outputs(captured, [])
        try:
            plain = self._plain().run(feeds)
        except Exception:  # noqa: BLE001 - a load or run failure: the walk reports it
            return None
        outputs = judge.output_results(captured.outputs, plain, graph.outputs,
                                       rtol=s.rtol, atol=s.atol, models=captured.output_names)
        # Kept for the pictures, within the store's budget like a walked input's outputs.
        held = TensorStore(self.spill, ("outputs", number))
        torch_outputs = StoredList(held, "torch", captured.outputs)
        onnx_outputs = StoredList(held, "onnx", plain)
        del plain
        empty = Alignment((), (), (), (), False)
        return CaseRun(case.label, case.kind, case.tensor, feeds, [], {}, empty, [], outputs,
                       None, None, onnx_outputs, torch_outputs, captured.input_mutated,
                       captured.training_modules, [], random_ops=captured.random_ops,
                       screened=True)

    def _pair_outputs(self, captured: capture_torch.TorchCapture, notes: list[str]) -> None:
        """PyTorch's outputs as the ONNX file's: the leading ones its users take (the
        loader says how many), in the file's order."""
        used = self.loaded.outputs
        if used and len(self.graph.outputs) == used < len(captured.outputs):
            notes.append(
                f"The model returns {len(captured.outputs)} tensors "
                f"({', '.join(captured.output_names)}); its users take the first "
                f"{used}, as the ONNX file does: those were compared.")
            captured.outputs = captured.outputs[:used]
            captured.output_names = captured.output_names[:used]
        order = preflight.pair_outputs(captured.output_names, self.graph.outputs,
                                       self.loaded.architecture)
        captured.outputs = [captured.outputs[k] for k in order]
        captured.output_names = [captured.output_names[k] for k in order]

    def _plain(self) -> capture_onnx.PlainRunner:
        """The unmodified model's session, shared by every plain run."""
        if self._plain_runner is None:
            s = self.settings
            self._plain_runner = capture_onnx.PlainRunner(self.graph, self.runtime,
                                                          level=s.ort_level, config=s.ort_config)
        return self._plain_runner

    # ----------------------------------------------------------------------- passes

    def _runner(self, plan: list[segments.Segment], level: str) -> segments.Runner:
        s = self.settings
        return segments.Runner(self.graph, plan, level=level, runtime=self.runtime,
                               config=s.ort_config)

    def _first_pass(self, runner: segments.Runner, feeds: dict[str, np.ndarray],
                    alignment: Alignment, captured: capture_torch.TorchCapture) -> _FirstPass:
        """Every aligned tensor compared at the fixed tolerance, segment by segment."""
        s = self.settings
        by_tensor = _positions(alignment)
        result = _FirstPass({}, {}, {}, None, None)
        tick = stepper(self.say, "segments", len(runner.segments))
        for index, known, run in segments.walk(runner, feeds, tick=tick):
            failing: list[int] = []
            for tensor, value in run.values.items():
                for k in by_tensor.get(tensor, ()):
                    pair = alignment.pairs[k]
                    wrong = misfit(pair, captured.calls, value, captured.activations)
                    if wrong is not None:
                        result.dropped[k] = wrong
                        continue
                    result.metrics[k] = compare(captured.activations[pair.call], value,
                                                rtol=s.rtol, atol=s.atol)
                    if not result.metrics[k].passed:
                        failing.append(k)
                        result.segment_of[k] = index
                        if result.resume is None:
                            result.resume = (index, known)
            value = None  # not held while the next segment runs
            if failing:  # their local error, while this segment's inputs are at hand
                kept = {k: p for k, p in enumerate(alignment.pairs) if k not in result.dropped}
                result.local.update(self._local(runner, index, known, run.values, failing, kept,
                                                captured.activations, {}))
            result.outputs.update(_graph_outputs(run, self.graph))
            result.failure = run.failure
        return result

    def _second_pass(self, runner: segments.Runner, feeds: dict[str, np.ndarray],
                     kept: dict[int, Any], first: _FirstPass,
                     captured: capture_torch.TorchCapture, noise: dict[int, float],
                     residuals: TensorStore | None, values: TensorStore) -> _SecondPass:
        """The failing layers again: against their noise floor, with the referee's view,
        and the ONNX values of the first-divergence candidates. Resumes at the first
        segment holding a failing layer, and stops once every layer the referee gave a
        floor is judged and both candidates are held: the first pass's figures and
        local errors stand for the failing layers after that (no floor changes them)."""
        s = self.settings
        failing = {k for k, m in first.metrics.items() if not m.passed}
        result = _SecondPass(values=values)
        by_tensor: dict[str, list[int]] = defaultdict(list)
        for k, pair in kept.items():
            by_tensor[pair.onnx_tensor].append(k)
        floored = [first.segment_of[k] for k in failing if kept[k].call in noise]
        last = max(floored, default=-1)
        start, carried = first.resume
        tick = stepper(self.say, "segments", len(runner.segments))
        for index, known, run in segments.walk(runner, feeds, start=start, carried=carried,
                                               tick=tick):
            here = [k for t in run.values for k in by_tensor.get(t, ()) if k in failing]
            for k in here:
                pair = kept[k]
                value = run.values[pair.onnx_tensor]
                reference = captured.activations[pair.call]
                metrics = (compare(reference, value, rtol=s.rtol, atol=s.atol,
                                   noise=noise[pair.call])
                           if pair.call in noise else first.metrics[k])
                result.metrics[k] = metrics
                residual = residuals.get(pair.call) if residuals is not None else None
                if residual is not None:
                    result.referees[k] = _referee_of(metrics, reference, value, residual)
            still = [k for k in here if not result.metrics[k].passed]
            again = [k for k in still if kept[k].call in noise]
            result.local.update({k: first.local[k] for k in still
                                 if k not in again and k in first.local})
            if again:
                result.local.update(self._local(runner, index, known, run.values, again, kept,
                                                captured.activations, noise))
            self._keep_candidates(result, still, kept, captured.calls, run.values)
            if index >= last and self._held(result, kept, first, index, captured.calls):
                break
        return result

    def _held(self, result: _SecondPass, kept: dict, first: _FirstPass, index: int,
              calls: list[TorchCall]) -> bool:
        """Whether both first-divergence candidates are held, or no failing layer after
        segment ``index`` could be one (first-pass figures, which stand there)."""
        ignore = self.settings.ignore
        later = [k for k, m in first.metrics.items() if not m.passed
                 and first.segment_of[k] > index
                 and not judge.is_ignored(ignore, calls[kept[k].call].label, kept[k].onnx_node,
                                          kept[k].op_type)]
        total = "total" in result.kept or not later
        local = "local" in result.kept or not any(
            k in first.local and not first.local[k].passed for k in later)
        return total and local

    def _local(self, runner: segments.Runner, index: int, known: Mapping[str, np.ndarray],
               computed: Collection[str], positions: list[int], pairs: Mapping[int, Any],
               activations: Mapping[int, np.ndarray],
               noise: Mapping[int, float]) -> dict[int, Metrics]:
        """The local error of the layers at ``positions`` (in ``pairs``) in segment
        ``index``: the segment run again on PyTorch's values of its inputs and of every
        aligned tensor it ``computed``, so that each layer sees correct inputs. ``known``
        gives the inputs PyTorch has no value for (the walk's values, or the graph's
        inputs); empty when one of them is missing there too."""
        s = self.settings
        segment = runner.segments[index]
        tensor_call = {p.onnx_tensor: p.call for p in reversed(list(pairs.values()))}
        references = {t: activations[c] for t, c in tensor_call.items()
                      if t in computed or t in segment.inputs}
        feeds = {}
        for name in segment.inputs:
            if name in references:
                dtype = (known[name].dtype if name in known
                         else self.graph.dtypes.get(name, np.float32))
                feeds[name] = references[name].astype(dtype, copy=False)
            elif name in known:
                feeds[name] = known[name]
            else:
                return {}
        own = runner.run_local(index, feeds, references, {pairs[k].onnx_tensor for k in positions})
        return {k: compare(activations[pairs[k].call], own[pairs[k].onnx_tensor], rtol=s.rtol,
                           atol=s.atol, noise=noise.get(pairs[k].call, 0.0))
                for k in positions if pairs[k].onnx_tensor in own}

    def _keep_candidates(self, result: _SecondPass, positions: list[int], kept: dict,
                         calls: list[TorchCall], values: dict[str, np.ndarray]) -> None:
        """Hold the ONNX values of the earliest failing layer and of the earliest whose
        own segment fails (ignored layers never count): the first divergence is one of
        them, and its previews and reproducer need the value."""
        ignore = self.settings.ignore
        for k in positions:
            pair = kept[k]
            if judge.is_ignored(ignore, calls[pair.call].label, pair.onnx_node, pair.op_type):
                continue
            local = result.local.get(k)
            for role, wanted in (("total", True), ("local", local is not None and not local.passed)):
                held = result.kept.get(role)
                if wanted and (held is None or pair.order < held[0]):
                    result.kept[role] = (pair.order, pair.onnx_tensor)
                    result.values[role] = values[pair.onnx_tensor]

    def _referee(self, case: cases_.Case, captured: capture_torch.TorchCapture,
                 wanted: dict[int, tuple[int, Metrics]], notes: list[str], number: int):
        """PyTorch in float64: the fp32 noise floor of the ``wanted`` calls (the failing
        layers: call -> their place in the graph and fixed-tolerance figures) and of the
        outputs, and float64 - float32 for those calls (a store); empty when off.

        It runs only as far as the first divergence needs: once a failing layer is off by
        more than its noise floor allows (it fails with any floor) and every failing layer
        before it in the graph has its floor, the forward stops. The layers after it keep
        the fixed tolerance and no referee, and the outputs no floor (a note says so)."""
        if self.settings.reference != "float64" or not captured.calls:
            return {}, None, []
        if captured.random_ops:  # a second forward draws other numbers: no noise floor
            notes.append("float64 referee skipped: the model draws random numbers in forward")
            return {}, None, []
        # Every float64 tensor is twice its float32 one, so the forward needs twice.
        if self._wont_fit("the float64 referee", "failing layers are judged at the fixed "
                          "tolerance, with no noise floor", 2, tuple(case.tensor.shape[-2:])):
            return {}, None, []
        residuals = TensorStore(self.spill, ("float64", number))
        noise: dict[int, float] = {}

        visited: set[int] = set()
        stopped: list[int] = []

        def visit(index: int, value64: torch.Tensor) -> None:
            if index not in wanted:
                return
            visited.add(index)
            fp32 = captured.activations.get(index)
            if fp32 is None or tuple(value64.shape) != fp32.shape:
                return
            residual, noise[index] = _residual(value64.double().cpu().numpy(), fp32)
            residuals[index] = residual
            order, metrics = wanted[index]
            if len(visited) < len(wanted) and _fails_beyond(metrics, noise[index], self.settings) \
                    and all(call in visited for call, (o, _) in wanted.items() if o < order):
                stopped.append(index)
                raise capture_torch.StopCapture

        try:
            if self._model64 is None:
                self._model64 = copy.deepcopy(self.loaded.module).double()
            args, kwargs = cases_.as_call(self.settings.input_specs, {
                name: v.double() if v.is_floating_point() else v for name, v in case.values.items()})
            captured64 = capture_torch.capture(
                self._model64, (args, kwargs), visit=visit, parameters=False,
                tick=stepper(self.say, "calls", len(captured.calls)))
        except capture_torch.StopCapture:
            later = sum(1 for call in wanted if call not in visited)
            notes.append(
                f"The float64 referee stopped at {captured.calls[stopped[0]].label}, the first "
                f"layer off by more than its noise floor: the {later} failing layer(s) after "
                "it and the outputs were judged at the fixed tolerance, with no referee.")
            return noise, residuals, []
        except (LayerdiffError, RuntimeError, TypeError) as exc:
            notes.append(f"float64 referee skipped: the model does not run in float64 ({exc})")
            return {}, None, []
        if [c.shape for c in captured64.calls] != [c.shape for c in captured.calls]:
            notes.append("float64 referee skipped: the float64 run took another path")
            return {}, None, []
        by_name = dict(zip(captured64.output_names, captured64.outputs))
        output_noise = [_max_diff(a, by_name[n]) if n in by_name else 0.0
                        for a, n in zip(captured.outputs, captured.output_names)]
        return noise, residuals, output_noise

    # ----------------------------------------------------------------------- re-checks

    def passes_unoptimised(self, case: CaseRun,
                           first: FirstDivergence | None = None) -> bool | None:
        """Whether every layer and output passes with onnxruntime's optimisations off.

        With ``first`` (the first divergence, in ``case``), its own segment runs first,
        unoptimised, on PyTorch's values: when the layer still fails there, its own
        computation is wrong without any rewrite, so the answer is no without running
        the rest of the graph."""
        s = self.settings
        by_tensor = _positions(case.alignment)
        outputs: dict[str, np.ndarray] = {}
        try:
            runner = self._runner(case.plan, "disable")
            if first is not None and self._fails_alone(runner, case, first):
                return False
            tick = stepper(self.say, "segments", len(runner.segments))
            for _, _, run in segments.walk(runner, case.feeds, tick=tick):
                if run.failure is not None:
                    return False
                for tensor, value in run.values.items():
                    for k in by_tensor.get(tensor, ()):
                        pair = case.alignment.pairs[k]
                        label = case.calls[pair.call].label
                        if judge.is_ignored(s.ignore, label, pair.onnx_node, pair.op_type):
                            continue
                        metrics = compare(case.activations[pair.call], value, rtol=s.rtol,
                                          atol=s.atol, noise=case.noise.get(pair.call, 0.0))
                        if not metrics.passed:
                            return False
                outputs.update(_graph_outputs(run, self.graph))
        except capture_onnx.OnnxLoadError:
            return None
        final = judge.output_results(case.torch_outputs, [outputs[n] for n in self.graph.outputs],
                                     self.graph.outputs, rtol=s.rtol, atol=s.atol,
                                     noise=case.output_noise)
        return all(o.passed for o in final)

    def _fails_alone(self, runner: segments.Runner, case: CaseRun, first: FirstDivergence) -> bool:
        """Whether ``first``'s layer fails on PyTorch's inputs in ``runner`` (False when
        that cannot be run: an input of its segment PyTorch has no value for)."""
        pairs = dict(enumerate(case.alignment.pairs))
        k = next((k for k, p in pairs.items() if p.onnx_node == first.onnx_node), None)
        index = next((i for i, seg in enumerate(case.plan)
                      if k is not None and pairs[k].onnx_tensor in seg.marks), None)
        if k is None or index is None:
            return False
        local = self._local(runner, index, case.feeds, case.plan[index].marks, [k], pairs,
                            case.activations, case.noise)
        return k in local and not local[k].passed

    def rewrite_of(self, first: FirstDivergence) -> str:
        s = self.settings
        return capture_onnx.optimised_producer(self.graph, first.onnx_node, level=s.ort_level,
                                               provider=s.provider, config=s.ort_config)

    def instrumentation_delta(self, case: CaseRun) -> float | None:
        """How much exposing intermediates changed the final output (fusions it prevented).
        None when not measured: no output, or the unmodified whole-graph run, which
        cannot be cut into segments, would not fit --max-memory."""
        if case.final_outputs is None:
            return None
        # onnxruntime's whole-graph peak is taken to be the larger forward's (footprint.py):
        # both hold the activations live at the widest point of the same graph.
        if self._wont_fit("the unmodified onnxruntime run", "whether exposing intermediate "
                          "tensors changes the output was not checked", 1,
                          tuple(case.tensor.shape[-2:])):
            return None
        plain = self._plain().run(case.feeds)
        return max((_largest_diff(a, b) if a.size else 0.0
                    for a, b in zip(plain, case.final_outputs)), default=0.0)

    def _room(self, times: int, size: tuple[int, ...]) -> tuple[bool, int, int]:
        """Whether a forward needing ``times`` the float32 forward's memory at ``size``
        (PyTorch's when more than once) fits --max-memory now (True when the need is
        unknown), with that need and the room left."""
        footprint = self.budget.footprint
        if footprint is None:
            return True, 0, 0
        high = forward_memory.RSS_FACTOR_HIGH  # skipping an optional check costs little
        one = footprint.torch_forward(*size, high) if times > 1 else footprint.forward(*size, high)
        need, room = times * one, self.budget.limit - current_rss()
        return need <= room, need, room

    def _wont_fit(self, check: str, consequence: str, times: int, size: tuple[int, int]) -> bool:
        """Whether ``check`` (see _room) must be skipped; if so, ``skipped`` says why and
        what is lost."""
        fits, need, room = self._room(times, size)
        if fits:
            return False
        self.skipped[check] = (
            f"Skipped {check} to stay within --max-memory {human_bytes(self.budget.limit)}: "
            f"it needs about {human_bytes(need)} and {human_bytes(max(room, 0))} was left; "
            f"{consequence}.")
        return True


# --------------------------------------------------------------------------- helpers


def _graph_outputs(run: segments.SegmentRun, graph: capture_onnx.OnnxGraph) -> dict:
    """The graph's final outputs among what a segment computed."""
    return {n: v for n, v in {**run.carry, **run.values}.items() if n in graph.outputs}


def _positions(alignment: Alignment) -> dict[str, list[int]]:
    found: dict[str, list[int]] = defaultdict(list)
    for k, pair in enumerate(alignment.pairs):
        found[pair.onnx_tensor].append(k)
    return found


def _sizes(alignment: Alignment, calls: list[TorchCall],
           graph: capture_onnx.OnnxGraph) -> dict[str, int]:
    """Bytes of each aligned tensor, from PyTorch's shape of it."""
    sizes: dict[str, int] = {}
    for pair in alignment.pairs:
        dtype = graph.dtypes.get(pair.onnx_tensor, np.dtype(np.float32))
        nbytes = int(np.prod(calls[pair.call].shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        sizes[pair.onnx_tensor] = max(sizes.get(pair.onnx_tensor, 0), nbytes)
    return sizes


def _fails_beyond(metrics: Metrics, noise: float, settings: Settings) -> bool:
    """Whether a layer that failed the fixed tolerance fails with a noise floor of
    ``noise`` too, from its figures alone (compare()'s first rule, with atol widened as
    the floor widens it): a shape or NaN/Inf that differs, or an error past the bound."""
    atol = max(settings.atol, NOISE_FACTOR * noise)
    return (metrics.shape_torch != metrics.shape_onnx or metrics.nonfinite_differs
            or metrics.max_abs > atol + settings.rtol * metrics.scale)


def _residual(value64: np.ndarray, fp32: np.ndarray) -> tuple[np.ndarray, float]:
    """float64 - float32 as float32 (its own rounding is far below the difference), and
    its largest magnitude measured in float64."""
    residual = np.empty(fp32.shape, dtype=np.float32)
    flat64, flat32, out = value64.reshape(-1), fp32.reshape(-1), residual.reshape(-1)
    worst = 0.0
    for lo in range(0, flat32.size, CHUNK):
        diff = flat64[lo:lo + CHUNK] - flat32[lo:lo + CHUNK].astype(np.float64)
        out[lo:lo + CHUNK] = diff
        finite = diff[np.isfinite(diff)]
        if finite.size:
            worst = max(worst, float(np.abs(finite).max()))
    return residual, worst


def _referee_of(metrics: Metrics, fp32: np.ndarray, onnx_value: np.ndarray,
                residual: np.ndarray) -> Referee:
    """Which side is further from float64: |torch32 - t64| against |onnx - t64|."""
    torch_error = onnx_error = 0.0
    flat32, flat_res = fp32.reshape(-1), residual.reshape(-1)
    flat_onnx = onnx_value.reshape(-1) if onnx_value.size == fp32.size else None
    if flat_onnx is None:
        return Referee(float(np.abs(residual).max()) if residual.size else 0.0, float("inf"), RefereeSide.ONNX)
    for lo in range(0, flat32.size, CHUNK):
        res = flat_res[lo:lo + CHUNK].astype(np.float64)
        off = flat_onnx[lo:lo + CHUNK].astype(np.float64) - flat32[lo:lo + CHUNK] - res
        torch_error = max(torch_error, _finite_max(res))
        onnx_error = max(onnx_error, _finite_max(off))
    if onnx_error > 2 * torch_error + 1e-12 and not metrics.passed:
        side = RefereeSide.ONNX
    elif torch_error > 2 * onnx_error + 1e-12 and not metrics.passed:
        side = RefereeSide.TORCH
    else:
        side = RefereeSide.NOISE
    return Referee(torch_error, onnx_error, side)


def _finite_max(values: np.ndarray) -> float:
    magnitude = np.abs(values)
    if not np.isfinite(magnitude).all():
        magnitude = magnitude[np.isfinite(magnitude)]
    return float(magnitude.max()) if magnitude.size else 0.0


def _max_diff(fp32: np.ndarray, fp64: np.ndarray | None) -> float:
    """max |fp32 - fp64| over the non-NaN differences (0 when none is finite), in
    float64 chunks: no full-size temporaries."""
    if fp64 is None or fp64.shape != fp32.shape or not fp32.size:
        return 0.0
    worst, finite = 0.0, False
    for a, b in _chunks(fp32, fp64):
        diff = np.abs(a.astype(np.float64) - b)
        finite = finite or bool(np.isfinite(diff).any())
        diff = diff[~np.isnan(diff)]
        if diff.size:
            worst = max(worst, float(diff.max()))
    return worst if finite else 0.0


def _largest_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| in float64 (NaN when any difference is), in chunks."""
    worst = 0.0
    for x, y in _chunks(a, b):
        top = float(np.max(np.abs(x.astype(np.float64) - y)))
        if top != top:
            return top
        worst = max(worst, top)
    return worst


def _chunks(a: np.ndarray, b: np.ndarray):
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    for lo in range(0, flat_a.size, CHUNK):
        yield flat_a[lo:lo + CHUNK], flat_b[lo:lo + CHUNK]


def feeds_for(graph: capture_onnx.OnnxGraph, specs: Sequence[InputSpec],
              values: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The ONNX inputs: each input's values as the graph's dtype (ORT only reads them)."""
    if not graph.inputs:
        raise UsageError("the ONNX model has no inputs", hint="re-export it with an input")
    dtypes = {name: dtype for name, dtype, _ in graph.inputs}
    feeds = {}
    for spec in specs:
        if spec.onnx_name is None:
            continue
        array = values[spec.name].numpy()
        feeds[spec.onnx_name] = array.astype(dtypes.get(spec.onnx_name, array.dtype), copy=False)
    missing = [name for name in dtypes if name not in feeds]
    if missing:
        raise UsageError(f"the ONNX model has an input '{missing[0]}' that layerdiff cannot fill",
                         hint="give it with --input-shape/--input-range NAME:..., or export "
                              "the ONNX with the inputs forward() takes")
    return feeds
