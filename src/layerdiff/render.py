"""Output layer: turn a :class:`~layerdiff.records.Diagnosis` into JSON, HTML and a
terminal summary.

Everything here is a pure function of the Diagnosis: no comparison, no alignment,
no rule evaluation -- only formatting. The number / status formatting lives in
:mod:`layerdiff.report_format`, the drawings (error-vs-depth chart, previews,
neighbourhood graph, histograms) in :mod:`layerdiff.report_visuals`.

Public API::

    to_json_dict(d)              -> dict   (schema "layerdiff/2")
    write_json(d, path)          -> Path   (atomic)
    render_html(d)               -> str    (one self-contained HTML page)
    write_html(d, path)          -> Path   (atomic)
    console_summary(d, color=)   -> str    (a few lines for the terminal)
"""

from __future__ import annotations

import functools
import json
import math
import os
import textwrap
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from .files import atomic_write_text
from .records import (
    SCHEMA, CaseVerdict, Diagnosis, DivergenceKind, ImageQuality, LayerResult, LayerStatus, Metrics, PairMethod,
    RefereeSide, Verdict,
)
from .store import human_bytes
from .report_format import (
    STATUS_LABELS,
    _fd_layer,
    _finite_or_none,
    _normalised,
    fmt_cos,
    fmt_db,
    fmt_num,
    fmt_pct,
    fmt_shape,
    fmt_shapes,
    fmt_ssim,
    fmt_value,
)
from .report_visuals import HISTOGRAM_PREFIX, _chart, _histograms, _neighbourhood, _pictures, _preview
from . import report_visuals as _visuals

# The drawing constants moved to report_visuals; still importable from here.
CHART_W, CHART_H = _visuals.CHART_W, _visuals.CHART_H
CHART_L, CHART_R = _visuals.CHART_L, _visuals.CHART_R
CHART_T, CHART_B = _visuals.CHART_T, _visuals.CHART_B
CHART_ZERO_LANE, CHART_MIN_EXP = _visuals.CHART_ZERO_LANE, _visuals.CHART_MIN_EXP
NB_CAP, HIST_BINS, HIST_FLOOR = _visuals.NB_CAP, _visuals.HIST_BINS, _visuals.HIST_FLOOR

__all__ = [
    "to_json_dict",
    "write_json",
    "render_html",
    "write_html",
    "console_summary",
    "layer_counts",
    "fmt_num",
]

TEMPLATE_NAME = "report.html.j2"

KIND_LABELS = {
    DivergenceKind.NUMERIC: "numeric mismatch",
    DivergenceKind.SHAPE_MISMATCH: "shape mismatch",
    DivergenceKind.NONFINITE: "non-finite values (NaN / inf)",
    DivergenceKind.RUNTIME_ERROR: "onnxruntime error",
}

VERDICT_LABELS = {Verdict.PASS: "PASS", Verdict.DIVERGED: "DIVERGED", Verdict.ERROR: "ERROR"}


# =========================================================================== JSON


def _fp16_json(findings: Any) -> dict[str, Any] | None:
    """The fp16 analysis (fp16.Fp16Findings) as JSON, or None when there was none."""
    if findings is None:
        return None
    layer = lambda l: {"module": l.module, "module_type": l.module_type,  # noqa: E731
                       "onnx_node": l.onnx_node, "max_abs": _finite_or_none(l.max_abs),
                       "tiny_share": _finite_or_none(l.tiny_share)}
    first = findings.first_nonfinite
    return {
        "summary": findings.summary(),
        "overflow": [layer(l) for l in findings.overflow],
        "underflow": [layer(l) for l in findings.underflow],
        "first_nonfinite": None if first is None else {"module": first.module,
                                                       "onnx_node": first.onnx_node},
        "keep_fp32": [{"module": k.module, "nodes": list(k.nodes), "reason": k.reason}
                      for k in findings.keep],
    }


def _plain(v: Any) -> Any:
    """Best-effort conversion of an arbitrary value to JSON-valid data.

    Non-finite floats become None; enum members their values; paths and unknown objects
    strings.
    """
    if isinstance(v, Enum):
        return _plain(v.value)
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)) and not isinstance(v, np.bool_):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (float, np.floating)):
        return _finite_or_none(v)
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        if v.size <= 64:
            return _plain(v.tolist())
        return f"array(shape={list(v.shape)}, dtype={v.dtype})"
    if isinstance(v, (bytes, bytearray)):
        return fmt_value(v)
    return str(v)


def _metrics_json(m: Metrics | None) -> dict[str, Any]:
    if m is None:
        return {
            "max_abs": None,
            "mean_abs": None,
            "max_rel": None,
            "cosine": None,
            "scale": None,
            "outlier_share": None,
            "shape_torch": None,
            "shape_onnx": None,
            "nan_torch": None,
            "nan_onnx": None,
            "inf_torch": None,
            "inf_onnx": None,
            "passed": None,
            "reason": None,
        }
    return {
        "max_abs": _finite_or_none(m.max_abs),
        "mean_abs": _finite_or_none(m.mean_abs),
        "max_rel": _finite_or_none(m.max_rel),
        "cosine": _finite_or_none(m.cosine),
        "scale": _finite_or_none(m.scale),
        "outlier_share": _finite_or_none(m.outlier_share),
        "shape_torch": [int(s) for s in m.shape_torch],
        "shape_onnx": [int(s) for s in m.shape_onnx],
        "nan_torch": int(m.nan_torch),
        "nan_onnx": int(m.nan_onnx),
        "inf_torch": int(m.inf_torch),
        "inf_onnx": int(m.inf_onnx),
        "passed": bool(m.passed),
        "reason": m.reason,
    }


def psnr_json(db: float) -> float | str | None:
    """A PSNR in JSON: a number of dB, the string "inf" for identical pictures (JSON has
    no infinity), null for NaN."""
    if math.isinf(db) and db > 0:
        return "inf"
    return _finite_or_none(db)


def _image_json(q: ImageQuality | None, case: bool) -> dict[str, Any] | None:
    if q is None:
        return None
    row = {"output": q.output, "psnr": psnr_json(q.psnr), "ssim": _finite_or_none(q.ssim),
           "visibility": q.visibility.value, "max_abs": _finite_or_none(q.max_abs),
           "value_range": [_finite_or_none(v) for v in q.value_range]}
    if case:
        row["case"] = q.case
    return row


def _call_labels(d: Diagnosis) -> dict[int, str]:
    labels = {c.index: c.label for c in d.calls}
    labels[-1] = "model input"
    return labels


def _aliases(d: Diagnosis) -> list[tuple[str, str]]:
    if d.alignment is None:
        return []
    labels = _call_labels(d)
    return [
        (labels.get(a, f"call {a}"), labels.get(b, f"call {b}")) for a, b in d.alignment.aliases
    ]


def to_json_dict(d: Diagnosis) -> dict[str, Any]:
    """The diagnosis as plain JSON data, schema ``"layerdiff/2"``.

    Float convention: every non-finite float (NaN, +inf, -inf) is written as ``null``,
    so the result always passes ``json.dumps(..., allow_nan=False)``. Whether a tensor
    actually held NaN / inf is recorded separately by the integer counts ``nan_torch``,
    ``nan_onnx``, ``inf_torch``, ``inf_onnx`` on each layer and output. A layer whose
    metrics are missing (onnxruntime never produced the tensor, ``status == "not_run"``)
    has ``null`` in every metric field and ``passed: null``.

    Paths are strings; tuples are lists; ``model`` / ``onnx`` are ``null`` when the
    diagnosis stopped before they existed (verdict ``"error"``). ``previews`` is never
    serialised.
    """
    fd = d.first_divergence
    fd_index = None if fd is None else fd.layer

    outputs = []
    for o in d.outputs:
        row = {"name": o.name, "model_output": o.model_output}
        row.update(_metrics_json(o.metrics))
        image = _image_json(o.image, case=True)
        if image is not None:  # an image output: its lowest PSNR over the inputs
            del image["output"], image["max_abs"]
        row["image"] = image
        outputs.append(row)

    layers = []
    for i, r in enumerate(d.layers):
        m = _metrics_json(r.metrics)
        row = {
            "index": i,
            "module": r.module,
            "module_type": r.module_type,
            "onnx_tensor": r.onnx_tensor,
            "onnx_node": r.onnx_node,
            "op_type": r.op_type,
            "order": int(r.order),
            "method": r.method.value,
            "ignored": bool(r.ignored),
            "status": r.status.value,
        }
        row.update(m)
        # The layer's own error (its segment on PyTorch's inputs); null when not measured.
        row["local"] = _metrics_json(r.local) if r.local is not None else None
        row["referee"] = None if r.referee is None else {
            "torch_error": _finite_or_none(r.referee.torch_error),
            "onnx_error": _finite_or_none(r.referee.onnx_error),
            "side": r.referee.side.value,
        }
        row["case"] = r.case
        layers.append(row)

    first = None
    if fd is not None:
        first = {
            "module": fd.module,
            "module_type": fd.module_type,
            "onnx_node": fd.onnx_node,
            "op_type": fd.op_type,
            "kind": fd.kind.value,
            "max_abs": _finite_or_none(fd.max_abs),
            "message": fd.message,
            "layer": fd_index,
            "region": [
                {"name": n.name, "op_type": n.op_type, "attrs": _plain(n.attrs)}
                for n in fd.region
            ],
            "torch_attrs": _plain(fd.torch_attrs),
            "downstream_of_ignored": list(fd.downstream_of_ignored),
            "case": fd.case,
        }
        if fd_index is not None:
            row = d.layers[fd_index]
            first["local_max_abs"] = None if row.local is None else _finite_or_none(row.local.max_abs)
            first["accumulated_max_abs"] = (None if row.metrics is None
                                            else _finite_or_none(row.metrics.max_abs))

    al = d.alignment
    unmatched = {
        "torch": [{"name": u.name, "reason": u.reason} for u in (al.unmatched_torch if al else ())],
        "onnx": [{"name": u.name, "reason": u.reason} for u in (al.unmatched_onnx if al else ())],
    }

    model = None
    if d.model is not None:
        mo = d.model
        model = {
            "path": None if mo.path is None else str(mo.path),
            "architecture": mo.architecture,
            "kind": mo.kind.value,
            "input_channels": _plain(mo.input_channels),
            "output_channels": _plain(mo.output_channels),
            "scale": _plain(mo.scale),
            "notes": list(mo.notes),
        }

    onnx = None
    if d.onnx is not None:
        on = d.onnx
        onnx = {
            "path": str(on.path),
            "exporter": on.exporter.value,
            "opset": _plain(on.opset),
            "producer": on.producer,
            "notes": list(on.notes),
            "verified_by": dict(on.verified_by),
        }

    s = d.settings
    settings = {
        "rtol": _finite_or_none(s.rtol),
        "atol": _finite_or_none(s.atol),
        "input_shape": [int(x) for x in s.input_shape],
        "inputs": [{"name": i.name, "onnx_name": i.onnx_name, "dtype": i.dtype,
                    "shape": [int(x) for x in i.shape], "kind": str(i.kind),
                    "range": (None if i.low is None else [_finite_or_none(i.low),
                                                          _finite_or_none(i.high)]),
                    "fill": _finite_or_none(i.fill) if i.fill is not None else None,
                    "keyword": i.keyword, "dynamic_axes": list(i.dynamic_axes)}
                   for i in s.input_specs],
        "input_files": list(s.input_files),
        "photo": s.photo,
        "check_sizes": [list(c) for c in s.check_sizes],
        "seed": int(s.seed),
        "ignore": list(s.ignore),
        "provider": s.provider,
        "ort_level": s.ort_level,
        "ort_config": {str(k): str(v) for k, v in getattr(s, "ort_config", ())},
        "max_memory": int(s.max_memory) if s.max_memory else None,
    }

    f = d.facts
    facts = {
        "input_mutated": bool(f.input_mutated),
        "training_modules": list(f.training_modules),
        "random_ops": [{"side": r.side.value, "where": r.where, "op": r.op} for r in f.random_ops],
        "onnx_training_nodes": list(f.onnx_training_nodes),
        "mutated_outputs": list(f.mutated_outputs),
        "onnx_input_shape": _plain(f.onnx_input_shape),
        "vanishes_without_ort_optimisation": f.vanishes_without_ort_optimisation,
        "ort_optimisation_level": f.ort_optimisation_level,
        "ort_rewrite": f.ort_rewrite,
        "instrumentation_delta": _finite_or_none(f.instrumentation_delta),
        "export_size": _plain(f.export_size),
        "fp16": _fp16_json(f.fp16),
        "fp16_fix": None if f.fp16_fix is None else {"path": f.fp16_fix[0],
                                                     "verdict": _plain(f.fp16_fix[1])},
        "peak_memory": f.peak_memory,
        "over_memory": bool(f.over_memory),
        "spilled_bytes": int(f.spilled_bytes),
        "segments": int(f.segments),
        "forward_memory": f.forward_memory,
        "skipped_for_memory": list(f.skipped_for_memory),
        "runtime_precision": f.runtime_precision,
        "runtime_detail": f.runtime_detail,
    }

    return {
        "schema": SCHEMA,
        "verdict": d.verdict.value,
        "exit_code": d.exit_code,
        "summary": d.summary,
        "tolerance": {"rtol": settings["rtol"], "atol": settings["atol"]},
        "outputs": outputs,
        "layers": layers,
        # fail: its own segment fails (a cause); propagated: only carries error from upstream
        "layer_counts": layer_counts(d),
        "first_divergence": first,
        "suggestions": [
            {
                "rule": sg.rule,
                "title": sg.title,
                "detail": sg.detail,
                "fix": sg.fix,
                "layers": list(sg.layers),
            }
            for sg in d.suggestions
        ],
        "unmatched": unmatched,
        "aliases": [{"module": a, "shares_with": b} for a, b in _aliases(d)],
        "coverage": _plain(d.alignment.coverage()) if d.alignment else None,
        "reproducer": None if d.reproducer is None else {"onnx": d.reproducer[0], "npz": d.reproducer[1]},
        "cases": [
            {"label": c.label, "kind": c.kind.value, "shape": list(c.shape),
             "verdict": c.verdict.value,
             "first_divergence": c.first_divergence,
             "max_output_error": _finite_or_none(c.max_output_error), "note": c.note,
             "layer_by_layer": c.layer_by_layer,
             "images": [_image_json(q, case=False) for q in c.images]}
            for c in d.cases
        ],
        "masked": bool(d.masked),
        "model": model,
        "onnx": onnx,
        "settings": settings,
        "facts": facts,
        "versions": {str(k): _plain(v) for k, v in d.versions.items()},
        "notes": list(d.notes),
        "error": d.error,
        "runtimes": [
            {"runtime": r.runtime, "verdict": r.verdict.value,
             "first_divergence": r.first_divergence or None, "onnx_node": r.onnx_node or None,
             "max_output_error": _finite_or_none(r.max_output_error),
             "failing_layers": int(r.failing_layers), "summary": r.summary,
             "detail": r.detail}
            for r in d.runtimes
        ],
        "runtime_departure": _departure_json(d.runtime_departure),
        **({} if d.conversion is None else {"conversion": {
            "verification": d.conversion.verification,
            "attempts": [a.as_json() for a in d.conversion.attempts],
            "reason": d.conversion.reason}}),
    }


def _departure_json(where: Any) -> dict[str, Any] | None:
    if where is None:
        return None
    return {"module": where.module, "onnx_node": where.onnx_node, "op_type": where.op_type,
            "departs": list(where.departs), "holds": list(where.holds),
            "max_abs": {name: _finite_or_none(err) for name, err in where.errors}}


def to_json(d: Diagnosis, *, indent: int | None = 2) -> str:
    """``to_json_dict`` serialised; guaranteed valid JSON (no NaN / Infinity tokens)."""
    return json.dumps(to_json_dict(d), indent=indent, allow_nan=False, ensure_ascii=False) + "\n"


# =========================================================================== files


def write_json(d: Diagnosis, path: str | os.PathLike[str]) -> Path:
    """Write ``to_json_dict(d)`` to ``path`` atomically; creates parent directories."""
    return atomic_write_text(path, to_json(d))


def write_html(d: Diagnosis, path: str | os.PathLike[str]) -> Path:
    """Render the report and write it to ``path`` atomically; creates parent directories.

    The page is rendered completely in memory first, so a rendering error leaves no file
    (and an existing report untouched).
    """
    html = render_html(d)
    return atomic_write_text(path, html)


# =========================================================================== HTML


def _template_dir() -> Path:
    """Folder holding report.html.j2: the installed ``layerdiff.templates`` package, or
    ``<repo>/templates`` when running from a source checkout."""
    candidates: list[Path] = []
    try:
        from importlib.resources import files

        res = files("layerdiff.templates")
        # templates/ has no __init__.py, so this is usually a namespace package and
        # ``res`` a MultiplexedPath; joinpath() of an existing file gives a real Path.
        hit = res.joinpath(TEMPLATE_NAME)
        if isinstance(hit, Path):
            candidates.append(hit.parent)
        candidates.extend(Path(str(p)) for p in getattr(res, "_paths", None) or [res])
    except Exception:  # not installed / not importable: use the source tree
        pass
    candidates.append(Path(__file__).resolve().parents[2] / "templates")
    for c in candidates:
        if (c / TEMPLATE_NAME).is_file():
            return c
    raise FileNotFoundError(
        f"cannot find {TEMPLATE_NAME}; looked in: " + ", ".join(str(c) for c in candidates)
    )


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_template_dir())),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        num=fmt_num,
        cos=fmt_cos,
        pct=fmt_pct,
        shape=fmt_shape,
        value=fmt_value,
        bytes=human_bytes,
        db=fmt_db,
        ssim=fmt_ssim,
    )
    return env


def _status_title(r: LayerResult) -> str:
    """Hover text of a status badge: why it has that status, in words."""
    m, lm, status = r.metrics, r.local, r.status
    if status == LayerStatus.PROPAGATED:
        why = f" ({m.reason})" if m is not None and m.reason else ""
        return ("its own segment passes on PyTorch's inputs; the total error fails only because of "
                f"error arriving from upstream{why}")
    if status == LayerStatus.FAIL:
        if lm is not None and not lm.passed:
            return f"its own segment fails on PyTorch's inputs: {lm.reason}" if lm.reason else \
                "its own segment fails on PyTorch's inputs"
        return m.reason if m is not None and m.reason else ""
    if status == LayerStatus.NOT_RUN:
        return "onnxruntime never produced this tensor"
    if status == LayerStatus.IGNORED:
        return "left out by --ignore-layer" + (f"; {m.reason}" if m is not None and m.reason else "")
    return ""


REFEREE_LABELS = {RefereeSide.ONNX: "off: ONNX", RefereeSide.TORCH: "off: PyTorch",
                  RefereeSide.NOISE: "noise"}


def _referee_title(ref: Any) -> str:
    """Hover text of a layer's float64 referee marker: both fp32 errors."""
    return (f"vs a float64 PyTorch run: ONNX error {fmt_num(ref.onnx_error)}, PyTorch fp32 error "
            f"{fmt_num(ref.torch_error)} (the layer's fp32 noise floor)")


def _ratio(a: float, b: float) -> str:
    """a / b as a compact factor ("3.2", "41", "1,250", "4.2e6")."""
    q = a / b
    if q < 10:
        return f"{q:.1f}"
    if q < 1e4:
        return f"{q:,.0f}"
    return fmt_num(q)


def _referee_words(ref: Any) -> str:
    """One sentence on which fp32 side a float64 PyTorch run finds off."""
    on, to = float(ref.onnx_error), float(ref.torch_error)
    pair = (f"ONNX is off by {fmt_num(on)}, PyTorch fp32 by {fmt_num(to)} (the layer's fp32 "
            "rounding noise)")
    if ref.side == RefereeSide.NOISE:
        return (f"Against a float64 PyTorch run both fp32 sides are within a few times the layer's "
                f"rounding noise: {pair}. Neither is clearly wrong.")
    bad, good, bad_v, good_v = (("ONNX", "PyTorch fp32", on, to) if ref.side == RefereeSide.ONNX
                                else ("PyTorch fp32", "ONNX", to, on))
    if not math.isfinite(bad_v):
        how = f"{bad} is non-finite where float64 is not, while {good} is off by {fmt_num(good_v)}"
        return f"Against a float64 PyTorch run: {how}."
    if good_v > 0 and math.isfinite(good_v):
        how = f"{bad} is {_ratio(bad_v, good_v)}× further from float64 than {good} is"
    else:
        how = f"{bad} is off by {fmt_num(bad_v)}, {good} by {fmt_num(good_v)}"
    return f"Against a float64 PyTorch run: {how}. {pair}."


def _layer_rows(d: Diagnosis, fd_index: int | None) -> list[dict[str, Any]]:
    rows = []
    several = len(d.cases) > 1
    for i, r in enumerate(d.layers):
        m, lm = r.metrics, r.local
        status = r.status
        css_status = LayerStatus.IGNORED if r.ignored else status
        norm, lnorm = _normalised(m), _normalised(lm)
        rows.append(
            {
                "i": i,
                "r": r,
                "m": m,
                "lm": lm,
                "status": status,
                "status_label": STATUS_LABELS[status],
                "css": css_status,
                "first": i == fd_index,
                "shape": fmt_shapes(m),
                "shape_mismatch": m is not None and tuple(m.shape_torch) != tuple(m.shape_onnx),
                "local_bad": lm is not None and not lm.passed,
                # raw values for sorting (JS); "" sorts last
                "v_max_abs": _sortkey(m.max_abs if m else None),
                "v_local_max_abs": _sortkey(lm.max_abs if lm else None),
                "v_mean_abs": _sortkey(m.mean_abs if m else None),
                "v_max_rel": _sortkey(m.max_rel if m else None),
                "v_cosine": _sortkey(m.cosine if m else None),
                "v_outlier": _sortkey(m.outlier_share if m else None),
                "v_local_outlier": _sortkey(lm.outlier_share if lm else None),
                "v_norm": "" if norm is None else _sortkey(norm, 3),
                "v_lnorm": "" if lnorm is None else _sortkey(lnorm, 3),
                "title": _status_title(r),
                "ref": None if r.referee is None else (
                    r.referee.side, REFEREE_LABELS[r.referee.side],
                    _referee_title(r.referee)),
                "case": r.case if several else "",
            }
        )
    return rows


def _unpaired_rows(d: Diagnosis) -> list[dict[str, Any]]:
    """Modules with no ONNX tensor of their own, as table rows: "fused" into another
    module's node, or "not paired" with the reason."""
    if d.alignment is None:
        return []
    by_label = {c.label: c for c in d.calls}
    rows = []
    for u in d.alignment.unmatched_torch:
        call = by_label.get(u.name)
        fused = u.fused_into is not None
        rows.append({
            "name": u.name, "reason": u.reason,
            "module_type": call.module_type if call else "",
            "shape": fmt_shape(call.shape) if call else "–",
            "status": "fused" if fused else "unmatched",
            "label": "fused" if fused else "not paired",
        })
    return rows


def _sortkey(x: Any, digits: int = 9) -> str:
    """Numeric sort value for a data- attribute: NaN and inf sort as huge, None as ''.

    ``digits`` significant digits: enough to order cosines next to 1, short enough to keep
    a 5,000-row table light.
    """
    if x is None:
        return ""
    f = float(x)
    if math.isnan(f) or math.isinf(f):
        return "1e308"
    return f"{f:.{digits}g}"


# ---------------------------------------------------------------- context


def _all_notes(d: Diagnosis) -> list[tuple[str, str]]:
    """(source, note) for d.notes, d.onnx.notes and d.model.notes, each note once.

    The pipeline may copy the model / ONNX notes into d.notes; they are shown once,
    labelled with where they came from.
    """
    onnx_notes = tuple(d.onnx.notes) if d.onnx is not None else ()
    model_notes = tuple(d.model.notes) if d.model is not None else ()

    def source(n: str) -> str:
        return "ONNX" if n in onnx_notes else "model" if n in model_notes else "layerdiff"

    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for n in (*d.notes, *onnx_notes, *model_notes):
        if n not in seen:
            seen.add(n)
            out.append((source(n), n))
    return out


def layer_counts(d: Diagnosis) -> dict[str, int]:
    """Layers by status: ``fail`` (its own segment fails: a cause), ``propagated`` (only
    carries error from upstream), ``pass``, ``ignored``, ``not_run``; ``compared`` is all."""
    counts = {"compared": len(d.layers), "pass": 0, "fail": 0, "propagated": 0, "ignored": 0,
              "not_run": 0}
    for r in d.layers:
        counts[(LayerStatus.IGNORED if r.ignored else r.status).value] += 1
    return counts


def fails_own(k: int) -> str:
    """'3 fail on their own' / '1 fails on its own'."""
    return f"{k} fails on its own" if k == 1 else f"{k} fail on their own"


def carries(k: int) -> str:
    """'3 only carry error from upstream' / '1 only carries error from upstream'."""
    return f"{k} only carries error from upstream" if k == 1 else f"{k} only carry error from upstream"


def _share(m: Metrics | None) -> str:
    """max_abs as a share of the tensor's range, in words."""
    v = _normalised(m)
    if v is None:
        return "–"
    if not math.isfinite(v):
        return "non-finite"
    return fmt_pct(v) if v >= 1e-4 else fmt_num(v)


def _fd_errors(layer: LayerResult | None) -> dict[str, Any] | None:
    """The first divergence's own (local) and total (accumulated) error side by side, and
    one plain sentence on how they relate."""
    if layer is None or layer.metrics is None:
        return None
    own, total = layer.local, layer.metrics
    if own is None:
        words = ("Only the total error was measured for this layer; its own error (its ONNX segment "
                 "run on PyTorch's inputs) is not available.")
    elif not own.passed:
        a, b = _finite_or_none(own.max_abs), _finite_or_none(total.max_abs)
        if a is not None and b is not None and b > 0 and a < 0.5 * b:
            words = (f"Its own segment adds an error of {fmt_num(a)} even on exact inputs; more error "
                     f"arrives from upstream, for {fmt_num(b)} in total at its output.")
        else:
            words = ("Its own segment produces this error: run on PyTorch's exact inputs it is already "
                     "this far off, so the inputs it receives are not the cause.")
    else:
        words = ("Its own segment passes on PyTorch's inputs: the error at its output arrives from "
                 "upstream.")
    return {"own": own, "total": total, "own_share": _share(own), "total_share": _share(total),
            "words": words}


METHOD_LABELS = {PairMethod.CLOSE_WEIGHTS: "close weights"}


def _coverage_line(d: Diagnosis) -> str:
    """"40 module calls: 98% compared (scope 20, weights 18), 0% fused, 2% not paired"."""
    if d.alignment is None:
        return ""
    c = d.alignment.coverage()
    n = int(c["modules"])
    if n == 0:
        return ""

    def pct(x: float) -> str:
        if 0 < x < 0.01:
            return "<1%"
        if 0.99 < x < 1:
            return ">99%"
        return f"{x * 100:.0f}%"

    by = sorted(c["by_method"].items(), key=lambda kv: -kv[1])
    how = ", ".join(f"{METHOD_LABELS.get(m, m)} {k}" for m, k in by)
    return (f"{n} module call{'s' if n != 1 else ''}: {pct(c['compared'])} compared"
            + (f" ({how})" if how else "")
            + f", {pct(c['fused'])} fused, {pct(c['unmatched'])} not paired")


def _fp16(d: Diagnosis) -> dict[str, Any] | None:
    """The float16 section: summary, layers to keep in fp32, the fix file's verdict."""
    f = d.facts.fp16
    if f is None:
        return None
    keep = []
    for k in f.keep:
        nodes = list(k.nodes)
        shown = ", ".join(nodes[:3]) + (f", … +{len(nodes) - 3} more" if len(nodes) > 3 else "")
        keep.append({"module": k.module, "nodes": shown, "all_nodes": ", ".join(nodes),
                     "n": len(nodes), "reason": k.reason})
    fix = d.facts.fp16_fix
    return {"summary": f.summary(), "keep": keep, "clean": f.clean,
            "fix": None if fix is None else {"path": fix[0], "verdict": fix[1],
                                             "label": VERDICT_LABELS[fix[1]]}}


def _context(d: Diagnosis) -> dict[str, Any]:
    fd = d.first_divergence
    fd_index = None if fd is None else fd.layer
    rows = _layer_rows(d, fd_index)
    counts = layer_counts(d)
    fd_layer = _fd_layer(d)
    # Drift: outputs off, nobody fails on its own (an ignored layer that does is a cause too).
    ignored_causes = any(r.ignored and (j := r.local or r.metrics) is not None and not j.passed
                         for r in d.layers)
    drift = (d.verdict == Verdict.DIVERGED and fd is None and counts["fail"] == 0
             and counts["propagated"] > 0 and not ignored_causes)

    fd_suggestions = []
    if fd is not None:
        keys = {fd.module, fd.onnx_node}
        fd_suggestions = [s for s in d.suggestions if keys & set(s.layers)]

    notes = _all_notes(d)

    f = d.facts
    facts = []
    if f.vanishes_without_ort_optimisation is True:
        facts.append(("onnxruntime optimisation", "the divergence vanishes with every graph optimisation off"))
    elif f.vanishes_without_ort_optimisation is False:
        facts.append(("onnxruntime optimisation", "the divergence stays with every graph optimisation off"))
    if f.input_mutated:
        facts.append(("input", "the model modifies its input tensor in place"))
    if f.training_modules:
        facts.append(("left in training mode", ", ".join(f.training_modules)))
    if f.random_ops:
        facts.append(("random numbers drawn in forward",
                      ", ".join(f"{r.op} ({r.side}: {r.where})" for r in f.random_ops)))
    if f.onnx_training_nodes:
        facts.append(("ONNX training-mode nodes", ", ".join(f.onnx_training_nodes)))
    if f.mutated_outputs:
        facts.append(("outputs changed after the hook", ", ".join(f.mutated_outputs)))
    if f.onnx_input_shape:
        facts.append(("ONNX input shape", fmt_shape(f.onnx_input_shape)))
    if f.ort_rewrite:
        facts.append(("onnxruntime rewrite", f"the optimiser turns this node into {f.ort_rewrite}"))

    previews = []
    for name, arr in (d.previews or {}).items():
        if str(name).startswith(HISTOGRAM_PREFIX):  # bar charts, not heat maps
            continue
        p = _preview(str(name), arr)
        if p is not None:
            previews.append(p)

    al = d.alignment
    title_bits = []
    if d.model is not None:
        title_bits.append(d.model.architecture)
    elif d.onnx is not None:
        title_bits.append(d.onnx.path.name)

    return {
        "d": d,
        "schema": SCHEMA,
        "verdict": d.verdict,
        "verdict_label": VERDICT_LABELS[d.verdict],
        "title": " · ".join(title_bits),
        "fd": fd,
        "fd_index": fd_index,
        "fd_layer": fd_layer,
        "fd_errors": _fd_errors(fd_layer),
        "fd_referee": None if fd_layer is None or fd_layer.referee is None
        else _referee_words(fd_layer.referee),
        "cases": list(d.cases) if len(d.cases) > 1 else [],
        "cases_diverged": sum(1 for c in d.cases if c.verdict == CaseVerdict.DIVERGED),
        "coverage": _coverage_line(d),
        "fp16": _fp16(d),
        "carried_after_fd": 0 if fd_index is None else sum(
            1 for r in d.layers[fd_index + 1:]
            if r.status == LayerStatus.PROPAGATED and not r.ignored),
        "drift": drift,
        "fd_kind": KIND_LABELS[fd.kind] if fd else "",
        "fd_suggestions": fd_suggestions,
        "rows": rows,
        "unpaired_rows": _unpaired_rows(d),
        "counts": counts,
        "chart": _chart(d, fd_index),
        "aliases": _aliases(d),
        # Written next to the report, so linked by file name.
        "reproducer": None if d.reproducer is None else {
            "onnx": Path(d.reproducer[0]).name, "npz": Path(d.reproducer[1]).name},
        "unmatched_torch": list(al.unmatched_torch) if al else [],
        "unmatched_onnx": list(al.unmatched_onnx) if al else [],
        "has_scopes": al.has_scopes if al else None,
        "notes": notes,
        "conversion": d.conversion,
        "facts": facts,
        "previews": previews,
        "pictures": _pictures(d),
        "has_images": any(o.image is not None for o in d.outputs),
        "cases_images": any(c.images for c in d.cases),
        "histograms": _histograms(d),
        "neighbourhood": _neighbourhood(d, fd),
        "outputs_failed": sum(1 for o in d.outputs if not o.passed),
        "layerdiff_version": d.versions.get("layerdiff", ""),
        "fmt_shapes": fmt_shapes,
        "fails_own": fails_own,
        "carries": carries,
    }


def render_html(d: Diagnosis) -> str:
    """The full report: one self-contained HTML page (inline CSS / JS / SVG, no network)."""
    return _env().get_template(TEMPLATE_NAME).render(**_context(d))


# =========================================================================== console


def _console_pictures(d: Diagnosis) -> list[str]:
    """PSNR and SSIM of each image output on each input, with the judgment in words."""
    images = [q for c in d.cases for q in c.images] or [o.image for o in d.outputs if o.image]
    if not images:
        return []
    several = len({q.output for q in images}) > 1
    lines = ["  pictures (ONNX vs PyTorch, values clipped to [0, 1]):"]
    for q in images:
        where = q.case + (f", {q.output}" if several else "")
        lines.append(f"    {where}: PSNR {fmt_db(q.psnr)}, SSIM {fmt_ssim(q.ssim)}, "
                     f"max abs error {fmt_num(q.max_abs)}: {q.visibility.words}")
    return lines


_COLORS = {Verdict.PASS: "32", Verdict.DIVERGED: "31", Verdict.ERROR: "33"}


def console_summary(d: Diagnosis, *, color: bool) -> str:
    """A compact multi-line summary for the terminal (no trailing newline).

    With ``color=False`` the text contains no escape sequences at all.
    """

    def c(code: str, s: str) -> str:
        return f"\x1b[{code}m{s}\x1b[0m" if color else s

    def wrap(s: str, indent: str) -> list[str]:
        out: list[str] = []
        for para in str(s).splitlines() or [""]:
            out += textwrap.wrap(
                para,
                width=100,
                initial_indent=indent,
                subsequent_indent=indent,
                break_long_words=False,
                break_on_hyphens=False,
            ) or [indent.rstrip()]
        return out

    label = VERDICT_LABELS[d.verdict]
    lines = [f"layerdiff: {c('1;' + _COLORS[d.verdict], label)}"]
    if d.summary:
        lines += wrap(d.summary, "  ")

    if d.runtimes:
        lines.append("  runtimes:")
        width = max(len(r.runtime) for r in d.runtimes)
        for r in d.runtimes:
            verdict = c(_COLORS[r.verdict], r.verdict.value.ljust(8))
            what = (f"first divergence {r.first_divergence}" if r.first_divergence
                    else r.summary if r.verdict == Verdict.ERROR else "")
            lines += wrap(f"{r.runtime.ljust(width)}  {verdict}  max output error "
                          f"{fmt_num(r.max_output_error)}" + (f"; {what}" if what else ""),
                          "    ")
    if d.verdict == Verdict.ERROR and d.error:
        lines.append(f"  {c('33', 'error:')} {d.error.splitlines()[0] if d.error else ''}")
        lines += [f"    {ln}" for ln in d.error.splitlines()[1:6]]

    fd = d.first_divergence
    if fd is not None:
        where = fd.module + (f" ({fd.module_type})" if fd.module_type else "")
        lines.append(f"  first divergence: {c('1', where)}")
        bits = [f"ONNX node {fd.onnx_node}", f"op {fd.op_type}", f"kind {fd.kind}"]
        row = _fd_layer(d)
        own_total = ""
        if row is not None and row.local is not None and row.metrics is not None:
            on = f", on {row.case}" if row.case and fd.case and row.case != fd.case else ""
            own_total = (f"own error {fmt_num(row.local.max_abs)} (its segment on PyTorch's inputs), "
                         f"total {fmt_num(row.metrics.max_abs)} at its output{on}")
        elif fd.max_abs is not None:
            bits.append(f"max abs error {fmt_num(fd.max_abs)}")
        lines += wrap(", ".join(bits), "    ")
        if own_total:
            lines += wrap(own_total, "    ")
        if fd.message:
            msg = fd.message.strip().splitlines()
            lines += wrap(msg[0], "    ")
            if fd.kind == DivergenceKind.RUNTIME_ERROR and len(msg) > 1:
                lines += [f"    {ln}" for ln in msg[1:4]]
        if fd.downstream_of_ignored:
            lines.append(
                "    downstream of ignored modules: " + ", ".join(fd.downstream_of_ignored)
            )
    if d.masked:
        lines.append(
            "  "
            + c("33", "masked downstream:")
            + " a layer diverges but the final output still passes the tolerance."
        )

    if d.layers:
        n = layer_counts(d)
        bits = [f"{n['compared']} compared",
                c("31", fails_own(n["fail"])) if n["fail"] else fails_own(0),
                c("33", carries(n["propagated"])) if n["propagated"] else carries(0)]
        bits += [f"{n[k]} {k.replace('_', ' ')}" for k in ("ignored", "not_run") if n[k]]
        lines.append("  layers: " + ", ".join(bits))

    if d.outputs:
        failed = [o.name for o in d.outputs if not o.passed]
        errs = [float(o.metrics.max_abs) for o in d.outputs]
        worst = math.nan if any(math.isnan(v) for v in errs) else max(errs)
        state = f"{len(failed)} of {len(d.outputs)} fail" if failed else "all pass"
        lines.append(f"  outputs: {state} (max abs error {fmt_num(worst)})")
    lines += _console_pictures(d)

    if d.suggestions:
        lines.append("  suggestions:")
        for k, s in enumerate(d.suggestions[:3], 1):
            lines += wrap(f"{k}. {s.title}", "    ")
            if s.fix:
                lines += wrap(f"fix: {s.fix}", "       ")
        if len(d.suggestions) > 3:
            lines.append(f"    (+{len(d.suggestions) - 3} more in the report)")

    notes = _all_notes(d)
    if notes:
        lines.append("  notes:")
        for _, n in notes:
            lines += wrap(f"- {n}", "    ")
    return "\n".join(lines)
