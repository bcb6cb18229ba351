"""Pure numerics: how far an ONNX tensor is from its PyTorch reference.

The pass rule separates rounding noise from real divergence. A bare elementwise
``|onnx - torch| <= atol + rtol * |torch|`` flags clean fp32 exports: after cancellation
some elements are near zero, and a rounding error that is tiny next to the tensor's
magnitude is huge next to them. Rounding error scales with the magnitude of the terms
that were summed, which the tensor's own range (``scale = max |torch|``) tracks. So a
tensor passes when both hold:

1. no element is off by more than ``atol + rtol * scale`` (nothing is wrong by a
   visible fraction of the tensor's range: catches shifted pixels, wrong weights,
   layout permutations, a wrong activation slope);
2. at most ``OUTLIER_SHARE`` (1%) of elements fall outside the elementwise bound
   ``atol + rtol * |torch|`` (catches small but systematic changes, such as the tanh
   approximation of GELU, that stay under rule 1 yet touch many elements).

Shapes must match and NaN/Inf must appear in the same places.

With a float64 referee run, ``noise`` is PyTorch fp32's own largest error against
float64 for this tensor: the layer's noise floor. The absolute tolerance then becomes
``max(atol, NOISE_FACTOR * noise)``, so a layer is never failed for differing from
PyTorch by no more than PyTorch's own rounding.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .records import Metrics

OUTLIER_SHARE = 0.01
NOISE_FACTOR = 3.0  # |onnx - torch32| <= |onnx - t64| + |t64 - torch32|: both within noise


def compare(reference: np.ndarray, candidate: np.ndarray, *, rtol: float, atol: float,
            noise: float = 0.0) -> Metrics:
    atol = max(atol, NOISE_FACTOR * noise)
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    if ref.shape != cand.shape:
        if ref.size == cand.size:
            # Exporters and optimisers flatten batch dimensions (a Linear on (B, N, C) as a
            # 2-D Gemm): the same values in another shape. Judge the values; a layout
            # that really differs shows in them.
            metrics = compare(ref, cand.reshape(ref.shape), rtol=rtol, atol=atol, noise=noise)
            return replace(metrics, shape_onnx=tuple(cand.shape))
        return _shape_mismatch(ref, cand)

    ref64 = ref.astype(np.float64, copy=False)
    cand64 = cand.astype(np.float64, copy=False)
    ref_nan, cand_nan = np.isnan(ref64), np.isnan(cand64)
    ref_inf, cand_inf = np.isinf(ref64), np.isinf(cand64)
    finite = np.isfinite(ref64) & np.isfinite(cand64)

    if finite.any():
        r, c = ref64[finite], cand64[finite]
        diff = np.abs(c - r)
        mag = np.abs(r)
        max_abs = float(diff.max())
        mean_abs = float(diff.mean())
        scale = float(mag.max())
        max_rel = float((diff / np.maximum(mag, max(atol, 1e-12))).max())
        outlier_share = float(np.count_nonzero(diff > atol + rtol * mag) / diff.size)
        cosine = _cosine(r, c)
    else:
        max_abs = mean_abs = scale = max_rel = outlier_share = 0.0
        cosine = 1.0

    reason = ""
    nonfinite_differs = bool((ref_nan != cand_nan).any() or (ref_inf != cand_inf).any()
                             or (ref64[ref_inf] != cand64[ref_inf]).any())
    if nonfinite_differs:
        reason = (f"NaN/Inf differ (torch {int(ref_nan.sum())} NaN {int(ref_inf.sum())} Inf, "
                  f"onnx {int(cand_nan.sum())} NaN {int(cand_inf.sum())} Inf)")
    elif max_abs > atol + rtol * scale:
        reason = f"max error {max_abs:.3g} is {max_abs / max(scale, 1e-30):.2%} of the tensor's range {scale:.3g}"
    elif outlier_share > OUTLIER_SHARE:
        reason = f"{outlier_share:.1%} of elements outside atol + rtol*|x|"

    return Metrics(
        shape_torch=tuple(ref.shape),
        shape_onnx=tuple(cand.shape),
        max_abs=max_abs,
        mean_abs=mean_abs,
        max_rel=max_rel,
        cosine=cosine,
        scale=scale,
        outlier_share=outlier_share,
        nan_torch=int(ref_nan.sum()),
        nan_onnx=int(cand_nan.sum()),
        inf_torch=int(ref_inf.sum()),
        inf_onnx=int(cand_inf.sum()),
        passed=not reason,
        reason=reason,
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _shape_mismatch(ref: np.ndarray, cand: np.ndarray) -> Metrics:
    inf = float("inf")
    return Metrics(
        shape_torch=tuple(ref.shape), shape_onnx=tuple(cand.shape),
        max_abs=inf, mean_abs=inf, max_rel=inf, cosine=0.0,
        scale=float(np.abs(ref).max()) if ref.size else 0.0, outlier_share=1.0,
        passed=False, reason=f"shape {tuple(cand.shape)} != torch {tuple(ref.shape)}",
    )

