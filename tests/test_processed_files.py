"""Files as users ship them: simplified by onnxslim, saved by onnxruntime after
optimisation (ORT-only fused ops), and converted to float16. Clean files must pass; a one-node fault must be localised."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

import faults
from conftest import SHAPE, make_model
from layerdiff import diagnose, fp16


def _ort_optimised(source, tmp_path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "ort-optimised.onnx")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return tmp_path / "ort-optimised.onnx"


def _fp16(source, tmp_path):
    path, _ = fp16.make_fp16_onnx(None, None, source, tmp_path / "fp16.onnx", "convert")
    return path


def _onnxslim(source, tmp_path):
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(str(source))), str(tmp_path / "slim.onnx"))
    return tmp_path / "slim.onnx"


PROCESS = {"ort-optimised": _ort_optimised, "fp16": _fp16, "onnxslim": _onnxslim}
CASES = [(arch, how, step) for arch, how in [("esrgan", "legacy"), ("esrgan", "nameless"),
                                              ("compact", "nameless"), ("swinir", "legacy")]
         for step in PROCESS if not (arch == "swinir" and step == "fp16")]


@pytest.mark.parametrize("arch,how,step", CASES)
def test_processed_file_passes_and_localises_a_fault(arch, how, step, exported, tmp_path):
    model = make_model(arch)
    path = PROCESS[step](exported(arch, how), tmp_path)
    tolerance = dict(rtol=1e-2, atol=1e-3) if step == "fp16" else {}
    clean = diagnose(model, path, input_shape=SHAPE, check_sizes=(), **tolerance)
    assert clean.verdict == "pass", clean.summary
    assert clean.alignment.coverage()["compared"] >= 0.3

    graph = onnx.load(str(path))
    conv = "Conv" if any(n.op_type == "Conv" for n in graph.graph.node) else "FusedConv"
    faulty, node = faults.scale_weight(graph, conv, 1, 1.5)
    onnx.save(faulty, str(tmp_path / "faulty.onnx"))
    d = diagnose(model, tmp_path / "faulty.onnx", input_shape=SHAPE, check_sizes=(), **tolerance)
    assert d.verdict == "diverged"
    assert d.first_divergence.onnx_node == node


def test_fused_conv_is_paired_with_the_activation_it_applies(exported, tmp_path):
    path = _ort_optimised(exported("esrgan", "legacy"), tmp_path)
    d = diagnose(make_model("esrgan"), path, input_shape=SHAPE, check_sizes=())
    fused = [l for l in d.layers if l.method == "fused" and l.op_type == "FusedConv"]
    assert fused and all(l.module_type == "LeakyReLU" for l in fused)
    swallowed = [u for u in d.alignment.unmatched_torch if u.reason.startswith("fused into")]
    assert len(swallowed) >= len(fused)
    folded = [u for u in d.alignment.unmatched_torch if "folded into it" in u.reason]
    assert folded  # ESRGAN's `* 0.2` after conv5 is folded into the conv by onnxruntime


def test_an_empty_weight_is_no_evidence_of_a_close_pairing():
    # CRAFT at a small width has Linear layers with no output feature (weight (0, 2)):
    # their similarity used to fail on the reshape and stop the diagnosis (exit 3).
    import numpy as np

    from layerdiff.align import _channel_similarity

    assert _channel_similarity(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)) == 0.0
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    assert _channel_similarity(weight, weight * 2) == pytest.approx(1.0)
