"""`layerdiff convert`: a file is written only when the diagnosis verifies it, with the
verification in its metadata; `layerdiff.testing.assert_matches`."""

from __future__ import annotations

import json
import shutil
import textwrap

import onnx
import pytest
import torch
import torch.nn.functional as F

import faults
import layerdiff
from conftest import ROOT, make_model, with_fault
from layerdiff import testing
from layerdiff.cli import main
from layerdiff.converting import Verification, convert
from layerdiff.errors import UsageError
from layerdiff.fp16 import is_fp16
from layerdiff.records import Verdict

SAMPLE = ROOT / "samples" / "compact_x4.pth"
SMALL = (1, 3, 16, 16)


class OneConv(torch.nn.Module):
    """One 3x3 convolution with seeded weights; subclasses say what forward does with it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)


class FrozenSize(OneConv):
    """Upsamples to a size computed as Python ints: the legacy exporter bakes the traced
    size into the file, so at any other size its output has the wrong shape."""

    def forward(self, x):
        y = self.conv(x)
        return F.interpolate(y, size=(int(y.shape[2]) * 2, int(y.shape[3]) * 2), mode="nearest")


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_cli_converts_a_clean_model_and_report_shows_the_verification(tmp_path, capsys):
    out = tmp_path / "deploy" / "compact_x4.onnx"
    code = main(["convert", str(SAMPLE), "-o", str(out), "--input-shape", "1,3,16,16",
                 "--json", str(tmp_path / "c.json")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.splitlines()[0].startswith(f"verified: wrote {out}")
    report = out.with_name("compact_x4.html")
    assert f"report: {report}" in printed and report.is_file()
    meta = metadata(out)
    assert meta["layerdiff.verified"] == "true" and meta["layerdiff.dtype"] == "fp32"
    assert meta["layerdiff.exporter"] == "dynamo" and int(meta["layerdiff.opset"]) >= 18
    assert json.loads(meta["layerdiff.inputs"])[0]["shape"] == [1, 3, 16, 16]
    sizes = json.loads(meta["layerdiff.sizes"])
    assert sizes[0] == [1, 3, 16, 16] and len(sizes) == 2  # and one other size
    assert float(meta["layerdiff.rtol"]) == 1e-3 and float(meta["layerdiff.atol"]) == 1e-5
    assert float(meta["layerdiff.max_output_error"]) < 1e-3
    assert float(meta["layerdiff.psnr"]) > 60
    # the same PSNR as the diagnosis's (quality.py), the lowest over the inputs
    image = json.loads((tmp_path / "c.json").read_text())["outputs"][0]["image"]
    assert meta["layerdiff.psnr"] == ("inf" if image["psnr"] == "inf" else f"{image['psnr']:.2f}")
    assert json.loads(meta["layerdiff.attempts"]) == [
        {"exporter": "dynamo", "dtype": "fp32", "method": None, "failed": None, "verdict": "pass",
         "repair": None, "optimizer": None}]
    cases = json.loads(meta["layerdiff.cases"])  # random, the bundled photo, another size
    assert [c["kind"] for c in cases] == ["random", "photo", "size"]
    assert all(c["verdict"] == "pass" for c in cases)
    assert json.loads((tmp_path / "c.json").read_text())["onnx"]["verified_by"] == meta
    # `report` on the converted file shows what convert wrote into it.
    code = main(["report", str(SAMPLE), "--onnx", str(out), "-o", str(tmp_path / "r.html"),
                 "--json", str(tmp_path / "r.json"), "--check-sizes", "none", "-q"])
    assert code == 0
    assert json.loads((tmp_path / "r.json").read_text())["onnx"]["verified_by"] == meta
    html = (tmp_path / "r.html").read_text()
    assert "layerdiff.verified" in html and "layerdiff.psnr" in html


def test_a_file_wrong_at_another_size_is_not_written(tmp_path):
    out = tmp_path / "frozen.onnx"
    result = convert(FrozenSize().eval(), out, exporter="legacy", input_shape=SMALL,
                     reproducer_for=tmp_path / "frozen.html")
    assert result.path is None and not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder or temporary file left
    assert result.verdict == Verdict.DIVERGED and result.verification == Verification.FAILED
    assert result.exit_code == 1
    assert "shape" in result.reason
    assert any(f"did not write {out}" in n for n in result.diagnosis.notes)
    assert result.metadata["layerdiff.verified"] == "false"


def test_force_writes_a_failed_file_marked_so(tmp_path):
    out = tmp_path / "frozen.onnx"
    result = convert(FrozenSize().eval(), out, exporter="legacy", input_shape=SMALL, force=True)
    assert result.path == out and out.is_file() and result.exit_code == 1
    meta = metadata(out)
    assert meta["layerdiff.verified"] == "failed, written with --force"
    assert json.loads(meta["layerdiff.attempts"])[0]["verdict"] == "diverged"


def test_no_verify_writes_a_file_marked_not_verified(tmp_path):
    out = tmp_path / "frozen.onnx"
    result = convert(FrozenSize().eval(), out, exporter="legacy", input_shape=SMALL, verify=False)
    assert result.path == out and result.diagnosis is None and result.exit_code == 0
    assert result.verdict == "unverified"
    meta = metadata(out)
    assert meta["layerdiff.verified"] == "not verified" and "layerdiff.sizes" not in meta


def test_the_cli_exits_1_and_writes_no_file_when_it_does_not_verify(tmp_path, capsys):
    code_file = tmp_path / "nets.py"
    code_file.write_text(textwrap.dedent("""
        import torch
        import torch.nn.functional as F

        class Frozen(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

            def forward(self, x):
                y = self.conv(x)
                return F.interpolate(y, size=(int(y.shape[2]) * 2, int(y.shape[3]) * 2))
    """))
    out = tmp_path / "frozen.onnx"
    code = main(["convert", f"{code_file}:Frozen", "-o", str(out), "--exporter", "legacy",
                 "--input-shape", "1,3,16,16"])
    printed = capsys.readouterr().out
    assert code == 1 and not out.exists()
    assert printed.startswith(f"NOT VERIFIED: {out} not written")
    report = (tmp_path / "frozen.html").read_text()
    assert f"did not write {out}" in report


def test_an_output_over_the_model_is_refused_before_any_work(tmp_path, capsys):
    model = tmp_path / "compact_x4.pth"
    shutil.copy(SAMPLE, model)
    before = model.read_bytes()
    code = main(["convert", str(model), "-o", str(model)])
    assert code == 2
    assert "is the model" in capsys.readouterr().err
    assert model.read_bytes() == before and sorted(tmp_path.iterdir()) == [model]
    with pytest.raises(UsageError, match="is the model"):
        convert(model, model)


def test_static_size_writes_a_fixed_file(tmp_path):
    out = tmp_path / "static.onnx"
    result = convert(make_model("compact"), out, static=(20, 12), exporter="legacy")
    assert result.verification == Verification.VERIFIED, result.reason
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 20, 12]
    assert json.loads(metadata(out)["layerdiff.sizes"]) == [[1, 3, 20, 12]]


def test_fp16_conversion_of_a_spandrel_model_is_verified(tmp_path):
    out = tmp_path / "compact_fp16.onnx"
    result = layerdiff.convert(make_model("compact"), out, dtype="fp16", input_shape=SMALL)
    assert result.verification == Verification.VERIFIED, result.reason
    assert is_fp16(out)
    meta = metadata(out)
    assert meta["layerdiff.dtype"] == "fp16" and meta["layerdiff.verified"] == "true"
    assert float(meta["layerdiff.rtol"]) == 1e-2  # fp16 tolerances
    assert [(a.dtype, a.method) for a in result.attempts] == [("fp16", "convert")]


def test_assert_matches_passes_on_a_clean_export(exported):
    diagnosis = testing.assert_matches(make_model("compact"), exported("compact", "legacy"),
                                       check_sizes=())
    assert diagnosis.verdict == Verdict.PASS


def test_assert_matches_names_the_first_divergence_and_the_fix(exported, tmp_path):
    faulty, node = with_fault(exported("compact", "legacy"), faults.scale_weight, tmp_path)
    with pytest.raises(AssertionError) as raised:
        testing.assert_matches(make_model("compact"), faulty, check_sizes=())
    message = str(raised.value)
    assert f"ONNX node {node} (Conv)" in message
    assert "first divergence: body.0" in message and "numeric" in message
    assert "max error" in message
    assert "suggestion: " in message and "fix: " in message


class Overflows(OneConv):
    """Values above float16's 65504 in the middle: no float16 file of it can verify."""

    def forward(self, x):
        big = self.conv(x + 1) * 300  # constants within the converter's 1e4 clamp
        return big * 300 / 90000


def test_fp16_tries_the_conversion_then_half_and_writes_neither_when_both_fail(tmp_path):
    out = tmp_path / "overflows.onnx"
    report = tmp_path / "overflows.html"
    result = convert(Overflows().eval(), out, dtype="fp16", input_shape=SMALL,
                     reproducer_for=report)
    assert [(a.method, a.verdict) for a in result.attempts] == [
        ("convert", Verdict.DIVERGED), ("half", Verdict.DIVERGED)]
    assert result.path is None and not out.exists() and result.exit_code == 1
    # The first try is the one reported (fp32 inputs and outputs, as neosr makes them).
    assert result.metadata["layerdiff.exporter"] != "" and result.diagnosis.onnx.path == out
    assert any("onnxconverter-common" in n for n in result.diagnosis.onnx.notes)


def test_no_verify_takes_no_report_options(tmp_path, capsys):
    code = main(["convert", str(SAMPLE), "-o", str(tmp_path / "c.onnx"), "--no-verify",
                 "--json", str(tmp_path / "c.json")])
    assert code == 2 and "--no-verify writes no report" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


class DataDependent(OneConv):
    """A branch on a value: torch.export refuses it, the legacy exporter traces one side."""

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > -1e9:
            return y
        return -y


def test_auto_falls_back_to_legacy_and_records_both_attempts(tmp_path):
    out = tmp_path / "branchy.onnx"
    result = convert(DataDependent().eval(), out, input_shape=SMALL)
    assert result.verification == Verification.VERIFIED, result.reason
    dynamo, legacy = result.attempts
    assert dynamo.exporter == "dynamo" and dynamo.failed and dynamo.verdict is None
    assert legacy.exporter == "legacy" and not legacy.failed and legacy.verdict == Verdict.PASS
    assert metadata(out)["layerdiff.exporter"] == "legacy"
    assert (tmp_path / "branchy.onnx.dynamo.log").is_file()  # kept for the user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branchy.onnx", "branchy.onnx.dynamo.log"]
    # Asked for that exporter only, there is no fallback.
    with pytest.raises(layerdiff.LayerdiffError, match="dynamo exporter"):
        convert(DataDependent().eval(), tmp_path / "only.onnx", exporter="dynamo",
                input_shape=SMALL)
    assert not (tmp_path / "only.onnx").exists()


class ConvScale(OneConv):
    """A convolution, then a per-channel scale and shift (as a folded normalisation
    leaves them): both optimisers fold them into the convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3).view(1, 3, 1, 1))
        self.shift = torch.nn.Parameter(torch.linspace(-0.1, 0.1, 3).view(1, 3, 1, 1))

    def forward(self, x):
        return torch.relu(self.conv(x) * self.scale + self.shift)


@pytest.mark.parametrize("optimizer", ["ort", "onnxslim"])
def test_optimize_writes_the_optimised_file_once_it_verifies_again(optimizer, tmp_path):
    plain, optimised = tmp_path / "plain.onnx", tmp_path / "optimised.onnx"
    convert(ConvScale().eval(), plain, input_shape=SMALL, exporter="dynamo", verify=False)
    result = convert(ConvScale().eval(), optimised, input_shape=SMALL, exporter="dynamo",
                     optimize=optimizer)
    assert result.verification == Verification.VERIFIED, result.reason
    # The unoptimised file was verified, then the optimised one, which is the one written.
    assert [(a.optimizer, a.verdict) for a in result.attempts] == [
        ("", Verdict.PASS), (optimizer, Verdict.PASS)]
    meta = metadata(optimised)
    assert meta["layerdiff.optimizer"] == optimizer and meta["layerdiff.verified"] == "true"
    ops = lambda path: [n.op_type for n in onnx.load(str(path)).graph.node]  # noqa: E731
    assert "Mul" in ops(plain) and "Mul" not in ops(optimised)
    assert len(ops(optimised)) < len(ops(plain))


def test_optimize_refuses_an_unknown_optimizer_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's own exit
        main(["convert", str(SAMPLE), "-o", str(tmp_path / "x.onnx"), "--optimize", "fast"])
    assert stop.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="unknown optimizer"):
        convert(SAMPLE, tmp_path / "x.onnx", optimize="fast")
    assert list(tmp_path.iterdir()) == []


def test_bf16_is_written_unverified_with_float32_inputs_and_outputs(tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "compact_bf16.onnx"
    # Verification is refused up front, with the reason and the way out.
    code = main(["convert", str(SAMPLE), "-o", str(out), "--dtype", "bf16"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot verify a bfloat16 file" in err and "--no-verify" in err
    assert not out.exists()
    code = main(["convert", str(SAMPLE), "-o", str(out), "--dtype", "bf16", "--no-verify",
                 "--input-shape", "1,3,16,16"])
    assert code == 0 and capsys.readouterr().out.startswith(f"not verified: wrote {out}")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    bf16, fp32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    weights = [i for i in model.graph.initializer if len(i.dims) > 1]  # not Resize's scales
    assert weights and {i.data_type for i in weights} == {bf16}
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] \
        == [fp32, fp32]
    assert model.opset_import[0].version >= 22
    meta = metadata(out)
    assert meta["layerdiff.dtype"] == "bf16" and meta["layerdiff.verified"] == "not verified"
    # The reason given: onnxruntime's CPU provider cannot run it (when it can, verify it).
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|Could not find an implementation"):
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
