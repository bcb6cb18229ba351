"""`layerdiff convert`'s repairs (issue 12): when the diagnosis names a cause layerdiff can
remedy, the file is made again that way and verified again; every try is recorded."""

from __future__ import annotations

import json

import onnx
import torch
import torch.nn.functional as F

from layerdiff.cli import main
from layerdiff.converting import Verification, convert
from layerdiff.fp16 import is_fp16
from layerdiff.records import Verdict
from test_convert import SMALL, FrozenSize, OneConv, metadata
from test_fp16 import Overflow


class TrainingMode(torch.nn.Module):
    """Conv, BatchNorm and Dropout: left in training mode, no export of it can match."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.2)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(2.0)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


def test_a_model_in_training_mode_is_exported_again_in_eval_mode(tmp_path):
    model = TrainingMode().train()
    out = tmp_path / "bn.onnx"
    result = convert(model, out, input_shape=SMALL, reproducer_for=tmp_path / "bn.html")
    assert result.verification == Verification.VERIFIED, result.reason
    first, repaired = result.attempts
    assert first.repair == "" and first.verdict == Verdict.DIVERGED
    assert repaired.repair == "eval-mode" and repaired.verdict == Verdict.PASS
    assert model.training and model.bn.training  # the caller's module is untouched
    meta = metadata(out)
    assert json.loads(meta["layerdiff.repairs"]) == ["eval-mode"]
    assert meta["layerdiff.model_mode"].startswith("eval")
    assert [a["repair"] for a in json.loads(meta["layerdiff.attempts"])] == [None, "eval-mode"]
    # The first try's reproducer describes a file that was not kept: removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.onnx"]


def test_fp16_overflow_is_repaired_by_keeping_its_layers_in_fp32(tmp_path):
    out = tmp_path / "overflows.onnx"
    result = convert(Overflow().eval(), out, dtype="fp16", input_shape=SMALL)
    assert [(a.method, a.repair, a.verdict) for a in result.attempts] == [
        ("convert", "", Verdict.DIVERGED), ("half", "", Verdict.DIVERGED),
        ("keep-fp32", "keep-fp32", Verdict.PASS)]
    assert result.verification == Verification.VERIFIED, result.reason
    meta = metadata(out)
    assert meta["layerdiff.dtype"] == "fp16" and float(meta["layerdiff.rtol"]) == 1e-2
    assert json.loads(meta["layerdiff.repairs"]) == ["keep-fp32"]
    assert is_fp16(out)
    assert any(n.startswith("mixed precision:") and "boost" in n
               for n in result.diagnosis.onnx.notes)


class FrozenAndBranchy(OneConv):
    """torch.export refuses the branch on a value; the legacy exporter traces it and
    freezes the upsampled size (Python ints): no dynamic export of it is right."""

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > -1e9:
            y = y + 0
        return F.interpolate(y, size=(int(y.shape[2]) * 2, int(y.shape[3]) * 2))


def test_no_dynamic_export_is_right_offers_a_static_size_and_does_not_switch(tmp_path, capsys):
    out = tmp_path / "frozen.onnx"
    result = convert(FrozenAndBranchy().eval(), out, input_shape=SMALL)
    assert result.path is None and not out.exists() and result.exit_code == 1
    assert [(a.exporter, bool(a.failed), a.verdict) for a in result.attempts] == [
        ("dynamo", True, None), ("legacy", False, Verdict.DIVERGED)]
    assert "no dynamic export is right" in result.reason
    assert "the dynamo exporter failed" in result.reason
    assert "--static 16,16" in result.reason
    # The fixed-size file it offers verifies, and says it is fixed-size.
    static = tmp_path / "static.onnx"
    fixed = convert(FrozenAndBranchy().eval(), static, static=(16, 16))
    assert fixed.verification == Verification.VERIFIED, fixed.reason
    assert metadata(static)["layerdiff.fixed_size"] == "16,16"


class ExactSizeBranch(OneConv):
    """A branch on one exact height whose two sides compute the same values (a path kept
    for the size a model was trained at). torch.export specialises the height to keep it,
    so the dynamo exporter's file comes out fixed at the traced size; the legacy exporter
    bakes the branch it took and stays free, which is right at any size."""

    def forward(self, x):
        if x.shape[2] == 16:
            return self.conv(x)
        return self.conv(x) * 1.0


def test_a_file_that_came_out_fixed_is_made_again_by_the_other_exporter(tmp_path):
    out = tmp_path / "free.onnx"
    result = convert(ExactSizeBranch().eval(), out, input_shape=SMALL)
    assert result.verification == Verification.VERIFIED, result.reason
    # dynamo's file passed at the traced size but took no other: not verified, repaired.
    assert [(a.exporter, a.verdict, a.repair) for a in result.attempts] == [
        ("dynamo", Verdict.PASS, ""), ("legacy", Verdict.PASS, "other-exporter")]
    meta = metadata(out)
    assert meta["layerdiff.exporter"] == "legacy"
    assert json.loads(meta["layerdiff.repairs"]) == ["other-exporter"]
    assert len(json.loads(meta["layerdiff.sizes"])) == 2  # the traced size and another
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims[2:]] == [True, True]  # height, width free


def test_a_named_exporter_is_not_switched_and_the_reason_says_so(tmp_path):
    result = convert(FrozenSize().eval(), tmp_path / "f.onnx", exporter="legacy", input_shape=SMALL)
    assert [a.exporter for a in result.attempts] == ["legacy"] and result.exit_code == 1
    assert "the dynamo exporter was not tried (--exporter legacy" in result.reason
    # With auto the dynamo exporter keeps the size free (torch 2.14.1): no repair needed.
    auto = convert(FrozenSize().eval(), tmp_path / "a.onnx", input_shape=SMALL)
    assert auto.verification == Verification.VERIFIED, auto.reason


def test_the_cli_shows_the_attempts_in_the_json_and_the_report(tmp_path, capsys):
    code_file = tmp_path / "nets.py"
    code_file.write_text(
        "import torch\n"
        "import torch.nn.functional as F\n"
        "class Frozen(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        y = self.conv(x)\n"
        "        if y.sum() > -1e9:\n"
        "            y = y + 0\n"
        "        return F.interpolate(y, size=(int(y.shape[2]) * 2, int(y.shape[3]) * 2))\n")
    out = tmp_path / "frozen.onnx"
    code = main(["convert", f"{code_file}:Frozen", "-o", str(out), "--input-shape", "1,3,16,16",
                 "--json", str(tmp_path / "frozen.json")])
    printed = capsys.readouterr().out
    assert code == 1 and not out.exists(), printed
    assert "no dynamic export is right" in printed
    conversion = json.loads((tmp_path / "frozen.json").read_text())["conversion"]
    assert conversion["verification"] == "false"
    assert "--static 16,16" in conversion["reason"]
    assert [(a["exporter"], a["verdict"]) for a in conversion["attempts"]] == [
        ("dynamo", None), ("legacy", "diverged")]
    html = (tmp_path / "frozen.html").read_text()
    assert "Attempts (layerdiff convert)" in html and "failed: the dynamo exporter" in html
    # `report` has no conversion: neither the key nor the table.
    code = main(["report", f"{code_file}:Frozen", "--exporter", "legacy", "-q",
                 "--input-shape", "1,3,16,16", "--check-sizes", "none",
                 "-o", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json")])
    assert "conversion" not in json.loads((tmp_path / "r.json").read_text())
    assert "Attempts (layerdiff convert)" not in (tmp_path / "r.html").read_text()


def test_a_divergence_only_with_ort_optimisations_records_the_safe_level(tmp_path):
    from test_rules import ConvGELU  # legacy GELU is exact; ORT's optional fusion is not

    out = tmp_path / "gelu.onnx"
    result = convert(ConvGELU().eval(), out, exporter="legacy", input_shape=SMALL, force=True,
                     ort_level="all", ort_config={"optimization.enable_gelu_approximation": "1"})
    assert result.diagnosis.facts.vanishes_without_ort_optimisation is True
    # No re-export: the graph is right. Not verified at the level asked (exit 1).
    assert [a.repair for a in result.attempts] == [""] and result.exit_code == 1
    assert result.verification == Verification.FORCED
    assert "--ort-level disable" in result.reason
    assert metadata(out)["layerdiff.safe_ort_level"] == "disable"
