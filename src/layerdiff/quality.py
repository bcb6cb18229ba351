"""Pure numerics: the figures image people judge a conversion by, PSNR and SSIM of the
ONNX output against PyTorch's, and what a PSNR means to the eye.

Both take the outputs as pictures: values clipped to [0, 1] (what a super-resolution or
restoration model's output becomes when it is saved), data range 1.

- PSNR = 10 log10(1 / MSE) in dB over every element; ``inf`` when the clipped outputs
  are identical.
- SSIM is Wang, Bovik, Sheikh and Simoncelli 2004 ("Image quality assessment: from error
  visibility to structural similarity"): an 11x11 Gaussian window with sigma 1.5,
  K1 = 0.01, K2 = 0.03, L = 1, population (not sample) covariances, the mean of the SSIM
  map over the positions where the window fits inside the image, per channel, averaged
  over channels. This is MATLAB's reference ``ssim_index`` and scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)`` on each channel.

Both are computed a band of rows at a time in float64, so a 4096 px output costs a few
band-sized temporaries, not copies of the output; an output the store read back from disk
(a memory map) has its pages dropped from this process once read (compare.py does the same).
"""

from __future__ import annotations

import math
import numpy as np

from .compare import _compared_pages
from .records import Visibility

DATA_RANGE = 1.0
WINDOW = 11  # SSIM's Gaussian window, pixels per side
SIGMA = 1.5
K1, K2 = 0.01, 0.03
C1, C2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
BAND_ELEMENTS = 1 << 18  # input elements per band of rows (per channel)


THRESHOLDS = ((50.0, Visibility.IDENTICAL), (40.0, Visibility.INVISIBLE),
              (30.0, Visibility.CLOSE_INSPECTION))


def visibility(psnr_db: float) -> Visibility:
    """The plain-words judgment of a PSNR (NaN, from NaN outputs, is visibly different)."""
    for low, judgment in THRESHOLDS:
        if psnr_db >= low:
            return judgment
    return Visibility.VISIBLE


def psnr(mse: float) -> float:
    """PSNR in dB of a mean squared error over values of data range 1; inf for 0."""
    if mse < 0 or math.isnan(mse):
        return math.nan
    return math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE ** 2 / mse)


def clipped(values: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Values clipped to [0, 1] as a new ``dtype`` array, NaN as 0 (a picture cannot
    show NaN)."""
    out = np.clip(np.asarray(values, dtype=dtype), 0.0, 1.0)  # a new array; inf clips too
    nan = np.isnan(out)
    if nan.any():
        out[nan] = 0.0
    return out


def mse_of(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean squared difference of the clipped arrays (any shape), in chunks."""
    flat_r, flat_c = reference.reshape(-1), candidate.reshape(-1)
    if not flat_r.size:
        return 0.0
    done = read_once(reference, candidate)
    total, step = 0.0, BAND_ELEMENTS
    for lo in range(0, flat_r.size, step):
        d = clipped(flat_c[lo:lo + step]) - clipped(flat_r[lo:lo + step])
        total += float(np.einsum("i,i->", d, d))
        done(lo + step)
    return total / flat_r.size


def read_once(*arrays: np.ndarray):
    """A function that drops from this process the pages of each memory-mapped array
    before element ``upto`` (of the whole array, flat), once read: reading a full-size
    output then costs a few MB of memory, not its size. Ascending calls only."""
    drops = [_compared_pages(a) for a in arrays]

    def done(upto: int) -> None:
        for drop in drops:
            drop(upto)

    return done


def gaussian_window() -> np.ndarray:
    """The 1-D Gaussian taps (sum 1) whose outer product is SSIM's window."""
    x = np.arange(WINDOW, dtype=np.float64) - (WINDOW - 1) / 2
    taps = np.exp(-(x * x) / (2 * SIGMA * SIGMA))
    return taps / taps.sum()


def _filter_valid(a: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of the last two axes (no padding: the window fits)."""
    n = len(taps)
    rows = a.shape[-2] - n + 1
    v = taps[0] * a[..., 0:rows, :]
    for k in range(1, n):
        v += taps[k] * a[..., k:k + rows, :]
    cols = a.shape[-1] - n + 1
    h = taps[0] * v[..., 0:cols]
    for k in range(1, n):
        h += taps[k] * v[..., k:k + cols]
    return h


def ssim(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Mean SSIM of two pictures (..., H, W), e.g. C,H,W or N,C,H,W: each 2-D map's mean
    SSIM, averaged over all maps. Values are clipped to [0, 1] first. None when H or W is
    smaller than the window (11 px)."""
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape or ref.ndim < 2:
        raise ValueError(f"ssim needs two arrays of one shape, got {ref.shape} and {cand.shape}")
    height, width = ref.shape[-2:]
    if height < WINDOW or width < WINDOW:
        return None
    maps_r = ref.reshape(-1, height, width)
    maps_c = cand.reshape(-1, height, width)
    taps = gaussian_window()
    out_rows = height - WINDOW + 1
    # Output rows per band; each band reads WINDOW - 1 rows more (the window's reach).
    step = max(1, BAND_ELEMENTS // width - (WINDOW - 1))
    done = read_once(reference, candidate)  # the memory maps, not asarray's plain views
    means = []
    for m, (r_map, c_map) in enumerate(zip(maps_r, maps_c)):
        total = 0.0
        for lo in range(0, out_rows, step):
            if lo:  # rows above this band are read
                done(m * height * width + lo * width)
            hi = min(lo + step, out_rows)
            x = clipped(r_map[lo:hi + WINDOW - 1])
            y = clipped(c_map[lo:hi + WINDOW - 1])
            mu_x, mu_y = _filter_valid(x, taps), _filter_valid(y, taps)
            xx, yy, xy = _filter_valid(x * x, taps), _filter_valid(y * y, taps), _filter_valid(x * y, taps)
            mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
            var_x, var_y, cov = xx - mu_xx, yy - mu_yy, xy - mu_xy
            s = ((2 * mu_xy + C1) * (2 * cov + C2)) / ((mu_xx + mu_yy + C1) * (var_x + var_y + C2))
            total += float(s.sum())
        means.append(total / (out_rows * (width - WINDOW + 1)))
    done(ref.size)
    return float(np.mean(means))
