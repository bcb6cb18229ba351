"""Tests for layerdiff.compare: a large tensor compared in two halves at once gives the
figures of one pass over it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from layerdiff import compare as comparing


def _pair(size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(size).astype(np.float32)
    cand = ref + rng.standard_normal(size).astype(np.float32) * 1e-3
    cand[size - 7] += 5.0  # the worst element, in the second half
    cand[size - 3:] = np.nan  # NaN/Inf there too, on one side only
    ref[size - 1] = np.inf
    return ref, cand


def _one_pass(ref, cand, monkeypatch) -> comparing.Metrics:
    with monkeypatch.context() as patched:
        patched.setattr(comparing, "PARALLEL_MIN", 1 << 40)
        return comparing.compare(ref, cand, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("mapped", [False, True], ids=["in memory", "mapped from a file"])
def test_two_halves_give_the_figures_of_one_pass(mapped, monkeypatch, tmp_path):
    size = comparing.PARALLEL_MIN + 12345  # not a whole number of chunks
    ref, cand = _pair(size)
    if mapped:  # how the store hands back an activation it put on disk
        ref.tofile(tmp_path / "ref.bin")
        ref = np.memmap(tmp_path / "ref.bin", dtype=np.float32, mode="r", shape=ref.shape)
    halves = comparing.compare(ref, cand, rtol=1e-3, atol=1e-5)
    whole = _one_pass(ref, cand, monkeypatch)

    assert not halves.passed and halves.nonfinite_differs and halves.nan_onnx == 3
    exact = ("shape_torch", "shape_onnx", "max_abs", "max_rel", "scale", "outlier_share",
             "nan_torch", "nan_onnx", "inf_torch", "inf_onnx", "nonfinite_differs", "passed",
             "reason")
    for name in exact:
        assert getattr(halves, name) == getattr(whole, name), name
    assert halves.max_abs == pytest.approx(5.0, abs=1e-2)
    for name in ("mean_abs", "mse", "cosine"):  # sums added in another order
        assert math.isclose(getattr(halves, name), getattr(whole, name), rel_tol=1e-12), name


def test_a_clean_pair_passes_in_halves_as_in_one(monkeypatch):
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(3 * comparing.PARALLEL_MIN).astype(np.float32)
    cand = ref + np.float32(1e-6) * rng.standard_normal(ref.size).astype(np.float32)
    halves = comparing.compare(ref.reshape(3, -1), cand.reshape(3, -1), rtol=1e-3, atol=1e-5)
    whole = _one_pass(ref.reshape(3, -1), cand.reshape(3, -1), monkeypatch)
    assert halves.passed and whole.passed
    assert dataclasses.replace(halves, mean_abs=0, mse=0, cosine=0) == \
        dataclasses.replace(whole, mean_abs=0, mse=0, cosine=0)


def test_a_forked_child_compares_in_halves_too():
    """The worker thread is not copied into a forked child: the child makes its own
    rather than waiting on a thread that is not there."""
    import multiprocessing

    ref, cand = _pair(comparing.PARALLEL_MIN)
    parent = comparing.compare(ref, cand, rtol=1e-3, atol=1e-5)  # the worker exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(comparing.compare, (ref, cand),
                                 {"rtol": 1e-3, "atol": 1e-5}).get(timeout=60)
    assert child == parent
