"""The report's drawings, computed from a Diagnosis: the error-vs-depth chart geometry,
the PNG heatmap previews, the neighbourhood SVG around the first divergence and the
error histograms.

Pure functions of the Diagnosis; :mod:`layerdiff.render` puts their results into the
HTML page.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from typing import Any

import markupsafe
import numpy as np

from .records import HISTOGRAM_PREFIX, Diagnosis, FirstDivergence, LayerResult, LayerStatus, Metrics
from .report_format import (
    _fd_layer,
    _finite_or_none,
    _normalised,
    fmt_factor,
    fmt_num,
    fmt_pct,
    fmt_shape,
)


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
    if r.ignored or r.status == LayerStatus.IGNORED:
        return "ignored"
    if not math.isfinite(v):
        return "nonfinite"
    if r.status == LayerStatus.FAIL:
        return "fail"
    if r.status == LayerStatus.PROPAGATED:
        return "propagated"
    return "pass"


def _local_class(r: LayerResult, v: float) -> str:
    """Colour class of a layer's local-error ring."""
    if r.ignored or r.status == LayerStatus.IGNORED:
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
            if v == 0 or r.ignored or r.status == LayerStatus.IGNORED:
                continue
            out.append(f"{'L' if pen else 'M'}{xpos(i):.1f} {ypos(v):.1f}")
            pen = True
        return "".join(out)

    fd_point = None
    for i, (r, a, lv) in enumerate(zip(d.layers, acc, loc)):
        x = xpos(i)
        if r.status == LayerStatus.FAIL and not r.ignored:
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
    counted = [(i, r) for i, r in enumerate(d.layers)
               if not r.ignored and r.status != LayerStatus.IGNORED]
    causes = [i for i, r in counted if r.status == LayerStatus.FAIL]
    carried = [i for i, r in counted if r.status == LayerStatus.PROPAGATED]
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


def _png_uri(rgb: np.ndarray) -> str:
    """H,W,3 uint8 as an inline PNG (data: URI, no network)."""
    return "data:image/png;base64," + base64.b64encode(_png(np.ascontiguousarray(rgb))).decode("ascii")


def _colours(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] through the colour map, as float RGB."""
    pos = t * (len(_CMAP) - 1)
    i0 = np.floor(pos).astype(int).clip(0, len(_CMAP) - 2)
    frac = (pos - i0)[..., None]
    return _CMAP[i0] * (1 - frac) + _CMAP[i0 + 1] * frac


def _colour_bar() -> str:
    """The colour map as a CSS gradient, 0 left, max right: the same linear blend of
    the same stops as the maps, without another image."""
    stops = ", ".join(f"rgb({r:.0f},{g:.0f},{b:.0f})" for r, g, b in _CMAP)
    return f"linear-gradient(to right, {stops})"


def _preview(name: str, arr: Any) -> dict[str, Any] | None:
    """A small array as an inline PNG heat map with its colour bar. A map with no
    negative value (|diff|) is scaled from 0, so a colour means the same error in every
    map; others from their minimum."""
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
        if vmin >= 0:  # |diff|: colours from no error at all
            vmin = 0.0
    else:
        vmin = vmax = 0.0
    with np.errstate(all="ignore"):
        t = (a - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(a)
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0)
    rgb = _colours(t)
    rgb[~finite] = (0, 200, 255)  # NaN / inf: cyan, off the colour map
    rgb = rgb.round().astype(np.uint8)
    # display size: upscale small maps, keep the aspect ratio
    dh, dw = rgb.shape[:2]
    k = max(1, min(8, 320 // max(dh, dw, 1)))
    ok = finite.any()
    return {
        "name": name,
        "shape": fmt_shape(shape),
        "min": fmt_num(vmin) if ok else "–",
        "mid": fmt_num((vmin + vmax) / 2) if ok else "–",
        "max": fmt_num(vmax) if ok else "–",
        "nonfinite": int((~finite).sum()),
        "reduced": reduced,
        "uri": _png_uri(rgb),
        "bar": _colour_bar(),
        "width": dw * k,
        "height": dh * k,
    }


# ---------------------------------------------------------------- pictures

# Display boxes, CSS px. Pictures are shown at a whole multiple of their pixels (never
# resampled: a resampled checkerboard shows moiré that is not in the output).
PIC_BOX = 256  # each side-by-side picture (pictures.SIDE: reduced ones show 1:1)
INPUT_BOX = 170  # the input, smaller
FLIP_BOX = 512  # the picture that flips in place
CROP_BOX = 192  # a 64 px full-resolution crop, 3 screen px per pixel


def _fit(width: int, height: int, box: int) -> tuple[int, int]:
    """Display size of a width x height picture: the largest whole multiple that fits a
    box x box square, and never below 1:1."""
    k = max(1, box // max(width, height, 1))
    return width * k, height * k


def _pictures(d: Diagnosis) -> list[dict[str, Any]]:
    """Each picture of the Diagnosis as what the template shows: inline PNGs with their
    display sizes, the figures in words, the crop's place on the picture in percent."""
    several = len({p.quality.output for p in d.pictures}) > 1
    out = []
    for p in d.pictures:
        q = p.quality
        height, width = p.size
        top, left, ch, cw = p.crop
        w, h = _fit(p.torch.shape[1], p.torch.shape[0], PIC_BOX)
        fw, fh = _fit(p.torch.shape[1], p.torch.shape[0], FLIP_BOX)
        cropw, croph = _fit(cw, ch, CROP_BOX)
        view = {
            "case": q.case, "output": q.output if several else "", "quality": q,
            "words": q.visibility.words,
            "size": fmt_shape((height, width)), "reduced": p.reduced,
            "torch": _png_uri(p.torch), "onnx": _png_uri(p.onnx), "diff": _png_uri(p.diff),
            "w": w, "h": h, "fw": fw, "fh": fh,
            "factor": fmt_factor(p.factor), "identical": not np.any(p.diff),
            "crop": {"top": top, "left": left, "h": ch, "w": cw,
                     "x": 100 * left / width, "y": 100 * top / height,
                     "pw": 100 * cw / width, "ph": 100 * ch / height},
            "crop_torch": _png_uri(p.crop_torch), "crop_onnx": _png_uri(p.crop_onnx),
            "crop_diff": _png_uri(p.crop_diff), "cw": cropw, "ch": croph,
            "input": None,
        }
        if p.input is not None:
            iw, ih = _fit(p.input.shape[1], p.input.shape[0], INPUT_BOX)
            view["input"] = {"uri": _png_uri(p.input), "w": iw, "h": ih}
        out.append(view)
    return out


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
        status.setdefault(r.module, "ignored" if r.ignored else r.status.value)
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
_H_W, _H_H, _H_L, _H_R, _H_T, _H_B = 360, 170, 40, 10, 22, 34


def _hist_metrics(d: Diagnosis, name: str) -> Metrics | None:
    """The metrics whose tolerance applies to a preview called ``name``."""
    low = name.lower()
    if low.startswith("first divergence"):
        row = _fd_layer(d)
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
        # an explicit histogram stands for the maps named after it (a layer's channels)
        if name.startswith(HISTOGRAM_PREFIX) or any(name.startswith(t) for t in explicit):
            continue
        h = _histogram(d, name, arr, explicit=False)
        if h is not None:
            out.append(h)
    return out
