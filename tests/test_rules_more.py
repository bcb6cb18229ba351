"""Reproducers for the rules float_drift, reflect_pad, gridsample_opset, names_lost,
export_crash, preprocessing_mismatch and instrumentation_changed_result.

Every test runs ``diagnose`` on a real model (real torch, a real export or a real ONNX
file changed with onnx.helper / samples/faults.py, real onnxruntime); no Diagnosis is
built by hand. Each checks the verdict, where relevant the first divergence, and that
the rule fires; ``test_clean_models_get_none_of_these_rules`` checks that clean small
models get none of them.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

import faults
from conftest import SHAPE, make_model, with_fault
from layerdiff.pipeline import diagnose, make_input
from layerdiff.rules import REGISTRY
from layerdiff.rules.float_drift import nice_up, suggested_tolerance

RULES = {
    "float_drift", "reflect_pad", "gridsample_opset", "names_lost", "export_crash",
    "preprocessing_mismatch", "instrumentation_changed_result",
}


# --------------------------------------------------------------------------- helpers


def fired(d) -> list[str]:
    return [s.rule for s in d.suggestions]


def suggestion(d, rule: str):
    return next(s for s in d.suggestions if s.rule == rule)


def assert_fires(d, rule: str, *also: str) -> None:
    """``rule`` fires; of this file's rules only it and ``also`` do."""
    rules = fired(d)
    assert rule in rules, f"{rule} did not fire; suggestions: {rules}; {d.summary}"
    others = (set(rules) & RULES) - {rule, *also}
    assert not others, f"{sorted(others)} fired beside {rule}: {d.summary}"


def statuses(d) -> dict[str, int]:
    counts: dict[str, int] = {}
    for l in d.layers:
        counts[l.status] = counts.get(l.status, 0) + 1
    return counts


def export_legacy(model: nn.Module, shape, path: Path, *, opset: int = 17) -> Path:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (make_input(shape, 0),), str(path), dynamo=False,
                          opset_version=opset, input_names=["input"], output_names=["output"])
    return path


def test_rules_are_registered():
    ids = [rule.id for rule in REGISTRY]
    assert RULES <= set(ids)
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- small models


class ConvChain(nn.Module):
    """head -> n x (conv -> ReLU) -> tail, He-initialised, no bias in the body: a plain
    deep network where every conv rounds a little differently in torch and onnxruntime."""

    def __init__(self, n: int = 20, c: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(n))
        for conv in self.body:
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.act = nn.ReLU()
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        x = self.head(x)
        for conv in self.body:
            x = self.act(conv(x))
        return self.tail(x)


class Padded(nn.Module):
    """conv1 -> pad -> conv2, the pad a module (``pad``) or F.pad; mode as given."""

    def __init__(self, p: int, mode: str = "constant", functional: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.p, self.mode, self.functional = p, mode, functional
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        if not functional:
            self.pad = nn.ZeroPad2d(p) if mode == "constant" else nn.ReflectionPad2d(p)
        self.conv2 = nn.Conv2d(8, 3, 3)

    def forward(self, x):
        x = self.conv1(x)
        x = F.pad(x, (self.p,) * 4, mode=self.mode) if self.functional else self.pad(x)
        return self.conv2(x)


class Warp(nn.Module):
    """A learned offset field applied with F.grid_sample, as DySample-style upsamplers do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.offset = nn.Conv2d(8, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        f = self.conv1(x)
        _, _, h, w = f.shape
        gy, gx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        grid = torch.stack((gx, gy), -1).unsqueeze(0) + 0.1 * self.offset(f).permute(0, 2, 3, 1)
        f = F.grid_sample(f, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return self.conv2(f)


def with_input_step(path: Path, kind: str, tmp_path: Path) -> Path:
    """A copy of the ONNX file with one preprocessing node right after the graph input:
    ``x255`` (Mul by 255) or ``bgr`` (Gather of channels [2, 1, 0])."""
    model = onnx.load(str(path))
    graph = model.graph
    source = graph.input[0].name
    prepared = f"{source}_prepared"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == source:
                node.input[i] = prepared
    if kind == "x255":
        graph.initializer.append(numpy_helper.from_array(np.array(255, np.float32), "range_255"))
        step = helper.make_node("Mul", [source, "range_255"], [prepared], name="to_0_255")
    else:
        graph.initializer.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), "bgr"))
        step = helper.make_node("Gather", [source, "bgr"], [prepared], name="rgb_to_bgr", axis=1)
    graph.node.insert(0, step)
    onnx.checker.check_model(model)
    out = tmp_path / f"{path.stem}-{kind}.onnx"
    onnx.save(model, str(out))
    return out


# --------------------------------------------------------------------------- float_drift


DRIFT = dict(input_shape=(1, 3, 16, 16), exporter="legacy", check_sizes=(), reference="none")


def test_float_drift_deep_conv_chain(tmp_path):
    """22 convs: each conv's own error stays under rtol=3e-5 (atol=0), the accumulated
    error does not. Without the float64 referee, which would absorb the drift."""
    model = ConvChain(n=20).eval()
    d = diagnose(model, output_dir=tmp_path, rtol=3e-5, atol=0.0, **DRIFT)

    assert d.verdict == "diverged", d.summary
    assert d.first_divergence is None
    counts = statuses(d)
    assert counts.get("fail", 0) == 0 and counts.get("not_run", 0) == 0
    assert counts["propagated"] >= 5
    assert not all(o.passed for o in d.outputs)
    assert_fires(d, "float_drift")

    rtol, atol, basis = suggested_tolerance(d)
    s = suggestion(d, "float_drift")
    assert f"rtol={rtol:g}, atol={atol:g}" in s.detail and f"--atol {atol:g}" in s.fix
    assert "Nothing to fix" in s.fix
    # atol=0 leaves near-zero elements with unbounded relative error: the rule suggests
    # an atol that every element meets, and keeps rtol.
    assert (rtol, 0.0 < atol <= 1e-5) == (3e-5, True), basis
    again = diagnose(model, d.onnx.path, output_dir=tmp_path, rtol=rtol, atol=atol, **{
        k: v for k, v in DRIFT.items() if k != "exporter"})
    assert again.verdict == "pass", again.summary
    assert statuses(again) == {"pass": len(again.layers)}
    assert "float_drift" not in fired(again)

    # What the brief's rtol=1e-7, atol=0 gives: every conv fails on its own already
    # (fp32 rounding is ~1e-7 of the range), so that is not drift.
    strict = diagnose(model, d.onnx.path, output_dir=tmp_path, rtol=1e-7, atol=0.0, **{
        k: v for k, v in DRIFT.items() if k != "exporter"})
    assert statuses(strict).get("fail", 0) > 0 and strict.first_divergence is not None
    assert "float_drift" not in fired(strict)

    # With the float64 referee (the default) each layer's atol rises to its fp32 noise
    # floor: the same tolerance passes.
    refereed = diagnose(model, d.onnx.path, input_shape=(1, 3, 16, 16), check_sizes=(),
                        output_dir=tmp_path, rtol=3e-5, atol=0.0)
    assert refereed.verdict == "pass" and "float_drift" not in fired(refereed)


def test_float_drift_with_passing_output(tmp_path):
    """Deeper (30 convs): layers drift past the tolerance while the output still passes."""
    d = diagnose(ConvChain(n=30).eval(), output_dir=tmp_path, rtol=3e-5, atol=0.0, **DRIFT)

    assert d.verdict == "pass"  # propagated layers alone are no divergence
    assert all(o.passed for o in d.outputs)
    assert statuses(d).get("propagated", 0) >= 5 and statuses(d).get("fail", 0) == 0
    assert_fires(d, "float_drift")
    assert "final output still passes" in suggestion(d, "float_drift").detail


def test_nice_up():
    assert [nice_up(v) for v in (1e-5, 1.01e-5, 2.5e-7, 6e-3, 0.0)] == [1e-5, 2e-5, 5e-7, 1e-2, 0.0]


# --------------------------------------------------------------------------- reflect_pad


def test_torch_refuses_reflect_pad_as_large_as_the_input():
    with pytest.raises(RuntimeError, match="Padding size should be less than"):
        F.pad(torch.rand(1, 1, 4, 4), (4, 4, 4, 4), mode="reflect")


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_reflect_pad_as_large_as_the_input(functional, tmp_path):
    """torch refuses such a model, so the reproducer pads 4 on a 4x4 map with zeros and the
    ONNX Pad is switched to reflect: onnxruntime refuses it at run time."""
    model = Padded(4, functional=functional).eval()
    clean = export_legacy(model, (1, 3, 4, 4), tmp_path / "pad.onnx")
    path, node = with_fault(clean, lambda m: faults.set_attribute(m, "Pad", "mode", "reflect"),
                            tmp_path)
    d = diagnose(model, path, input_shape=(1, 3, 4, 4), check_sizes=(), output_dir=tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert (first.kind, first.op_type, first.onnx_node) == ("runtime_error", "Pad", node)
    assert first.module == ("conv2" if functional else "pad")
    assert d.layers[0].module == "conv1" and d.layers[0].status == "pass"
    assert_fires(d, "reflect_pad")
    detail = suggestion(d, "reflect_pad").detail
    assert "pre-pad of 4 on axis 2, whose size is 4" in detail
    if not functional:
        assert "ZeroPad2d with padding (4, 4, 4, 4)" in detail


def test_reflect_pad_is_the_failing_layer(tmp_path):
    """pad 2 < 8: onnxruntime runs the reflect Pad, whose values differ from torch's zero
    padding; the pads are a runtime input, so the rule names the Pad and the mode."""
    model = Padded(2).eval()
    clean = export_legacy(model, (1, 3, 8, 8), tmp_path / "pad.onnx")
    path, node = with_fault(clean, lambda m: faults.set_attribute(m, "Pad", "mode", "reflect"),
                            tmp_path)
    d = diagnose(model, path, input_shape=(1, 3, 8, 8), check_sizes=(), output_dir=tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert (first.kind, first.module, first.op_type, first.onnx_node) == (
        "numeric", "pad", "Pad", node)
    assert [l.status for l in d.layers] == ["pass", "fail", "propagated"]
    assert_fires(d, "reflect_pad")
    assert "does not pad by reflection" in suggestion(d, "reflect_pad").detail


# --------------------------------------------------------------------------- gridsample_opset


def test_gridsample_below_opset_16(tmp_path):
    """The legacy exporter refuses aten::grid_sampler at opset 14; layerdiff falls back to
    dynamo, which writes opset 18 (and the model passes)."""
    d = diagnose(Warp().eval(), input_shape=(1, 3, 16, 16), exporter="legacy", opset=14,
                 check_sizes=(), output_dir=tmp_path)

    assert d.onnx.exporter == "dynamo" and d.onnx.opset >= 16
    assert any("grid_sampler" in note for note in d.onnx.notes)
    assert d.verdict == "pass", d.summary
    assert_fires(d, "gridsample_opset", "export_crash")  # a fallback, reported by both
    s = suggestion(d, "gridsample_opset")
    assert "opset >= 16" in s.fix and "at opset 14" in s.detail


# --------------------------------------------------------------------------- names_lost


def test_names_lost_nameless_esrgan(exported, tmp_path):
    """chaiNNer-style export (no module names) of a small ESRGAN with one conv's weight
    changed: the divergence is located by weights and structure."""
    path, node = with_fault(exported("esrgan", "nameless"),
                            lambda m: faults.scale_weight(m, "Conv", 3, 1.5), tmp_path)
    d = diagnose(make_model("esrgan"), path, input_shape=SHAPE, check_sizes=(),
                 output_dir=tmp_path)

    assert d.alignment.has_scopes is False
    assert d.verdict == "diverged"
    assert d.first_divergence.onnx_node == node
    assert d.first_divergence.module == "model.1.sub.0.RDB1.conv3.0"
    assert_fires(d, "names_lost")
    detail = suggestion(d, "names_lost").detail
    unpaired = [u.name for u in d.alignment.unmatched_torch if not u.reason.startswith("fused")]
    assert unpaired  # ESRGAN's last RDB of a block cannot be paired without names
    assert f"{len(unpaired)} could not be paired ({unpaired[0]}" in detail
    assert "paired by weights~" in detail
    assert "not an nn.Module" in suggestion(d, "names_lost").fix


# --------------------------------------------------------------------------- export_crash


def test_export_crash_span_dynamo(tmp_path):
    """The dynamo exporter segfaults on spandrel's SPAN (torch 2.14.1): legacy is used."""
    d = diagnose(make_model("span"), input_shape=(1, 3, 16, 16), exporter="dynamo",
                 check_sizes=(), output_dir=tmp_path)

    assert d.onnx.exporter == "legacy"
    assert any(n.startswith("the dynamo exporter crashed (SIG") for n in d.onnx.notes), d.onnx.notes
    assert d.verdict == "pass", d.summary
    assert_fires(d, "export_crash")
    s = suggestion(d, "export_crash")
    assert "dynamo exporter crashed (SIG" in s.detail and "legacy exporter" in s.detail
    assert "span.onnx.dynamo.log" in s.detail


# --------------------------------------------------------------------------- preprocessing_mismatch


@pytest.mark.parametrize("kind", ["x255", "bgr"])
def test_preprocessing_step_before_the_first_layer(kind, exported, tmp_path):
    path = with_input_step(exported("compact", "legacy"), kind, tmp_path)
    d = diagnose(make_model("compact"), path, input_shape=SHAPE, check_sizes=(),
                 output_dir=tmp_path)

    assert d.verdict == "diverged"
    first = d.first_divergence
    assert (first.module, first.module_type, first.op_type) == ("body.0", "Conv2d", "Conv")
    assert first.region[0].name == ("to_0_255" if kind == "x255" else "rgb_to_bgr")
    assert d.layers[0].module == "body.0"  # nothing upstream was aligned
    assert_fires(d, "preprocessing_mismatch")
    detail = suggestion(d, "preprocessing_mismatch").detail
    if kind == "x255":
        assert "0-255" in detail
    else:
        assert "RGB and BGR" in detail


# --------------------------------------------------------------------------- instrumentation


def test_instrumentation_changed_result_esrgan(exported, tmp_path):
    """Exposing ESRGAN's conv outputs stops onnxruntime folding the residual scale into the
    conv: the final output moves by ~1e-8, which matters at a tolerance of that order."""
    path = exported("esrgan", "legacy")
    strict = dict(input_shape=SHAPE, check_sizes=(), reference="none", rtol=1e-7, atol=0.0,
                  output_dir=tmp_path)
    d = diagnose(make_model("esrgan"), path, **strict)

    assert d.facts.instrumentation_delta and d.facts.instrumentation_delta > 0
    assert d.verdict == "diverged"
    assert_fires(d, "instrumentation_changed_result")
    assert "--ort-level disable" in suggestion(d, "instrumentation_changed_result").fix

    plain = diagnose(make_model("esrgan"), path, ort_level="disable", **strict)
    assert plain.facts.instrumentation_delta == 0.0
    assert "instrumentation_changed_result" not in fired(plain)


# --------------------------------------------------------------------------- negative check


def _clean_cases():
    def spandrel(arch, how):
        def run(tmp, exported):
            return diagnose(make_model(arch), exported(arch, how), input_shape=SHAPE,
                            check_sizes=(), output_dir=tmp)
        return run

    def deep_chain(tmp, _):
        return diagnose(ConvChain(n=20).eval(), input_shape=(1, 3, 16, 16), exporter="legacy",
                        check_sizes=(), output_dir=tmp)

    def reflect_pad_below_size(tmp, _):
        model = Padded(2, mode="reflect").eval()
        return diagnose(model, input_shape=(1, 3, 8, 8), exporter="legacy", check_sizes=(),
                        output_dir=tmp)

    def gridsample_opset_16(tmp, _):
        return diagnose(Warp().eval(), input_shape=(1, 3, 16, 16), exporter="legacy", opset=16,
                        check_sizes=(), output_dir=tmp)

    return [
        ("compact-legacy", spandrel("compact", "legacy")),
        ("compact-nameless", spandrel("compact", "nameless")),
        ("esrgan-legacy", spandrel("esrgan", "legacy")),
        ("esrgan-nameless", spandrel("esrgan", "nameless")),
        ("deep-chain", deep_chain),
        ("reflect-pad-below-size", reflect_pad_below_size),
        ("gridsample-opset-16", gridsample_opset_16),
    ]


@pytest.mark.parametrize("make", [make for _, make in _clean_cases()],
                         ids=[name for name, _ in _clean_cases()])
def test_clean_models_get_none_of_these_rules(make, exported, tmp_path):
    d = make(tmp_path, exported)
    assert d.verdict == "pass", d.summary
    assert not set(fired(d)) & RULES, fired(d)
