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

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from .records import Metrics

OUTLIER_SHARE = 0.01
CHUNK = 1 << 16  # elements compared at a time: float64 temporaries that stay in cache
PARALLEL_MIN = 1 << 20  # elements from which a tensor is compared in two halves at once
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

    flat_ref, flat_cand = ref.reshape(-1), cand.reshape(-1)
    size = flat_ref.size
    if size >= PARALLEL_MIN:  # the second half on the other core (numpy lets go of the GIL)
        mid = size // 2 // CHUNK * CHUNK
        other = _pool().submit(_sums, flat_ref, flat_cand, mid, size, rtol, atol,
                               _compared_pages(reference, mid))
        acc = _sums(flat_ref, flat_cand, 0, mid, rtol, atol, _compared_pages(reference))
        acc.merge(other.result())
    else:
        acc = _sums(flat_ref, flat_cand, 0, size, rtol, atol, _compared_pages(reference))
    max_abs, mean_abs, scale, max_rel, outlier_share, cosine = acc.figures()
    ref_nan, cand_nan, ref_inf, cand_inf = acc.nan_ref, acc.nan_cand, acc.inf_ref, acc.inf_cand

    reason = ""
    if acc.nonfinite_differs:
        reason = (f"NaN/Inf differ (torch {ref_nan} NaN {ref_inf} Inf, "
                  f"onnx {cand_nan} NaN {cand_inf} Inf)")
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
        nan_torch=ref_nan,
        nan_onnx=cand_nan,
        inf_torch=ref_inf,
        inf_onnx=cand_inf,
        nonfinite_differs=acc.nonfinite_differs,
        mse=acc.sum_sq / acc.count if acc.count else 0.0,
        passed=not reason,
        reason=reason,
    )


def _sums(ref: np.ndarray, cand: np.ndarray, lo: int, hi: int, rtol: float, atol: float,
          done) -> _Sums:
    """The sums over elements [lo, hi) of two flat arrays, a chunk at a time."""
    acc = _Sums()
    for start in range(lo, hi, CHUNK):
        stop = min(start + CHUNK, hi)
        acc.add(ref[start:stop], cand[start:stop], rtol=rtol, atol=atol)
        done(stop, stop >= hi)
    return acc


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """One worker thread, made on first use, that compares the second half of large tensors."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerdiff-compare")


# A forked child has no copy of the worker thread: it makes its own.
os.register_at_fork(after_in_child=_pool.cache_clear)


def _compared_pages(array: np.ndarray, begin: int = 0):
    """For an array mapped from a file (an activation the store read back from disk), a
    function that drops from this process the pages from element ``begin`` to element
    ``upto``, once compared (all of them when ``last``): a full-size reference then costs
    a few MB while it is compared, not its whole size next to onnxruntime's value. Other
    arrays: a function doing nothing."""
    import mmap

    mapped = getattr(array, "_mmap", None)
    if (not isinstance(array, np.memmap) or mapped is None or not array.flags.c_contiguous
            or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED")):
        return lambda upto, last=False: None
    start = array.offset % mmap.ALLOCATIONGRANULARITY  # where the data begins in the map
    dropped = [(start + begin * array.itemsize) // mmap.PAGESIZE * mmap.PAGESIZE]

    def drop(upto: int, last: bool = False) -> None:
        end = (start + upto * array.itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
        if end - dropped[0] >= 16 * 2**20 or last or upto >= array.size:
            end = min(end, len(mapped) // mmap.PAGESIZE * mmap.PAGESIZE)
            if end > dropped[0]:
                mapped.madvise(mmap.MADV_DONTNEED, dropped[0], end - dropped[0])
                dropped[0] = end

    return drop


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Inner product without BLAS: a threaded BLAS call on a chunk this small waits on
    threads that PyTorch and onnxruntime keep busy, and takes 100x longer."""
    return float(np.einsum("i,i->", a, b))


class _Sums:
    """Running reductions over chunks of a tensor pair (float64 arithmetic per chunk), so
    comparing a tensor needs a few chunk-sized temporaries, not copies of the tensor."""

    def __init__(self) -> None:
        self.count = 0  # finite pairs
        self.max_abs = self.sum_abs = self.scale = self.max_rel = 0.0
        self.sum_sq = 0.0  # d.d: the mean squared error (PSNR of a converted file's output)
        self.outliers = 0
        self.dot = self.norm_ref = self.norm_cand = 0.0  # c.r, r.r, c.c
        self.nan_ref = self.nan_cand = self.inf_ref = self.inf_cand = 0
        self.nonfinite_differs = False

    def add(self, ref: np.ndarray, cand: np.ndarray, *, rtol: float, atol: float) -> None:
        diff = np.subtract(cand, ref, dtype=np.float64)
        dot = _dot(diff, diff)  # also NaN/Inf exactly when some value is
        if not np.isfinite(dot):
            r, c = ref.astype(np.float64), cand.astype(np.float64)
            finite = np.isfinite(r) & np.isfinite(c)
            if not finite.all():
                self._nonfinite(r, c)
            r, c = r[finite], c[finite]
            if r.size:
                self._finite(r, c - r, rtol=rtol, atol=atol)
            return
        self._finite(ref, diff, dot, rtol=rtol, atol=atol)

    def _finite(self, ref: np.ndarray, diff: np.ndarray, d_dot_d: float | None = None, *,
                rtol: float, atol: float) -> None:
        """Sums over a chunk without NaN/Inf: ``diff`` = cand - ref in float64 (overwritten)."""
        r = ref.astype(np.float64, copy=False)
        d_dot_r = _dot(diff, r)
        r_dot_r = _dot(r, r)
        if d_dot_d is None:
            d_dot_d = _dot(diff, diff)
        np.abs(diff, out=diff)
        mag = np.abs(r)
        self.count += r.size
        self.sum_sq += d_dot_d
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.scale = max(self.scale, float(mag.max()))
        bound = mag * rtol
        bound += atol
        self.outliers += int(np.count_nonzero(diff > bound))
        np.maximum(mag, max(atol, 1e-12), out=mag)
        np.divide(diff, mag, out=diff)
        self.max_rel = max(self.max_rel, float(diff.max()))
        self.dot += d_dot_r + r_dot_r  # c.r = (c - r).r + r.r
        self.norm_ref += r_dot_r
        self.norm_cand += d_dot_d + 2 * d_dot_r + r_dot_r  # c.c = d.d + 2 d.r + r.r

    def merge(self, other: _Sums) -> None:
        """Add the sums of another range of the same tensor pair."""
        self.count += other.count
        self.max_abs = max(self.max_abs, other.max_abs)
        self.sum_abs += other.sum_abs
        self.scale = max(self.scale, other.scale)
        self.max_rel = max(self.max_rel, other.max_rel)
        self.sum_sq += other.sum_sq
        self.outliers += other.outliers
        self.dot += other.dot
        self.norm_ref += other.norm_ref
        self.norm_cand += other.norm_cand
        self.nan_ref += other.nan_ref
        self.nan_cand += other.nan_cand
        self.inf_ref += other.inf_ref
        self.inf_cand += other.inf_cand
        self.nonfinite_differs = self.nonfinite_differs or other.nonfinite_differs

    def _nonfinite(self, r: np.ndarray, c: np.ndarray) -> None:
        r_nan, c_nan, r_inf, c_inf = np.isnan(r), np.isnan(c), np.isinf(r), np.isinf(c)
        self.nan_ref += int(r_nan.sum())
        self.nan_cand += int(c_nan.sum())
        self.inf_ref += int(r_inf.sum())
        self.inf_cand += int(c_inf.sum())
        if (r_nan != c_nan).any() or (r_inf != c_inf).any() or (r[r_inf] != c[r_inf]).any():
            self.nonfinite_differs = True

    def figures(self) -> tuple[float, float, float, float, float, float]:
        """max_abs, mean_abs, scale, max_rel, outlier share, cosine."""
        if not self.count:
            return 0.0, 0.0, 0.0, 0.0, 0.0, 1.0
        na, nc = np.sqrt(self.norm_ref), np.sqrt(self.norm_cand)
        if na == 0.0 and nc == 0.0:
            cosine = 1.0
        elif na == 0.0 or nc == 0.0:
            cosine = 0.0
        else:
            cosine = float(self.dot / (na * nc))
        return (self.max_abs, self.sum_abs / self.count, self.scale, self.max_rel,
                self.outliers / self.count, cosine)


def _shape_mismatch(ref: np.ndarray, cand: np.ndarray) -> Metrics:
    inf = float("inf")
    return Metrics(
        shape_torch=tuple(ref.shape), shape_onnx=tuple(cand.shape),
        max_abs=inf, mean_abs=inf, max_rel=inf, cosine=0.0,
        scale=float(np.abs(ref).max()) if ref.size else 0.0, outlier_share=1.0,
        passed=False, reason=f"shape {tuple(cand.shape)} != torch {tuple(ref.shape)}",
    )

