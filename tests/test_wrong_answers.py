"""Wrong answers on valid files: each class pinned by a reproducer of its own.

1. A module called several times in one forward: its calls must pair with the ONNX
   pieces that really computed them (data flow), or stay unpaired with a reason.
2. Weights folded with a per-channel factor (a layer scale ``x * gamma``, zeros
   included) by onnxruntime's or onnxslim's optimiser: not a divergence.
3. Random numbers drawn in forward: named as the cause, not blamed on exposed tensors.

Real torch, real exporters (legacy, dynamo, and the names-lost wrapper export), real
onnxruntime and onnxslim; tiny models.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import faults
from conftest import export, with_fault
from layerdiff.pipeline import diagnose, make_input
from layerdiff.render import to_json_dict

SHAPE = (1, 3, 16, 16)


def _export(model: nn.Module, path: Path, how: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export(model, make_input(SHAPE, 0), path, how)


def _diagnose(model: nn.Module, path: Path, tmp_path: Path):
    return diagnose(model, onnx=path, input_shape=SHAPE, check_sizes=(), output_dir=tmp_path)


def _unmatched(d, label: str) -> str | None:
    return next((u.reason for u in d.alignment.unmatched_torch if u.name == label), None)


# --------------------------------------------------------------------------- 1. reused modules


class SharedBranches(nn.Module):
    """One GroupNorm and one LeakyReLU, each called three times: on a deep branch, then on
    a shallow one, then on their sum. ONNX's topological order puts the shallow branch
    first, so pairing calls in ONNX order swaps them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                    nn.Conv2d(8, 8, 3, padding=1))
        self.norm = nn.GroupNorm(2, 8)
        self.act = nn.LeakyReLU(0.2)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        b = self.act(self.norm(self.conv_b(x)))
        a = self.act(self.norm(self.conv_a(x)))
        return self.out(self.act(self.norm(a + b)))


class SharedConvResidual(nn.Module):
    """One conv applied before and after a residual addition."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        y = self.act(self.conv(h)) + h
        return self.tail(self.act(self.conv(y)))


class SharedShapes(nn.Module):
    """One conv and one LeakyReLU on the half-size map first, then on the full-size one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.tail = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        small = self.act(self.conv(F.avg_pool2d(h, 2)))
        big = self.act(self.conv(h))
        return self.tail(torch.cat([big, F.interpolate(small, scale_factor=2.0)], 1))


REUSED = {SharedBranches: ("norm", "act"), SharedConvResidual: ("conv", "act"),
          SharedShapes: ("conv", "act")}


@pytest.mark.parametrize("how", ["legacy", "dynamo", "nameless"])
@pytest.mark.parametrize("make", list(REUSED), ids=lambda m: m.__name__)
def test_reused_modules_clean_export_passes(make, how, tmp_path):
    """Every call of a reused module is paired with its own ONNX piece or left unpaired
    with a reason; a clean export passes (it used to diverge by up to 150% of the range)."""
    model = make().eval()
    d = _diagnose(model, _export(model, tmp_path / f"{how}.onnx", how), tmp_path)

    assert d.verdict == "pass", d.summary
    assert all(l.status == "pass" for l in d.layers)
    calls = [c for c in d.calls if c.module in REUSED[make] and c.alias_of is None]
    paired = {l.module for l in d.layers}
    for call in calls:
        assert call.label in paired or _unmatched(d, call.label), call.label
    if how != "nameless":  # with names, data flow tells every call apart
        assert {c.label for c in calls} <= paired


@pytest.mark.parametrize("how", ["legacy", "dynamo"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_reused_activation_fault_is_localised_to_its_call(how, index, tmp_path):
    """One LeakyRelu's slope changed: the divergence is that call of the shared module.
    Both exporters write nodes in execution order, so the index-th node is the index-th call."""
    model = SharedBranches().eval()
    path, node = with_fault(_export(model, tmp_path / f"{how}.onnx", how),
                            lambda m: faults.leaky_slope(m, 0.5, index), tmp_path)
    d = _diagnose(model, path, tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert (first.module, first.onnx_node) == ("act" if index == 0 else f"act#{index}", node)
    assert [l.module for l in d.layers if l.status == "fail"] == [first.module]


def test_reused_conv_changed_in_one_call_nameless(tmp_path):
    """Names lost, the second call's conv weights (a copy of their own there) changed in
    one channel: that call is the first divergence, paired by its near weights."""
    model = SharedConvResidual().eval()
    path, node = with_fault(_export(model, tmp_path / "nameless.onnx", "nameless"),
                            lambda m: faults.scale_weight(m, "Conv", 2, 1.5, 0), tmp_path)
    d = _diagnose(model, path, tmp_path)

    first = d.first_divergence
    assert (first.module, first.onnx_node) == ("conv#1", node)
    layer = next(l for l in d.layers if l.module == "conv")
    assert layer.status == "pass" and layer.onnx_node != node
    assert "changed_weights" in [s.rule for s in d.suggestions]
    # The file is wrong, not onnxruntime's rewrite of it: with optimisations off the
    # layer, fed PyTorch's values, is still wrong.
    assert d.facts.vanishes_without_ort_optimisation is False


# --------------------------------------------------------------------------- 2. folded layer scale


class LayerScaleNet(nn.Module):
    """head -> relu -> h + conv(h) * gamma -> tail, gamma a per-channel parameter of the model."""

    GAMMA = {"zeros": torch.zeros(8), "random": torch.rand(8, generator=torch.Generator().manual_seed(1)) + 0.5,
             "some-zero": torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.5, 0.0, 3.0])}

    def __init__(self, gamma: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(self.GAMMA[gamma].clone().view(8, 1, 1))
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.act(self.head(x))
        return self.tail(h + self.conv(h) * self.gamma)


class LayerScale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(channels, generator=torch.Generator().manual_seed(1)) + 0.5)

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class LayerScaleModuleNet(nn.Module):
    """The same with the scale in a module of its own, which consumes the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.scale = LayerScale(8)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.act(self.head(x))
        return self.tail(h + self.scale(self.conv(h)))


def _ort_optimised(path: Path, tmp_path: Path) -> Path:
    """Saved by onnxruntime after its graph optimisations (ConvMulFusion among them).
    EXTENDED: ALL adds hardware-specific NCHWc layouts that leave nothing to compare here."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "ort-optimised.onnx")
    options.log_severity_level = 4
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Path(options.optimized_model_filepath)


def _onnxslim(path: Path, tmp_path: Path) -> Path:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):
        onnx.save(onnxslim.slim(onnx.load(str(path))), str(tmp_path / "slim.onnx"))
    return tmp_path / "slim.onnx"


def _conv_weights(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "FusedConv") and n.input[1] in inits]


def _assert_folded(path: Path, model: nn.Module) -> None:
    """The optimiser really folded the scale: no Mul left, and a conv holds conv * gamma."""
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Mul" not in ops, ops
    gamma = next(p for n, p in model.named_parameters() if n.endswith("gamma")).detach().reshape(-1, 1, 1, 1)
    folded = (model.conv.weight * gamma).detach().numpy()
    assert any(w.shape == folded.shape and np.allclose(w, folded, atol=1e-6) for w in _conv_weights(path))


@pytest.mark.parametrize("gamma", ["zeros", "random", "some-zero"])
@pytest.mark.parametrize("how", ["legacy", "dynamo"])
def test_layer_scale_folded_by_onnxruntime_passes(how, gamma, tmp_path):
    """A clean file whose conv holds its weights times gamma passes; the conv is unpaired
    with the reason (it used to be read as a 100% error)."""
    model = LayerScaleNet(gamma).eval()
    path = _ort_optimised(_export(model, tmp_path / f"{how}.onnx", how), tmp_path)
    _assert_folded(path, model)
    d = _diagnose(model, path, tmp_path)

    assert d.verdict == "pass", d.summary
    assert "conv" not in {l.module for l in d.layers}
    assert "weights folded with a per-channel factor" in _unmatched(d, "conv")
    assert not d.suggestions


@pytest.mark.parametrize("process", [_ort_optimised, _onnxslim], ids=["ort", "onnxslim"])
def test_layer_scale_module_takes_the_folded_conv(process, tmp_path):
    """With the scale in a module, the folded conv's output is that module's: paired with it."""
    model = LayerScaleModuleNet().eval()
    path = process(_export(model, tmp_path / "legacy.onnx", "legacy"), tmp_path)
    _assert_folded(path, model)
    d = _diagnose(model, path, tmp_path)

    assert d.verdict == "pass", d.summary
    scale = next(l for l in d.layers if l.module == "scale")
    assert (scale.method, scale.op_type) == ("fused", "Conv")
    assert _unmatched(d, "conv").startswith("fused into")


@pytest.mark.parametrize("how", ["legacy", "dynamo"])
def test_folded_conv_with_a_changed_channel_is_a_changed_weight(how, tmp_path):
    """The folded conv's weights also scaled in one channel: no parameter of the model
    holds those factors, so it stays paired and diverges, explained by changed_weights."""
    model = LayerScaleNet("random").eval()
    path = _ort_optimised(_export(model, tmp_path / f"{how}.onnx", how), tmp_path)
    path, node = with_fault(path, lambda m: faults.scale_weight(m, "Conv", 0, 1.5, 0), tmp_path)
    d = _diagnose(model, path, tmp_path)

    assert d.verdict == "diverged"
    assert (d.first_divergence.module, d.first_divergence.onnx_node) == ("conv", node)
    assert "changed_weights" in [s.rule for s in d.suggestions]


# --------------------------------------------------------------------------- 3. random numbers


class Noisy(nn.Module):
    """head -> relu -> + randn_like * 0.1 -> tail: the noise is drawn in forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.act(self.head(x))
        return self.tail(h + torch.randn_like(h) * 0.1)


@pytest.mark.parametrize("how", ["legacy", "dynamo"])
def test_random_noise_in_forward_is_named(how, tmp_path):
    model = Noisy().eval()
    path = _export(model, tmp_path / f"{how}.onnx", how)
    d = _diagnose(model, path, tmp_path)

    assert d.verdict == "diverged"
    assert d.first_divergence.module == "tail"  # the first layer reading the noise
    assert [(r.side, r.op) for r in d.facts.random_ops] == [
        ("torch", "randn_like"), ("onnx", "RandomNormalLike")]
    assert d.facts.random_ops[0].where == "Noisy"
    rules = [s.rule for s in d.suggestions]
    assert "random_ops" in rules
    assert "instrumentation_changed_result" not in rules and "float_drift" not in rules
    assert not any("Exposing intermediate tensors" in n for n in d.notes)
    suggestion = next(s for s in d.suggestions if s.rule == "random_ops")
    assert "tail" in suggestion.layers and "forward argument" in suggestion.fix
    facts = to_json_dict(d)["facts"]
    assert facts["random_ops"][1] == {"side": "onnx", "where": d.facts.random_ops[1].where,
                                      "op": "RandomNormalLike"}


def test_random_ops_are_recorded_in_the_module_that_draws():
    """PyTorch's draws are found by the aten op, wherever they are made."""
    from layerdiff.capture_torch import capture

    class Draws(nn.Module):
        def forward(self, x):
            return x + torch.rand(x.shape) + torch.empty_like(x).normal_()

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.draws = Draws()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.draws(x)) * torch.bernoulli(torch.full_like(x, 0.5))

    captured = capture(Outer().eval(), make_input(SHAPE, 0))
    assert captured.random_ops == (("draws", "rand"), ("draws", "normal_"), ("Outer", "bernoulli"))
    assert capture(nn.Conv2d(3, 3, 1), make_input(SHAPE, 0)).random_ops == ()
