"""FP16: fp16 files made as neosr and chaiNNer make them, diagnosed against the fp32 model;
overflow found from PyTorch's fp32 values; the fix-fp16 flow (keep those layers in fp32)."""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import SHAPE, export, make_model
from torch import nn

from layerdiff import capture_torch, diagnose, fp16
from layerdiff.errors import ExportError, UsageError
from layerdiff.pipeline import make_input

# What neosr and chaiNNer check fp16 outputs with (DIVERGENCES.md).
FP16_TOL = {"rtol": 1e-2, "atol": 1e-3}


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class LayerNorm2d(nn.Module):
    """Channel LayerNorm written out, as in NAFNet-style SR blocks: exports as ReduceMean/Pow/..."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + 1e-6).sqrt()
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


class Overflow(nn.Module):
    """Features scaled past 65504 (boost, act), brought back by a norm: inf/NaN in fp16."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.gain = Scale(100.0)  # ~1e2: fits fp16
        self.boost = Scale(1000.0)  # ~1e5: does not
        self.act = nn.LeakyReLU(0.2)
        self.norm = LayerNorm2d(8)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.norm(self.act(self.boost(self.gain(self.head(x))))))


class LoudNorm(nn.Module):
    """A norm fed values ~1e3: fine in fp16 themselves, but their squares reach ~1e6."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.gain = Scale(1000.0)
        self.norm = LayerNorm2d(8)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.norm(self.gain(self.head(x))))


class BigConstant(nn.Module):
    """A scale of 2e4: representable in fp16, but onnxconverter-common clamps it to 1e4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.gain = Scale(2e4)
        self.tail = Scale(1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.gain(self.head(x)))


class Whisper(nn.Module):
    """Values ~1e-9: every one of them flushes to 0 in fp16."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.shrink = Scale(1e-9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shrink(self.head(x))


class Refuses(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            raise RuntimeError("no half precision here")
        return x


def _fp32_onnx(model: nn.Module, tmp_path, name: str):
    return export(model.eval(), make_input(SHAPE, 0), tmp_path / f"{name}.onnx", "legacy")


def _findings(model: nn.Module, diagnosis, fp32_path) -> fp16.Fp16Findings:
    captured = capture_torch.capture(model, make_input(SHAPE, 0))  # diagnose's main input
    return fp16.analyse(captured.calls, captured.activations, diagnosis.layers, fp32_path)


# --------------------------------------------------------------------------- clean models


@pytest.mark.parametrize("method", ["convert", "half"])
@pytest.mark.parametrize("arch", ["compact", "esrgan"])
def test_clean_model_passes_in_fp16(arch, method, exported, tmp_path):
    model = make_model(arch)
    fp32_path = exported(arch, "legacy")
    path, how = fp16.make_fp16_onnx(model, make_input(SHAPE, 0), fp32_path,
                                    tmp_path / f"{arch}-fp16.onnx", method)
    assert how == fp16.DESCRIPTIONS[method]
    assert fp16.is_fp16(path)

    diagnosis = diagnose(model, path, input_shape=SHAPE, output_dir=tmp_path, **FP16_TOL)

    assert diagnosis.verdict == "pass", diagnosis.summary
    assert not diagnosis.alignment.unmatched_torch
    findings = _findings(model, diagnosis, fp32_path)
    assert not findings.overflow and not findings.keep and findings.first_nonfinite is None


def test_half_export_has_fp16_io_and_dynamic_size(tmp_path):
    path, _ = fp16.make_fp16_onnx(make_model("compact"), make_input(SHAPE, 0), None,
                                  tmp_path / "half.onnx", "half")
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[2].dim_param and dims[3].dim_param


# --------------------------------------------------------------------------- fix-fp16


def test_overflow_is_found_and_fixed_by_keeping_layers_in_fp32(tmp_path):
    model = Overflow().eval()
    fp32_path = _fp32_onnx(model, tmp_path, "overflow")
    fp16_path, _ = fp16.make_fp16_onnx(model, make_input(SHAPE, 0), fp32_path,
                                       tmp_path / "overflow-fp16.onnx", "convert")
    broken = diagnose(model, fp16_path, input_shape=SHAPE, **FP16_TOL)
    assert broken.verdict == "diverged"
    assert broken.first_divergence.module == "boost"

    findings = _findings(model, broken, fp32_path)

    assert [l.module for l in findings.overflow] == ["boost", "act"]
    assert all(l.max_abs > fp16.FP16_MAX for l in findings.overflow)
    assert findings.first_nonfinite.module == "boost"
    keep = {k.module: k for k in findings.keep}
    assert set(keep) == {"boost", "act", "norm"}
    assert "inf/NaN" in keep["boost"].reason and "65504" in keep["act"].reason
    assert "back into float16's range" in keep["norm"].reason
    names = findings.node_names
    assert {"/boost/Mul", "/act/LeakyRelu", "/norm/Pow", "/norm/Sub",
            "/norm/ReduceMean"} <= set(names)
    assert "/head/Conv" not in names and "/tail/Conv" not in names and "/gain/Mul" not in names
    assert "boost" in findings.summary()

    mixed = fp16.keep_in_fp32(fp32_path, names, tmp_path / "overflow-mixed.onnx")

    assert fp16.is_fp16(mixed)
    fixed = diagnose(model, mixed, input_shape=SHAPE, **FP16_TOL)
    assert fixed.verdict == "pass", fixed.summary


def test_kept_nodes_pass_fp32_values_to_each_other(tmp_path):
    """No fp32 -> fp16 -> fp32 round trip between kept nodes, also where a tensor fans out."""
    model = Overflow().eval()
    fp32_path = _fp32_onnx(model, tmp_path, "overflow")
    kept = ["/boost/Constant", "/boost/Mul", "/act/LeakyRelu", "/norm/ReduceMean", "/norm/Sub"]

    mixed = onnx.load(str(fp16.keep_in_fp32(fp32_path, kept, tmp_path / "mixed.onnx")))

    to16 = {n.output[0] for n in mixed.graph.node if fp16._cast_to(n) == onnx.TensorProto.FLOAT16}
    round_trips = [n.name for n in mixed.graph.node
                   if fp16._cast_to(n) == onnx.TensorProto.FLOAT and n.input[0] in to16]
    assert round_trips == []
    onnx.checker.check_model(mixed)


def test_norm_fed_large_values_is_kept_in_fp32(tmp_path):
    """Row 13: (x - mean)**2 passes 65504 inside the norm although no layer output does."""
    model = LoudNorm().eval()
    fp32_path = _fp32_onnx(model, tmp_path, "loudnorm")
    fp16_path, _ = fp16.make_fp16_onnx(model, make_input(SHAPE, 0), fp32_path,
                                       tmp_path / "loudnorm-fp16.onnx", "convert")
    diagnosis = diagnose(model, fp16_path, input_shape=SHAPE, **FP16_TOL)

    findings = _findings(model, diagnosis, fp32_path)

    assert not findings.overflow
    assert [k.module for k in findings.keep] == ["norm"]
    assert "squares" in findings.keep[0].reason
    assert {"/norm/Pow", "/norm/ReduceMean_1", "/norm/Sqrt"} <= set(findings.node_names)
    # onnxruntime's CPU provider runs these ops in fp32 behind Casts: say so.
    assert fp16.provider_note(fp16_path) == fp16.CPU_PROVIDER_NOTE
    assert fp16.provider_note(fp16_path, "CUDAExecutionProvider") is None
    mixed = fp16.keep_in_fp32(fp32_path, findings.node_names, tmp_path / "loudnorm-mixed.onnx")
    assert diagnose(model, mixed, input_shape=SHAPE, **FP16_TOL).verdict == "pass"


def test_constants_the_converter_would_clamp_are_kept_in_fp32(tmp_path):
    model = BigConstant().eval()
    fp32_path = _fp32_onnx(model, tmp_path, "bigconstant")
    fp16_path, how = fp16.make_fp16_onnx(model, make_input(SHAPE, 0), fp32_path,
                                         tmp_path / "bigconstant-fp16.onnx", "convert")
    assert "clamped 1 weight/constant tensor(s)" in how
    broken = diagnose(model, fp16_path, input_shape=SHAPE, **FP16_TOL)
    assert broken.verdict == "diverged" and broken.first_divergence.module == "gain"

    findings = _findings(model, broken, fp32_path)

    assert not findings.overflow
    assert [(k.module, k.nodes) for k in findings.keep] == [
        ("gain", ("/gain/Constant", "/gain/Mul"))]
    assert "clamps" in findings.keep[0].reason
    mixed = fp16.keep_in_fp32(fp32_path, findings.node_names, tmp_path / "bigconstant-mixed.onnx")
    assert diagnose(model, mixed, input_shape=SHAPE, **FP16_TOL).verdict == "pass"


def test_underflow_is_reported(tmp_path):
    model = Whisper().eval()
    fp32_path = _fp32_onnx(model, tmp_path, "whisper")
    captured = capture_torch.capture(model, make_input(SHAPE, 0))

    findings = fp16.analyse(captured.calls, captured.activations, [], fp32_path)

    assert [l.module for l in findings.underflow] == ["shrink"]
    assert findings.underflow[0].tiny_share > 0.99
    assert not findings.overflow and not findings.keep


# --------------------------------------------------------------------------- small contracts


def test_is_fp16(exported, tmp_path):
    fp32_path = exported("compact", "legacy")
    converted, _ = fp16.make_fp16_onnx(None, None, fp32_path, tmp_path / "c16.onnx", "convert")
    assert not fp16.is_fp16(fp32_path)
    assert fp16.is_fp16(converted)
    assert fp16.provider_note(fp32_path) is None


def test_bad_requests_are_usage_errors(exported, tmp_path):
    fp32_path = exported("compact", "legacy")
    with pytest.raises(UsageError):
        fp16.make_fp16_onnx(None, None, fp32_path, tmp_path / "x.onnx", "bf16")
    with pytest.raises(UsageError, match="not in"):
        fp16.keep_in_fp32(fp32_path, ["/no/such/node"], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_failed_half_export_raises_and_writes_nothing(tmp_path):
    out = tmp_path / "refuses.onnx"
    with pytest.raises(ExportError, match="half"):
        fp16.make_fp16_onnx(Refuses(), make_input(SHAPE, 0), None, out, "half")
    assert not out.exists()


def test_fp16_flag_end_to_end_finds_and_fixes_the_overflow(tmp_path):
    """--fp16 --fix-fp16 through diagnose(): made fp16 file, analysis, rule, checked fix."""
    model = Overflow().eval()
    fixed = tmp_path / "mixed.onnx"
    d = diagnose(model, input_shape=(1, 3, 16, 16), exporter="legacy",
                           output_dir=tmp_path, fp16=True, fix_fp16=fixed, check_sizes=())
    assert d.settings.rtol == 1e-2 and d.settings.atol == 1e-3  # fp16 defaults
    assert any("float16 model" in n for n in d.onnx.notes)
    assert d.verdict == "diverged"
    assert d.facts.fp16 is not None and d.facts.fp16.overflow
    assert "fp16_precision" in [s.rule for s in d.suggestions]
    assert d.facts.fp16_fix == (str(fixed), "pass") and fixed.is_file()


def test_fp16_flag_on_a_clean_model_passes_without_suggestions(tmp_path):
    from conftest import make_model

    d = diagnose(make_model("compact"), input_shape=(1, 3, 24, 24), exporter="legacy",
                           output_dir=tmp_path, fp16=True, check_sizes=())
    assert d.verdict == "pass", d.summary
    assert d.facts.fp16 is not None and d.facts.fp16.clean
    assert "fp16_precision" not in [s.rule for s in d.suggestions]
