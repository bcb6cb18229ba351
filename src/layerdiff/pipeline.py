"""The diagnosis pipeline: one function that runs every stage in order.

load model -> get ONNX (export or given) -> capture torch -> read ONNX -> align
-> run ONNX with aligned tensors exposed -> compare -> first divergence -> rules.
"""

from __future__ import annotations

import inspect
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import capture_onnx, capture_torch, divergence as judge
from .align import align, drop_misfits
from .errors import UsageError
from .exporting import describe_onnx, export_onnx
from .loading import from_module, load_model
from .records import Diagnosis, Facts, LoadedModel, OnnxSource, Settings
from .rules import suggest

Progress = Callable[[str], None]


def diagnose(
    model: str | Path | torch.nn.Module | LoadedModel,
    onnx: str | Path | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    rtol: float = 1e-3,
    atol: float = 1e-5,
    ignore: tuple[str, ...] | list[str] = (),
    exporter: str = "dynamo",
    opset: int | None = None,
    output_dir: str | Path = "layerdiff_report",
    trust_pickle: bool = False,
    ort_level: str = "all",
    ort_config: dict[str, str] | None = None,
    provider: str = "CPUExecutionProvider",
    progress: Progress | None = None,
) -> Diagnosis:
    """Compare ``model`` with its ONNX export layer by layer and return a Diagnosis.

    ``model`` is a path (spandrel state dict, TorchScript archive), an ``nn.Module`` or a
    LoadedModel. Without ``onnx`` the model is exported into ``output_dir``. Raises
    LayerdiffError for input the user must fix (bad file, unknown architecture...).
    """
    say = progress or (lambda _msg: None)
    if ort_level not in capture_onnx.LEVELS:
        raise UsageError(f"unknown onnxruntime optimisation level '{ort_level}'",
                         hint="use one of: " + ", ".join(capture_onnx.LEVELS))

    say("loading model")
    loaded = _load(model, trust_pickle)
    shape = tuple(input_shape) if input_shape else (1, loaded.input_channels, 64, 64)
    example = make_input(shape, seed)
    settings = Settings(rtol=rtol, atol=atol, input_shape=shape, seed=seed,
                        ignore=tuple(ignore), provider=provider, ort_level=ort_level,
                        ort_config=tuple((ort_config or {}).items()))

    if onnx is None:
        say(f"exporting with the {exporter} exporter")
        out = Path(output_dir) / f"{_stem(loaded)}.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        source = export_onnx(loaded, example, out, exporter=exporter, opset=opset)
    else:
        source = describe_onnx(onnx)
    graph = capture_onnx.load_graph(source.path)
    feeds = _feeds(graph, example, loaded)

    say("running PyTorch with hooks")
    was_training = capture_torch.training_modules(loaded.module) if isinstance(loaded.module, torch.nn.Module) else ()
    captured = capture_torch.capture(loaded.module, example)

    say("aligning the two graphs")
    alignment = align(captured.calls, captured.parameters, graph)

    say("running onnxruntime with intermediate tensors exposed")
    try:
        run = capture_onnx.run(graph, feeds, [p.onnx_tensor for p in alignment.pairs],
                               level=ort_level, provider=provider, config=settings.ort_config)
    except capture_onnx.OnnxLoadError as exc:
        return _error_diagnosis(loaded, source, settings, str(exc), exc.hint)

    alignment = drop_misfits(alignment, captured.calls, run.values)
    say("running each layer's ONNX segment on PyTorch's inputs (local error)")
    local = capture_onnx.run_local(
        graph, feeds, {p.onnx_tensor: captured.activations[p.call] for p in alignment.pairs},
        level=ort_level, provider=provider, config=settings.ort_config)

    say("comparing")
    layers = judge.layer_results(alignment, captured.calls, captured.activations, run.values,
                                 rtol=rtol, atol=atol, ignore=settings.ignore,
                                 local_values=local.values)
    outputs = judge.output_results(captured.outputs, run.outputs, graph.outputs, rtol=rtol, atol=atol)
    first = judge.first_divergence(layers, graph, alignment, captured.calls, run.failure)
    verdict, masked = judge.verdict(layers, outputs, first)

    facts = Facts(
        input_mutated=captured.input_mutated,
        training_modules=was_training,
        onnx_training_nodes=_training_nodes(graph),
        mutated_outputs=tuple(c.label for c in captured.calls if c.mutated_later),
        onnx_input_shape=tuple(graph.inputs[0][2]) if graph.inputs else (),
        ort_optimisation_level=ort_level,
    )
    if verdict == "diverged" and ort_level != "disable" and run.failure is None:
        say("re-running with onnxruntime graph optimisations off")
        facts = replace(facts, vanishes_without_ort_optimisation=_vanishes_unoptimised(
            graph, feeds, alignment, captured, settings))

    notes = list(source.notes) + list(loaded.notes)
    if not captured.calls:
        notes.append("No submodule outputs were captured (TorchScript modules take no forward "
                     "hooks): only the final outputs are compared.")
    if captured.input_mutated:
        notes.append("The model changes its input tensor in place during forward; "
                     "layerdiff gave PyTorch and ONNX their own copies.")
    diagnosis = Diagnosis(
        verdict=verdict,
        summary=judge.summarise(verdict, layers, outputs, first, masked, rtol, atol,
                                len(alignment.unmatched_torch)),
        model=loaded, onnx=source, settings=settings, versions=versions(graph),
        outputs=tuple(outputs), layers=tuple(layers), first_divergence=first, masked=masked,
        alignment=alignment, calls=tuple(captured.calls), facts=facts, notes=tuple(notes),
    )
    return replace(diagnosis, suggestions=suggest(diagnosis))


def make_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform values in [0, 1], like an image, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float32)


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


# --------------------------------------------------------------------------- helpers


def _load(model: Any, trust_pickle: bool) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        return from_module(model)
    return load_model(model, trust_pickle=trust_pickle)


def _stem(model: LoadedModel) -> str:
    return model.path.stem if model.path else model.architecture.lower()


def _feeds(graph: capture_onnx.OnnxGraph, example: torch.Tensor, model: LoadedModel) -> dict:
    """The image for the first input; forward()'s defaults for any other (RealCUGAN's alpha)."""
    if not graph.inputs:
        raise UsageError("the ONNX model has no inputs", hint="re-export it with an input")
    name, dtype, _ = graph.inputs[0]
    feeds = {name: example.numpy().astype(dtype)}
    extra = graph.inputs[1:]
    if not extra:
        return feeds
    defaults = _forward_defaults(model.module)
    for name, dtype, shape in extra:
        if name not in defaults:
            raise UsageError(
                f"the ONNX model has an input '{name}' that layerdiff cannot fill",
                hint=f"the model's forward() has no default for '{name}'; "
                     "export the ONNX with a single image input",
            )
        value = np.asarray(defaults[name], dtype=dtype)
        dims = [d if isinstance(d, int) else 1 for d in shape]
        feeds[name] = np.broadcast_to(value, dims).copy() if dims else value
    return feeds


def _forward_defaults(module: Any) -> dict[str, Any]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return {}
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty
            and isinstance(p.default, (int, float, bool))}


def _training_nodes(graph: capture_onnx.OnnxGraph) -> tuple[str, ...]:
    return tuple(n.name for n in graph.nodes
                 if (n.op_type == "BatchNormalization" and n.attrs.get("training_mode") == 1)
                 or (n.op_type == "Dropout" and len(n.inputs) > 2 and n.inputs[2]
                     and bool(np.any(graph.constants.get(n.inputs[2], np.array(True))))))


def _vanishes_unoptimised(graph, feeds, alignment, captured, settings: Settings) -> bool | None:
    try:
        run = capture_onnx.run(graph, feeds, [p.onnx_tensor for p in alignment.pairs],
                               level="disable", provider=settings.provider,
                               config=settings.ort_config)
    except capture_onnx.OnnxLoadError:
        return None
    local = capture_onnx.run_local(
        graph, feeds, {p.onnx_tensor: captured.activations[p.call] for p in alignment.pairs},
        level="disable", provider=settings.provider, config=settings.ort_config)
    layers = judge.layer_results(alignment, captured.calls, captured.activations, run.values,
                                 rtol=settings.rtol, atol=settings.atol, ignore=settings.ignore,
                                 local_values=local.values)
    outputs = judge.output_results(captured.outputs, run.outputs, graph.outputs,
                                   rtol=settings.rtol, atol=settings.atol)
    return run.failure is None and judge.verdict(layers, outputs, None)[0] == "pass"


def _error_diagnosis(model: LoadedModel, source: OnnxSource, settings: Settings,
                     message: str, hint: str) -> Diagnosis:
    return Diagnosis(
        verdict="error", summary=f"{message}. {hint}".strip(), model=model, onnx=source,
        settings=settings, versions=versions(), error=message,
    )
