"""The command line: exit codes, JSON schema, and bad input handled in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_model
from layerdiff.cli import main

SAMPLES = ROOT / "samples"
LAYER_KEYS = {"module", "onnx_tensor", "onnx_node", "op_type", "max_abs", "mean_abs",
              "max_rel", "cosine", "passed", "ignored"}


def run(args, tmp_path, capsys):
    report = tmp_path / "out" / "report.html"
    code = main(["report", *map(str, args), "-o", str(report), "--json", str(tmp_path / "d.json")])
    out, err = capsys.readouterr()
    return code, out, err, report


def test_clean_sample_exits_0_and_writes_report_and_json(tmp_path, capsys):
    code, out, err, report = run([SAMPLES / "compact_x4.pth", "--onnx", SAMPLES / "compact_x4.onnx"],
                                 tmp_path, capsys)
    assert code == 0, err
    assert "PASS" in out and str(report) in out
    assert report.read_text().lstrip().lower().startswith("<!doctype html")
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["schema"] == "layerdiff/2" and data["verdict"] == "pass"
    assert data["tolerance"] == {"rtol": 1e-3, "atol": 1e-5}
    assert data["first_divergence"] is None
    assert data["layers"] and all(LAYER_KEYS <= set(layer) for layer in data["layers"])
    assert {"name", "max_abs", "max_rel", "passed"} <= set(data["outputs"][0])
    assert set(data["unmatched"]) == {"torch", "onnx"}


def test_faulty_sample_exits_1_and_names_the_layer(tmp_path, capsys):
    code, out, _, _ = run([SAMPLES / "compact_x4.pth", "--onnx", SAMPLES / "compact_x4_dcr.onnx"],
                          tmp_path, capsys)
    assert code == 1
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["verdict"] == "diverged"
    first = data["first_divergence"]
    assert first["module"] == "upsampler" and first["op_type"] == "DepthToSpace"
    assert {"module", "onnx_node", "op_type", "kind", "max_abs", "message"} <= set(first)
    assert "pixel_shuffle_layout" in [s["rule"] for s in data["suggestions"]]
    assert "upsampler" in out


def test_export_path_without_onnx(tmp_path, capsys):
    code, out, err, report = run([SAMPLES / "compact_x4.pth", "--exporter", "legacy",
                                  "--input-shape", "1,3,32,32"], tmp_path, capsys)
    assert code == 0, err
    assert (report.parent / "compact_x4.onnx").is_file()  # exported next to the report
    assert json.loads((tmp_path / "d.json").read_text())["settings"]["input_shape"] == [1, 3, 32, 32]


def _state_dict_file(tmp_path: Path) -> Path:
    path = tmp_path / "unknown.pth"
    torch.save({"foo.weight": torch.zeros(3, 3), "bar": torch.ones(2)}, path)
    return path


def _pickled_module(tmp_path: Path) -> Path:
    path = tmp_path / "pickled.pth"
    torch.save(make_model("compact"), path)
    return path


def _corrupt_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf" * 10)
    return path


@pytest.mark.parametrize("case,expect", [
    ("missing model", "not found"),
    ("unknown architecture", "architecture"),
    ("pickled module", "--trust-pickle"),
    ("corrupt onnx", "onnx"),
    ("wrong channels", "input"),
])
def test_bad_input_is_one_line_exit_2_and_no_report(case, expect, tmp_path, capsys):
    sample = SAMPLES / "compact_x4.pth"
    args = {
        "missing model": [tmp_path / "nope.pth"],
        "unknown architecture": [_state_dict_file(tmp_path)],
        "pickled module": [_pickled_module(tmp_path)],
        "corrupt onnx": [sample, "--onnx", _corrupt_onnx(tmp_path)],
        "wrong channels": [sample, "--onnx", SAMPLES / "compact_x4.onnx", "--input-shape", "1,5,32,32"],
    }[case]
    code, out, err, report = run(args, tmp_path, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and expect.lower() in err.lower()
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint: "))
    assert "Traceback" not in err
    assert not report.exists() and not (tmp_path / "d.json").exists()


def test_pickled_module_loads_with_trust_pickle(tmp_path, capsys):
    code, _, err, _ = run([_pickled_module(tmp_path), "--trust-pickle", "--exporter", "legacy",
                           "--input-shape", "1,3,16,16"], tmp_path, capsys)
    assert code == 0, err


def test_bad_shape_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "m.pth", "--input-shape", "1,3,x"])
    assert exc.value.code == 2
    assert "N,C,H,W" in capsys.readouterr().err


def test_entry_point_prints_no_traceback_in_a_fresh_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-m", "layerdiff.cli", "report", str(tmp_path / "x.pth")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: model file not found")
    assert "Traceback" not in result.stderr


def test_align_prints_the_pairing_table_and_coverage(capsys):
    code = main(["align", str(SAMPLES / "esrgan_x2.pth"), "--onnx",
                 str(SAMPLES / "esrgan_x2_nameless_slope.onnx"), "--input-shape", "1,3,32,32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "model.0" in out and "weights" in out and "structure" in out
    assert "module names in the file: no" in out
    coverage = out.strip().splitlines()[-1]
    assert coverage.startswith("40 module calls: 98% paired")


def test_max_memory_is_applied_and_reported(tmp_path, capsys):
    code, _, err, report = run([SAMPLES / "compact_x4.pth", "--onnx", SAMPLES / "compact_x4.onnx",
                                "--max-memory", "3G", "--check-sizes", "none"], tmp_path, capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["settings"]["max_memory"] == 3 * 2**30
    facts = data["facts"]
    assert facts["segments"] == 1 and facts["spilled_bytes"] == 0 and facts["over_memory"] is False
    assert facts["peak_memory"] is None or facts["peak_memory"] > 0
    html = report.read_text()
    assert "memory limit</dt><dd class=\"num\">3.00 GiB" in html


@pytest.mark.parametrize("value", ["lots", "0", "-2G"])
def test_bad_max_memory_exits_2(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["report", str(SAMPLES / "compact_x4.pth"), f"--max-memory={value}"])
    assert stop.value.code == 2
    assert "--max-memory" in capsys.readouterr().err
