"""Number, shape and status formatting shared by the report modules
(:mod:`layerdiff.render` and :mod:`layerdiff.report_visuals`).

Pure functions of their arguments; no HTML, no drawing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .records import Diagnosis, LayerResult, LayerStatus, Metrics


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


# =========================================================================== status


STATUS_LABELS = {
    LayerStatus.PASS: "pass",
    LayerStatus.FAIL: "fail",
    LayerStatus.PROPAGATED: "propagated",
    LayerStatus.IGNORED: "ignored",
    LayerStatus.NOT_RUN: "not run",
}


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


def _fd_layer(d: Diagnosis) -> LayerResult | None:
    """The first divergence's row in the layer table, if it has one."""
    fd = d.first_divergence
    return None if fd is None or fd.layer is None else d.layers[fd.layer]


# =========================================================================== pictures


def fmt_db(x: Any) -> str:
    """A PSNR: "48.21 dB", "∞ dB" for identical pictures, "–" when not measured."""
    if x is None:
        return "–"
    f = float(x)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "∞ dB"
    return f"{f:.2f} dB"


def fmt_ssim(x: Any) -> str:
    """An SSIM: 6 decimals next to 1 (where conversions live), 4 elsewhere; "–" when the
    picture is smaller than SSIM's window."""
    f = _finite_or_none(x)
    if f is None:
        return "–" if x is None else fmt_num(x)
    return f"{f:.6f}" if f >= 0.999 else f"{f:.4f}"


def fmt_factor(x: float) -> str:
    """An amplification factor: "×5", "×2000", "×50000", then "×2e5", "×1e7"."""
    if x < 1e5:
        return f"×{x:.0f}"
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"×{mantissa}e{int(exponent)}"
