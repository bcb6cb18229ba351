"""PSNR and SSIM (quality.py): pure numerics checked against closed forms and a direct,
window-by-window implementation of Wang et al. 2004."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layerdiff import quality
from layerdiff.quality import Visibility


def test_psnr_of_known_errors():
    assert quality.psnr(1e-4) == pytest.approx(40.0)
    assert quality.psnr(1e-6) == pytest.approx(60.0)
    assert quality.psnr(0.0) == math.inf
    assert math.isnan(quality.psnr(math.nan))


def test_mse_is_measured_on_pictures_clipped_to_0_1():
    a = np.full((1, 3, 8, 8), 0.5, dtype=np.float32)
    b = a + np.float32(0.01)
    assert quality.mse_of(a, b) == pytest.approx(1e-4, rel=1e-4)
    assert quality.psnr(quality.mse_of(a, b)) == pytest.approx(40.0, abs=1e-3)
    # beyond [0, 1] both clip to the same white: no visible difference
    assert quality.mse_of(a + 1, a + 2) == 0.0
    # NaN shows as black
    c = a.copy()
    c[0, 0, 0, 0] = np.nan
    assert quality.mse_of(a, c) == pytest.approx(0.25 / a.size)


@pytest.mark.parametrize("db, judgment", [
    (math.inf, Visibility.IDENTICAL), (50.0, Visibility.IDENTICAL),
    (49.9, Visibility.INVISIBLE), (40.0, Visibility.INVISIBLE),
    (39.9, Visibility.CLOSE_INSPECTION), (30.0, Visibility.CLOSE_INSPECTION),
    (29.9, Visibility.VISIBLE), (math.nan, Visibility.VISIBLE),
])
def test_visibility_thresholds(db, judgment):
    assert quality.visibility(db) == judgment


def test_gaussian_window_is_wangs():
    taps = quality.gaussian_window()
    assert len(taps) == 11 and taps.sum() == pytest.approx(1.0)
    assert taps[5] / taps[4] == pytest.approx(math.exp(1 / (2 * 1.5 ** 2)))


def test_ssim_of_identical_images_is_one():
    rng = np.random.default_rng(0)
    x = rng.random((3, 40, 37))
    assert quality.ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_a_constant_offset_is_the_luminance_term():
    # x constant a, y = a + c: both variances and the covariance are 0, so SSIM is
    # (2 a (a + c) + C1) / (a^2 + (a + c)^2 + C1) everywhere.
    a, c = 0.5, 0.1
    x = np.full((1, 3, 20, 20), a)
    expected = (2 * a * (a + c) + 1e-4) / (a * a + (a + c) ** 2 + 1e-4)
    assert expected == pytest.approx(0.98361, abs=1e-5)
    assert quality.ssim(x, x + c) == pytest.approx(expected, rel=1e-12)


def test_ssim_of_a_structure_flip():
    # x = a + t, y = a - t: same means and variances, covariance -var: negative SSIM.
    rng = np.random.default_rng(1)
    t = rng.normal(scale=0.05, size=(2, 30, 25))
    x, y = 0.5 + t, 0.5 - t
    assert quality.ssim(x, y) == pytest.approx(_ssim_direct(x, y), rel=1e-10)
    assert quality.ssim(x, y) < 0


def _ssim_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 window by window: the 2-D Gaussian weights at each position."""
    taps = quality.gaussian_window()
    w = np.outer(taps, taps)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    means = []
    for xm, ym in zip(np.clip(x, 0, 1).reshape(-1, *x.shape[-2:]),
                      np.clip(y, 0, 1).reshape(-1, *y.shape[-2:])):
        values = []
        for i in range(xm.shape[0] - 10):
            for j in range(xm.shape[1] - 10):
                px, py = xm[i:i + 11, j:j + 11], ym[i:i + 11, j:j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = (w * (px - mx) ** 2).sum()
                vy = (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cxy + c2)
                              / ((mx * mx + my * my + c1) * (vx + vy + c2)))
        means.append(np.mean(values))
    return float(np.mean(means))


def test_ssim_matches_the_direct_definition_in_bands(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.random((1, 3, 33, 29)).astype(np.float32)
    y = np.clip(x + rng.normal(scale=0.05, size=x.shape), -0.1, 1.1).astype(np.float32)
    direct = _ssim_direct(x, y)
    assert quality.ssim(x, y) == pytest.approx(direct, rel=1e-9)
    # a band of a few output rows at a time gives the same mean
    monkeypatch.setattr(quality, "BAND_ELEMENTS", 29 * 14)
    assert quality.ssim(x, y) == pytest.approx(direct, rel=1e-9)
    assert 0 < direct < 1


def test_ssim_needs_the_window_to_fit():
    assert quality.ssim(np.zeros((3, 10, 40)), np.zeros((3, 10, 40))) is None
    with pytest.raises(ValueError):
        quality.ssim(np.zeros((3, 20, 20)), np.zeros((3, 20, 21)))
