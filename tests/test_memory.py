"""Bounded memory: a diagnosis that spills activations to disk and runs ONNX in many
segments gives exactly the results of one that holds everything in memory."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from layerdiff import pipeline, store
from layerdiff.pipeline import diagnose
from benchmarks.peak import run_measured
from samples import faults

from conftest import SHAPE, make_model, with_fault

UNBOUNDED = 64 * 2**30


def tight(monkeypatch):
    """Budgets far below the models' activations: nothing stays in RAM, and every
    segment holds at most one aligned tensor's worth."""
    monkeypatch.setattr(pipeline, "budgets", lambda limit, held, forward=0: (0, 1))


def same_results(a, b):
    assert a.verdict == b.verdict
    assert a.summary == b.summary
    assert a.outputs == b.outputs
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert x == y, (x.module, x.status, y.status)
    assert a.first_divergence == b.first_divergence
    assert a.alignment == b.alignment
    assert a.cases == b.cases
    assert [s.rule for s in a.suggestions] == [s.rule for s in b.suggestions]
    assert a.previews.keys() == b.previews.keys()
    for key in a.previews:
        np.testing.assert_array_equal(a.previews[key], b.previews[key])
    assert [p.quality for p in a.pictures] == [p.quality for p in b.pictures]
    for p, q in zip(a.pictures, b.pictures):  # read back from disk or held: the same pictures
        for field in ("torch", "onnx", "diff", "crop_diff"):
            np.testing.assert_array_equal(getattr(p, field), getattr(q, field))
    facts = lambda d: dataclasses.replace(d.facts, peak_memory=None, over_memory=False,
                                          spilled_bytes=0, segments=1)
    assert facts(a) == facts(b)


CASES = {
    "esrgan clean, two sizes": ("esrgan", "legacy", None, {}),
    "swinir dynamo clean": ("swinir", "dynamo", None, {"check_sizes": ()}),
    "swinir frozen shape at the odd size": ("swinir", "nameless", None, {}),
    "compact conv weight": ("compact", "legacy",
                            lambda m: faults.scale_weight(m, "Conv", 3, 1.5), {}),
    "esrgan leaky slope, ignored": ("esrgan", "legacy", lambda m: faults.leaky_slope(m, 0.1, 2),
                                    {"ignore": ("*lrelu*",)}),
    "esrgan one channel +1%": ("esrgan", "dynamo",
                               lambda m: faults.scale_weight(m, "Conv", 2, 1.01, channel=1),
                               {"check_sizes": ()}),
}


@pytest.mark.parametrize("name", CASES)
def test_bounded_run_matches_unbounded(name, exported, tmp_path, monkeypatch):
    arch, how, fault, kwargs = CASES[name]
    path = exported(arch, how)
    if fault is not None:
        path, _ = with_fault(path, fault, tmp_path)
    free = diagnose(make_model(arch), path, input_shape=SHAPE, max_memory=UNBOUNDED, **kwargs)
    assert free.facts.segments == 1 and free.facts.spilled_bytes == 0
    tight(monkeypatch)
    bounded = diagnose(make_model(arch), path, input_shape=SHAPE, max_memory=UNBOUNDED, **kwargs)
    assert bounded.facts.segments > 3, "the tight budget must cut the graph"
    assert bounded.facts.spilled_bytes > 0, "the tight budget must spill activations"
    same_results(free, bounded)


def test_spill_keeps_values_and_cleans_up(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {i: rng.standard_normal((3, 5, 7)).astype(np.float32) for i in range(6)}
    with store.Spill(budget=2 * arrays[0].nbytes, folder=tmp_path) as spill:
        view = store.TensorStore(spill, "a")
        for key, value in arrays.items():
            view[key] = value
        assert spill.ram_bytes <= 2 * arrays[0].nbytes and spill.disk_bytes == 4 * arrays[0].nbytes
        for key, value in arrays.items():
            np.testing.assert_array_equal(view[key], value)
        assert list(view) == list(arrays) and view.shape_of(5) == (3, 5, 7)
        assert list(tmp_path.iterdir())
        other = store.TensorStore(spill, "b")
        other[0] = arrays[0]
        view.clear()
        assert len(view) == 0 and 0 not in view
        assert spill.ram_bytes + spill.disk_bytes == arrays[0].nbytes  # only "b" is left
        np.testing.assert_array_equal(other[0], arrays[0])
    assert not any(p.is_dir() for p in tmp_path.iterdir())


@pytest.mark.parametrize("text,expected", [("6G", 6 * 2**30), ("512M", 512 * 2**20),
                                           ("1.5GiB", int(1.5 * 2**30)), ("1000", 1000)])
def test_parse_size(text, expected):
    assert store.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "lots"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        store.parse_size(text)


def test_peak_over_the_limit_is_reported(exported):
    d = diagnose(make_model("compact"), exported("compact", "legacy"), input_shape=SHAPE,
                 check_sizes=(), max_memory=1)
    assert d.facts.over_memory is (d.facts.peak_memory is not None)
    if d.facts.peak_memory is not None:
        assert any("exceeded --max-memory" in n for n in d.notes)


@pytest.mark.parametrize("arch,how", [("esrgan", "legacy"), ("swinir", "dynamo"),
                                      ("compact", "legacy")])
def test_plan_covers_every_node_once_and_cuts_cleanly(arch, how, exported):
    import torch

    from layerdiff import capture_onnx, capture_torch, run_case, segments
    from layerdiff.align import align

    graph = capture_onnx.load_graph(exported(arch, how))
    captured = capture_torch.capture(make_model(arch), torch.rand(*SHAPE))
    alignment = align(captured.calls, captured.parameters, graph)
    marks = [p.onnx_tensor for p in alignment.pairs]
    sizes = run_case._sizes(alignment, captured.calls, graph)
    whole = segments.plan(graph, marks, sizes, sum(sizes.values()))
    assert [(s.first, s.stop) for s in whole] == [(0, len(graph.nodes))]
    plan = segments.plan(graph, marks, sizes, max(sizes.values()))
    assert len(plan) > 3
    assert [s.first for s in plan[1:]] == [s.stop for s in plan[:-1]]
    assert plan[0].first == 0 and plan[-1].stop == len(graph.nodes)
    assert sorted(m for s in plan for m in s.marks) == sorted(set(marks))
    if arch == "compact":  # its input skip (the upscaled input, added at the end) is
        # recomputed where it is read: it does not keep the whole body in one segment.
        assert max(s.marked_bytes for s in plan) <= 2 * max(sizes.values())
    graph_inputs = {name for name, _, _ in graph.inputs}
    aligned = set(marks)
    for segment in plan[1:]:
        for name in segment.inputs:  # only clean values cross a cut
            dtype = graph.dtypes.get(name)
            assert (name in aligned or name in graph_inputs
                    or (dtype is not None and not np.issubdtype(dtype, np.floating))), name


# --------------------------------------------------------------------------- large inputs

ROOT = Path(__file__).resolve().parents[1]
COMPACT = [str(ROOT / "samples" / "compact_x4.pth"),
           "--onnx", str(ROOT / "samples" / "compact_x4.onnx")]


def run_cli(args: list[str], tmp_path) -> tuple[int, str, int, float]:
    """`layerdiff report` in its own process: exit code, stderr, peak RSS, seconds. The
    peak is the child's own, not inherited from this test process (benchmarks/peak.py)."""
    cmd = [sys.executable, "-m", "layerdiff.cli", "report", *args, "-o",
           str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json"), "-q"]
    with open(tmp_path / "stderr", "w+") as err:
        code, peak, seconds, _ = run_measured(cmd, err)
        err.seek(0)
        text = err.read()
    return code, text, peak, seconds


def test_forward_that_cannot_fit_is_refused_up_front(tmp_path):
    code, err, _, seconds = run_cli([*COMPACT, "--input-shape", "1,3,2048,2048",
                                     "--max-memory", "1500M"], tmp_path)
    assert code == 2, err
    assert re.search(r"error: the model's forward alone needs about [\d.]+ GiB at 2048x2048", err), err
    # The hint names what would fit: a smaller input, and the budget this one needs.
    assert re.search(r"hint: use (--input-shape 1,3,\d+,\d+ or smaller, or )?--max-memory [\d.]+G", err), err
    # Importing torch and onnxruntime alone takes 6 to 15 s on this 2-core machine; a
    # run at this size, minutes.
    assert seconds < 60, "the refusal must come before any full-size work"
    assert not (tmp_path / "r.json").exists()


def test_large_input_stays_within_budget(tmp_path):
    # 512 px: unbounded, Compact's activations alone (0.6 GB) would take it over.
    budget = 1300 * 2**20
    code, err, peak, _ = run_cli([*COMPACT, "--input-shape", "1,3,512,512", "--max-memory",
                                  "1300M", "--check-sizes", "none", "--reference", "none"],
                                 tmp_path)
    assert code == 0, err
    facts = json.loads((tmp_path / "r.json").read_text())["facts"]
    assert facts["spilled_bytes"] > 0 and facts["segments"] > 3, "the budget must be tight"
    assert facts["forward_memory"] > 0
    assert peak <= budget, f"peak {peak / 2**30:.2f} GiB over the 1300 MiB budget"
    assert not facts["over_memory"]


def test_footprint_scales_exactly_for_a_conv_net():
    import torch

    from layerdiff import footprint

    model = make_model("compact")
    found = footprint.estimate(model, (1, 3, 512, 384))
    measured, largest = footprint._peak_tensor_bytes(model, torch.rand(1, 3, 256, 192))
    assert found.tensors(256, 192) == pytest.approx(measured, rel=0.01)
    assert found.largest_per_pixel * 256 * 192 == pytest.approx(largest, rel=0.01)
    fit = found.largest_fitting(found.forward(512, 384), 512, 384)
    assert fit is not None and fit[0] <= 512 and fit[1] <= 384 and fit[0] >= 512 - 16
    # Nothing to estimate: an input that is not an image, or already small.
    assert footprint.estimate(torch.nn.Linear(16, 4), (1, 16)) is None
    assert footprint.estimate(model, (1, 3, 96, 96)) is None


def test_chunked_difference_helpers_match_whole_array_arithmetic():
    from layerdiff import run_case

    rng = np.random.default_rng(0)
    a = rng.standard_normal((1, 3, 600, 530)).astype(np.float32)
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 1e-3
    naive = np.abs(a.astype(np.float32) - b)[0].max(axis=0)
    sy, sx = -(-600 // pipeline.PREVIEW_SIDE), -(-530 // pipeline.PREVIEW_SIDE)
    padded = np.zeros((-(-600 // sy) * sy, -(-530 // sx) * sx), np.float32)
    padded[:600, :530] = naive
    expected = padded.reshape(padded.shape[0] // sy, sy, -1, sx).max(axis=(1, 3))
    np.testing.assert_array_equal(pipeline._diff_map(a, b), expected)
    b64 = b.astype(np.float64)
    b64[0, 0, 0, :3] = [np.nan, np.inf, 5.0]
    assert run_case._max_diff(a, b64) == float(np.nanmax(np.abs(a.astype(np.float64) - b64)))
    assert run_case._largest_diff(a, b) == float(np.max(np.abs(a.astype(np.float64) - b)))
    assert np.isnan(run_case._largest_diff(a, b64))
