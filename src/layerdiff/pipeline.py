"""The diagnosis pipeline: one function that runs every stage in order.

load model -> get ONNX (export or given) -> for each input (random, files, other sizes),
within the memory budget (run_case.py): capture torch -> align -> run ONNX segment by
segment, comparing as the tensors arrive -> for failing layers only, the float64 referee
and their local runs -> then combine the inputs (each layer keeps its worst), find the
first divergence, re-check without ORT optimisation, apply the rules.
"""

from __future__ import annotations

import math
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import capture_onnx, capture_torch, divergence as judge, inputs as cases_, reproducer as repro
from . import files, footprint as forward_memory, options, preflight, store as memory
from .align import align
from .compare import CHUNK
from .errors import LayerdiffError, UsageError
from .exporting import describe_onnx, export_onnx
from .loading import from_module, load_model
from .records import (
    Alignment, CaseKind, CaseResult, CaseVerdict, Diagnosis, DivergenceKind, Facts,
    FirstDivergence, LayerResult, LayerStatus, LoadedModel, OnnxSource, OutputResult, RandomOp,
    Settings, Side, TorchCall, Verdict,
)
from .rules import suggest
from .run_case import CaseRun as _Case, CaseRunner

Progress = Callable[[str], None]

# Of the memory a diagnosis may use beyond what the process holds when it starts and
# what the model's forward needs (when estimated, footprint.py):
STORE_SHARE = 0.35  # PyTorch activations and outputs kept in RAM (the rest go to disk)
# The aligned tensors of one ONNX segment. A failing segment's second look holds up to
# three times that: ONNX's values, PyTorch's for the local run, and its outputs.
SEGMENT_SHARE = 0.1
# The rest is for the forwards themselves (all of them, when the forward's need is
# unknown), the outputs read back and the comparison's temporaries.


def diagnose(
    model: str | Path | torch.nn.Module | LoadedModel,
    onnx: str | Path | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    samples: int = 1,
    inputs: tuple[str, ...] | list[str] = (),
    check_sizes: tuple[tuple[int, int], ...] | list[tuple[int, int]] | None = None,
    reference: str = "float64",
    rtol: float | None = None,
    atol: float | None = None,
    fp16: bool = False,
    fp16_method: str = "convert",
    fix_fp16: str | Path | None = None,
    ignore: tuple[str, ...] | list[str] = (),
    exporter: str = "dynamo",
    opset: int | None = None,
    output_dir: str | Path = "layerdiff_report",
    trust_pickle: bool = False,
    ort_level: str = "all",
    ort_config: dict[str, str] | None = None,
    provider: str = "CPUExecutionProvider",
    progress: Progress | None = None,
    reproducer_for: str | Path | None = None,
    max_memory: int | None = None,
) -> Diagnosis:
    """Compare ``model`` with its ONNX export layer by layer and return a Diagnosis.

    ``model`` is a path (spandrel state dict, TorchScript archive), an ``nn.Module`` or a
    LoadedModel. Without ``onnx`` the model is exported into ``output_dir``. The model
    runs on ``samples`` random inputs, the ``inputs`` files, and at ``check_sizes``
    (None: one odd, non-square size besides the main one, when the graph takes any
    size; () for none). ``reference="float64"`` also runs PyTorch in float64 to measure
    each layer's fp32 noise floor and say which side is off. ``fp16`` compares against
    a float16 ONNX (the given file, converted when it is fp32, or one made with
    ``fp16_method``: "convert" with onnxconverter-common, "half" as model.half() then
    export); ``fix_fp16`` writes a mixed-precision file keeping the layers that need
    fp32 and checks it. Tolerances default to 1e-3 / 1e-5 (fp16: 1e-2 / 1e-3). Raises
    LayerdiffError for input the user must fix. With ``reproducer_for`` (the report's
    path) and a numeric first divergence, the minimal reproducer (reproducer.py) is
    written next to it and named in the notes. ``max_memory`` (bytes; default
    store.default_max_memory()) bounds what the process holds: activations and outputs
    beyond it go to a temporary folder on disk and ONNX runs in segments. A UsageError
    says so before anything runs at full size when the model's forward alone, estimated
    from two small runs (footprint.py), cannot fit it; when the peak still exceeds it,
    a note does.
    """
    options.check(rtol=rtol, atol=atol, seed=seed, samples=samples, opset=opset,
                  max_memory=max_memory)
    rtol = rtol if rtol is not None else (1e-2 if fp16 else 1e-3)
    atol = atol if atol is not None else (1e-3 if fp16 else 1e-5)
    say = progress or (lambda _msg: None)
    if ort_level not in capture_onnx.LEVELS:
        raise UsageError(f"unknown onnxruntime optimisation level '{ort_level}'",
                         hint="use one of: " + ", ".join(capture_onnx.LEVELS))
    if reference not in ("float64", "none"):
        raise UsageError(f"unknown reference '{reference}'", hint="use float64 or none")
    capture_onnx.check_runtime(provider, ort_level, tuple((ort_config or {}).items()))
    given = files.given_inputs(model if isinstance(model, (str, Path)) else None, onnx, inputs)

    def planned(stem: str) -> dict[str, Path | None]:
        return files.planned_outputs(stem, onnx=onnx, output_dir=output_dir, fp16=fp16,
                                     fix_fp16=fix_fp16, report=reproducer_for)

    files.check_inputs(given)
    if isinstance(model, (str, Path)):  # checked before the model is even read
        files.check_outputs(planned(Path(model).stem), given)

    say("loading model")
    loaded = _load(model, trust_pickle)
    files.check_outputs(planned(_stem(loaded)), given)
    shape = tuple(input_shape) if input_shape else (1, loaded.input_channels, 64, 64)
    limit = max_memory or memory.default_max_memory()
    # Before anything runs at full size (export included): refuse what cannot fit.
    footprint = _forward_fits(loaded, shape, check_sizes, limit, say)
    main_input = cases_.random_input(shape, seed)

    out = files.export_path(output_dir, _stem(loaded))
    if onnx is None:
        say(f"exporting with the {exporter} exporter")
        out.parent.mkdir(parents=True, exist_ok=True)
        source = export_onnx(loaded, main_input, out, exporter=exporter, opset=opset)
        export_size = tuple(shape[-2:])
    else:
        source = describe_onnx(onnx)
        export_size = None
    fp32_path = None
    if fp16:
        source, fp32_path = _as_fp16(source, loaded, main_input, out, fp16_method, say, given)
    graph = capture_onnx.load_graph(source.path)
    preflight.check_pairing(loaded, graph, shape)
    notes = list(source.notes) + list(loaded.notes)

    sizes, size_note = _sizes(check_sizes, shape, graph)
    if size_note:
        notes.append(size_note)
    settings = Settings(rtol=rtol, atol=atol, input_shape=shape, seed=seed, ignore=tuple(ignore),
                        provider=provider, ort_level=ort_level,
                        ort_config=tuple((ort_config or {}).items()), reference=reference,
                        samples=samples, fp16=fp16, inputs=tuple(str(i) for i in inputs),
                        check_sizes=tuple(sizes), max_memory=limit)
    held, peak_before = memory.current_rss(), memory.peak_rss()
    largest = max([tuple(shape[-2:]), *sizes], key=lambda s: s[0] * s[1])
    # Shared out against the high end of the estimate; refused (above) only on the low.
    forward = (footprint.forward(*largest, forward_memory.RSS_FACTOR_HIGH)
               if footprint is not None else 0)
    store_bytes, segment_bytes = budgets(limit, held, forward)
    budget = forward_memory.Budget(limit, store_bytes, segment_bytes, footprint)
    with memory.Spill(store_bytes) as spill:
        runner = CaseRunner(loaded, graph, settings, say, spill, budget)
        diagnosis = _run_cases(runner, loaded, source, graph, settings, notes, main_input, out,
                               fp32_path, fix_fp16, export_size, reproducer_for)
        spilled = spill.written_bytes
    facts = _memory_facts(diagnosis.facts, settings.max_memory, held, peak_before, spilled)
    facts = replace(facts, forward_memory=forward or None,
                    skipped_for_memory=tuple(runner.skipped))
    notes = list(diagnosis.notes) + list(runner.skipped.values())
    size = memory.human_bytes
    if facts.spilled_bytes:
        notes.append(f"{size(facts.spilled_bytes)} of PyTorch activations went to a temporary "
                     f"folder on disk to stay within --max-memory {size(settings.max_memory)}.")
    if facts.over_memory:
        notes.append(f"Peak memory {size(facts.peak_memory)} exceeded --max-memory "
                     f"{size(settings.max_memory)}: the forward passes themselves need more at "
                     "this input size (or a segment of the graph could not be cut smaller). "
                     "Use a smaller --input-shape or raise --max-memory.")
    return replace(diagnosis, facts=facts, notes=tuple(notes))


def budgets(limit: int, held: int, forward: int = 0) -> tuple[int, int]:
    """Bytes of PyTorch activations kept in RAM, and of aligned tensors per ONNX segment,
    for a diagnosis that may use ``limit`` bytes in a process holding ``held`` now,
    whose model's forward needs ``forward`` (0: unknown)."""
    headroom = max(limit - held - forward, 64 * 2**20)
    return int(STORE_SHARE * headroom), int(SEGMENT_SHARE * headroom)


LOADING = 256 * 2**20  # see _forward_fits


def _forward_fits(loaded: LoadedModel, shape: tuple[int, ...], check_sizes, limit: int,
                  say: Progress) -> forward_memory.Footprint | None:
    """The forward's estimated footprint (None when unknown); a UsageError when the
    forward alone, at the largest input size known now, cannot fit ``limit``."""
    say("estimating the memory of the model's forward")
    footprint = forward_memory.estimate(loaded.module, shape)
    if footprint is None:
        return None
    sizes = [tuple(shape[-2:]), *(tuple(s) for s in check_sizes or ())]
    height, width = max(sizes, key=lambda s: s[0] * s[1])
    held, need = memory.current_rss(), footprint.forward(height, width)
    if held + need <= limit:
        return footprint
    size = memory.human_bytes
    # What is offered instead must fit: on the high end of the estimate, and with what
    # the process comes to hold after this check (graph, sessions, allocator: 0.15 to
    # 0.25 GiB more by the ONNX pass, measured on Compact and ESRGAN).
    later = held + LOADING
    fit = footprint.largest_fitting(limit - later, *shape[-2:])
    enough = later + footprint.forward(height, width, forward_memory.RSS_FACTOR_HIGH)
    larger = f"--max-memory {math.ceil(enough / 2**30 * 10) / 10:g}G or more"
    raise UsageError(
        f"the model's forward alone needs about {size(need)} at {height}x{width} (estimated "
        f"from two small runs), {size(held + need)} with what layerdiff holds: more than "
        f"--max-memory {size(limit)}",
        hint=(f"use --input-shape {shape[0]},{shape[1]},{fit[0]},{fit[1]} or smaller, or "
              f"{larger}" if fit else f"use {larger}"),
    )


def _memory_facts(facts: Facts, limit: int, held: int, peak_before: int, spilled: int) -> Facts:
    """Peak memory of this diagnosis (when measurable) and what went to disk."""
    peak = memory.peak_rss()
    # The process's peak is a high-water mark: when it was set before this diagnosis
    # began (and is above what it holds now), this one's own peak is unknown (None).
    measured = peak if peak > peak_before or peak_before <= held * 1.05 else None
    return replace(facts, peak_memory=measured, spilled_bytes=spilled,
                   over_memory=measured is not None and measured > limit)




def _run_cases(runner: CaseRunner, loaded: LoadedModel, source: OnnxSource,
               graph: capture_onnx.OnnxGraph, settings: Settings, notes: list[str],
               main_input: torch.Tensor, out: Path, fp32_path: Path | None, fix_fp16,
               export_size, reproducer_for) -> Diagnosis:
    say, shape, seed = runner.say, settings.input_shape, settings.seed
    rtol, atol, ort_level, fp16 = settings.rtol, settings.atol, settings.ort_level, settings.fp16
    results: list[_Case] = []
    skipped: list[CaseResult] = []
    for number, case in enumerate(cases_.cases(shape, seed, samples=settings.samples,
                                               files=settings.inputs, sizes=settings.check_sizes)):
        say(f"input {number + 1}: {case.label}")
        try:
            results.append(runner.run(case, number))
        except capture_onnx.OnnxLoadError as exc:
            if number == 0:
                return _error_diagnosis(loaded, source, settings, str(exc), exc.hint)
            skipped.append(CaseResult(case.label, tuple(case.tensor.shape), CaseVerdict.SKIPPED,
                                      case.kind, note=f"onnxruntime cannot run it: {exc.message}"))
        except LayerdiffError as exc:
            if number == 0 or case.kind == CaseKind.FILE:
                raise
            skipped.append(CaseResult(case.label, tuple(case.tensor.shape), CaseVerdict.SKIPPED,
                                      case.kind, note=f"PyTorch itself fails here: {exc.message}"))
    main = results[0]

    layers = _worst_layers(results)
    outputs = _worst_outputs(results)
    first, first_case = _first_divergence(results, layers)
    verdict, masked = judge.verdict(layers, outputs, first)
    # An input on which onnxruntime failed produced no output: nothing is masked there.
    masked = masked and all(r.final_outputs is not None for r in results)

    random_ops = _random_ops(main, graph)
    facts = Facts(
        input_mutated=any(r.input_mutated for r in results),
        training_modules=main.training_modules,
        random_ops=random_ops,
        onnx_training_nodes=_training_nodes(graph),
        mutated_outputs=tuple(c.label for c in main.calls if c.mutated_later),
        onnx_input_shape=tuple(graph.inputs[0][2]) if graph.inputs else (),
        ort_optimisation_level=ort_level,
        # A plain run draws other random numbers: it would measure the draws, not fusions.
        instrumentation_delta=(None if any(r.side == Side.ONNX for r in random_ops)
                               else runner.instrumentation_delta(main)),
        export_size=export_size,
        segments=len(main.plan),
    )
    if verdict == Verdict.DIVERGED and ort_level != "disable" and first_case is not None \
            and first_case.failure is None:
        say("re-running with onnxruntime graph optimisations off")
        vanishes = runner.passes_unoptimised(first_case)
        facts = replace(facts, vanishes_without_ort_optimisation=vanishes,
                        ort_rewrite=runner.rewrite_of(first) if vanishes and first else "")

    if fp16 or _is_fp16(graph):
        facts, fp16_notes = _fp16_facts(facts, main, graph, fp32_path, fix_fp16, loaded,
                                        main_input, out, settings, say)
        notes += fp16_notes
    if facts.instrumentation_delta:
        notes.append(f"Exposing intermediate tensors changed the final output by up to "
                     f"{facts.instrumentation_delta:.3g} (onnxruntime fuses fewer nodes when their "
                     "outputs are exposed); the layer figures come from the instrumented run, "
                     "the verdict on outputs too.")
    if facts.input_mutated:
        notes.append("The model changes its input tensor in place during forward; "
                     "layerdiff gave PyTorch and ONNX their own copies.")
    if not main.calls:
        notes.append("No submodule outputs were captured (TorchScript modules take no forward "
                     "hooks): only the final outputs are compared.")
    notes += [n for r in results for n in r.notes]
    # --- previews and minimal reproducer of the first divergence (numeric kinds only)
    previews: dict[str, np.ndarray] = {}
    written = None
    if first is not None and first_case is not None and first.kind in repro.KINDS:
        previews = _previews(first_case)
        if reproducer_for is not None:
            say("writing the minimal reproducer")
            note, written = _write_reproducer(graph, first_case, reproducer_for)
            if written is None:  # say why it is missing; when written, the record holds it
                notes.append(note)

    diagnosis = Diagnosis(
        verdict=verdict,
        summary=judge.summarise(verdict, layers, outputs, first, masked, rtol, atol,
                                len(main.alignment.unmatched_torch)),
        model=loaded, onnx=source, settings=settings, versions=versions(graph),
        outputs=tuple(outputs), layers=tuple(layers), first_divergence=first, masked=masked,
        alignment=main.alignment, calls=tuple(main.calls),
        cases=tuple(r.summary() for r in results) + tuple(skipped) if len(results) + len(skipped) > 1 else (),
        facts=facts, notes=tuple(dict.fromkeys(n for n in notes if n)), previews=previews,
        reproducer=written,
    )
    return replace(diagnosis, suggestions=suggest(diagnosis))


def explain_alignment(
    model: str | Path | torch.nn.Module | LoadedModel, onnx: str | Path, *,
    input_shape: tuple[int, ...] | None = None, seed: int = 0, trust_pickle: bool = False,
) -> tuple[list[TorchCall], Alignment]:
    """Only the pairing of module calls with ONNX tensors, for ``layerdiff align``."""
    files.check_inputs(files.given_inputs(model if isinstance(model, (str, Path)) else None,
                                          onnx, ()))
    loaded = _load(model, trust_pickle)
    shape = tuple(input_shape) if input_shape else (1, loaded.input_channels, 64, 64)
    graph = capture_onnx.load_graph(describe_onnx(onnx).path)
    # The pairing needs the calls and their weights, not the activations.
    captured = capture_torch.capture(loaded.module, cases_.random_input(shape, seed),
                                     visit=lambda index, value: None)
    return captured.calls, align(captured.calls, captured.parameters, graph)


make_input = cases_.random_input  # uniform [0, 1] input, reproducible from its seed


def versions(graph: capture_onnx.OnnxGraph | None = None) -> dict[str, str]:
    import onnx
    import onnxruntime

    from . import __version__

    found = {
        "layerdiff": __version__, "python": platform.python_version(),
        "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
    }
    try:
        import spandrel

        found["spandrel"] = spandrel.__version__
    except (ImportError, AttributeError):
        pass
    if graph is not None and graph.opset is not None:
        found["opset"] = str(graph.opset)
    return found


# --------------------------------------------------------------------------- combining inputs

# A measured result outranks an unmeasured one: "not_run" (onnxruntime failed before
# the layer on some input) never hides how the layer did where it ran.
_SEVERITY = {LayerStatus.FAIL: 3, LayerStatus.PROPAGATED: 2, LayerStatus.PASS: 1,
             LayerStatus.IGNORED: 1, LayerStatus.NOT_RUN: 0}


def _normalised_error(layer: LayerResult) -> float:
    m = layer.metrics
    return 0.0 if m is None else m.max_abs / max(m.scale, 1e-30)


def _worst_layers(results: list[_Case]) -> list[LayerResult]:
    """Each layer once, as it did on the input where it was worst."""
    if len(results) == 1:
        return results[0].layers
    worst: dict[tuple[str, str], LayerResult] = {}
    for case in results:
        for layer in case.layers:
            key = (layer.module, layer.onnx_tensor)
            mine = (_SEVERITY.get(layer.status, 0), _normalised_error(layer))
            held = worst.get(key)
            if held is None or mine > (_SEVERITY.get(held.status, 0), _normalised_error(held)):
                worst[key] = replace(layer, case=case.label)
    return sorted(worst.values(), key=lambda l: l.order)


def _worst_outputs(results: list[_Case]) -> list[OutputResult]:
    by_name: dict[str, OutputResult] = {}
    for case in results:
        for out in case.outputs:
            held = by_name.get(out.name)
            if held is None or (not out.passed, out.metrics.max_abs) > (not held.passed, held.metrics.max_abs):
                by_name[out.name] = out
    return list(by_name.values())


def _first_divergence(results: list[_Case], layers: list[LayerResult]
                      ) -> tuple[FirstDivergence | None, _Case | None]:
    """The earliest first divergence over all inputs (execution order), with its input;
    its ``layer`` is its row in ``layers``, the inputs combined (_worst_layers)."""
    best: tuple[int, FirstDivergence, _Case] | None = None
    for case in results:
        if case.first is None:
            continue
        position = _position(case)
        if best is None or position < best[0]:
            best = (position, case.first, case)
    if best is None:
        return None, None
    _, first, case = best
    if len(results) == 1:
        return first, case
    row = None
    if first.layer is not None:
        mine = case.layers[first.layer]
        row = next(i for i, l in enumerate(layers)
                   if (l.module, l.onnx_tensor) == (mine.module, mine.onnx_tensor))
    return replace(first, case=case.label, layer=row), case


def _position(case: _Case) -> int:
    first = case.first
    if first.kind != DivergenceKind.RUNTIME_ERROR:  # a failing layer
        return case.layers[first.layer].order
    return next((p.order for p in case.alignment.pairs if p.onnx_node == first.onnx_node), 10**9)


# --------------------------------------------------------------------------- previews, reproducer

PREVIEW_SIDE = 256  # larger |diff| maps are reduced (block max) to about this many pixels


def _first_pair(case: _Case):
    """The alignment pair of the case's first divergence, when it is a failing layer."""
    first = case.first
    if first is None or first.kind not in repro.KINDS:
        return None
    return case.alignment.pairs[first.layer]  # one layer per pair, in the same order


def _previews(case: _Case) -> dict[str, np.ndarray]:
    """|torch - onnx| of the first diverging layer and of the final output, small 2-D maps."""
    previews = {}
    pair = _first_pair(case)
    if pair is not None and case.first_onnx is not None:
        diff = _diff_map(case.activations[pair.call], case.first_onnx)
        if diff is not None:
            previews[f"first divergence |diff|: {case.calls[pair.call].label}"] = diff
    if case.final_outputs and case.torch_outputs:
        diff = _diff_map(case.torch_outputs[0], case.final_outputs[0])
        if diff is not None:
            previews["final output |diff|"] = diff
    return previews


def _diff_map(torch_value: np.ndarray, onnx_value: np.ndarray) -> np.ndarray | None:
    """First batch item, max over channels (N,C,H,W), block max down to ~PREVIEW_SIDE.
    Computed a band of rows at a time: an output at 4096 px is GBs, its map is not."""
    if torch_value.shape != onnx_value.shape or not torch_value.size:
        return None
    a, b = (_as_maps(v) for v in (torch_value, onnx_value))  # views: (maps, H, W)
    _, h, w = a.shape
    sy, sx = -(-h // PREVIEW_SIDE), -(-w // PREVIEW_SIDE)
    rows = sy * max(1, CHUNK // (sy * a.shape[0] * w))  # a multiple of sy
    bands = []
    for lo in range(0, h, rows):
        band = np.abs(a[:, lo:lo + rows].astype(np.float32)
                      - b[:, lo:lo + rows].astype(np.float32)).max(axis=0)
        if sy > 1 or sx > 1:
            height = band.shape[0]
            padded = np.zeros((-(-height // sy) * sy, -(-w // sx) * sx), dtype=band.dtype)
            padded[:height, :w] = band
            band = padded.reshape(padded.shape[0] // sy, sy, padded.shape[1] // sx, sx).max(axis=(1, 3))
        bands.append(band)
    return np.ascontiguousarray(np.concatenate(bands))


def _as_maps(value: np.ndarray) -> np.ndarray:
    """The 2-D maps a preview takes the max over, as (maps, H, W): the first batch
    item's channels for N,C,H,W (and beyond), the first item for N,H,W."""
    if value.ndim >= 4:
        return value[0].reshape(-1, *value.shape[-2:])
    if value.ndim == 3:
        return value[:1]
    return np.atleast_2d(value)[None]


def _write_reproducer(graph: capture_onnx.OnnxGraph, case: _Case, report: str | Path):
    """Write the first divergence's minimal reproducer next to ``report``: (note, paths)."""
    pair = _first_pair(case)
    if pair is None:
        return "", None
    aligned = {p.onnx_tensor: p.call for p in reversed(case.alignment.pairs)}
    values = {}
    for name in repro.boundary(graph, pair.onnx_tensor, set(aligned)):
        values[name] = case.feeds[name] if name in case.feeds else case.activations[aligned[name]]
    try:
        parts = repro.build(graph, pair.onnx_tensor, values, case.activations[pair.call],
                            case.calls[pair.call].label)
        onnx_path, npz_path = repro.write(parts, report)
        return "", (str(onnx_path), str(npz_path))
    except Exception as exc:  # an extra; the diagnosis stands without it
        return f"No minimal reproducer was written: {exc}", None


# --------------------------------------------------------------------------- helpers


def _load(model: Any, trust_pickle: bool) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        return from_module(model)
    return load_model(model, trust_pickle=trust_pickle)


def _stem(model: LoadedModel) -> str:
    return model.path.stem if model.path else model.architecture.lower()


def _sizes(check_sizes, shape: tuple[int, ...], graph: capture_onnx.OnnxGraph):
    """Other sizes to run at, and a note when the graph cannot take any."""
    declared = graph.inputs[0][2] if graph.inputs else ()
    fixed = len(declared) == 4 and all(isinstance(d, int) for d in declared[-2:])
    if check_sizes is None:
        if fixed:
            return [], (f"the ONNX input is fixed at {tuple(declared)}: other sizes were not "
                        "checked (export with dynamic height and width to use other sizes)")
        return [cases_.default_check_size(*shape[-2:])], ""
    return [tuple(s) for s in check_sizes], ""


def _random_ops(case: _Case, graph: capture_onnx.OnnxGraph) -> tuple[RandomOp, ...]:
    return (tuple(RandomOp(Side.TORCH, where, op) for where, op in case.random_ops)
            + tuple(RandomOp(Side.ONNX, n.name, n.op_type) for n in capture_onnx.random_nodes(graph)))


def _training_nodes(graph: capture_onnx.OnnxGraph) -> tuple[str, ...]:
    return tuple(n.name for n in graph.nodes
                 if (n.op_type == "BatchNormalization" and n.attrs.get("training_mode") == 1)
                 or (n.op_type == "Dropout" and len(n.inputs) > 2 and n.inputs[2]
                     and bool(np.any(graph.constants.get(n.inputs[2], np.array(True))))))


def _is_fp16(graph: capture_onnx.OnnxGraph) -> bool:
    from . import fp16 as half

    return half.is_fp16(graph.model)


def _as_fp16(source: OnnxSource, loaded: LoadedModel, example: torch.Tensor, out: Path,
             method: str, say: Progress, given: files.Inputs) -> tuple[OnnxSource, Path | None]:
    """The float16 file to diagnose, and the float32 one it came from (if any)."""
    from . import fp16 as half

    if half.is_fp16(source.path):
        return source, None
    files.check_outputs({"the float16 ONNX file": files.fp16_path(out)}, given)
    say(f"making a float16 model ({method})")
    out.parent.mkdir(parents=True, exist_ok=True)
    path, how = half.make_fp16_onnx(loaded, example, source.path,
                                    files.fp16_path(out), method)
    return replace(source, path=path, notes=source.notes + (f"float16 model: {how}",)), source.path


def _fp16_facts(facts: Facts, main: _Case, graph, fp32_path: Path | None, fix_path,
                loaded: LoadedModel, example: torch.Tensor, out: Path, settings: Settings,
                say: Progress) -> tuple[Facts, list[str]]:
    from . import fp16 as half

    notes = []
    note = half.provider_note(graph.model, settings.provider)
    if note:
        notes.append(note)
    findings = half.analyse(main.calls, main.activations, main.layers, fp32_path or graph)
    fix = None
    if fix_path is not None:
        if not findings.keep:
            notes.append("--fix-fp16: no layer needs float32, so no mixed-precision file was written")
        else:
            if fp32_path is None:
                say("exporting a float32 model to build the mixed-precision one from")
                fp32_path = export_onnx(loaded, example, files.fp32_path(out),
                                        exporter="legacy").path
            say("writing and checking the mixed-precision model")
            mixed = half.keep_in_fp32(fp32_path, findings.node_names, fix_path)
            check = diagnose(loaded, mixed, input_shape=settings.input_shape, seed=settings.seed,
                             rtol=settings.rtol, atol=settings.atol, check_sizes=(),
                             reference="none", ort_level=settings.ort_level,
                             ort_config=dict(settings.ort_config), provider=settings.provider)
            fix = (str(mixed), check.verdict)
    return replace(facts, fp16=findings, fp16_fix=fix), notes


def _error_diagnosis(model: LoadedModel, source: OnnxSource, settings: Settings,
                     message: str, hint: str) -> Diagnosis:
    diagnosis = Diagnosis(
        verdict=Verdict.ERROR, summary=f"{message}. {hint}".strip(), model=model, onnx=source,
        settings=settings, versions=versions(), error=message,
    )
    # Rules may still explain why the file cannot load (an op missing at this opset).
    return replace(diagnosis, suggestions=suggest(diagnosis))
