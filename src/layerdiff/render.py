"""Output layer: turn a :class:`~layerdiff.records.Diagnosis` into JSON, HTML and a
terminal summary.

Everything here is a pure function of the Diagnosis: no comparison, no alignment,
no rule evaluation -- only formatting (and laying out the error-vs-depth chart).

Public API::

    to_json_dict(d)              -> dict   (schema "layerdiff/1")
    write_json(d, path)          -> Path   (atomic)
    render_html(d)               -> str    (one self-contained HTML page)
    write_html(d, path)          -> Path   (atomic)
    console_summary(d, color=)   -> str    (a few lines for the terminal)
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import os
import secrets
import struct
import textwrap
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import numpy as np

from .records import SCHEMA, Diagnosis, FirstDivergence, LayerResult, Metrics

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
    "numeric": "numeric mismatch",
    "shape_mismatch": "shape mismatch",
    "nonfinite": "non-finite values (NaN / inf)",
    "runtime_error": "onnxruntime error",
}

VERDICT_LABELS = {"pass": "PASS", "diverged": "DIVERGED", "error": "ERROR"}


# =========================================================================== numbers


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt_num(x: Any) -> str:
    """Compact number: 3 significant digits, scientific when small or very large.

    ``None`` -> "–", NaN -> "NaN", infinities -> "inf" / "-inf", 0 -> "0".
    """
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if f == 0:
        return "0"
    a = abs(f)
    if 1e3 <= a < 1e5:
        return f"{f:.0f}"
    if 1e-3 <= a < 1e3:
        s = f"{f:.3g}"
        if "e" not in s:
            return s
    mant, exp = f"{f:.2e}".split("e")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def fmt_cos(x: Any) -> str:
    """Cosine similarity: fixed 6 decimals (it lives next to 1), NaN/None as fmt_num."""
    f = _finite_or_none(x)
    if f is None:
        return fmt_num(x)
    return f"{f:.6f}"


def fmt_pct(x: Any) -> str:
    """A share in [0, 1] as a compact percentage."""
    f = _finite_or_none(x)
    if f is None:
        return fmt_num(x)
    if f == 0:
        return "0%"
    if f < 1e-4:
        return "<0.01%"
    return f"{f * 100:.3g}%"


def fmt_shape(shape: Any, sep: str = "×") -> str:
    if shape is None:
        return "–"
    shape = tuple(shape)
    if not shape:
        return "scalar"
    return sep.join("?" if s is None else str(s) for s in shape)


def fmt_shapes(m: Metrics | None, sep: str = "×") -> str:
    if m is None:
        return "–"
    a, b = tuple(m.shape_torch), tuple(m.shape_onnx)
    if a == b:
        return fmt_shape(a, sep)
    return f"{fmt_shape(a, sep)} vs {fmt_shape(b, sep)}"


def fmt_value(v: Any, limit: int = 160) -> str:
    """Short human rendering of an attribute value (ONNX or torch)."""
    if isinstance(v, (bytes, bytearray)):
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            v = f"<{len(v)} bytes>"
    if isinstance(v, np.ndarray):
        if v.size <= 16:
            v = v.tolist()
        else:
            return f"array(shape={fmt_shape(v.shape, 'x')}, dtype={v.dtype})"
    if isinstance(v, float):
        s = fmt_num(v)
    elif isinstance(v, (list, tuple)):
        inner = ", ".join(fmt_value(x, limit) for x in v)
        s = f"[{inner}]" if isinstance(v, list) else f"({inner}{',' if len(v) == 1 else ''})"
    elif isinstance(v, Mapping):
        s = "{" + ", ".join(f"{k}: {fmt_value(x, limit)}" for k, x in v.items()) + "}"
    else:
        s = str(v)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s


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

    Non-finite floats become None; paths and unknown objects become strings.
    """
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


def _layer_index(d: Diagnosis, fd: FirstDivergence | None) -> int | None:
    """Position in d.layers of the first divergence's row, if there is one."""
    if fd is None:
        return None
    candidates = [i for i, r in enumerate(d.layers) if r.module == fd.module]
    for i in candidates:
        if d.layers[i].onnx_node == fd.onnx_node:
            return i
    if candidates:
        return candidates[0]
    for i, r in enumerate(d.layers):
        if r.onnx_node == fd.onnx_node:
            return i
    return None


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
    """The diagnosis as plain JSON data, schema ``"layerdiff/1"``.

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
    fd_index = _layer_index(d, fd)

    outputs = []
    for o in d.outputs:
        row = {"name": o.name}
        row.update(_metrics_json(o.metrics))
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
            "method": r.method,
            "ignored": bool(r.ignored),
            "status": r.status,
        }
        row.update(m)
        # The layer's own error (its segment on PyTorch's inputs); null when not measured.
        row["local"] = _metrics_json(r.local) if r.local is not None else None
        row["referee"] = None if r.referee is None else {
            "torch_error": _finite_or_none(r.referee.torch_error),
            "onnx_error": _finite_or_none(r.referee.onnx_error),
            "side": r.referee.side,
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
            "kind": fd.kind,
            "max_abs": _finite_or_none(fd.max_abs),
            "message": fd.message,
            "layer_index": fd_index,
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
            "kind": mo.kind,
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
            "exporter": on.exporter,
            "opset": _plain(on.opset),
            "producer": on.producer,
            "notes": list(on.notes),
        }

    s = d.settings
    settings = {
        "rtol": _finite_or_none(s.rtol),
        "atol": _finite_or_none(s.atol),
        "input_shape": [int(x) for x in s.input_shape],
        "seed": int(s.seed),
        "ignore": list(s.ignore),
        "provider": s.provider,
        "ort_level": s.ort_level,
        "ort_config": {str(k): str(v) for k, v in getattr(s, "ort_config", ())},
    }

    f = d.facts
    facts = {
        "input_mutated": bool(f.input_mutated),
        "training_modules": list(f.training_modules),
        "onnx_training_nodes": list(f.onnx_training_nodes),
        "mutated_outputs": list(f.mutated_outputs),
        "onnx_input_shape": _plain(f.onnx_input_shape),
        "vanishes_without_ort_optimisation": f.vanishes_without_ort_optimisation,
        "ort_optimisation_level": f.ort_optimisation_level,
        "ort_rewrite": f.ort_rewrite,
        "instrumentation_delta": _finite_or_none(f.instrumentation_delta),
        "export_size": _plain(f.export_size),
        "fp16": _fp16_json(f.fp16),
        "fp16_fix": None if f.fp16_fix is None else {"path": f.fp16_fix[0], "verdict": f.fp16_fix[1]},
    }

    return {
        "schema": SCHEMA,
        "verdict": d.verdict,
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
            {"label": c.label, "kind": c.kind, "shape": list(c.shape), "verdict": c.verdict,
             "first_divergence": c.first_divergence,
             "max_output_error": _finite_or_none(c.max_output_error), "note": c.note}
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
    }


def to_json(d: Diagnosis, *, indent: int | None = 2) -> str:
    """``to_json_dict`` serialised; guaranteed valid JSON (no NaN / Infinity tokens)."""
    return json.dumps(to_json_dict(d), indent=indent, allow_nan=False, ensure_ascii=False) + "\n"


# =========================================================================== files


def _atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same directory + os.replace.

    The target either keeps its old content or gets the complete new content; the
    temp file is removed on any failure. The new file gets the usual umask-derived
    permissions (not the 0600 of tempfile.mkstemp), so the report can be shared.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def write_json(d: Diagnosis, path: str | os.PathLike[str]) -> Path:
    """Write ``to_json_dict(d)`` to ``path`` atomically; creates parent directories."""
    return _atomic_write_text(path, to_json(d))


def write_html(d: Diagnosis, path: str | os.PathLike[str]) -> Path:
    """Render the report and write it to ``path`` atomically; creates parent directories.

    The page is rendered completely in memory first, so a rendering error leaves no file
    (and an existing report untouched).
    """
    html = render_html(d)
    return _atomic_write_text(path, html)


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
    )
    return env


STATUS_LABELS = {
    "pass": "pass",
    "fail": "fail",
    "propagated": "propagated",
    "ignored": "ignored",
    "not_run": "not run",
}


def _status_of(r: LayerResult) -> str:
    """The layer's status; derived from its metrics for records that carry none."""
    if r.status:
        return r.status
    if r.metrics is None:
        return "not_run"
    return "pass" if r.metrics.passed else "fail"


def _status_title(r: LayerResult, status: str) -> str:
    """Hover text of a status badge: why it has that status, in words."""
    m, lm = r.metrics, r.local
    if status == "propagated":
        why = f" ({m.reason})" if m is not None and m.reason else ""
        return ("its own segment passes on PyTorch's inputs; the total error fails only because of "
                f"error arriving from upstream{why}")
    if status == "fail":
        if lm is not None and not lm.passed:
            return f"its own segment fails on PyTorch's inputs: {lm.reason}" if lm.reason else \
                "its own segment fails on PyTorch's inputs"
        return m.reason if m is not None and m.reason else ""
    if status == "not_run":
        return "onnxruntime never produced this tensor"
    if status == "ignored":
        return "left out by --ignore-layer" + (f"; {m.reason}" if m is not None and m.reason else "")
    return ""


REFEREE_LABELS = {"onnx": "off: ONNX", "torch": "off: PyTorch", "noise": "noise"}


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
    if ref.side == "noise":
        return (f"Against a float64 PyTorch run both fp32 sides are within a few times the layer's "
                f"rounding noise: {pair}. Neither is clearly wrong.")
    bad, good, bad_v, good_v = (("ONNX", "PyTorch fp32", on, to) if ref.side == "onnx"
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
        status = _status_of(r)
        css_status = "ignored" if r.ignored else status
        norm, lnorm = _normalised(m), _normalised(lm)
        rows.append(
            {
                "i": i,
                "r": r,
                "m": m,
                "lm": lm,
                "status": status,
                "status_label": STATUS_LABELS.get(status, status.replace("_", " ")),
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
                "title": _status_title(r, status),
                "ref": None if r.referee is None else (
                    r.referee.side, REFEREE_LABELS.get(r.referee.side, r.referee.side),
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
        fused = u.reason.startswith("fused into")
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


def _normalised(m: Metrics | None) -> float | None:
    """max_abs / scale (scale 0 -> max_abs); inf for non-finite errors; None without metrics."""
    if m is None:
        return None
    err = float(m.max_abs)
    if not math.isfinite(err):
        return math.inf
    scale = float(m.scale) if m.scale is not None else 0.0
    if not math.isfinite(scale) or scale <= 0:
        scale = 1.0
    return err / scale


# ---------------------------------------------------------------- chart geometry

CHART_W, CHART_H = 1000, 330
CHART_L, CHART_R, CHART_T, CHART_B = 62, 18, 30, 40
CHART_ZERO_LANE = 24  # band under the log axis where exact zeros are drawn
CHART_MIN_EXP = -12  # the log axis never reaches below 1e-12 (smaller values clamp)


def _nice_step(n: int, max_ticks: int = 10) -> int:
    if n <= 1:
        return 1
    raw = n / max_ticks
    mag = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    for k in (1, 2, 5, 10):
        if k * mag >= raw:
            return max(1, int(k * mag))
    return max(1, int(10 * mag))


def _acc_class(r: LayerResult, v: float) -> str:
    """Colour class of a layer's accumulated-error dot."""
    status = _status_of(r)
    if r.ignored or status == "ignored":
        return "ignored"
    if not math.isfinite(v):
        return "nonfinite"
    if status == "fail":
        return "fail"
    if status == "propagated":
        return "propagated"
    return "pass"


def _local_class(r: LayerResult, v: float) -> str:
    """Colour class of a layer's local-error ring."""
    if r.ignored or _status_of(r) == "ignored":
        return "ignored"
    if not math.isfinite(v):
        return "nonfinite"
    return "fail" if r.local is not None and not r.local.passed else "ok"


def _chart(d: Diagnosis, fd_index: int | None) -> dict[str, Any] | None:
    """Both errors of every layer over execution order, normalised by the layer's scale.

    Accumulated (ONNX model vs PyTorch): filled dots on a solid line, coloured by status.
    Local (the layer's own segment on PyTorch's inputs): hollow rings on a dashed line.
    A fault reads as one local spike where the accumulated line jumps and stays up;
    drift as low local rings under a slowly rising accumulated line. Exact zeros sit in
    a lane under the log axis; NaN / inf at the top. Everything is a handful of <path>s,
    so 5,000 layers stay light.
    """
    n = len(d.layers)
    if n == 0:
        return None
    rtol = _finite_or_none(d.settings.rtol)
    acc: list[float | None] = [_normalised(r.metrics) for r in d.layers]
    loc: list[float | None] = [_normalised(r.local) for r in d.layers]
    has_local = any(v is not None for v in loc)
    every = [v for v in (*acc, *loc) if v is not None]
    positive = [v for v in every if math.isfinite(v) and v > 0]
    zero_lane = any(v == 0 for v in every)

    rng = list(positive)
    if rtol and rtol > 0:
        rng.append(rtol)
    if not rng:
        rng = [1e-7, 1e-4]
    lo = math.floor(math.log10(max(min(rng), 10.0**CHART_MIN_EXP)) + 1e-9)
    hi = math.ceil(math.log10(max(rng)) - 1e-9)
    if hi <= lo:
        hi = lo + 1
    grow_up = True  # at least 3 decades, widened on both sides, data stays mid-chart
    while hi - lo < 3:
        if grow_up or lo <= CHART_MIN_EXP:
            hi += 1
        else:
            lo -= 1
        grow_up = not grow_up
    span = hi - lo

    pw = CHART_W - CHART_L - CHART_R
    axis_y = CHART_H - CHART_B
    plot_b = axis_y - (CHART_ZERO_LANE if zero_lane else 0)  # bottom of the log scale
    ph = plot_b - CHART_T
    lane_y = plot_b + CHART_ZERO_LANE * 0.55
    step = pw / n

    def xpos(i: int) -> float:
        return CHART_L + (i + 0.5) * step

    def ypos(v: float) -> float:
        if not math.isfinite(v):
            return CHART_T
        if v <= 0:
            return lane_y
        lv = min(max(math.log10(v), lo), hi)
        return CHART_T + (hi - lv) / span * ph

    dot = 7.0 if n <= 60 else 5.0 if n <= 300 else 3.5 if n <= 1500 else 2.5
    ring = dot + 4.0
    core = max(ring - 3.0, 1.0)

    dots: dict[str, list[str]] = {k: [] for k in ("pass", "propagated", "fail", "ignored", "nonfinite")}
    rings: dict[str, list[str]] = {k: [] for k in ("ok", "fail", "ignored", "nonfinite")}
    cores: list[str] = []
    notrun: list[str] = []
    bands: list[str] = []
    band_w = max(step, 3.0)

    def trend(values: list[float | None]) -> str:
        """Line through the layers that count: breaks where a value is missing, passes
        over exact zeros (drawn in the zero lane) without dropping to them."""
        out: list[str] = []
        pen = False
        for i, (r, v) in enumerate(zip(d.layers, values)):
            if v is None:
                pen = False
                continue
            if v == 0 or r.ignored or _status_of(r) == "ignored":
                continue
            out.append(f"{'L' if pen else 'M'}{xpos(i):.1f} {ypos(v):.1f}")
            pen = True
        return "".join(out)

    fd_point = None
    for i, (r, a, lv) in enumerate(zip(d.layers, acc, loc)):
        x = xpos(i)
        if _status_of(r) == "fail" and not r.ignored:
            bands.append(f"M{x - band_w / 2:.1f} {CHART_T}h{band_w:.1f}v{axis_y - CHART_T}h{-band_w:.1f}z")
        if lv is not None:
            y = ypos(lv)
            rings[_local_class(r, lv)].append(f"M{x:.1f} {y:.1f}h0")
            cores.append(f"M{x:.1f} {y:.1f}h0")
        if a is None:
            notrun.append(f"M{x:.1f} {axis_y:.1f}v-14")
            continue
        y = ypos(a)
        dots[_acc_class(r, a)].append(f"M{x:.1f} {y:.1f}h0")
        if i == fd_index:
            fd_point = (x, y)

    yticks = []
    every_k = 1 if span <= 10 else 2 if span <= 20 else 3
    for e in range(lo, hi + 1):
        if (e - lo) % every_k:
            continue
        label = {-1: "0.1", 0: "1", 1: "10"}.get(e, f"1e{e}")
        yticks.append({"y": round(CHART_T + (hi - e) / span * ph, 1), "label": label})

    xs = _nice_step(n)
    xticks = [{"x": round(xpos(i), 1), "label": str(i)} for i in range(0, n, xs)]

    fd_mark = None
    if fd_index is not None:
        x = xpos(fd_index)
        label = f"first divergence: {d.layers[fd_index].module}"
        if len(label) > 60:
            label = label[:59] + "…"
        anchor = "end" if x > CHART_L + pw * 0.6 else "start"
        fd_mark = {
            "x": round(x, 1),
            "point": None if fd_point is None else (round(fd_point[0], 1), round(fd_point[1], 1)),
            "label": label,
            "anchor": anchor,
            "tx": round(x - 6 if anchor == "end" else x + 6, 1),
        }

    return {
        "w": CHART_W,
        "h": CHART_H,
        "l": CHART_L,
        "r": CHART_W - CHART_R,
        "t": CHART_T,
        "b": axis_y,
        "plot_b": plot_b,
        "step": step,
        "n": n,
        "dot": dot,
        "ring": ring,
        "core": core,
        "dots": {k: "".join(v) for k, v in dots.items()},
        "rings": {k: "".join(v) for k, v in rings.items()},
        "cores": "".join(cores),
        "bands": "".join(bands),
        "notrun": "".join(notrun),
        "line": trend(acc),
        "local_line": trend(loc) if has_local else "",
        "has_local": has_local,
        "zero_lane": round(lane_y, 1) if zero_lane else None,
        "yticks": yticks,
        "xticks": xticks,
        "rtol_y": round(ypos(rtol), 1) if rtol and rtol > 0 else None,
        "rtol": rtol,
        # the rtol label sits at the end away from the first-divergence marker
        "rtol_x": CHART_L + 4 if fd_mark and fd_mark["anchor"] == "end" else CHART_W - CHART_R - 4,
        "rtol_anchor": "start" if fd_mark and fd_mark["anchor"] == "end" else "end",
        "fd": fd_mark,
        "reading": _chart_reading(d, acc, loc),
        "counts": {k: len(v) for k, v in dots.items()}
        | {"local_" + k: len(v) for k, v in rings.items()}
        | {"notrun": len(notrun), "causes": len(bands)},
    }


def _chart_reading(d: Diagnosis, acc: list[float | None], loc: list[float | None]) -> list[str]:
    """A few plain sentences saying what the chart shows: a jump or drift (no verdicts of
    its own: only the statuses and numbers already in the diagnosis)."""
    counted = [(i, r) for i, r in enumerate(d.layers) if not r.ignored and _status_of(r) != "ignored"]
    causes = [i for i, r in counted if _status_of(r) == "fail"]
    carried = [i for i, r in counted if _status_of(r) == "propagated"]
    out: list[str] = []

    def rel(v: float | None) -> str:
        if v is None:
            return "–"
        if not math.isfinite(v):
            return "non-finite"
        return f"{fmt_pct(v) if v >= 1e-4 else fmt_num(v)} of its range"

    if causes:
        i = causes[0]
        r = d.layers[i]
        after = sum(1 for k in carried if k > i)
        own = f"its own error is {rel(loc[i])}" if loc[i] is not None else "its own error was not measured"
        text = (f"The first layer that fails on its own is #{i} {r.module}: {own}, "
                f"the total error at its output {rel(acc[i])}.")
        if after:
            text += f" After it, {after} layer{'s' if after != 1 else ''} only carry error from upstream."
        if len(causes) > 1:
            more = len(causes) - 1
            text += (f" {more} more layer{'s fail on their' if more != 1 else ' fails on its'} own"
                     " (shaded columns).")
        out.append(text)
        # One jump, or errors of the same size everywhere? Compare the largest own error
        # with the typical one.
        own_errors = sorted(v for k, r in counted if (v := loc[k]) is not None and math.isfinite(v) and v > 0)
        if len(causes) > 1 and len(own_errors) >= 5:
            median = own_errors[len(own_errors) // 2]
            ratio = own_errors[-1] / median if median > 0 else math.inf
            if ratio < 30:
                out.append(f"The own errors are all of similar size (the largest is {ratio:.1f}× the median "
                           f"{fmt_num(median)}): rounding everywhere rather than one faulty layer, which "
                           "suggests a tolerance tighter than float32 arithmetic can meet.")
    elif ignored := [r.module for r in d.layers
                     if r.ignored and (j := r.local or r.metrics) is not None and not j.passed]:
        out.append("No counted layer fails on its own; only ignored layers do ("
                   + ", ".join(ignored[:3]) + (", …" if len(ignored) > 3 else "")
                   + "), and the error downstream may come from them.")
    elif carried:
        first, last = carried[0], carried[-1]
        grow = [v for v in (acc[k] for k, _ in counted) if v is not None and math.isfinite(v) and v > 0]
        span = f", from {fmt_num(grow[0])} to {fmt_num(grow[-1])} of the layer's range" if len(grow) >= 2 else ""
        out.append(f"No layer fails on its own: the dashed local line stays within the tolerance while the "
                   f"total error builds up{span}. {len(carried)} layer{'s' if len(carried) != 1 else ''} "
                   f"(#{first}–#{last}) only carry error from upstream: slow drift, no single jump.")
    return out


# ---------------------------------------------------------------- previews

_CMAP = np.array(  # dark -> bright, perceptually ordered (magma-like)
    [
        [252, 253, 191],
        [252, 137, 97],
        [183, 55, 121],
        [81, 18, 124],
        [0, 0, 4],
    ][::-1],
    dtype=np.float64,
)


def _png(rgb: np.ndarray) -> bytes:
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _preview(name: str, arr: Any) -> dict[str, Any] | None:
    """A small array as an inline PNG heat map (data: URI, no network)."""
    try:
        a = np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if a.size == 0:
        return None
    shape = a.shape
    reduced = False
    if a.ndim == 0:
        a = a.reshape(1, 1)
    elif a.ndim == 1:
        a = a.reshape(1, -1)
    elif a.ndim > 2:  # batch / channels: the largest magnitude over the leading axes
        a = np.abs(a).reshape(-1, *a.shape[-2:]).max(axis=0)
        reduced = True
    h, w = a.shape
    sy, sx = max(1, math.ceil(h / 512)), max(1, math.ceil(w / 512))
    a = a[::sy, ::sx]
    finite = np.isfinite(a)
    if finite.any():
        vmin, vmax = float(a[finite].min()), float(a[finite].max())
    else:
        vmin = vmax = 0.0
    with np.errstate(all="ignore"):
        t = (a - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(a)
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0)
    pos = t * (len(_CMAP) - 1)
    i0 = np.floor(pos).astype(int).clip(0, len(_CMAP) - 2)
    frac = (pos - i0)[..., None]
    rgb = _CMAP[i0] * (1 - frac) + _CMAP[i0 + 1] * frac
    rgb[~finite] = (0, 200, 255)  # NaN / inf: cyan, off the colour map
    rgb = rgb.round().astype(np.uint8)
    uri = "data:image/png;base64," + base64.b64encode(_png(rgb)).decode("ascii")
    # display size: upscale small maps, keep the aspect ratio
    dh, dw = rgb.shape[:2]
    k = max(1, min(8, 320 // max(dh, dw, 1)))
    return {
        "name": name,
        "shape": fmt_shape(shape),
        "min": fmt_num(vmin) if finite.any() else "–",
        "max": fmt_num(vmax) if finite.any() else "–",
        "nonfinite": int((~finite).sum()),
        "reduced": reduced,
        "uri": uri,
        "width": dw * k,
        "height": dh * k,
    }



# ---------------------------------------------------------------- neighbourhood graph

NB_CAP = 8  # boxes per column at most, "+N more" for the rest
_NB_W, _NB_BOX_W, _NB_BOX_H, _NB_GAP, _NB_TOP = 760, 290, 38, 12, 26
_NB_LEFT_X, _NB_RIGHT_X = 40, _NB_W - 40 - _NB_BOX_W


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _clip(s: str, n: int = 38) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _capped(items: list[Any], cap: int) -> tuple[list[Any], int]:
    """At most ``cap`` items: the first cap-1 and the last (often the one that matters)."""
    if len(items) <= cap:
        return items, 0
    if cap <= 1:
        return items[:cap], len(items) - cap
    return items[: cap - 1] + items[-1:], len(items) - cap


def _neighbourhood(d: Diagnosis, fd: FirstDivergence | None) -> dict[str, Any] | None:
    """The first divergence and its direct neighbours, PyTorch left, ONNX right.

    PyTorch: the diverging call, the calls that fed it (``producers``) and the calls it fed
    (calls whose producers include it, or a call that aliases it). ONNX: the region nodes in
    order, the nodes producing the aligned tensors of the feeding calls (upstream) and those of
    the calls it fed (downstream): the region records no node inputs, so the torch data flow
    stands in for the ONNX one. Dashed lines join aligned counterparts. Returns None when
    there is nothing to draw (no calls recorded for the diverging module).
    """
    if fd is None or not d.calls:
        return None
    call = next((c for c in d.calls if c.label == fd.module), None)
    if call is None:
        return None
    by_index = {c.index: c for c in d.calls}
    status: dict[str, str] = {}
    for r in d.layers:
        status.setdefault(r.module, "ignored" if r.ignored else _status_of(r))
    pair_of: dict[int, Any] = {}
    for p in (d.alignment.pairs if d.alignment else ()):
        pair_of.setdefault(p.call, p)

    def torch_box(idx: int, role: str) -> dict[str, Any]:
        if idx == -1:
            return {"key": "t-1", "label": "model input", "sub": "input", "status": "input",
                    "role": role, "call": -1}
        c = by_index[idx]
        return {"key": f"t{idx}", "label": c.label, "sub": c.module_type,
                "status": status.get(c.label, "unmatched"), "role": role, "call": idx}

    producers = list(dict.fromkeys(p for p in call.producers if p is not None
                                   and (p == -1 or p in by_index)))
    # calls it fed; a call that aliases it (an Identity, a Sequential ending in it) feeds the same
    same = {call.index} | {c.index for c in d.calls if c.alias_of == call.index}
    consumers = [c.index for c in d.calls if c.index not in same
                 and any(p in same for p in c.producers if p is not None)]
    t_side = max(1, (NB_CAP - 1) // 2)
    shown_p, more_p = _capped(producers, t_side)
    shown_c, more_c = _capped(consumers, NB_CAP - 1 - len(shown_p) - (1 if more_p else 0))
    left: list[dict[str, Any]] = [torch_box(i, "up") for i in shown_p]
    if more_p:
        left.append({"more": more_p, "role": "up"})
    fd_box = torch_box(call.index, "fd")
    fd_box["status"] = status.get(call.label, "fail")
    left.append(fd_box)
    left += [torch_box(i, "down") for i in shown_c]
    if more_c:
        left.append({"more": more_c, "role": "down"})
    if not consumers:  # its output goes to functional ops (cat, +) or is the model output
        left.append({"note": "no module takes its output directly", "role": "down"})

    # ONNX column
    region = [{"key": f"o:{n.name}", "label": n.name, "sub": n.op_type, "status": "region",
               "role": "fd"} for n in fd.region]
    if not any(r["label"] == fd.onnx_node for r in region):
        region.append({"key": f"o:{fd.onnx_node}", "label": fd.onnx_node, "sub": fd.op_type,
                       "status": "region", "role": "fd"})
    region_names = {r["label"] for r in region}

    def onnx_boxes(idxs: list[int], role: str) -> list[dict[str, Any]]:
        out, seen = [], set()
        for i in idxs:
            if i == -1:
                key, label, sub, st = "o:-1", "graph input", "input", "input"
            elif i in pair_of:
                p = pair_of[i]
                key, label, sub = f"o:{p.onnx_node}", p.onnx_node, p.op_type
                st = status.get(by_index[i].label, "pass")
            else:
                continue
            if key in seen or label in region_names:
                continue
            seen.add(key)
            out.append({"key": key, "label": label, "sub": sub, "status": st, "role": role})
        return out

    ups = onnx_boxes(producers, "up")
    downs = onnx_boxes(consumers, "down")
    o_side = max(1, (NB_CAP - 2) // 3)
    ups, more_u = _capped(ups, o_side)
    downs, more_d = _capped(downs, o_side)
    room = NB_CAP - len(ups) - len(downs) - (1 if more_u else 0) - (1 if more_d else 0)
    region_shown, more_r = _capped(region, max(2, room - 1) if len(region) > room else room)
    right: list[dict[str, Any]] = list(ups)
    if more_u:
        right.append({"more": more_u, "role": "up"})
    if more_r:
        region_shown = region_shown[:-1] + [{"more": more_r, "role": "fd"}] + region_shown[-1:]
    right += region_shown
    right += downs
    if more_d:
        right.append({"more": more_d, "role": "down"})

    # layout
    step = _NB_BOX_H + _NB_GAP

    def place(col: list[dict[str, Any]], x: int) -> None:
        for k, b in enumerate(col):
            b["x"], b["y"] = x, _NB_TOP + k * step

    place(left, _NB_LEFT_X)
    place(right, _NB_RIGHT_X)
    height = _NB_TOP + max(len(left), len(right)) * step + 4

    edges: list[tuple[dict[str, Any], dict[str, Any], str]] = []
    real = lambda col, role: [b for b in col if "more" not in b and "note" not in b  # noqa: E731
                              and b["role"] == role]
    for b in real(left, "up"):
        edges.append((b, fd_box, "left"))
    for b in real(left, "down"):
        edges.append((fd_box, b, "left"))
    reg = [b for b in right if b["role"] == "fd"]
    for a, b in zip(reg, reg[1:]):
        edges.append((a, b, "right"))
    if reg:
        for b in real(right, "up"):
            edges.append((b, reg[0], "right"))
        for b in real(right, "down"):
            edges.append((reg[-1], b, "right"))

    # dashed lines between aligned counterparts
    by_key = {b["key"]: b for b in right if "more" not in b}
    links = []
    for b in left:
        if "more" in b or "note" in b:
            continue
        if b is fd_box:
            target = by_key.get(f"o:{fd.onnx_node}")
        elif b["call"] == -1:
            target = by_key.get("o:-1")
        elif b["call"] in pair_of:
            target = by_key.get(f"o:{pair_of[b['call']].onnx_node}")
        else:
            target = None
        if target is not None:
            links.append((b, target))

    parts = [f'<svg class="nb-svg" id="nb-svg" viewBox="0 0 {_NB_W} {height}" width="{_NB_W}" '
             f'height="{height}" role="img" aria-label="Neighbourhood of the first divergence: '
             f'PyTorch modules and ONNX nodes">',
             '<defs><marker id="nb-arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" '
             'markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#8a94a3"/></marker></defs>',
             f'<text class="nb-head" x="{_NB_LEFT_X}" y="14">PyTorch</text>',
             f'<text class="nb-head" x="{_NB_RIGHT_X}" y="14">ONNX</text>']
    for a, b in links:
        y1, y2 = a["y"] + _NB_BOX_H / 2, b["y"] + _NB_BOX_H / 2
        parts.append(f'<line class="nb-link" x1="{a["x"] + _NB_BOX_W}" y1="{y1:.0f}" '
                     f'x2="{b["x"]}" y2="{y2:.0f}"/>')
    for a, b, side in edges:
        if b["y"] == a["y"] + step:  # neighbours: a short straight arrow
            x = a["x"] + _NB_BOX_W / 2
            parts.append(f'<line class="nb-edge" x1="{x:.0f}" y1="{a["y"] + _NB_BOX_H}" x2="{x:.0f}" '
                         f'y2="{b["y"] - 1}" marker-end="url(#nb-arrow)"/>')
            continue
        # further apart: a curve on the outer side of the column
        if side == "left":
            x, bend = a["x"], a["x"] - 30
        else:
            x, bend = a["x"] + _NB_BOX_W, a["x"] + _NB_BOX_W + 30
        y1, y2 = a["y"] + _NB_BOX_H / 2, b["y"] + _NB_BOX_H / 2
        parts.append(f'<path class="nb-edge" d="M{x},{y1:.0f} C{bend},{y1:.0f} {bend},{y2:.0f} '
                     f'{x},{y2:.0f}" marker-end="url(#nb-arrow)"/>')
    for b in left + right:
        if "more" in b or "note" in b:
            text = b["note"] if "note" in b else f'+{b["more"]} more'
            parts.append(f'<text class="nb-more" x="{b["x"] + _NB_BOX_W / 2:.0f}" '
                         f'y="{b["y"] + _NB_BOX_H / 2 + 4:.0f}" text-anchor="middle">'
                         f'{_esc(text)}</text>')
            continue
        cls = f'nb-box nb-{b["status"]}' + (" nb-fd" if b["role"] == "fd" else "")
        title = f'{b["label"]} ({b["sub"]}) · {b["status"].replace("_", " ")}'
        parts.append(f'<g class="{cls}" data-role="{b["role"]}"><title>{_esc(title)}</title>'
                     f'<rect x="{b["x"]}" y="{b["y"]}" width="{_NB_BOX_W}" height="{_NB_BOX_H}" rx="5"/>'
                     f'<text class="nb-label" x="{b["x"] + 8}" y="{b["y"] + 16}">{_esc(_clip(b["label"]))}</text>'
                     f'<text class="nb-sub" x="{b["x"] + 8}" y="{b["y"] + 31}">{_esc(_clip(b["sub"], 44))}</text></g>')
    parts.append("</svg>")
    return {"svg": markupsafe.Markup("".join(parts)), "torch": len(left), "onnx": len(right),
            "links": len(links)}


# ---------------------------------------------------------------- error histograms

HIST_BINS = 20
HIST_FLOOR = 1e-9
HISTOGRAM_PREFIX = "histogram:"
_H_W, _H_H, _H_L, _H_R, _H_T, _H_B = 360, 170, 40, 10, 22, 34


def _hist_metrics(d: Diagnosis, name: str) -> Metrics | None:
    """The metrics whose tolerance applies to a preview called ``name``."""
    low = name.lower()
    if low.startswith("first divergence"):
        row = _fd_layer(d, _layer_index(d, d.first_divergence))
        return None if row is None else row.metrics
    for o in d.outputs:
        if low.startswith("final output") or o.name in name:
            return o.metrics
    return None


def _hist_counts(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int] | None:
    """(edges, counts, below, nonfinite): HIST_BINS log-spaced bins HIST_FLOOR … max."""
    a = np.asarray(arr, dtype=np.float64).ravel()
    if a.size == 0:
        return None
    finite = np.isfinite(a)
    a = np.abs(a[finite])
    hi = float(a.max()) if a.size else 0.0
    hi = max(hi, HIST_FLOOR * 10)
    edges = np.logspace(math.log10(HIST_FLOOR), math.log10(hi), HIST_BINS + 1)
    # clip to the last edge itself: logspace may round it just below the max
    counts, _ = np.histogram(np.clip(a[a >= HIST_FLOOR], edges[0], edges[-1]), bins=edges)
    return edges, counts, int((a < HIST_FLOOR).sum()), int((~finite).sum())


def _histogram(d: Diagnosis, name: str, arr: Any, *, explicit: bool) -> dict[str, Any] | None:
    """An inline SVG bar chart of |torch − onnx| on log-spaced bins, tolerance marked.

    ``explicit``: ``arr`` is a pipeline histogram, a 2-D array [[edges…], [counts…, pad]]
    (n+1 edges, n counts plus one ignored pad value). Otherwise ``arr`` is a |diff| map and
    is binned here.
    """
    below = nonfinite = 0
    try:
        if explicit:
            h = np.asarray(arr, dtype=np.float64)
            if h.ndim != 2 or h.shape[0] < 2 or h.shape[1] < 2:
                return None
            edges, counts = h[0], np.nan_to_num(h[1][: h.shape[1] - 1], nan=0.0)
            if not np.all(np.isfinite(edges)) or np.any(edges <= 0) or np.any(np.diff(edges) <= 0):
                return None
        else:
            got = _hist_counts(np.asarray(arr))
            if got is None:
                return None
            edges, counts, below, nonfinite = got
    except (TypeError, ValueError):
        return None
    m = _hist_metrics(d, name)
    s = d.settings
    scale = _finite_or_none(m.scale) if m is not None else None
    tol = (s.atol + s.rtol * scale) if scale is not None else s.atol
    lo_e, hi_e = float(edges[0]), float(edges[-1])
    x_hi = max(hi_e, tol * 2) if tol > 0 else hi_e
    pw, ph = _H_W - _H_L - _H_R, _H_H - _H_T - _H_B
    llo, lhi = math.log10(lo_e), math.log10(x_hi)

    def xpos(v: float) -> float:
        return _H_L + (math.log10(max(v, lo_e)) - llo) / max(lhi - llo, 1e-12) * pw

    top = max(float(counts.max()) if counts.size else 0.0, 1.0)
    ly = lambda c: math.log10(1 + c) / math.log10(1 + top) * ph  # noqa: E731
    parts = [f'<svg class="hist-svg" viewBox="0 0 {_H_W} {_H_H}" width="{_H_W}" height="{_H_H}" '
             f'role="img" aria-label="histogram of |torch − onnx|: {_esc(name)}">',
             f'<line class="hist-axis" x1="{_H_L}" y1="{_H_T + ph}" x2="{_H_L + pw}" y2="{_H_T + ph}"/>']
    for k, c in enumerate(counts):
        a, b = float(edges[k]), float(edges[k + 1])
        x1, x2 = xpos(a), xpos(b)
        hgt = ly(float(c))
        cls = "hist-bar bad" if tol > 0 and a >= tol else "hist-bar"
        parts.append(f'<rect class="{cls}" x="{x1 + 0.5:.1f}" y="{_H_T + ph - hgt:.1f}" '
                     f'width="{max(x2 - x1 - 1, 0.5):.1f}" height="{hgt:.1f}"><title>'
                     f'{fmt_num(a)} … {fmt_num(b)}: {int(c)}</title></rect>')
    # decade ticks
    for e in range(math.ceil(llo), math.floor(lhi) + 1):
        if (e - math.ceil(llo)) % max(1, math.ceil((lhi - llo) / 6)):
            continue
        x = xpos(10.0 ** e)
        parts.append(f'<line class="hist-tick" x1="{x:.1f}" y1="{_H_T + ph}" x2="{x:.1f}" y2="{_H_T + ph + 4}"/>'
                     f'<text class="hist-tl" x="{x:.1f}" y="{_H_T + ph + 15}" text-anchor="middle">1e{e}</text>')
    parts.append(f'<text class="hist-tl" x="{_H_L + pw / 2:.0f}" y="{_H_H - 4}" text-anchor="middle">'
                 f'|torch − onnx| (log bins)</text>')
    parts.append(f'<text class="hist-tl" x="{_H_L - 4}" y="{_H_T + 4}" text-anchor="end">{int(top)}</text>'
                 f'<text class="hist-tl" x="{_H_L - 4}" y="{_H_T + ph}" text-anchor="end">0</text>')
    if tol > 0:
        x = xpos(tol)
        anchor = "end" if x > _H_L + pw * 0.7 else "start"
        dx = -3 if anchor == "end" else 3
        parts.append(f'<line class="hist-tol" x1="{x:.1f}" y1="{_H_T - 6}" x2="{x:.1f}" y2="{_H_T + ph}"/>'
                     f'<text class="hist-toltext" x="{x + dx:.1f}" y="{_H_T - 8}" text-anchor="{anchor}">'
                     f'tol {fmt_num(tol)}</text>')
    parts.append("</svg>")
    total = int(counts.sum()) + below
    over = int(sum(int(c) for k, c in enumerate(counts) if tol > 0 and float(edges[k]) >= tol))
    return {"name": name, "svg": markupsafe.Markup("".join(parts)), "total": total,
            "below": below, "nonfinite": nonfinite, "tol": fmt_num(tol),
            "tol_words": ("atol + rtol·scale" if scale is not None else "atol"),
            "over": over, "explicit": explicit, "floor": fmt_num(lo_e)}


def _histograms(d: Diagnosis) -> list[dict[str, Any]]:
    """Explicit ``histogram:<name>`` previews, else one histogram per |diff| map."""
    out, explicit = [], set()
    for name, arr in (d.previews or {}).items():
        name = str(name)
        if name.startswith(HISTOGRAM_PREFIX):
            title = name[len(HISTOGRAM_PREFIX):].strip()
            explicit.add(title)
            h = _histogram(d, title, arr, explicit=True)
            if h is not None:
                out.append(h)
    for name, arr in (d.previews or {}).items():
        name = str(name)
        if name.startswith(HISTOGRAM_PREFIX) or name in explicit:
            continue
        h = _histogram(d, name, arr, explicit=False)
        if h is not None:
            out.append(h)
    return out


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


def _fd_layer(d: Diagnosis, fd_index: int | None) -> LayerResult | None:
    return None if fd_index is None else d.layers[fd_index]


def layer_counts(d: Diagnosis) -> dict[str, int]:
    """Layers by status: ``fail`` (its own segment fails: a cause), ``propagated`` (only
    carries error from upstream), ``pass``, ``ignored``, ``not_run``; ``compared`` is all."""
    counts = {"compared": len(d.layers), "pass": 0, "fail": 0, "propagated": 0, "ignored": 0,
              "not_run": 0}
    for r in d.layers:
        status = "ignored" if r.ignored else _status_of(r)
        counts[status if status in counts else "fail"] += 1
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


METHOD_LABELS = {"weights~": "close weights"}


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
                                             "label": VERDICT_LABELS.get(fix[1], fix[1].upper())}}


def _context(d: Diagnosis) -> dict[str, Any]:
    fd = d.first_divergence
    fd_index = _layer_index(d, fd)
    rows = _layer_rows(d, fd_index)
    counts = layer_counts(d)
    fd_layer = _fd_layer(d, fd_index)
    # Drift: outputs off, nobody fails on its own (an ignored layer that does is a cause too).
    ignored_causes = any(r.ignored and (j := r.local or r.metrics) is not None and not j.passed
                         for r in d.layers)
    drift = (d.verdict == "diverged" and fd is None and counts["fail"] == 0
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
        "verdict_label": VERDICT_LABELS.get(d.verdict, d.verdict.upper()),
        "title": " · ".join(title_bits),
        "fd": fd,
        "fd_index": fd_index,
        "fd_layer": fd_layer,
        "fd_errors": _fd_errors(fd_layer),
        "fd_referee": None if fd_layer is None or fd_layer.referee is None
        else _referee_words(fd_layer.referee),
        "cases": list(d.cases) if len(d.cases) > 1 else [],
        "cases_diverged": sum(1 for c in d.cases if c.verdict == "diverged"),
        "coverage": _coverage_line(d),
        "fp16": _fp16(d),
        "carried_after_fd": 0 if fd_index is None else sum(
            1 for r in d.layers[fd_index + 1:] if _status_of(r) == "propagated" and not r.ignored),
        "drift": drift,
        "fd_kind": KIND_LABELS.get(fd.kind, fd.kind) if fd else "",
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
        "facts": facts,
        "previews": previews,
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

_COLORS = {"pass": "32", "diverged": "31", "error": "33"}


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

    label = VERDICT_LABELS.get(d.verdict, d.verdict.upper())
    lines = [f"layerdiff: {c('1;' + _COLORS.get(d.verdict, '0'), label)}"]
    if d.summary:
        lines += wrap(d.summary, "  ")

    if d.verdict == "error" and d.error:
        lines.append(f"  {c('33', 'error:')} {d.error.splitlines()[0] if d.error else ''}")
        lines += [f"    {ln}" for ln in d.error.splitlines()[1:6]]

    fd = d.first_divergence
    if fd is not None:
        where = fd.module + (f" ({fd.module_type})" if fd.module_type else "")
        lines.append(f"  first divergence: {c('1', where)}")
        bits = [f"ONNX node {fd.onnx_node}", f"op {fd.op_type}", f"kind {fd.kind}"]
        row = _fd_layer(d, _layer_index(d, fd))
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
            if fd.kind == "runtime_error" and len(msg) > 1:
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
