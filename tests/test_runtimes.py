"""Runtimes: onnxruntime providers and OpenVINO's own runtime behind one interface, and
several of them in one diagnosis (--provider repeated, or all).

What runs here: onnxruntime's CPU provider and OpenVINO (the `test` extra) on the CPU.
GPU providers (CUDA, TensorRT, DirectML) are the same onnxruntime runtime with another
name; they were not run here (no GPU).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import ROOT
from layerdiff import diagnose, runtimes
from layerdiff.cli import main
from layerdiff.errors import UsageError

openvino = pytest.importorskip("openvino")

SAMPLES = ROOT / "samples"
MODEL, CLEAN, FAULTY = (SAMPLES / "compact_x4.pth", SAMPLES / "compact_x4.onnx",
                        SAMPLES / "compact_x4_dcr.onnx")
FAST = dict(check_sizes=(), reference="none")


def _ov_default_precision() -> str:
    """What OpenVINO's CPU plugin computes float32 models in here by default: bf16 on
    CPUs with AVX512-BF16 or AMX, f32 elsewhere."""
    runtime = runtimes.get("openvino")
    runtime.session(CLEAN.read_bytes(), level="all")
    return runtime.describe()


def test_all_is_every_runtime_installed_here():
    names = runtimes.resolve("all")
    assert names[0] == "CPUExecutionProvider" and "openvino" in names
    assert "AzureExecutionProvider" not in names  # listed by onnxruntime, computes nothing
    assert runtimes.resolve(["cpu", "CPUExecutionProvider", "all"]) == names  # each once


def test_an_unavailable_runtime_is_an_error_naming_the_available_ones(tmp_path, capsys):
    code = main(["report", str(MODEL), "--onnx", str(CLEAN), "-o", str(tmp_path / "r.html"),
                 "--provider", "cpu", "--provider", "cuda", "--check-sizes", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'cuda' is not available" in err
    assert "CPUExecutionProvider" in err and "openvino" in err
    with pytest.raises(UsageError, match="no device NPU9"):
        runtimes.get("openvino:NPU9")


def test_an_openvino_session_computes_what_onnxruntime_does():
    x = np.random.default_rng(0).random((1, 3, 12, 20), dtype=np.float32)
    model = CLEAN.read_bytes()
    ort_out = runtimes.get("cpu").session(model, level="all").run(None, {"input": x})
    ov = runtimes.get("openvino-fp32").session(model, level="all")
    assert [p.name for p in ov.get_inputs()] == ["input"]
    assert [p.name for p in ov.get_outputs()] == [o.name for o in onnx.load(str(CLEAN)).graph.output]
    ov_out = ov.run(None, {"input": x})
    assert ov_out[0].shape == ort_out[0].shape == (1, 3, 48, 80)
    np.testing.assert_allclose(ov_out[0], ort_out[0], rtol=1e-4, atol=1e-5)


def test_clean_file_passes_on_both_runtimes_and_they_agree():
    d = diagnose(str(MODEL), str(CLEAN), provider=("cpu", "openvino-fp32"), **FAST)
    assert d.verdict == "pass", d.summary
    assert [(r.runtime, r.verdict) for r in d.runtimes] == [
        ("CPUExecutionProvider", "pass"), ("openvino-fp32", "pass")]
    assert d.runtime_departure is None
    assert all(r.max_output_error < 1e-5 for r in d.runtimes)
    ov = d.runtimes[1]
    assert "OpenVINO" in ov.detail and "inference precision f32" in ov.detail


def test_a_fault_in_the_file_diverges_on_every_runtime_at_the_same_layer():
    # The layer's own error is computed on OpenVINO too (its segment fed PyTorch's values).
    d = diagnose(str(MODEL), str(FAULTY), provider=("openvino-fp32", "cpu"), **FAST)
    assert d.verdict == "diverged"
    assert {r.verdict for r in d.runtimes} == {"diverged"}
    assert {r.onnx_node for r in d.runtimes} == {"/upsampler/DepthToSpace"}
    assert d.runtime_departure is None  # they disagree with PyTorch, not with each other
    assert d.settings.provider == "openvino-fp32"  # the first with the worst verdict
    assert d.first_divergence.onnx_node == "/upsampler/DepthToSpace"
    assert d.layers[d.first_divergence.layer].status == "fail"
    assert "pixel_shuffle_layout" in [s.rule for s in d.suggestions]


def test_openvino_at_its_default_precision_departs_where_the_cpu_provider_holds(tmp_path, capsys):
    what = _ov_default_precision()
    if "precision bf16" not in what and "precision f16" not in what:
        pytest.skip(f"OpenVINO computes in float32 on this CPU by default ({what})")
    # This CPU has bfloat16 instructions: OpenVINO's CPU plugin runs the float32 file in
    # bfloat16 unless told otherwise, which onnxruntime's CPU provider never does.
    report = tmp_path / "r.html"
    code = main(["report", str(MODEL), "--onnx", str(CLEAN), "-o", str(report), "--json",
                 str(tmp_path / "d.json"), "--provider", "cpu", "--provider", "openvino",
                 "--check-sizes", "none", "--reference", "none"])
    out = capsys.readouterr().out
    assert code == 1
    data = json.loads((tmp_path / "d.json").read_text())
    assert [(r["runtime"], r["verdict"]) for r in data["runtimes"]] == [
        ("CPUExecutionProvider", "pass"), ("openvino", "diverged")]
    dep = data["runtime_departure"]
    assert dep["departs"] == ["openvino"] and dep["holds"] == ["CPUExecutionProvider"]
    first_conv = next(l for l in data["layers"] if l["op_type"] == "Conv")
    assert dep["onnx_node"] == first_conv["onnx_node"]  # bf16 shows at the first conv
    assert dep["max_abs"]["openvino"] > 100 * dep["max_abs"]["CPUExecutionProvider"]
    assert data["settings"]["provider"] == "openvino"
    assert data["facts"]["runtime_precision"] in ("bf16", "f16")
    rule = next(s for s in data["suggestions"] if s["rule"] == "runtime_precision")
    assert "--provider openvino-fp32" in rule["fix"]
    assert "openvino departs from PyTorch first at" in out and "runtimes:" in out
    html = report.read_text()
    assert 'id="runtimes"' in html and "departs" in html


def test_one_runtime_keeps_the_json_keys_empty(tmp_path, capsys):
    code = main(["report", str(MODEL), "--onnx", str(CLEAN), "-o", str(tmp_path / "r.html"),
                 "--json", str(tmp_path / "d.json"), "--provider", "openvino-fp32",
                 "--check-sizes", "none", "--reference", "none"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["runtimes"] == [] and data["runtime_departure"] is None
    assert data["settings"]["provider"] == "openvino-fp32"
    # onnxruntime's own checks do not apply, and the report says so.
    assert any("onnxruntime's and were not used" in n for n in data["notes"])
    assert data["facts"]["runtime_precision"] == "f32"


def test_bfloat16_is_below_a_float16_file_too(tmp_path):
    what = _ov_default_precision()
    if "precision bf16" not in what:
        pytest.skip(f"OpenVINO does not take bfloat16 on this CPU by default ({what})")
    # The float16 file layerdiff makes from the clean one: float16 passes on the CPU
    # provider at the float16 tolerances, OpenVINO's bfloat16 does not.
    d = diagnose(str(MODEL), str(CLEAN), provider=("cpu", "openvino"), fp16=True,
                 output_dir=tmp_path, **FAST)
    assert [(r.runtime, r.verdict) for r in d.runtimes] == [
        ("CPUExecutionProvider", "pass"), ("openvino", "diverged")]
    assert d.runtime_departure.departs == ("openvino",)
    assert "runtime_precision" in [s.rule for s in d.suggestions]


def test_at_float32_a_fault_is_not_blamed_on_precision():
    d = diagnose(str(MODEL), str(FAULTY), provider="openvino-fp32", **FAST)
    assert d.verdict == "diverged" and d.facts.runtime_precision == "f32"
    assert "runtime_precision" not in [s.rule for s in d.suggestions]
    assert "pixel_shuffle_layout" in [s.rule for s in d.suggestions]
