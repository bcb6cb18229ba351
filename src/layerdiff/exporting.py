"""Export a LoadedModel to ONNX, and describe ONNX files given by the user.

This module owns choosing the exporter, falling back to the other one, and isolating
every export attempt in a forked child process: an exporter can crash the interpreter
(the dynamo exporter segfaults on spandrel's SPAN with torch 2.14), hang, or print
pages of output, and none of that may reach the caller. The ONNX file appears at its
destination only once an exporter has written all of it.
"""

from __future__ import annotations

import faulthandler
import functools
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import torch

from .errors import ExportError, OnnxLoadError, UsageError, first_line
from .records import ExportFallback, LoadedModel, OnnxSource

EXPORTERS = ("dynamo", "legacy")
LEGACY_DEFAULT_OPSET = 17
# The dynamo exporter builds opset 18+ graphs; for a lower opset it runs onnx's version
# converter, which drops the module-name metadata that lets layers be matched by name.
DYNAMO_NATIVE_OPSET = 18

LEGACY_DYNAMIC_AXES = {
    "input": {0: "batch", 2: "height", 3: "width"},
    "output": {0: "batch", 2: "height", 3: "width"},
}


@dataclass(frozen=True)
class Example:
    """What an export traces: forward()'s arguments, the names the ONNX inputs and
    outputs get, and the axes of each input that stay free (by input name)."""

    args: tuple
    kwargs: dict
    input_names: tuple[str, ...]
    dynamic: dict[str, tuple[int, ...]]
    output_names: tuple[str, ...] = ()

    @staticmethod
    def image(tensor: torch.Tensor) -> "Example":
        """One image in, one out: named "input" and "output", batch, height and width free."""
        return Example((tensor,), {}, ("input",), {"input": (0, 2, 3)}, ("output",))

    def fixed(self) -> "Example":
        """The same trace with no free axis: the file takes only the traced sizes."""
        return replace(self, dynamic={})

    @property
    def shapes(self) -> str:
        return ", ".join(str(tuple(t.shape)) for t in (*self.args, *self.kwargs.values()))

BAD_ONNX_HINT = "the file may be truncated or not an ONNX model; re-export it"

Export = Callable[[Path], None]  # writes the ONNX file to the given path


@dataclass(frozen=True)
class _Failure:
    reason: str  # completes "the dynamo exporter ...": "crashed (SIGSEGV)", "failed (...)"
    raised: bool  # the exporter raised an exception, as opposed to crashing or hanging
    log: Path | None = None  # what the exporter printed, kept for the user


def export_onnx(
    model: LoadedModel,
    example: torch.Tensor | Example,
    out_path: str | Path,
    *,
    exporter: str = "dynamo",
    opset: int | None = None,
    timeout_s: float = 900,
    fallback: bool = True,
) -> OnnxSource:
    """Export ``model`` traced on ``example`` (one image tensor, or an Example) to
    ``out_path``; fall back to the other exporter (unless ``fallback`` is False).

    ``timeout_s`` bounds each export attempt. Raises ExportError when every exporter fails.
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter '{exporter}'",
                         hint="use one of: " + ", ".join(EXPORTERS))
    if isinstance(example, torch.Tensor):
        example = Example.image(example)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    order, notes = _plan(model, exporter)
    if not fallback:
        order = order[:1]
    failures: list[tuple[str, _Failure]] = []
    for name in order:
        result = _ATTEMPTS[name](model.module, example, out_path, opset, timeout_s)
        if isinstance(result, _Failure):
            failures.append((name, result))
            continue
        notes += [_fallback_note(failed, failure, name) for failed, failure in failures]
        notes += result
        written = _default_opset(_read_onnx(out_path))
        notes += _opset_notes(name, opset, written)
        fallback = next((ExportFallback(failed, failure.reason, not failure.raised,
                                        failure.log.name if failure.log else None)
                         for failed, failure in failures), None)
        return OnnxSource(
            path=out_path,
            exporter=name,
            opset=written,
            producer=f"torch {torch.__version__.split('+')[0]}",
            notes=tuple(notes),
            fallback=fallback,
            asked_opset=opset,
        )
    raise _all_failed(failures)


def describe_onnx(path: str | Path) -> OnnxSource:
    """An OnnxSource for a file the user exported themselves."""
    path = Path(path)
    if not path.is_file():
        raise OnnxLoadError(f"ONNX file not found: {path}", hint="check the path given to --onnx")
    model = _read_onnx(path)
    return OnnxSource(
        path=path,
        exporter="user",
        opset=_default_opset(model),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        verified_by=verification_metadata(model),
    )


METADATA_PREFIX = "layerdiff."


def verification_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The ``layerdiff.*`` entries of the file's metadata_props (`layerdiff convert`)."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


# --------------------------------------------------------------------------- planning


def _plan(model: LoadedModel, exporter: str) -> tuple[list[str], list[str]]:
    """Exporters to try, in order, and notes about that choice."""
    if isinstance(model.module, torch.jit.ScriptModule):
        notes = [] if exporter == "legacy" else [
            "TorchScript modules cannot go through the dynamo exporter; "
            "exported with the legacy exporter"]
        return ["legacy"], notes
    other = "legacy" if exporter == "dynamo" else "dynamo"
    return [exporter, other], []


def _opset_notes(exporter: str, asked: int | None, written: int | None) -> list[str]:
    notes = []
    if asked is not None and written != asked:
        notes.append(f"opset {asked} was asked for; the {exporter} exporter wrote opset {written}")
    if exporter == "dynamo" and written is not None and written < DYNAMO_NATIVE_OPSET:
        notes.append(f"opset {written} is below the dynamo exporter's {DYNAMO_NATIVE_OPSET}; the "
                     "version converter drops module names, so layers are matched by weights "
                     "and structure")
    return notes


def _fallback_note(failed: str, failure: _Failure, used: str) -> str:
    return (f"the {failed} exporter {failure.reason}; "
            f"exported with the {used} exporter instead{_log_mention(failure)}")


def _log_mention(failure: _Failure) -> str:
    return f" (its output is in {failure.log.name})" if failure.log else ""


def _all_failed(failures: list[tuple[str, _Failure]]) -> ExportError:
    reasons = "; ".join(f"the {name} exporter {failure.reason}" for name, failure in failures)
    logs = ", ".join(str(failure.log) for _, failure in failures if failure.log)
    return ExportError(
        f"could not export the model to ONNX: {reasons}",
        hint="try another --opset, or export the model yourself and pass it with --onnx"
        + (f"; the exporters' output is in {logs}" if logs else ""),
    )


# --------------------------------------------------------------------------- exporters


def _try_dynamo(
    module: torch.nn.Module, example: Example, out_path: Path, opset: int | None,
    timeout_s: float,
) -> list[str] | _Failure:
    """Dynamic sizes first; fixed ones if the exporter refuses them."""
    notes: list[str] = []
    export = functools.partial(_export_dynamo, module, example, opset, True)
    failure = _run_isolated(export, out_path, "dynamo", timeout_s)
    if failure is None:
        return notes
    if not failure.raised:
        return failure
    export = functools.partial(_export_dynamo, module, example, opset, False)
    retry = _run_isolated(export, out_path, "dynamo-fixed", timeout_s)
    if retry is not None:
        if retry.log:  # the first attempt's reason and output are the ones reported
            retry.log.unlink()
        return failure
    free = "height and width" if example.dynamic == {"input": (0, 2, 3)} else "sizes"
    return notes + [f"the dynamo exporter refused a dynamic {free} ({failure.reason}); "
                    f"exported with a fixed input size {example.shapes}"
                    + _log_mention(failure)]


def _try_legacy(
    module: torch.nn.Module, example: Example, out_path: Path, opset: int | None,
    timeout_s: float,
) -> list[str] | _Failure:
    export = functools.partial(_export_legacy, module, example, opset or LEGACY_DEFAULT_OPSET)
    failure = _run_isolated(export, out_path, "legacy", timeout_s)
    return [] if failure is None else failure


_ATTEMPTS = {"dynamo": _try_dynamo, "legacy": _try_legacy}


def _export_dynamo(
    module: torch.nn.Module, example: Example, opset: int | None, dynamic: bool, target: Path
) -> None:
    options: dict = {} if opset is None else {"opset_version": opset}
    if dynamic:
        # Batch stays as traced: a free batch of 1 is specialised by torch.export anyway.
        # Named as in the legacy export: axes that share a name must agree (a sequence's
        # ids and attention mask), which is what lets the exporter keep them free.
        ranks = dict(zip(example.input_names,
                         (t.dim() for t in (*example.args, *example.kwargs.values()))))
        auto = {name: {a: _axis_name(name, a, ranks.get(name, 0)) for a in axes if a > 0}
                for name, axes in example.dynamic.items()}
        names = _parameter_names(module, example)
        if names is not None:
            options["dynamic_shapes"] = {param: auto.get(name) or None
                                         for param, name in names}
    if len(example.output_names) > 1:
        options["output_names"] = list(example.output_names)
    # external_data=False: one self-contained file unless the weights pass protobuf's 2 GB.
    torch.onnx.export(module, example.args, str(target), kwargs=example.kwargs or None,
                      dynamo=True, external_data=False, **options)


def _parameter_names(module: torch.nn.Module, example: Example) -> list[tuple[str, str]] | None:
    """(forward()'s parameter, input name) for each argument, as torch.export keys
    dynamic_shapes; None when the signature cannot be read."""
    import inspect

    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    positional = params[:len(example.args)]
    if len(positional) != len(example.args):
        return None
    names = list(example.input_names)
    return list(zip(positional, names)) + [(k, k) for k in example.kwargs]


def _export_legacy(
    module: torch.nn.Module, example: Example, opset: int, target: Path
) -> None:
    ranks = dict(zip(example.input_names,
                     (t.dim() for t in (*example.args, *example.kwargs.values()))))
    # Axes that vary together share a name (an image's and its mask's height), so the
    # file says they must agree.
    dynamic_axes = {name: {a: _axis_name(name, a, ranks.get(name, 0)) for a in axes}
                    for name, axes in example.dynamic.items()}
    if example.output_names == ("output",) and example.input_names == ("input",) \
            and example.dynamic:
        dynamic_axes["output"] = LEGACY_DYNAMIC_AXES["output"]
    # The legacy exporter takes keyword arguments as a trailing dict in args.
    args = (*example.args, example.kwargs) if example.kwargs else example.args
    torch.onnx.export(
        module,
        args,
        str(target),
        dynamo=False,
        opset_version=opset,
        input_names=list(example.input_names),
        output_names=list(example.output_names) or None,
        dynamic_axes=dynamic_axes,
    )


def _axis_name(name: str, axis: int, rank: int) -> str:
    if axis == 0:
        return "batch"
    if rank == 4 and axis in (2, 3):
        return ("height", "width")[axis - 2]
    if rank == 2 and axis == 1:
        return "sequence"
    return f"{name}_{axis}"


# --------------------------------------------------------------------------- isolation


def _run_isolated(
    export: Export, out_path: Path, label: str, timeout_s: float
) -> _Failure | None:
    """Run ``export`` in a forked child; move its file to ``out_path`` only if it succeeded.

    The child writes into a private directory beside ``out_path`` (same file system,
    so the final move is atomic, and any external-data file keeps its relative name).
    On failure the child's output is kept as ``<out_path>.<label>.log``.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        (staging / "model").mkdir()
        target = staging / "model" / out_path.name
        failure = _run_child(export, target, staging, timeout_s)
        if failure is None:
            failure = _check_written(target)
        if failure is None:
            _publish(target, out_path)
            return None
        return replace(failure, log=_keep_log(staging, out_path, label))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _keep_log(staging: Path, out_path: Path, label: str) -> Path | None:
    produced = staging / "export.log"
    if not produced.exists():  # the child died before it could open it
        return None
    log = out_path.parent / f"{out_path.name}.{label}.log"
    os.replace(produced, log)
    return log


def _run_child(
    export: Export, target: Path, staging: Path, timeout_s: float
) -> _Failure | None:
    reason_file = staging / "reason.txt"
    child = multiprocessing.get_context("fork").Process(
        target=_child_main, args=(export, target, staging / "export.log", reason_file), daemon=True)
    child.start()
    try:
        child.join(timeout_s)
        timed_out = child.is_alive()
    finally:
        # Also when the wait is interrupted (Ctrl-C): the child must not outlive it.
        if child.is_alive():
            child.kill()
            child.join()
    if timed_out:
        return _Failure(f"timed out after {timeout_s:g} s", raised=False)
    if child.exitcode < 0:
        return _Failure(f"crashed ({_signal_name(-child.exitcode)})", raised=False)
    if child.exitcode > 0:
        reason = reason_file.read_text() if reason_file.exists() else f"exit code {child.exitcode}"
        return _Failure(f"failed ({reason})", raised=reason_file.exists())
    return None


def _child_main(export: Export, target: Path, log: Path, reason_file: Path) -> None:
    # The parent's intra-op thread pool did not survive the fork; one thread avoids
    # deadlocking on it.
    torch.set_num_threads(1)
    _redirect_output(log)
    try:
        export(target)
    except BaseException as error:
        reason_file.write_text(_describe_failure(error))
        raise  # multiprocessing prints the traceback into the log and exits with 1


def _redirect_output(log: Path) -> None:
    # Both levels: C++ code writes to fds 1 and 2, Python code to sys.stdout/stderr,
    # which a caller such as pytest may have replaced.
    stream = open(log, "w", buffering=1)  # noqa: SIM115 - lives as long as the child
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream
    # A crash's traceback belongs in the log too, not on the caller's terminal (pytest
    # enables faulthandler on its own copy of the original stderr).
    faulthandler.enable(file=stream)


def _check_written(target: Path) -> _Failure | None:
    try:
        _read_onnx(target)
    except OnnxLoadError as error:
        return _Failure(f"wrote an unreadable file ({error.message})", raised=True)
    return None


def _publish(target: Path, out_path: Path) -> None:
    # Side files (external weights) first, so out_path never names an incomplete export.
    for produced in target.parent.iterdir():
        if produced != target:
            os.replace(produced, out_path.parent / produced.name)
    os.replace(target, out_path)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --------------------------------------------------------------------------- reading ONNX


def _read_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError, OSError, ...
        raise OnnxLoadError(f"cannot read ONNX file {path}: {_one_line(error)}",
                            hint=BAD_ONNX_HINT) from None
    # An empty file parses as an empty model.
    if not model.opset_import or not model.graph.output:
        raise OnnxLoadError(f"{path} is not an ONNX model (it has no graph)", hint=BAD_ONNX_HINT)
    return model


def _default_opset(model: onnx.ModelProto) -> int | None:
    default_domain = (entry.version for entry in model.opset_import
                      if entry.domain in ("", "ai.onnx"))
    return next(default_domain, None)


def _describe_failure(error: BaseException) -> str:
    """The exception that started it all, in one line.

    The dynamo exporter wraps the real cause in a TorchExportError whose own message
    is generic advice ("Failed to export the model with torch.export...").
    """
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    return _one_line(root) + ("" if root is error else f" (raised as {type(error).__name__})")


def _one_line(error: BaseException) -> str:
    line = first_line(str(error))  # exporters colour their messages; first_line strips that
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
