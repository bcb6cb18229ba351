"""The diagnosis pipeline: one function that runs every stage in order.

load model -> get ONNX (export or given) -> for each input (random, files, other sizes),
within the memory budget (run_case.py): capture torch -> align -> run ONNX segment by
segment, comparing as the tensors arrive -> for failing layers only, the float64 referee
and their local runs -> then combine the inputs (each layer keeps its worst), find the
first divergence, re-check without ORT optimisation, apply the rules.
"""

from __future__ import annotations

import functools
import math
import platform
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import capture_onnx, capture_torch, divergence as judge, inputs as cases_, reproducer as repro
from . import (across_runtimes, files, footprint as forward_memory, pictures as pictures_,
               preflight, quality, runtimes)
from . import store as memory
from .align import align
from .compare import CHUNK
from .errors import LayerdiffError, UsageError
from .exporting import Example, describe_onnx, export_onnx
from .models import from_module, load_model, model_file, output_stem
from .options import Options
from .progress import Progress, silent
from .records import (
    HISTOGRAM_PREFIX, Alignment, CaseKind, CaseResult, CaseVerdict, Diagnosis, DivergenceKind, Facts,
    FirstDivergence, InputKind, InputSpec, LayerResult, LayerStatus, LoadedModel, ModelKind, OnnxSource,
    OutputResult, Picture, RandomOp, Settings, Side, TorchCall, Verdict,
)
from .rules import suggest
from .run_case import CaseRun as _Case, CaseRunner

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
    inputs: torch.Tensor | tuple | dict | None = None,
    options: Options | None = None,
    progress: Progress | None = None,
    **settings: Any,
) -> Diagnosis:
    """Compare ``model`` with its ONNX export layer by layer and return a Diagnosis.

    ``model`` is a path (spandrel state dict, TorchScript archive), a Python entry point
    ``file.py:NAME``, an ``nn.Module`` or a LoadedModel. Without ``onnx`` the model is
    exported into ``options.output_dir``. ``inputs``: the model's main input values (a
    tensor, a tuple in forward()'s order, or a dict by name); without them, random values
    drawn for each input by its kind (inputs/). ``options`` (options.Options), or its
    fields as keywords (``rtol=1e-4``), say the rest: more random inputs (``samples``),
    files, other sizes (``check_sizes``; None: one odd size of the inputs' free axes when
    the graph has any), the float64 referee (``reference``), float16
    (``fp16``, ``fix_fp16``), onnxruntime's level, config and provider, and the memory
    budget (``max_memory``: activations beyond it go to disk and ONNX runs in segments;
    a UsageError says so up front when the forward alone cannot fit). Raises
    LayerdiffError for input the user must fix. With ``reproducer_for`` (the report's
    path) and a numeric first divergence, the minimal reproducer is written next to it.
    ``weights``: a state dict file loaded into the module a Python entry point builds.
    ``provider``: the runtime (runtimes/: an onnxruntime execution provider, OpenVINO),
    or several, or "all": each is diagnosed in a run of its own (PyTorch runs again for
    each) and the Diagnosis is the first with the worst verdict, with every runtime's
    outcome in ``runtimes`` and where they first disagree in ``runtime_departure``.
    """
    opts = replace(options or Options(), **settings)
    opts.check()
    names = runtimes.resolve(opts.provider)
    if len(names) == 1:
        return _diagnose(model, onnx, inputs, replace(opts, provider=names[0]), progress)
    say = progress or silent
    runs: list[tuple[str, Diagnosis | LayerdiffError]] = []
    first: Diagnosis | None = None
    reproducer = opts.reproducer_for
    for name in names:
        say(f"runtime {name}")
        # The first run exports or converts (when asked) and writes --fix-fp16; the others
        # diagnose the file it ran. The reproducer comes from the first run that diverges.
        once = {} if first is None else {"fix_fp16": None}
        given = onnx if first is None or first.onnx is None else first.onnx.path
        try:
            d = _diagnose(model, given, inputs,
                          replace(opts, provider=name, reproducer_for=reproducer, **once),
                          progress)
        except LayerdiffError as exc:
            if first is None:
                raise
            runs.append((name, exc))
            continue
        first = first or d
        reproducer = None if d.reproducer is not None else reproducer
        runs.append((name, d))
    return across_runtimes.combine(runs, source=first.onnx)


def _diagnose(model, onnx, inputs, opts: Options, progress: Progress | None) -> Diagnosis:
    """diagnose() on one runtime, ``opts.provider``."""
    rtol = opts.rtol if opts.rtol is not None else (1e-2 if opts.fp16 else 1e-3)
    atol = opts.atol if opts.atol is not None else (1e-3 if opts.fp16 else 1e-5)
    say = progress or silent
    if opts.ort_level not in capture_onnx.LEVELS:
        raise UsageError(f"unknown onnxruntime optimisation level '{opts.ort_level}'",
                         hint="use one of: " + ", ".join(capture_onnx.LEVELS))
    if opts.reference not in ("float64", "none"):
        raise UsageError(f"unknown reference '{opts.reference}'", hint="use float64 or none")
    runtime = runtimes.get(opts.provider)
    if runtime.onnxruntime:
        capture_onnx.check_config(runtime.name, opts.ort_level,
                                  tuple((opts.ort_config or {}).items()))
    files_in = tuple(opts.input_files) + ((str(opts.input_data),) if opts.input_data else ())
    given = files.given_inputs(_model_file(model), onnx, files_in, weights=opts.weights)

    def planned(stem: str) -> dict[str, Path | None]:
        return files.planned_outputs(stem, onnx=onnx, output_dir=opts.output_dir, fp16=opts.fp16,
                                     fix_fp16=opts.fix_fp16, report=opts.reproducer_for)

    files.check_inputs(given)
    if isinstance(model, (str, Path)):  # checked before the model is even read
        files.check_outputs(planned(output_stem(model)), given)
    data = cases_.read_npz(opts.input_data) if opts.input_data else None

    say("loading model")
    loaded = _load(model, opts.trust_pickle, opts.weights)
    files.check_outputs(planned(_stem(loaded)), given)
    request = cases_.Request(shapes=opts.shapes(), ranges=opts.input_range, data=data or {})
    user_graph = capture_onnx.load_graph(describe_onnx(onnx).path) if onnx else None
    specs, _ = _specs(loaded, user_graph, request)
    given_values = cases_.values_from(specs, inputs) if inputs is not None else None
    if given_values:  # the given values fix the shapes
        specs = tuple(replace(s, shape=tuple(given_values[s.name].shape)) for s in specs)
    limit = opts.max_memory or memory.default_max_memory()
    # Before anything runs at full size (export included): refuse what cannot fit.
    footprint = _forward_fits(loaded, specs, opts.check_sizes, limit, say)
    main_values = given_values or cases_.draw(specs, opts.seed)

    out = files.export_path(opts.output_dir, _stem(loaded))
    # Made once, when an export needs it: naming the outputs runs the model.
    example = functools.cache(lambda: _example(loaded, specs, main_values))
    if onnx is None:
        say(f"exporting with the {opts.exporter} exporter")
        out.parent.mkdir(parents=True, exist_ok=True)
        source = export_onnx(loaded, example(), out, exporter=opts.exporter, opset=opts.opset)
        export_size = tuple(specs[0].shape[-2:]) if len(specs[0].shape) == 4 else None
    else:
        source = describe_onnx(onnx)
        export_size = None
    fp32_path = None
    if opts.fp16:
        source, fp32_path = _as_fp16(source, loaded, example, out, opts.fp16_method, say, given)
    graph = (user_graph if user_graph is not None and source.path == Path(onnx)
             else capture_onnx.load_graph(source.path))
    # Now with the file that runs: its input names, dtypes and free axes.
    fixed = cases_.Request(shapes={s.name: s.shape for s in specs},
                           ranges={s.name: (s.low, s.high) for s in specs if s.low is not None},
                           data=request.data)
    specs, pairing = _specs(loaded, graph, fixed, exported=onnx is None)
    preflight.check_pairing(loaded, graph, specs)
    notes = list(source.notes) + list(loaded.notes) + pairing

    sizes, size_note = _sizes(opts.check_sizes, specs)
    if size_note:
        notes.append(size_note)
    settings = Settings(rtol=rtol, atol=atol, input_specs=specs, seed=opts.seed,
                        ignore=tuple(opts.ignore), provider=opts.provider,
                        ort_level=opts.ort_level,
                        ort_config=tuple((opts.ort_config or {}).items()),
                        reference=opts.reference, samples=opts.samples, fp16=opts.fp16,
                        input_files=tuple(str(i) for i in files_in),
                        check_sizes=tuple(sizes), max_memory=limit)
    held, peak_before = memory.current_rss(), memory.peak_rss()
    # Shared out against the high end of the estimate; refused (above) only on the low.
    forward = 0
    if footprint is not None:
        largest = max([tuple(specs[0].shape[-2:]), *sizes], key=lambda s: s[0] * s[1])
        forward = footprint.forward(*largest, forward_memory.RSS_FACTOR_HIGH)
    store_bytes, segment_bytes = budgets(limit, held, forward)
    budget = forward_memory.Budget(limit, store_bytes, segment_bytes, footprint)
    case_list = cases_.cases(specs, opts.seed, samples=opts.samples, files=opts.input_files,
                             data=data, data_label=Path(opts.input_data).name if data else "",
                             sizes=sizes, given=given_values, photo=opts.photo)
    settings = replace(settings, photo=any(c.kind == CaseKind.PHOTO for c in case_list))
    # The default other size is odd; a model that takes only multiples of 8 or 16 gets a
    # nearby aligned one instead, rather than no other size at all.
    instead = cases_.retries(specs, opts.seed, sizes) if opts.check_sizes is None else {}
    with memory.Spill(store_bytes) as spill:
        runner = CaseRunner(loaded, graph, settings, say, spill, budget, runtime)
        diagnosis = _run_cases(runner, loaded, source, graph, settings, notes, case_list,
                               main_values, out, fp32_path, opts.fix_fp16, export_size,
                               opts.reproducer_for, instead)
        spilled = spill.written_bytes
    facts = _memory_facts(diagnosis.facts, settings.max_memory, held, peak_before, spilled)
    facts = replace(facts, forward_memory=forward or None,
                    skipped_for_memory=tuple(runner.skipped))
    notes = list(diagnosis.notes) + list(runner.skipped.values())
    if not runtime.onnxruntime:
        notes.append(f"Ran on {runtime.describe()}. --ort-level, --ort-config, the re-check "
                     "with onnxruntime's graph optimisations off and the rewrite lookup are "
                     "onnxruntime's and were not used.")
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


def _specs(loaded: LoadedModel, graph: capture_onnx.OnnxGraph | None, request,
           exported: bool = False):
    return cases_.resolve(loaded.module, loaded.inputs, graph.inputs if graph else None,
                          request, channels=loaded.input_channels, exported=exported)


def export_specs(loaded: LoadedModel, options: Options) -> tuple[InputSpec, ...]:
    """The inputs ``options`` describe for ``loaded``, before there is an ONNX file."""
    data = cases_.read_npz(options.input_data) if options.input_data else None
    request = cases_.Request(shapes=options.shapes(), ranges=options.input_range, data=data or {})
    return _specs(loaded, None, request)[0]


def export_example(loaded: LoadedModel, options: Options) -> tuple[Example, tuple[InputSpec, ...]]:
    """What an export of ``loaded`` traces at the inputs ``options`` describe (drawn
    from its seed), and those inputs."""
    specs = export_specs(loaded, options)
    return _example(loaded, specs, cases_.draw(specs, options.seed)), specs


def _example(loaded: LoadedModel, specs, values) -> Example:
    """What an export traces: the image model's one input named "input" as before; any
    other model's inputs by their names, and its outputs by what forward() returns."""
    image = len(specs) == 1 and specs[0].kind == InputKind.IMAGE and not specs[0].keyword
    if image and loaded.kind == ModelKind.SPANDREL:  # one image out, as spandrel runs it
        return Example.image(values[specs[0].name])
    args, kwargs = cases_.as_call(specs, values)
    outputs = capture_torch.output_names(loaded.module, (args, kwargs))
    if image and outputs == ["output"]:
        return Example.image(values[specs[0].name])
    return Example(args, kwargs, tuple(s.name for s in specs),
                   {s.name: s.dynamic_axes for s in specs if s.dynamic_axes},
                   tuple(outputs) if outputs != ["output"] else ("output",))


def budgets(limit: int, held: int, forward: int = 0) -> tuple[int, int]:
    """Bytes of PyTorch activations kept in RAM, and of aligned tensors per ONNX segment,
    for a diagnosis that may use ``limit`` bytes in a process holding ``held`` now,
    whose model's forward needs ``forward`` (0: unknown)."""
    headroom = max(limit - held - forward, 64 * 2**20)
    return int(STORE_SHARE * headroom), int(SEGMENT_SHARE * headroom)


LOADING = 256 * 2**20  # see _forward_fits


def _forward_fits(loaded: LoadedModel, specs, check_sizes, limit: int,
                  say: Progress) -> forward_memory.Footprint | None:
    """The forward's estimated footprint (None when unknown: only a model of one image
    input is estimated); a UsageError when the forward alone, at the largest input size
    known now, cannot fit ``limit``."""
    if len(specs) != 1 or specs[0].kind != InputKind.IMAGE or specs[0].keyword:
        return None
    shape = specs[0].shape
    say("estimating the memory of the model's forward")
    footprint = forward_memory.estimate(loaded.module, shape)
    if footprint is None:
        return None
    sizes = [tuple(shape[-2:]), *(tuple(s) for s in check_sizes or () if len(s) == 2)]
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
               case_list: list[cases_.Case], main_values: dict[str, torch.Tensor], out: Path,
               fp32_path: Path | None, fix_fp16, export_size, reproducer_for,
               instead: dict[str, cases_.Case] | None = None) -> Diagnosis:
    """Run every case (``instead``: a case to run in place of one PyTorch fails on, by
    label) and combine them into the diagnosis."""
    say = runner.say
    case_list, instead = list(case_list), dict(instead or {})
    rtol, atol, ort_level, fp16 = settings.rtol, settings.atol, settings.ort_level, settings.fp16
    results: list[_Case] = []
    skipped: list[CaseResult] = []
    for number, case in enumerate(case_list):
        say(f"input {number + 1}: {case.label}")
        try:
            results.append(_screened(runner, case, number, results) or runner.run(case, number))
        except capture_onnx.OnnxLoadError as exc:
            if number == 0:
                return _error_diagnosis(loaded, source, settings, str(exc), exc.hint)
            skipped.append(CaseResult(case.label, case.shape, CaseVerdict.SKIPPED, case.kind,
                                      note=f"onnxruntime cannot run it: {exc.message}"))
        except LayerdiffError as exc:
            if number == 0 or case.kind in (CaseKind.FILE, CaseKind.DATA):
                raise
            other = instead.pop(case.label, None)
            also = f"; ran {other.label} instead" if other is not None else ""
            if other is not None:
                case_list.append(other)  # run by this same loop
            skipped.append(CaseResult(case.label, case.shape, CaseVerdict.SKIPPED, case.kind,
                                      note=f"PyTorch itself fails here: {exc.message}{also}"))
    main = results[0]

    pictures = _pictures(results, settings.input_specs)
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
        onnx_input_shape=_declared(graph, settings.input_specs),
        ort_optimisation_level=ort_level,
        # A plain run draws other random numbers: it would measure the draws, not fusions.
        instrumentation_delta=(None if any(r.side == Side.ONNX for r in random_ops)
                               else runner.instrumentation_delta(main)),
        export_size=export_size,
        segments=len(main.plan),
        runtime_precision=runner.runtime.precision(),
        runtime_detail=runner.runtime.describe(),
    )
    if verdict == Verdict.DIVERGED and ort_level != "disable" and first_case is not None \
            and first_case.failure is None and runner.runtime.onnxruntime:
        say("re-running with onnxruntime graph optimisations off")
        vanishes = runner.passes_unoptimised(first_case, first)
        facts = replace(facts, vanishes_without_ort_optimisation=vanishes,
                        ort_rewrite=runner.rewrite_of(first) if vanishes and first else "")

    if fp16 or _is_fp16(graph):
        facts, fp16_notes = _fp16_facts(facts, main, graph, fp32_path, fix_fp16, loaded,
                                        main_values, out, settings, say)
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
        cases=tuple(_summary(r, first_case) for r in results) + tuple(skipped)
        if len(results) + len(skipped) > 1 else (),
        facts=facts, notes=tuple(dict.fromkeys(n for n in notes if n)), previews=previews,
        reproducer=written, pictures=pictures,
    )
    return replace(diagnosis, suggestions=suggest(diagnosis))


def _screened(runner: CaseRunner, case: cases_.Case, number: int,
              results: list[_Case]) -> _Case | None:
    """An input after the first, compared by its outputs alone when that settles it: they
    pass, or a divergence was already located layer by layer on an earlier input. Else
    None: the input is walked layer by layer (to find where it diverges)."""
    if not results:
        return None
    run = runner.screen(case, number)
    if run is None or not (run.passed or any(r.first is not None for r in results)):
        return None
    return run


def explain_alignment(
    model: str | Path | torch.nn.Module | LoadedModel, onnx: str | Path, *,
    input_shape: tuple[int, ...] | dict | None = None, seed: int = 0,
    trust_pickle: bool = False, input_range: dict | None = None,
    weights: str | Path | None = None,
) -> tuple[list[TorchCall], Alignment]:
    """Only the pairing of module calls with ONNX tensors, for ``layerdiff align``."""
    files.check_inputs(files.given_inputs(_model_file(model), onnx, (), weights=weights))
    loaded = _load(model, trust_pickle, weights)
    graph = capture_onnx.load_graph(describe_onnx(onnx).path)
    shapes = Options(input_shape=input_shape).shapes()
    specs, _ = _specs(loaded, graph, cases_.Request(shapes=shapes, ranges=input_range or {}))
    # The pairing needs the calls and their weights, not the activations.
    captured = capture_torch.capture(loaded.module, cases_.as_call(specs, cases_.draw(specs, seed)),
                                     visit=lambda index, value: None)
    return captured.calls, align(captured.calls, captured.parameters, graph,
                                 [s.onnx_name for s in specs])


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
    if "openvino" in sys.modules:  # imported only when a runtime used it
        from .runtimes import openvino

        found["openvino"] = openvino.version()
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


def _summary(case: _Case, first_case: _Case | None) -> CaseResult:
    """``case``'s row; a screened one says where its layers were compared instead."""
    if not case.screened or case.passed or first_case is None:
        return case.summary()
    return case.summary(note=f"outputs compared; the layers were compared on "
                             f"{first_case.label}, where the first divergence is")


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
    """Each output as it did on the input where it was worst; an image output with its
    lowest PSNR over the inputs (NaN lowest of all)."""
    by_name: dict[str, OutputResult] = {}
    for case in results:
        for out in case.outputs:
            held = by_name.get(out.name)
            if held is None or (not out.passed, out.metrics.max_abs) > (not held.passed, held.metrics.max_abs):
                by_name[out.name] = out
    images = [image for case in results for image in case.images]
    for name, out in by_name.items():
        mine = [image for image in images if image.output == name]
        if mine:
            worst = min(mine, key=lambda image: (not math.isnan(image.psnr), image.psnr))
            by_name[name] = replace(out, image=worst)
    return list(by_name.values())


MAX_PICTURES = 6  # pictures kept for the report (a few hundred KB each)


def _pictures(results: list[_Case], specs) -> tuple[Picture, ...]:
    """Measure every input's image outputs (PSNR, SSIM: kept on each input's run), and
    make the report's pictures of them on the real images (--input, --input-data, the
    bundled photo, given values), or on the main input when no real image ran."""
    if not pictures_.image_model(specs):
        return ()
    for case in results:
        case.images = pictures_.measure(case.label, case.outputs, case.torch_outputs,
                                        case.final_outputs)
    shown = [case for case in results if case.kind in pictures_.REAL] or results[:1]
    made: list[Picture] = []
    for case in shown:
        for image in case.images:
            if len(made) == MAX_PICTURES:
                return tuple(made)
            k = next(i for i, out in enumerate(case.outputs) if out.name == image.output)
            made.append(pictures_.picture(image, case.tensor, case.torch_outputs[k],
                                          case.final_outputs[k]))
    return tuple(made)


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


PREVIEW_CHANNELS = 4  # channels of the first divergence shown, those with the largest error
HISTOGRAM_BINS, HISTOGRAM_FLOOR = 20, 1e-9  # log-spaced bins of |diff|, as report_visuals'


def _previews(case: _Case) -> dict[str, np.ndarray]:
    """Small 2-D |torch - onnx| maps: the first diverging layer's channels with the
    largest error (with a histogram of its whole tensor), and the final output's map
    (max over channels)."""
    previews = {}
    pair = _first_pair(case)
    if pair is not None and case.first_onnx is not None:
        reference, value = case.activations[pair.call], case.first_onnx
        title = f"first divergence |diff|: {case.calls[pair.call].label}"
        maps = _channel_maps(reference, value)
        histogram = _diff_histogram(reference, value) if maps else None
        if histogram is not None:  # named after the maps: it stands for all of them
            previews[HISTOGRAM_PREFIX + title] = histogram
        for channel, count, diff in maps:
            name = title if channel is None else f"{title}, channel {channel} of {count}"
            previews[name] = diff
    if case.final_outputs and case.torch_outputs:
        diff = _diff_map(case.torch_outputs[0], case.final_outputs[0])
        if diff is not None:
            previews["final output |diff|"] = diff
    return previews


def _channel_maps(torch_value: np.ndarray, onnx_value: np.ndarray
                  ) -> list[tuple[int | None, int, np.ndarray]]:
    """(channel, channels, |diff| map) of the PREVIEW_CHANNELS channels of the first
    batch item with the largest max |diff| (NaN largest), in channel order; one map with
    channel None for a tensor without channels (fewer than 4 dimensions)."""
    if torch_value.shape != onnx_value.shape or not torch_value.size:
        return []
    if torch_value.ndim < 4:
        diff = _diff_map(torch_value, onnx_value)
        return [] if diff is None else [(None, 1, diff)]
    a, b = _as_maps(torch_value), _as_maps(onnx_value)
    height, width = a.shape[1:]
    rows = max(1, CHUNK // width)
    done = quality.read_once(torch_value, onnx_value)  # a layer at 4096 px is GBs
    worst = []
    for c in range(a.shape[0]):
        top = 0.0
        for lo in range(0, height, rows):
            d = np.abs(a[c, lo:lo + rows].astype(np.float32) - b[c, lo:lo + rows].astype(np.float32))
            top = max(top, np.inf if np.isnan(d).any() else float(d.max(initial=0.0)))
            done((c * height + lo + rows) * width)
        worst.append(top)
    chosen = sorted(sorted(range(len(worst)), key=lambda c: -worst[c])[:PREVIEW_CHANNELS])
    maps = []
    for c in chosen:
        diff = _diff_map(a[c][None], b[c][None])
        if diff is not None:
            maps.append((c, a.shape[0], diff))
    return maps


def _diff_histogram(torch_value: np.ndarray, onnx_value: np.ndarray) -> np.ndarray | None:
    """|torch - onnx| over the whole tensor in log-spaced bins from HISTOGRAM_FLOOR to
    its max, as report_visuals reads an explicit histogram: [edges, counts + one pad]."""
    flat_a, flat_b = torch_value.reshape(-1), onnx_value.reshape(-1)
    top = 0.0
    done = quality.read_once(torch_value, onnx_value)
    for lo in range(0, flat_a.size, CHUNK):
        d = np.abs(flat_a[lo:lo + CHUNK].astype(np.float64) - flat_b[lo:lo + CHUNK])
        d = d[np.isfinite(d)]
        if d.size:
            top = max(top, float(d.max()))
        done(lo + CHUNK)
    if top <= HISTOGRAM_FLOOR:
        return None
    edges = np.logspace(math.log10(HISTOGRAM_FLOOR), math.log10(top), HISTOGRAM_BINS + 1)
    counts = np.zeros(HISTOGRAM_BINS)
    done = quality.read_once(torch_value, onnx_value)
    for lo in range(0, flat_a.size, CHUNK):
        d = np.abs(flat_a[lo:lo + CHUNK].astype(np.float64) - flat_b[lo:lo + CHUNK])
        d = d[np.isfinite(d) & (d >= HISTOGRAM_FLOOR)]
        counts += np.histogram(np.clip(d, edges[0], edges[-1]), bins=edges)[0]
        done(lo + CHUNK)
    return np.stack([edges, np.append(counts, 0.0)])


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


def _load(model: Any, trust_pickle: bool, weights: str | Path | None = None) -> LoadedModel:
    if isinstance(model, (LoadedModel, torch.nn.Module)) and weights is not None:
        raise UsageError("weights= goes with a Python entry point ('file.py:NAME'), not a "
                         "module in memory", hint="load the state dict into the module yourself")
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        return from_module(model)
    return load_model(model, weights=weights, trust_pickle=trust_pickle)


def _model_file(model: Any) -> Any:
    """The file the model is read from (a path, an entry point's .py file), or None."""
    return model_file(model) if isinstance(model, (str, Path)) else None


def _stem(model: LoadedModel) -> str:
    if model.stem:
        return model.stem
    return model.path.stem if model.path else model.architecture.lower()


def _sizes(check_sizes, specs) -> tuple[list[tuple[int, ...]], str]:
    """Other extents of the first free input's dynamic axes to run at, and a note when
    the graph fixes them all."""
    lead = next((s for s in specs if s.dynamic_axes), None)
    if check_sizes is None:
        if lead is None:
            first = specs[0]
            what = ("height and width" if first.kind == InputKind.IMAGE
                    else "sizes")
            return [], (f"the ONNX input is fixed at {tuple(first.shape)}: other sizes were not "
                        f"checked (export with dynamic {what} to use other sizes)")
        return [cases_.default_other_size(lead)], ""
    return [tuple(s) for s in check_sizes], ""


def _declared(graph: capture_onnx.OnnxGraph, specs) -> tuple:
    """The ONNX file's dimensions of the first input (as the graph declares them)."""
    dims = {name: shape for name, _, shape in graph.inputs}
    name = specs[0].onnx_name if specs else None
    return tuple(dims.get(name, ())) if name else ()


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


def _as_fp16(source: OnnxSource, loaded: LoadedModel, example: Callable[[], Example], out: Path,
             method: str, say: Progress, given: files.Inputs) -> tuple[OnnxSource, Path | None]:
    """The float16 file to diagnose, and the float32 one it came from (if any)."""
    from . import fp16 as half

    if half.is_fp16(source.path):
        return source, None
    files.check_outputs({"the float16 ONNX file": files.fp16_path(out)}, given)
    say(f"making a float16 model ({method})")
    out.parent.mkdir(parents=True, exist_ok=True)
    path, how = half.make_fp16_onnx(loaded, example(), source.path,
                                    files.fp16_path(out), method)
    return replace(source, path=path, notes=source.notes + (f"float16 model: {how}",)), source.path


def _fp16_facts(facts: Facts, main: _Case, graph, fp32_path: Path | None, fix_path,
                loaded: LoadedModel, main_values: dict, out: Path, settings: Settings,
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
                example = _example(loaded, settings.input_specs, main_values)
                fp32_path = export_onnx(loaded, example, files.fp32_path(out),
                                        exporter="legacy").path
            say("writing and checking the mixed-precision model")
            mixed = half.keep_in_fp32(fp32_path, findings.node_names, fix_path)
            check = diagnose(loaded, mixed, input_shape={s.name: s.shape for s in settings.input_specs},
                             input_range={s.name: (s.low, s.high) for s in settings.input_specs
                                          if s.low is not None},
                             seed=settings.seed,
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
