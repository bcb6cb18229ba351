"""Previews of the first divergence and its minimal reproducer (subgraph + inputs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import faults
from conftest import ROOT, SHAPE, make_model, with_fault
from layerdiff import diagnose, reproducer
from layerdiff.cli import main
from layerdiff.pipeline import PREVIEW_SIDE, _diff_map

SAMPLES = ROOT / "samples"


def rerun(onnx_path, npz_path):
    """Run the extracted subgraph on the stored inputs: (output, expected)."""
    data = np.load(npz_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in session.get_inputs()}
    assert set(data.files) == set(feeds) | {"expected"}
    return session.run(None, feeds)[0], data["expected"]


@pytest.mark.parametrize("arch,how,fault", [
    ("compact", "legacy", faults.pixel_shuffle_dcr),
    ("esrgan", "dynamo", lambda m: faults.leaky_slope(m, 0.1, index=2)),
])
def test_reproducer_reproduces_the_first_divergence(arch, how, fault, exported, tmp_path):
    path, node = with_fault(exported(arch, how), fault, tmp_path)
    report = tmp_path / "out" / "r.html"
    d = diagnose(make_model(arch), path, input_shape=SHAPE, check_sizes=(), reference="none",
                 reproducer_for=report)
    first = d.first_divergence
    assert first is not None and first.kind == "numeric" and first.onnx_node == node
    onnx_path, npz_path = reproducer.paths(report)
    assert onnx_path.name == "r.first_divergence.onnx" and npz_path.name == "r.first_divergence.npz"
    assert d.reproducer == (str(onnx_path), str(npz_path))
    sub = onnx.load(str(onnx_path))
    onnx.checker.check_model(sub)
    assert node in {n.name for n in sub.graph.node}
    assert len(sub.graph.node) < len(onnx.load(str(path)).graph.node)
    got, expected = rerun(onnx_path, npz_path)
    assert got.shape == expected.shape
    # The layer's own error, as the report gives it.
    assert float(np.max(np.abs(got - expected))) == pytest.approx(first.max_abs, rel=0.05)
    assert not list(report.parent.glob("*.tmp"))


def test_previews_show_where_the_first_divergence_and_the_output_differ(exported, tmp_path):
    path, _ = with_fault(exported("compact", "legacy"), faults.pixel_shuffle_dcr, tmp_path)
    # One input: the output's worst |diff| is the one the preview shows.
    d = diagnose(make_model("compact"), path, input_shape=SHAPE, check_sizes=(), reference="none",
                 photo=False)
    title = f"first divergence |diff|: {d.first_divergence.module}"
    # The layer's output (3 channels) channel by channel, with a histogram of the whole
    # tensor, then the final output's map.
    assert list(d.previews) == [f"histogram:{title}",
                                *(f"{title}, channel {c} of 3" for c in range(3)),
                                "final output |diff|"]
    maps = {name: arr for name, arr in d.previews.items() if not name.startswith("histogram:")}
    for name, arr in maps.items():
        assert arr.ndim == 2 and max(arr.shape) <= PREVIEW_SIDE and np.all(arr >= 0)
    out = d.outputs[0].metrics.max_abs
    assert float(d.previews["final output |diff|"].max()) == pytest.approx(out, rel=1e-3)
    assert max(float(maps[f"{title}, channel {c} of 3"].max()) for c in range(3)) \
        == pytest.approx(d.first_divergence.max_abs, rel=1e-3)
    assert maps[f"{title}, channel 0 of 3"].shape == (SHAPE[2] * 4, SHAPE[3] * 4)  # shuffle x4


def test_clean_model_gets_no_previews_and_no_files(exported, tmp_path):
    report = tmp_path / "r.html"
    d = diagnose(make_model("compact"), exported("compact", "legacy"), input_shape=SHAPE,
                 check_sizes=(), reference="none", reproducer_for=report)
    assert d.verdict == "pass" and d.previews == {}
    assert not any(tmp_path.iterdir())
    assert d.reproducer is None


def test_diff_map_reduces_channels_and_keeps_peaks_when_downsampling():
    a = np.zeros((2, 3, 600, 300), np.float32)
    b = a.copy()
    b[0, 2, 599, 7] = 5.0  # one hot pixel, last row, first batch item
    b[1, 0, 10, 10] = 9.0  # second batch item is not shown
    diff = _diff_map(a, b)
    assert diff.ndim == 2 and max(diff.shape) <= PREVIEW_SIDE
    assert diff.max() == 5.0 and diff[-1].max() == 5.0
    assert _diff_map(a, b[:, :, :10]) is None  # shapes differ: nothing to show


def test_cli_writes_and_prints_the_reproducer(tmp_path, capsys):
    report = tmp_path / "out" / "report.html"
    code = main(["report", str(SAMPLES / "compact_x4.pth"), "--onnx",
                 str(SAMPLES / "compact_x4_dcr.onnx"), "-o", str(report), "--check-sizes", "none",
                 "--reference", "none"])
    out, err = capsys.readouterr()
    assert code == 1, err
    onnx_path, npz_path = reproducer.paths(report)
    assert f"minimal reproducer: {onnx_path} + {npz_path}" in out
    got, expected = rerun(onnx_path, npz_path)
    assert float(np.max(np.abs(got - expected))) > 0.05  # the DCR fault, ~0.11
    assert "Minimal reproducer" in report.read_text()
