"""`layerdiff convert`: export a model to ONNX and publish the file only once layerdiff's own
diagnosis verifies it.

Converters in the field (chaiNNer, neosr, traiNNer-redux) check the final output on one
tiny input, or not at all. Here the exported file is diagnosed like any other (several
inputs, the export size and another size when its axes are free, every output) and
appears at its destination only when it passes: it is exported into a private folder
beside the destination (same file system), the verification is written into its
metadata_props (``layerdiff.*`` keys, README "Convert"), and it is renamed into place.
``force`` publishes a file that failed, marked so; ``verify=False`` publishes without a
diagnosis, marked "not verified".

This module owns the order of attempts (the exporter, then for float16 the conversion
before ``model.half()``), the repairs (README "Convert": when the diagnosis names a cause
layerdiff can remedy, the file is made again that way, at most MAX_REPAIRS times), the
metadata, and publishing. Exporting, the float16 files and
the diagnosis itself are exporting.py's, fp16.py's and pipeline.py's.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import onnx
import torch

from . import files
from .errors import ExportError, UsageError
from .exporting import METADATA_PREFIX, export_onnx
from .options import Options
from .progress import Progress, silent
from .records import (Attempt, CaseVerdict, ConversionLog, Diagnosis, LoadedModel, OnnxSource,
                      Verdict)

DTYPES = ("fp32", "fp16", "bf16")
EXPORTERS = ("auto", "dynamo", "legacy")  # auto: dynamo, then legacy if it fails
FP16_METHODS = ("convert", "half")  # tried in this order (neosr's, then chaiNNer's)
OPTIMIZERS = ("onnxslim", "ort")  # --optimize: onnxslim, or onnxruntime's offline "basic" level
UNVERIFIED = "unverified"
MAX_REPAIRS = 3  # per conversion: each repair is one more export and diagnosis
BF16_OPSET = 22  # the first opset whose Conv, Gemm, Resize... take bfloat16
# bfloat16 keeps 8 significant bits (float16: 11): 8x float16's default tolerances.
BF16_RTOL, BF16_ATOL = 8e-2, 8e-3
# Why a bfloat16 file is not verified (README "Convert"): checked on onnxruntime 1.32.
BF16_UNVERIFIABLE = ("layerdiff cannot verify a bfloat16 file yet: onnxruntime's CPU provider "
                     "has no bfloat16 kernels for Conv and most other operators, and the graph "
                     "reader (onnx-graphsurgeon) cannot read bfloat16 constants")



class Verification(str, Enum):
    """What ``layerdiff.verified`` says of a written file."""

    VERIFIED = "true"
    FAILED = "false"  # never written as such: a failed file is written only with force
    FORCED = "failed, written with --force"
    NOT_VERIFIED = "not verified"

    def __str__(self) -> str:
        return self.value


class Repair(str, Enum):
    """A remedy for a cause the diagnosis recognises (README "Convert", "Repairs")."""

    EVAL_MODE = "eval-mode"  # layers left in training mode: export a copy in eval mode
    KEEP_FP32 = "keep-fp32"  # float16 overflow/underflow: keep those layers in float32
    OTHER_EXPORTER = "other-exporter"  # a shape frozen at trace time: the other exporter

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Conversion:
    """The result of ``convert``: the file written (None: none), the verdict of its
    diagnosis ("unverified" with verify=False), that diagnosis, and every attempt."""

    path: Path | None
    verdict: Verdict | Literal["unverified"]
    diagnosis: Diagnosis | None
    attempts: tuple[Attempt, ...]
    verification: Verification
    metadata: dict[str, str]  # what was (or would have been) written into the file
    reason: str = ""  # why it did not verify; "" when it did or was not checked

    @property
    def exit_code(self) -> int:
        """As `layerdiff report`: 0 verified (or not checked), 1 not verified, 2 error."""
        if self.diagnosis is None:
            return 0
        if self.diagnosis.verdict == Verdict.ERROR:
            return 2
        return 0 if self.verification == Verification.VERIFIED else 1


@dataclass(frozen=True)
class _Candidate:
    """A file in the staging folder, how it was made, and its diagnosis."""

    path: Path
    source: OnnxSource
    attempt: Attempt
    diagnosis: Diagnosis | None
    repairs: tuple[Repair, ...] = ()  # the remedies this file was made with, in order


@dataclass(frozen=True)
class _Plan:
    """How files are made: the model, what is traced, where, and how they are checked.
    A repair makes the next file from a changed plan."""

    loaded: LoadedModel
    example: Any  # exporting.Example
    staging: Path  # the folder the files are made in (one per repair)
    path: Path  # the destination (files are named after it)
    dtype: str
    exporter: str
    opset: int | None
    verify: bool
    check: Options
    say: Progress


def convert(
    model: str | Path | torch.nn.Module | LoadedModel,
    path: str | Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    exporter: str = "auto",
    dynamic: bool = True,
    static: tuple[int, int] | None = None,
    verify: bool = True,
    force: bool = False,
    optimize: str | None = None,
    options: Options | None = None,
    progress: Progress | None = None,
    **settings: Any,
) -> Conversion:
    """Export ``model`` to the ONNX file ``path``, written only when it verifies.

    ``model`` takes every form ``diagnose()`` does. ``dtype``: "fp32", or "fp16" (the
    onnxconverter-common conversion with fp32 inputs and outputs first, ``model.half()``
    exported when that does not verify; diagnosed with fp16 tolerances). ``exporter``:
    "auto" (dynamo, then legacy when it fails), "dynamo" or "legacy" (that one only).
    ``dynamic``: batch, height and width free (False: fixed at the traced size);
    ``static=(H, W)``: traced at that size with no free axis. ``verify=False``: written
    without a diagnosis, marked "not verified". ``force``: written even when it does not
    verify, marked so. ``options`` / ``settings``: the diagnosis's inputs, tolerances and
    runtime, as for ``diagnose()`` (``reproducer_for``: the report's path).

    Never writes over an input (a UsageError before any work). Raises ExportError when
    no exporter can write the file.
    """
    opts = replace(options or Options(), **settings)
    if opset is not None:
        opts = replace(opts, opset=opset)
    opts.check()
    _check_arguments(dtype, exporter, static, optimize)
    if dtype == "bf16" and verify:
        raise UsageError(BF16_UNVERIFIABLE, hint="write it unverified with --no-verify (its "
                         "metadata says so), or convert to fp16 or fp32, which are verified")
    say = progress or silent
    path = Path(path)
    from .pipeline import _load, _model_file, export_example

    files_in = tuple(opts.input_files) + ((str(opts.input_data),) if opts.input_data else ())
    given = files.given_inputs(_model_file(model), None, files_in, weights=opts.weights)
    files.check_inputs(given)
    reproducer = files.reproducer_paths(opts.reproducer_for) if opts.reproducer_for else (None, None)
    files.check_outputs({"-o": path, "the reproducer's .onnx": reproducer[0],
                         "the reproducer's .npz": reproducer[1]}, given)

    say("loading model")
    loaded = _load(model, opts.trust_pickle, opts.weights)
    if static is not None:
        opts = _at_size(loaded, opts, static)
        dynamic = False
    example, _ = export_example(loaded, opts)
    if not dynamic:
        example = example.fixed()
    # The loaded model goes to diagnose(): its weights are in it already.
    check = replace(opts, weights=None, fp16=dtype == "fp16", fix_fp16=None)
    if dtype == "bf16":
        check = replace(check, rtol=BF16_RTOL if opts.rtol is None else opts.rtol,
                        atol=BF16_ATOL if opts.atol is None else opts.atol)

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        attempts: list[Attempt] = []
        plan = _Plan(loaded, example, staging, path, dtype, exporter, opts.opset, verify,
                     check, say)
        chosen = _attempts(plan, attempts)
        free = dynamic and bool(example.dynamic)
        if verify:
            chosen = _repaired(chosen, plan, attempts, free, opts)
        notes: list[str] = []
        if optimize is not None and (not verify or not _why_not(chosen.diagnosis, free, opts)):
            chosen = _optimized(chosen, plan, attempts, optimize, free, opts, notes)
        fixed = None if dynamic else _image_size(example)
        return _publish(chosen, path, dtype, tuple(attempts), verify, force, free, opts,
                        exporter, fixed, tuple(notes))
    finally:
        _keep_logs(staging, path.parent)
        shutil.rmtree(staging, ignore_errors=True)


def _check_arguments(dtype: str, exporter: str, static: tuple[int, int] | None,
                     optimize: str | None = None) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'", hint="use one of: " + ", ".join(DTYPES))
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter '{exporter}'", hint="use one of: " + ", ".join(EXPORTERS))
    if static is not None and (len(static) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in static)):
        raise UsageError(f"static size {static} is not H,W", hint="give two whole numbers > 0, e.g. 256,256")
    if optimize is not None and optimize not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer '{optimize}'", hint="use one of: " + ", ".join(OPTIMIZERS))
    if optimize == "onnxslim":
        try:
            import onnxslim  # noqa: F401
        except ImportError:
            raise UsageError("--optimize onnxslim needs the onnxslim package",
                             hint="pip install onnxslim, or use --optimize ort") from None


def _at_size(loaded: LoadedModel, opts: Options, size: tuple[int, int]) -> Options:
    """``opts`` with the first input (an image) at ``size``: what a static file takes."""
    from .pipeline import export_specs

    lead = export_specs(loaded, opts)[0]
    if len(lead.shape) != 4:
        raise UsageError(f"--static H,W needs an image input (N,C,H,W); the first input "
                         f"{lead.name} has shape {tuple(lead.shape)}",
                         hint="give its fixed shape with --input-shape NAME:DIMS instead")
    shapes = {k: v for k, v in opts.shapes().items() if k not in (None, lead.name)}
    shapes[lead.name] = tuple(lead.shape[:2]) + tuple(size)
    return replace(opts, input_shape=shapes)


def _image_size(example) -> tuple[int, int] | None:
    """H, W of the first traced input when it is an image (N,C,H,W)."""
    lead = (*example.args, *example.kwargs.values())[0]
    return tuple(lead.shape[-2:]) if lead.dim() == 4 else None


def _attempts(plan: _Plan, attempts: list[Attempt]) -> _Candidate:
    """Make and diagnose files until one verifies (or none is left to try); the one to
    publish. Every try is appended to ``attempts``."""
    from . import fp16 as half

    loaded, example, staging, path, dtype, exporter, opset, verify, check, say = (
        plan.loaded, plan.example, plan.staging, plan.path, plan.dtype, plan.exporter,
        plan.opset, plan.verify, plan.check, plan.say)
    staging.mkdir(parents=True, exist_ok=True)

    first = "dynamo" if exporter == "auto" else exporter
    if dtype == "bf16":
        return _bf16_attempt(plan, first, attempts)
    say(f"exporting with the {first} exporter")
    fp32 = staging / path.name  # so that a failed exporter's log is named after OUT
    try:
        source = export_onnx(loaded, example, fp32, exporter=first, opset=opset,
                             fallback=exporter == "auto")
    except ExportError as error:
        attempts.append(Attempt(first, "fp32", failed=error.message))
        raise
    if source.fallback is not None:
        attempts.append(Attempt(str(source.fallback.failed), "fp32",
                                failed=f"the {source.fallback.failed} exporter {source.fallback.reason}"))
    if dtype == "fp32":
        candidate = _diagnosed(loaded, fp32, source, Attempt(str(source.exporter), "fp32"),
                               verify, check, say)
        attempts.append(candidate.attempt)
        return candidate

    tried: list[_Candidate] = []
    for method in FP16_METHODS:
        target = staging / f"{path.stem}_fp16_{method}.onnx"
        say(f"making a float16 model ({method})")
        exporter_name = str(source.exporter) if method == "convert" else "legacy"
        try:
            written, how = half.make_fp16_onnx(loaded, example, fp32, target, method)
        except ExportError as error:
            attempts.append(Attempt(exporter_name, "fp16", method, failed=error.message))
            continue
        made = replace(source, path=written, exporter=exporter_name,
                       notes=source.notes + (f"float16 model: {how}",))
        # Only the first try writes a reproducer: it is the one kept when none verifies.
        candidate = _diagnosed(loaded, written, made, Attempt(exporter_name, "fp16", method),
                               verify, check if not tried else replace(check, reproducer_for=None),
                               say)
        attempts.append(candidate.attempt)
        tried.append(candidate)
        if not verify or candidate.attempt.verdict == Verdict.PASS:
            if candidate is not tried[0]:
                _remove_reproducer(tried[0].diagnosis)
            return candidate
    if not tried:
        raise ExportError("could not make a float16 model: "
                          + "; ".join(a.failed for a in attempts if a.failed),
                          hint="convert to fp32 (--dtype fp32), or export the float16 model "
                               "yourself and check it with layerdiff report --fp16")
    return tried[0]  # neither verified: the first (fp32 inputs and outputs) is the one kept


def _bf16_attempt(plan: _Plan, first: str, attempts: list[Attempt]) -> _Candidate:
    """The model in bfloat16 (traiNNer-redux's ``model.bfloat16()``), exported with float32
    inputs and outputs (Casts at the borders, as the float16 conversion keeps them) at
    opset BF16_OPSET or later, and diagnosed against the float32 model."""
    target = plan.staging / f"{plan.path.stem}_bf16.onnx"
    plan.say(f"exporting a bfloat16 model with the {first} exporter")
    model = replace(plan.loaded, module=_in_bfloat16(plan.loaded.module))
    opset = max(plan.opset or 0, BF16_OPSET)
    try:
        source = export_onnx(model, plan.example, target, exporter=first, opset=opset,
                             fallback=plan.exporter == "auto")
    except ExportError as error:
        attempts.append(Attempt(first, "bf16", "bfloat16", failed=error.message))
        raise
    if source.fallback is not None:
        attempts.append(Attempt(str(source.fallback.failed), "bf16", "bfloat16",
                                failed=f"the {source.fallback.failed} exporter {source.fallback.reason}"))
    source = replace(source, notes=source.notes + (
        "bfloat16 model: model.bfloat16() exported with float32 inputs and outputs",))
    candidate = _diagnosed(plan.loaded, target, source,
                           Attempt(str(source.exporter), "bf16", "bfloat16"), plan.verify,
                           plan.check, plan.say)
    attempts.append(candidate.attempt)
    return candidate


def _in_bfloat16(module: torch.nn.Module) -> torch.nn.Module:
    """A bfloat16 copy of ``module`` whose forward() takes and returns float32: its class
    is a subclass that casts at the borders, so that its layers keep their names."""
    base = type(module)

    @functools.wraps(base.forward)  # the signature the exporters read
    def forward(self, *args, **kwargs):
        cast = lambda v: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        out = base.forward(self, *map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        return _float32(out)

    copied = copy.deepcopy(module).to(torch.bfloat16)
    copied.__class__ = type(base.__name__, (base,), {"forward": forward})
    return copied


def _float32(value: Any) -> Any:
    """``value``'s bfloat16 tensors as float32, through tuples, lists and dicts."""
    if torch.is_tensor(value):
        return value.float() if value.dtype == torch.bfloat16 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


def _diagnosed(loaded, file: Path, source: OnnxSource, attempt: Attempt, verify: bool,
               check: Options, say: Progress) -> _Candidate:
    if not verify:
        return _Candidate(file, source, attempt, None)
    from .pipeline import diagnose

    say("verifying the file")
    diagnosis = diagnose(loaded, file, options=check, progress=say)
    return _Candidate(file, source, replace(attempt, verdict=diagnosis.verdict), diagnosis)


def _remove_reproducer(d: Diagnosis | None) -> None:
    """The reproducer of a try that was not kept: it would describe another file."""
    for name in (d.reproducer if d is not None and d.reproducer else ()):
        Path(name).unlink(missing_ok=True)


def _keep_logs(staging: Path, folder: Path) -> None:
    """A failed exporter's output (``*.log``) goes beside the destination, to be read."""
    for log in staging.rglob("*.log"):  # repairs make their files in subfolders
        log.replace(folder / log.name)


# --------------------------------------------------------------------------- repairs


def _repaired(first: _Candidate, plan: _Plan, attempts: list[Attempt], dynamic: bool,
              opts: Options) -> _Candidate:
    """The first file a repair makes that verifies, else ``first``.

    Each repair answers a cause named by the latest try's diagnosis and builds on that
    try's plan (a repair of a repair: the eval-mode copy exported by the other exporter).
    Every try is appended to ``attempts`` with its repair. Only ``first`` writes a
    reproducer (it is the one reported when no repair verifies); it is removed when one does.
    """
    current, done = first, []
    while len(done) < MAX_REPAIRS and current.diagnosis is not None \
            and _why_not(current.diagnosis, dynamic, opts):
        remedy = _remedy(current, plan, attempts, done, dynamic, opts)
        if remedy is None:
            break
        done.append(remedy)
        plan.say(f"repairing: {remedy}")
        made: list[Attempt] = []
        try:
            current, plan = _apply(remedy, current, replace(
                plan, staging=plan.staging / f"repair{len(done)}",
                check=replace(plan.check, reproducer_for=None)), made)
        except ExportError:
            break  # the failed export is in ``made``: why is recorded there
        finally:
            attempts.extend(replace(a, repair=str(remedy)) for a in made)
        if current.diagnosis is not None and not _why_not(current.diagnosis, dynamic, opts):
            _remove_reproducer(first.diagnosis)
            return current
    return first


def _remedy(current: _Candidate, plan: _Plan, attempts: list[Attempt], done: list[Repair],
            dynamic: bool, opts: Options) -> Repair | None:
    """The remedy for the cause ``current``'s diagnosis names, in this order: training
    mode (it makes every other layer wrong too), float16 range, a frozen shape."""
    d = current.diagnosis
    if Repair.EVAL_MODE not in done and (d.facts.training_modules or d.facts.onnx_training_nodes) \
            and hasattr(plan.loaded.module, "eval"):
        return Repair.EVAL_MODE
    if Repair.KEEP_FP32 not in done and plan.dtype == "fp16" \
            and current.attempt.method == "convert" and _fp32_nodes(current, plan):
        return Repair.KEEP_FP32
    if Repair.OTHER_EXPORTER not in done and _frozen(d, dynamic, opts) \
            and _other_exporter(plan, current, attempts) is not None:
        return Repair.OTHER_EXPORTER
    return None


def _apply(remedy: Repair, current: _Candidate, plan: _Plan,
           made: list[Attempt]) -> tuple[_Candidate, _Plan]:
    """The file ``remedy`` makes from ``plan`` (its own staging folder), diagnosed."""
    from . import fp16 as half

    if remedy == Repair.KEEP_FP32:
        plan.staging.mkdir(parents=True)
        target = plan.staging / f"{plan.path.stem}_fp16_keep_fp32.onnx"
        names = _fp32_nodes(current, replace(plan, staging=plan.staging.parent))
        mixed = half.keep_in_fp32(plan.staging.parent / plan.path.name, names, target)
        source = replace(current.source, path=mixed, notes=current.source.notes + (
            f"mixed precision: {len(names)} ONNX node(s) kept in float32 "
            f"({', '.join(k.module for k in current.diagnosis.facts.fp16.keep)})",))
        candidate = _diagnosed(plan.loaded, mixed, source,
                               Attempt(str(current.source.exporter), "fp16", "keep-fp32"),
                               plan.verify, plan.check, plan.say)
        made.append(candidate.attempt)
        # Later repairs start from the same float32 file.
        return replace(candidate, repairs=current.repairs + (remedy,)), replace(
            plan, staging=plan.staging.parent)
    if remedy == Repair.EVAL_MODE:
        # A copy: the caller's module stays as it was given.
        try:
            module = copy.deepcopy(plan.loaded.module).eval()
        except Exception as exc:  # noqa: BLE001 - a module that cannot be copied: no repair
            made.append(Attempt(str(current.source.exporter), plan.dtype,
                                failed=f"the model cannot be copied to put it in eval mode: "
                                       f"{type(exc).__name__}: {exc}"))
            return current, plan
        plan = replace(plan, loaded=replace(plan.loaded, module=module, notes=plan.loaded.notes
                       + ("exported and verified in eval mode (a copy of the model; it was "
                          "given in training mode)",)))
    else:
        plan = replace(plan, exporter=_other_exporter(plan, current, made) or plan.exporter)
    candidate = _attempts(plan, made)
    return replace(candidate, repairs=current.repairs + (remedy,)), plan


def _fp32_nodes(current: _Candidate, plan: _Plan) -> list[str]:
    """The float16 diagnosis's layers to keep in float32, as nodes of the float32 file
    the float16 one was converted from (the converter keeps node names)."""
    findings = current.diagnosis.facts.fp16 if current.diagnosis is not None else None
    fp32 = plan.staging / plan.path.name
    if findings is None or not findings.keep or not fp32.is_file():
        return []
    known = {n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node}
    return [n for n in findings.node_names if n in known]


def _frozen(d: Diagnosis, dynamic: bool, opts: Options) -> bool:
    """Free sizes were asked for and the file is right only at the traced size."""
    return dynamic and (any(s.rule == "frozen_shape" for s in d.suggestions)
                        or _fixed_file(d, opts))


def _fixed_file(d: Diagnosis, opts: Options) -> bool:
    """The file came out fixed-size (the dynamo exporter's fallback) although free sizes
    were asked for."""
    return (d.verdict == Verdict.PASS and opts.check_sizes is None
            and not any(s.dynamic_axes for s in d.settings.input_specs))


def _other_exporter(plan: _Plan, current: _Candidate, attempts: list[Attempt]) -> str | None:
    """The exporter a frozen shape is retried with: only under ``exporter="auto"`` (a named
    exporter is that one only), and not one that already failed in this conversion."""
    other = {"dynamo": "legacy", "legacy": "dynamo"}.get(current.attempt.exporter)
    if plan.exporter != "auto" or other is None:
        return None
    if any(a.exporter == other and a.failed for a in attempts):
        return None
    return other


def _no_dynamic_export(d: Diagnosis, attempts: tuple[Attempt, ...], exporter: str) -> str:
    """Why no file with free sizes is right, exporter by exporter, and the fixed-size way out."""
    said = []
    for name in ("dynamo", "legacy"):
        mine = [a for a in attempts if a.exporter == name]
        if not mine:
            said.append(f"the {name} exporter was not tried (--exporter {exporter} uses that "
                        "one only; --exporter auto tries both)")
        elif all(a.failed for a in mine):
            said.append(f"the {name} exporter failed")
        else:
            said.append(f"the {name} exporter's file is right only at the traced size")
    lead = d.settings.input_specs[0].shape if d.settings.input_specs else ()
    size = f"--static {lead[-2]},{lead[-1]}" if len(lead) == 4 else "--static H,W"
    return ("no dynamic export is right: " + "; ".join(said)
            + f"; {size} writes a file fixed at the requested size")


# --------------------------------------------------------------------------- optimising


def _optimized(chosen: _Candidate, plan: _Plan, attempts: list[Attempt], how: str,
               dynamic: bool, opts: Options, notes: list[str]) -> _Candidate:
    """``chosen`` run through the optimiser ``how`` and verified again: the optimised file
    when it verifies (or verify is off), else ``chosen``, with a note saying why."""
    target = chosen.path.with_name(f"{chosen.path.stem}_{how}.onnx")
    attempt = replace(chosen.attempt, optimizer=how, verdict=None, failed="", repair="")
    plan.say(f"optimising with {how}")
    try:
        optimise_file(chosen.path, target, how)
    except ExportError as error:
        attempts.append(replace(attempt, failed=error.message))
        notes.append(f"--optimize {how} failed ({error.message}): the file is not optimised.")
        return chosen
    source = replace(chosen.source, path=target,
                     notes=chosen.source.notes + (f"optimised with {_OPTIMIZER_NAMES[how]}",))
    candidate = _diagnosed(plan.loaded, target, source, attempt, plan.verify,
                           replace(plan.check, reproducer_for=None), plan.say)
    attempts.append(candidate.attempt)
    if candidate.diagnosis is None or not _why_not(candidate.diagnosis, dynamic, opts):
        return replace(candidate, repairs=chosen.repairs)
    first = candidate.diagnosis.first_divergence
    where = f" (first divergence: {first.module or first.onnx_node})" if first is not None else ""
    notes.append(f"{_OPTIMIZER_NAMES[how]}'s file did not verify{where}: the file written "
                 "is the unoptimised one, which did.")
    return chosen


_OPTIMIZER_NAMES = {"onnxslim": "onnxslim", "ort": "onnxruntime's offline 'basic' optimisation"}


def optimise_file(source: Path, target: Path, how: str) -> Path:
    """``source`` optimised by ``how`` ("onnxslim" or "ort") into ``target``. Raises
    ExportError when the optimiser fails."""
    from .capture_onnx import save_optimised
    from .errors import OnnxLoadError

    try:
        if how == "ort":
            save_optimised(source, target, "basic")
        else:
            import onnxslim

            onnx.save(onnxslim.slim(str(source)), str(target))
    except OnnxLoadError as error:
        raise ExportError(error.message) from None
    except Exception as exc:  # noqa: BLE001 - onnxslim raises whatever its passes raise
        raise ExportError(f"onnxslim failed: {type(exc).__name__}: {exc}") from None
    if not target.is_file():
        raise ExportError(f"{how} wrote no file")
    return target


# --------------------------------------------------------------------------- publishing


def _publish(chosen: _Candidate, path: Path, dtype: str, attempts: tuple[Attempt, ...],
             verify: bool, force: bool, dynamic: bool, opts: Options, exporter: str,
             fixed: tuple[int, int] | None, notes: tuple[str, ...] = ()) -> Conversion:
    d = chosen.diagnosis
    reason = _why_not(d, dynamic, opts) if d is not None else ""
    if reason and _frozen(d, dynamic, opts):
        reason = f"{_no_dynamic_export(d, attempts, exporter)}. {reason}"
    safe_level = None
    if d is not None and d.facts.vanishes_without_ort_optimisation is True:
        # The graph is right; onnxruntime's rewrite of it is not (rule ort_optimisation).
        safe_level = "disable"
        reason += (f" The file passes with onnxruntime's graph optimisations off "
                   f"(--ort-level disable, written as layerdiff.safe_ort_level), not at the "
                   f"level asked ('{d.facts.ort_optimisation_level}'): deploy it with "
                   "optimisations off.")
    if not verify:
        verification = Verification.NOT_VERIFIED
    elif not reason:
        verification = Verification.VERIFIED
    else:
        verification = Verification.FORCED if force else Verification.FAILED
    meta = metadata(chosen.source, d, dtype, verification, attempts)
    if chosen.repairs:
        meta[METADATA_PREFIX + "repairs"] = json.dumps([str(r) for r in chosen.repairs])
    if Repair.EVAL_MODE in chosen.repairs:
        meta[METADATA_PREFIX + "model_mode"] = "eval (a copy of the model, given in training mode)"
    if fixed is not None:
        meta[METADATA_PREFIX + "fixed_size"] = f"{fixed[0]},{fixed[1]}"
    if safe_level is not None:
        meta[METADATA_PREFIX + "safe_ort_level"] = safe_level
    if chosen.attempt.optimizer:
        meta[METADATA_PREFIX + "optimizer"] = chosen.attempt.optimizer
    written = None
    if verification != Verification.FAILED:
        model = onnx.load(str(chosen.path))
        kept = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        written = files.atomic_write(path, lambda handle: handle.write(model.SerializeToString()))
    if d is not None:
        d = replace(d, onnx=replace(chosen.source, path=path, verified_by=meta),
                    notes=d.notes + notes + (_outcome(verification, path, reason),),
                    conversion=ConversionLog(verification.value, attempts, reason))
    return Conversion(path=written, verdict=d.verdict if d is not None else UNVERIFIED,
                      diagnosis=d, attempts=attempts, verification=verification,
                      metadata=meta, reason=reason)


def _why_not(d: Diagnosis, dynamic: bool, opts: Options) -> str:
    """Why the diagnosed file is not verified ("" when it is)."""
    if d.verdict != Verdict.PASS:
        return d.summary
    specs = d.settings.input_specs
    if dynamic and opts.check_sizes is None and not any(s.dynamic_axes for s in specs):
        # The dynamo exporter falls back to fixed sizes when it cannot keep them free.
        return ("free sizes were asked for, but the file takes only the traced size "
                f"{tuple(specs[0].shape) if specs else ()}: other sizes were not checked; "
                "convert with --static H,W for a fixed-size file, or --exporter legacy")
    return ""


def _outcome(verification: Verification, path: Path, reason: str) -> str:
    if verification == Verification.VERIFIED:
        return f"layerdiff convert verified the file and wrote {path}."
    if verification == Verification.FORCED:
        return f"layerdiff convert wrote {path} with --force although it failed: {reason}"
    return f"layerdiff convert did not write {path}: {reason} (--force writes it anyway)"


def metadata(source: OnnxSource, d: Diagnosis | None, dtype: str, verification: Verification,
             attempts: tuple[Attempt, ...]) -> dict[str, str]:
    """The ``layerdiff.*`` metadata_props of a converted file (README "Convert")."""
    from . import __version__

    key = lambda name: METADATA_PREFIX + name  # noqa: E731
    meta = {key("version"): __version__, key("verified"): verification.value,
            key("dtype"): dtype, key("exporter"): str(source.exporter),
            key("opset"): "" if source.opset is None else str(source.opset)}
    if d is not None:
        s = d.settings
        meta[key("inputs")] = json.dumps([{"name": i.onnx_name or i.name, "dtype": i.dtype,
                                           "shape": list(i.shape)} for i in s.input_specs])
        meta[key("sizes")] = json.dumps(_sizes(d))
        if d.cases:  # what it ran on: random draws, the bundled photo, files, other sizes
            meta[key("cases")] = json.dumps([{"input": c.label, "kind": c.kind.value,
                                              "shape": list(c.shape), "verdict": c.verdict.value}
                                             for c in d.cases])
        meta[key("rtol")], meta[key("atol")] = repr(s.rtol), repr(s.atol)
        errors = [o.metrics.max_abs for o in d.outputs]
        if errors:
            meta[key("max_output_error")] = f"{max(errors):.6g}"
        psnr = _psnr(d)
        if psnr is not None:
            meta[key("psnr")] = "inf" if math.isinf(psnr) else f"{psnr:.2f}"
    meta[key("attempts")] = json.dumps([a.as_json() for a in attempts])
    return meta


def _sizes(d: Diagnosis) -> list[list[int]]:
    """The shapes of the first input the file was run at (each input, each other size)."""
    ran = [list(c.shape) for c in d.cases if c.verdict != CaseVerdict.SKIPPED]
    specs = d.settings.input_specs
    return list(map(list, dict.fromkeys(map(tuple, ran)))) or ([list(specs[0].shape)] if specs else [])


def _psnr(d: Diagnosis) -> float | None:
    """The lowest PSNR of any image output over every input run (quality.py: the outputs
    as pictures clipped to [0, 1], data range 1); None without an image output."""
    values = [o.image.psnr for o in d.outputs if o.image is not None]
    return min(values, key=lambda v: (not math.isnan(v), v)) if values else None
