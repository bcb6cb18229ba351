"""Reproducers for the fix-suggestion rules (src/layerdiff/rules/), through the real pipeline.

Every test builds a real model, gets a real ONNX file (layerdiff's own export, or
torch.onnx.export plus one samples/faults.py injection), runs ``diagnose`` (real torch,
real onnxruntime) and checks the verdict, where the first divergence is, and that the
rule fires -- and that none of the other rules tested here fires with it. No Diagnosis
record is built by hand. ``test_clean_exports_get_no_suggestions`` is the negative
check: clean exports of the same small models get no suggestion at all.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import faults
from conftest import SHAPE, make_model, with_fault
from layerdiff.pipeline import diagnose, make_input
from layerdiff.rules import REGISTRY

TESTED_RULES = {
    "training_mode", "input_mutation", "resize_mode", "pixel_shuffle_layout", "frozen_shape",
    "gelu_approximation", "ort_optimisation", "attribute_mismatch", "changed_weights",
}


# --------------------------------------------------------------------------- helpers


def fired(d) -> list[str]:
    return [s.rule for s in d.suggestions]


def suggestion(d, rule: str):
    return next(s for s in d.suggestions if s.rule == rule)


def assert_fires(d, rule: str) -> None:
    """``rule`` fires, and no other rule of this file fires beside it."""
    rules = fired(d)
    assert rule in rules, f"{rule} did not fire; suggestions: {rules}; {d.summary}"
    others = (set(rules) & TESTED_RULES) - {rule}
    assert not others, f"{sorted(others)} fired beside {rule}: {d.summary}"


def layer(d, module: str):
    return next(l for l in d.layers if l.module == module)


@contextlib.contextmanager
def _quiet():
    """Exporters print progress and warn (TracerWarning for int(h)): keep the test log clean."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_legacy(model: nn.Module, shape, path: Path, *, opset: int = 17, dynamic: bool = False) -> Path:
    """torch.onnx.export with the legacy exporter, height and width dynamic if asked."""
    options = {}
    if dynamic:
        options["dynamic_axes"] = {"input": {2: "h", 3: "w"}, "output": {2: "h", 3: "w"}}
    with _quiet():
        torch.onnx.export(model, (make_input(shape, 0),), str(path), dynamo=False,
                          opset_version=opset, input_names=["input"], output_names=["output"],
                          **options)
    return path


def export_dynamo(model: nn.Module, shape, path: Path) -> Path:
    with _quiet():
        torch.onnx.export(model, (make_input(shape, 0),), str(path), dynamo=True)
    return path


# --------------------------------------------------------------------------- small models


class ConvBN(nn.Module):
    """conv1 -> bn -> relu -> conv2, or with ``bn_after_relu`` conv1 -> relu -> bn -> conv2.

    Both exporters fold a BatchNorm that follows a Conv into it; after a ReLU it stays a
    BatchNormalization node. The running statistics are not the defaults, so batch and
    running statistics give clearly different results.
    """

    def __init__(self, bn_after_relu: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn_after_relu = bn_after_relu
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 8))
            self.bn.running_var.copy_(torch.linspace(0.5, 2.0, 8))
            self.bn.weight.copy_(torch.linspace(0.5, 1.5, 8))
            self.bn.bias.copy_(torch.linspace(-0.2, 0.2, 8))

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn(self.relu(x)) if self.bn_after_relu else self.relu(self.bn(x))
        return self.conv2(x)


class Resample(nn.Module):
    """conv1 -> up (nn.Upsample) -> conv2; with ``functional`` the resize is F.interpolate."""

    def __init__(self, functional: bool = False, **interpolate) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.functional = functional
        self.interpolate = interpolate
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        if not functional:
            self.up = nn.Upsample(**interpolate)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        x = self.conv1(x)
        x = F.interpolate(x, **self.interpolate) if self.functional else self.up(x)
        return self.conv2(x)


class FrozenShape(nn.Module):
    """Reshapes with Python ints taken from the shape: the legacy tracer stores constants."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        x = self.conv1(x)
        b, c, h, w = x.shape
        y = x.reshape(b, c, int(h) * int(w)).transpose(1, 2)
        y = self.norm(y)
        y = y.transpose(1, 2).reshape(b, c, int(h), int(w))
        return self.conv2(y)


class ConvGELU(nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.GELU(approximate=approximate)
        self.conv2 = nn.Conv2d(16, 3, 3, padding=1)
        with torch.no_grad():  # pre-activations up to ~4, where erf and tanh GELU differ most
            self.conv1.weight.mul_(4)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


def tiny_rcan() -> nn.Module:
    from spandrel.architectures.RCAN import RCAN

    torch.manual_seed(0)
    return RCAN(scale=2, n_resgroups=1, n_resblocks=1, n_feats=16, reduction=4).eval()


def test_every_tested_rule_is_shipped():
    assert TESTED_RULES <= {rule.id for rule in REGISTRY}


# --------------------------------------------------------------------------- 1. training_mode


def test_training_mode_batchnorm_node(tmp_path):
    """BN after a ReLU stays a BatchNormalization node: the divergence starts exactly there."""
    model = ConvBN(bn_after_relu=True).train()
    d = diagnose(model, input_shape=(1, 3, 16, 16), exporter="legacy", output_dir=tmp_path)

    assert d.verdict == "diverged"
    assert d.facts.training_modules == ("bn",)
    first = d.first_divergence
    assert (first.module, first.module_type, first.op_type) == ("bn", "BatchNorm2d", "BatchNormalization")
    assert first.kind == "numeric"
    assert layer(d, "conv1").status == "pass" and layer(d, "relu").status == "pass"
    assert_fires(d, "training_mode")
    assert "bn" in suggestion(d, "training_mode").layers


def test_training_mode_folded_batchnorm_dynamo(tmp_path):
    """Conv+BN+ReLU+Conv: dynamo folds BN into the conv and names the fused Conv after bn."""
    model = ConvBN().train()
    d = diagnose(model, input_shape=(1, 3, 16, 16), exporter="dynamo", output_dir=tmp_path)

    assert d.onnx.exporter == "dynamo"
    assert d.verdict == "diverged"
    first = d.first_divergence
    assert (first.module, first.module_type, first.op_type) == ("bn", "BatchNorm2d", "Conv")
    assert_fires(d, "training_mode")


def test_training_mode_folded_batchnorm_legacy(tmp_path):
    """The brief's model as given: Conv+BN+ReLU+Conv in train(), legacy export (BN folded)."""
    model = ConvBN().train()
    d = diagnose(model, input_shape=(1, 3, 16, 16), exporter="legacy", output_dir=tmp_path)

    assert d.onnx.exporter == "legacy"
    assert d.verdict == "diverged"
    assert d.facts.training_modules == ("bn",)
    assert d.first_divergence is not None
    assert_fires(d, "training_mode")


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_folded_batchnorm_is_not_a_divergence(exporter, tmp_path):
    """Exporters fold eval BatchNorm into the Conv before it: the Conv's tensor is the BN's."""
    d = diagnose(ConvBN().eval(), input_shape=(1, 3, 16, 16), exporter=exporter,
                 output_dir=tmp_path)
    assert d.verdict == "pass", d.summary
    assert not [s.rule for s in d.suggestions]
    folded = [u for u in d.alignment.unmatched_torch if "fused into" in u.reason]
    if any(l.method == "fused" for l in d.layers):
        assert [u.name for u in folded] == ["conv1"]


def test_folded_batchnorm_in_a_nameless_export(tmp_path):
    model = ConvBN().eval()
    path = tmp_path / "nameless.onnx"
    faults.export_without_names(model, torch.rand(1, 3, 16, 16), path)
    d = diagnose(model, path, input_shape=(1, 3, 16, 16))
    assert d.verdict == "pass", d.summary
    assert any(l.module == "bn" and l.method == "fused" for l in d.layers)


# --------------------------------------------------------------------------- 2. input_mutation


def test_input_mutation_rcan(tmp_path):
    """spandrel's RCAN does ``x *= self.rgb_range`` on its input."""
    d = diagnose(tiny_rcan(), input_shape=(1, 3, 16, 16), exporter="legacy", output_dir=tmp_path)

    assert d.facts.input_mutated is True
    assert d.verdict == "pass", d.summary  # each side got its own copy of the input
    assert d.first_divergence is None
    assert_fires(d, "input_mutation")
    assert any("changes its input tensor in place" in note for note in d.notes)


# --------------------------------------------------------------------------- 3. resize_mode


def test_resize_nearest_non_integer_scale_module(tmp_path):
    """DIVERGENCES #1: nearest 26 -> 64 takes some rows/columns from the neighbouring pixel."""
    model = Resample(size=(64, 64), mode="nearest").eval()
    d = diagnose(model, input_shape=(1, 3, 26, 26), exporter="legacy", output_dir=tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert (first.module, first.module_type, first.op_type) == ("up", "Upsample", "Resize")
    assert layer(d, "conv1").status == "pass"
    assert_fires(d, "resize_mode")
    assert "Nearest" in suggestion(d, "resize_mode").detail


def test_resize_nearest_non_integer_scale_functional(tmp_path):
    """Same resize through F.interpolate: no module holds it, the Resize is a suspect of conv2."""
    model = Resample(functional=True, size=(64, 64), mode="nearest").eval()
    d = diagnose(model, input_shape=(1, 3, 26, 26), exporter="legacy", output_dir=tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert first.module == "conv2"
    resize = [n for n in first.region if n.op_type == "Resize"]
    assert len(resize) == 1 and resize[0].attrs["mode"] == "nearest"
    assert layer(d, "conv1").status == "pass"
    assert_fires(d, "resize_mode")


def test_resize_coordinate_mode_vs_align_corners(tmp_path):
    """DIVERGENCES #2. Old opsets do not reproduce here: the legacy exporter refuses
    bilinear align_corners=True at opset 9/10 and layerdiff falls back to dynamo, which
    exports it right. So the coordinate mode of a correct opset-11 file is changed."""
    model = Resample(size=(32, 32), mode="bilinear", align_corners=True).eval()
    clean = export_legacy(model, (1, 3, 16, 16), tmp_path / "resize.onnx", opset=11)
    path, node = with_fault(clean, lambda m: faults.set_attribute(
        m, "Resize", "coordinate_transformation_mode", "half_pixel"), tmp_path)
    d = diagnose(model, onnx=path, input_shape=(1, 3, 16, 16), output_dir=tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert (first.module, first.op_type, first.onnx_node) == ("up", "Resize", node)
    assert_fires(d, "resize_mode")
    assert "align_corners=True" in suggestion(d, "resize_mode").detail


# --------------------------------------------------------------------------- 4. pixel_shuffle_layout


def test_pixel_shuffle_dcr_compact(exported, tmp_path):
    path, node = with_fault(exported("compact", "legacy"), faults.pixel_shuffle_dcr, tmp_path)
    d = diagnose(make_model("compact"), onnx=path, input_shape=SHAPE, output_dir=tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert (first.module, first.module_type, first.op_type) == ("upsampler", "PixelShuffle", "DepthToSpace")
    assert first.onnx_node == node
    assert all(l.status == "pass" for l in d.layers if l.module != "upsampler")
    assert_fires(d, "pixel_shuffle_layout")


# --------------------------------------------------------------------------- 5. frozen_shape


def test_frozen_shape_reshape_fails_at_other_size(tmp_path):
    """Dynamic axes declared, but the Reshape targets are the 32x32 trace's constants."""
    model = FrozenShape().eval()
    path = export_legacy(model, (1, 3, 32, 32), tmp_path / "frozen.onnx", dynamic=True)
    d = diagnose(model, onnx=path, input_shape=(1, 3, 24, 40), output_dir=tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert first.kind == "runtime_error"
    assert first.op_type == "Reshape" and first.onnx_node == "/Reshape"
    assert first.module == "norm"  # the first compared module fed by the failing Reshape
    assert layer(d, "conv1").status == "pass"  # upstream layers were still compared
    assert layer(d, "norm").status == "not_run" and layer(d, "conv2").status == "not_run"
    assert_fires(d, "frozen_shape")
    assert suggestion(d, "frozen_shape").title == "A shape was frozen at export time"

    same_size = diagnose(model, onnx=path, input_shape=(1, 3, 32, 32), output_dir=tmp_path,
                         check_sizes=())
    assert same_size.verdict == "pass" and not same_size.suggestions

    # By default layerdiff also runs an odd, non-square size, which finds the fault.
    default = diagnose(model, onnx=path, input_shape=(1, 3, 32, 32), output_dir=tmp_path)
    assert default.verdict == "diverged"
    assert [c.kind for c in default.cases] == ["random", "photo", "size"]
    assert default.cases[0].verdict == "pass" and default.cases[1].verdict == "pass"
    assert default.first_divergence.case == default.cases[2].label
    assert default.first_divergence.kind == "runtime_error"
    assert_fires(default, "frozen_shape")


def test_frozen_shape_fixed_input_size(tmp_path):
    model = FrozenShape().eval()
    path = export_legacy(model, (1, 3, 32, 32), tmp_path / "fixed.onnx", dynamic=False)
    d = diagnose(model, onnx=path, input_shape=(1, 3, 24, 40), output_dir=tmp_path)

    assert d.facts.onnx_input_shape == (1, 3, 32, 32)
    assert d.verdict == "diverged"
    assert d.first_divergence.kind == "runtime_error"
    assert "invalid dimensions" in d.first_divergence.message.lower()
    assert_fires(d, "frozen_shape")
    assert suggestion(d, "frozen_shape").title == "The ONNX graph accepts only its export size"


# --------------------------------------------------------------------------- 6. gelu_approximation


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_gelu_tanh_in_onnx(exporter, tmp_path):
    """The file was exported from a copy whose GELU is approximate='tanh' (same weights)."""
    model = ConvGELU().eval()
    tanh = copy.deepcopy(model)
    tanh.act = nn.GELU(approximate="tanh")
    export = export_legacy if exporter == "legacy" else export_dynamo
    path = export(tanh, (1, 3, 16, 16), tmp_path / "tanh.onnx")
    d = diagnose(model, onnx=path, input_shape=(1, 3, 16, 16), output_dir=tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert (first.module, first.module_type) == ("act", "GELU")
    assert layer(d, "conv1").status == "pass"
    if exporter == "legacy":  # written out: ... Tanh ... Mul
        assert any(n.op_type == "Tanh" for n in first.region)
    else:
        assert first.op_type == "Gelu" and first.region[0].attrs["approximate"] == "tanh"
    assert_fires(d, "gelu_approximation")


# --------------------------------------------------------------------------- 7. ort_optimisation


def test_ort_gelu_approximation_fusion(tmp_path):
    """Legacy export writes GELU as Div/Erf/Add/Mul/Mul; ORT's optional fusion approximates it."""
    model = ConvGELU().eval()
    d = diagnose(model, input_shape=(1, 3, 16, 16), exporter="legacy", output_dir=tmp_path,
                 ort_level="all", ort_config={"optimization.enable_gelu_approximation": "1"})

    assert d.onnx.exporter == "legacy"
    assert d.verdict == "diverged"
    first = d.first_divergence
    assert (first.module, first.module_type) == ("act", "GELU")
    assert {"Erf", "Div"} <= {n.op_type for n in first.region}  # the exported graph is exact
    assert d.facts.vanishes_without_ort_optimisation is True
    assert_fires(d, "ort_optimisation")  # and not gelu_approximation: the file is right
    assert "enable_gelu_approximation" in suggestion(d, "ort_optimisation").detail
    assert d.facts.ort_rewrite.startswith("FastGelu")  # the fusion that did it, by name
    assert "FastGelu" in suggestion(d, "ort_optimisation").detail

    plain = diagnose(model, input_shape=(1, 3, 16, 16), exporter="legacy",
                     output_dir=tmp_path / "plain", ort_level="all")
    assert plain.verdict == "pass", plain.summary
    assert plain.facts.vanishes_without_ort_optimisation is None
    assert not plain.suggestions


# --------------------------------------------------------------------------- 8. attribute_mismatch


def test_leaky_relu_slope_esrgan(exported, tmp_path):
    path, node = with_fault(exported("esrgan", "legacy"),
                            lambda m: faults.leaky_slope(m, 0.1, index=2), tmp_path)
    d = diagnose(make_model("esrgan"), onnx=path, input_shape=SHAPE, output_dir=tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert first.onnx_node == node
    assert (first.module, first.module_type, first.op_type) == (
        "model.1.sub.0.RDB1.conv3.1", "LeakyReLU", "LeakyRelu")
    assert first.torch_attrs["negative_slope"] == pytest.approx(0.2)
    assert_fires(d, "attribute_mismatch")
    detail = suggestion(d, "attribute_mismatch").detail
    assert "negative_slope=0.2" in detail and "alpha=0.1" in detail


# --------------------------------------------------------------------------- 9. changed_weights


def test_changed_weights_nameless_esrgan(exported, tmp_path):
    """chaiNNer-style export (no module names, Constant weights), one conv's weight scaled."""
    path, node = with_fault(exported("esrgan", "nameless"),
                            lambda m: faults.scale_weight(m, "Conv", 3, 1.5), tmp_path)
    d = diagnose(make_model("esrgan"), onnx=path, input_shape=SHAPE, output_dir=tmp_path)

    assert d.alignment.has_scopes is False
    assert d.verdict == "diverged"
    first = d.first_divergence
    assert first.onnx_node == node
    assert (first.module, first.module_type, first.op_type) == (
        "model.1.sub.0.RDB1.conv3.0", "Conv2d", "Conv")
    assert layer(d, first.module).method == "weights~"
    assert all(l.status == "pass" for l in d.layers if l.order < layer(d, first.module).order)
    assert_fires(d, "changed_weights")


# --------------------------------------------------------------------------- negative check


def _clean_cases():
    """(id, make(tmp_path, exported) -> Diagnosis) for clean exports of the models above."""

    def bn_eval(tmp, _):
        return diagnose(ConvBN(bn_after_relu=True).eval(), input_shape=(1, 3, 16, 16),
                        exporter="legacy", output_dir=tmp)

    def resize_integer_scale(tmp, _):
        return diagnose(Resample(size=(52, 52), mode="nearest").eval(), input_shape=(1, 3, 26, 26),
                        exporter="legacy", output_dir=tmp)

    def resize_align_corners(tmp, _):
        model = Resample(size=(32, 32), mode="bilinear", align_corners=True).eval()
        path = export_legacy(model, (1, 3, 16, 16), tmp / "resize.onnx", opset=11)
        return diagnose(model, onnx=path, input_shape=(1, 3, 16, 16), output_dir=tmp)

    def frozen_at_export_size(tmp, _):
        model = FrozenShape().eval()
        path = export_legacy(model, (1, 3, 32, 32), tmp / "fixed.onnx")
        return diagnose(model, onnx=path, input_shape=(1, 3, 32, 32), output_dir=tmp)

    def gelu_exact(tmp, _):
        model = ConvGELU().eval()
        path = export_legacy(model, (1, 3, 16, 16), tmp / "gelu.onnx")
        return diagnose(model, onnx=path, input_shape=(1, 3, 16, 16), output_dir=tmp)

    def spandrel(arch, how):
        def run(tmp, exported):
            return diagnose(make_model(arch), onnx=exported(arch, how), input_shape=SHAPE,
                            output_dir=tmp)
        return run

    return [
        ("batchnorm-eval", bn_eval),
        ("resize-integer-scale", resize_integer_scale),
        ("resize-align-corners", resize_align_corners),
        ("frozen-at-export-size", frozen_at_export_size),
        ("gelu-exact", gelu_exact),
        ("compact-legacy", spandrel("compact", "legacy")),
        ("esrgan-legacy", spandrel("esrgan", "legacy")),
        ("esrgan-nameless", spandrel("esrgan", "nameless")),
    ]


@pytest.mark.parametrize("make", [make for _, make in _clean_cases()],
                         ids=[name for name, _ in _clean_cases()])
def test_clean_exports_get_no_suggestions(make, exported, tmp_path):
    d = make(tmp_path, exported)
    assert d.verdict == "pass", d.summary
    assert d.first_divergence is None
    assert not d.facts.input_mutated and not d.facts.training_modules
    assert fired(d) == []
