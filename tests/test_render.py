"""Tests for layerdiff.render: JSON, HTML report, atomic writes, console summary.

The Diagnosis records are built by hand here (the pipeline that produces them is
tested elsewhere); ``make_pass`` / ``make_diverged`` / ``make_error`` are also handy
for rendering sample reports by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from layerdiff import render, report_format, report_visuals
from layerdiff.fp16 import Fp16Findings, Fp16Layer, KeepFp32
from layerdiff.records import (
    Alignment,
    CaseResult,
    Diagnosis,
    Facts,
    InputSpec,
    FirstDivergence,
    LayerResult,
    LoadedModel,
    Metrics,
    OnnxNodeInfo,
    OnnxSource,
    OutputResult,
    Pair,
    Referee,
    Settings,
    Suggestion,
    TorchCall,
    Unmatched,
)

VERSIONS = {
    "layerdiff": "0.1.0",
    "torch": "2.14.1",
    "onnx": "1.18.0",
    "onnxruntime": "1.22.0",
    "python": "3.11.7",
}
SETTINGS = Settings(rtol=1e-3, atol=1e-5, input_specs=(InputSpec("x", shape=(1, 3, 64, 64)),),
                    seed=0, ignore=("*.dropout",))


def metrics(err: float, scale: float = 1.0, *, passed: bool = True, shape=(1, 64, 64, 64), **kw) -> Metrics:
    return Metrics(
        shape_torch=shape,
        shape_onnx=kw.pop("shape_onnx", shape),
        max_abs=err,
        mean_abs=kw.pop("mean_abs", err / 8),
        max_rel=kw.pop("max_rel", err / scale * 3),
        cosine=kw.pop("cosine", 1.0 - err * 1e-3),
        scale=scale,
        outlier_share=kw.pop("outlier_share", 0.0 if passed else 0.031),
        passed=passed,
        reason=kw.pop("reason", "" if passed else f"max abs error {err:.3g} > atol + rtol*|torch|"),
        **kw,
    )


def _body(n_blocks: int = 4) -> list[tuple[str, str, str, str]]:
    """(module, module_type, onnx_node, op_type) of a small ESRGAN-like net."""
    out = [("conv_first", "Conv2d", "/conv_first/Conv", "Conv")]
    for b in range(n_blocks):
        for k in range(1, 4):
            out.append((f"body.{b}.rdb.conv{k}", "Conv2d", f"/body.{b}/rdb/conv{k}/Conv", "Conv"))
            out.append((f"body.{b}.rdb.lrelu{k}", "LeakyReLU", f"/body.{b}/rdb/lrelu{k}/LeakyRelu", "LeakyRelu"))
        out.append((f"body.{b}.dropout", "Dropout", f"/body.{b}/dropout/Identity", "Identity"))
    out += [
        ("conv_body", "Conv2d", "/conv_body/Conv", "Conv"),
        ("upsample", "Upsample", "/upsample/Resize", "Resize"),
        ("conv_up1", "Conv2d", "/conv_up1/Conv", "Conv"),
        ("lrelu_up", "LeakyReLU", "/lrelu_up/LeakyRelu", "LeakyRelu"),
        ("conv_hr", "Conv2d", "/conv_hr/Conv", "Conv"),
        ("conv_last", "Conv2d", "/conv_last/Conv", "Conv"),
    ]
    return out


def _calls(spec) -> tuple[TorchCall, ...]:
    return tuple(
        TorchCall(index=i, module=m, call=0, module_type=t, shape=(1, 64, 64, 64), dtype="float32")
        for i, (m, t, _, _) in enumerate(spec)
    )


def _model() -> LoadedModel:
    return LoadedModel(
        module=None,
        path=Path("/models/4x_RealESRGAN_x4plus.pth"),
        kind="spandrel",
        architecture="ESRGAN",
        input_channels=3,
        output_channels=3,
        scale=4,
        notes=("loaded with spandrel 0.4.1",),
    )


def _onnx(exporter: str = "dynamo") -> OnnxSource:
    return OnnxSource(
        path=Path("/tmp/out/4x_RealESRGAN_x4plus.onnx"),
        exporter=exporter,
        opset=18,
        producer="pytorch 2.14.1",
        notes=("exported with dynamo=True; external data inlined",),
    )


def make_pass() -> Diagnosis:
    spec = _body(2)
    rng = np.random.default_rng(1)
    layers = []
    for i, (m, t, node, op) in enumerate(spec):
        ignored = m.endswith("dropout")
        err = float(rng.uniform(1, 9)) * 10.0 ** -(7 - i / 10)
        scale = float(rng.uniform(0.5, 5))
        layers.append(
            LayerResult(
                module=m,
                module_type=t,
                onnx_tensor=node.replace("/", "_").strip("_") + "_output_0",
                onnx_node=node,
                op_type=op,
                order=i * 2,
                method="scope",
                metrics=metrics(err, scale=scale),
                ignored=ignored,
                status="ignored" if ignored else "pass",
                # own error: exactly 0 for elementwise ops, rounding noise for convolutions
                local=metrics(0.0 if op != "Conv" else err / 3, scale=scale),
            )
        )
    calls = _calls(spec)
    return Diagnosis(
        verdict="pass",
        summary="The ONNX export matches the PyTorch model: every compared layer and the output "
        "agree within rtol 1e-3 / atol 1e-5.",
        model=_model(),
        onnx=_onnx(),
        settings=SETTINGS,
        versions=VERSIONS,
        outputs=(OutputResult("output", metrics(3.1e-6, 1.0, shape=(1, 3, 256, 256))),),
        layers=tuple(layers),
        alignment=Alignment(
            pairs=(),
            aliases=((len(calls) - 1, len(calls) - 2),),
            unmatched_torch=(),
            unmatched_onnx=(),
            has_scopes=True,
        ),
        calls=calls,
    )


def make_diverged(*, masked: bool = False) -> Diagnosis:
    spec = _body(4)
    rng = np.random.default_rng(0)
    fd_at = next(i for i, s in enumerate(spec) if s[0] == "upsample")
    layers = []
    for i, (m, t, node, op) in enumerate(spec):
        scale = float(rng.uniform(0.5, 6))
        ignored = m.endswith("dropout")
        own = metrics(0.0 if op != "Conv" else float(rng.uniform(1, 9)) * 3e-8 * scale, scale)
        if i < fd_at:
            mt = metrics(float(rng.uniform(1, 9)) * 1e-7 * scale, scale)
            status = "ignored" if ignored else "pass"
        elif i == fd_at:
            # the cause: its own segment fails, on exact inputs
            mt = metrics(0.0417, scale, passed=False, cosine=0.999213, outlier_share=0.184)
            own = metrics(0.0417, scale, passed=False, cosine=0.999213, outlier_share=0.184)
            status = "fail"
        else:
            # only carries the error from upstream: its own segment passes
            mt = metrics(float(rng.uniform(1, 9)) * 1e-2 * scale, scale, passed=False)
            status = "propagated"
        if ignored and i < fd_at:
            mt = metrics(2e-3 * scale, scale, passed=False)  # ignored even though it fails
            own = mt
        layers.append(
            LayerResult(m, t, node.replace("/", "_").strip("_") + "_output_0", node, op, i * 2,
                        "scope" if i % 7 else "weights", mt, ignored=ignored, status=status,
                        local=own)
        )
    # a tensor onnxruntime fused away: no metrics
    k = fd_at + 2
    layers[k] = dataclasses.replace(layers[k], metrics=None, local=None, status="not_run")
    # NaN in the ONNX tensor of the last conv, made by that conv itself: a second cause
    nan = metrics(math.nan, 1.7, passed=False, max_rel=math.inf, cosine=math.nan, nan_onnx=12,
                  reason="12 NaN values in the ONNX tensor")
    layers[-1] = dataclasses.replace(layers[-1], metrics=nan, local=nan, status="fail")
    calls = _calls(spec)
    fd = FirstDivergence(
        module="upsample",
        onnx_node="/upsample/Resize",
        op_type="Resize",
        kind="numeric",
        max_abs=0.0417,
        message="upsample (Upsample) differs from /upsample/Resize by up to 0.0417 "
        "(18.4% of elements outside tolerance); every input of the region passes.",
        layer=next(i for i, l in enumerate(layers) if l.module == "upsample"),
        region=(
            OnnxNodeInfo("/upsample/Constant", "Constant", {"value": np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32)}),
            OnnxNodeInfo(
                "/upsample/Resize",
                "Resize",
                {
                    "mode": b"cubic",
                    "coordinate_transformation_mode": b"half_pixel",
                    "cubic_coeff_a": -0.5,
                    "exclude_outside": 0,
                    "nearest_mode": b"round_prefer_floor",
                },
            ),
        ),
        module_type="Upsample",
        torch_attrs={"scale_factor": 2.0, "mode": "bicubic", "align_corners": False},
    )
    sugg = (
        Suggestion(
            rule="resize_cubic_coeff",
            title="Bicubic upsampling uses a different kernel in ONNX",
            detail="PyTorch's bicubic interpolation uses a = -0.75; this Resize node uses "
            "cubic_coeff_a = -0.5, so every interpolated pixel differs slightly.",
            fix="Re-export with opset >= 11 using the dynamo exporter, or set cubic_coeff_a=-0.75 "
            "on /upsample/Resize with onnx-graphsurgeon.",
            layers=("upsample",),
        ),
        Suggestion(
            rule="ort_optimisation",
            title="The divergence does not depend on onnxruntime graph optimisations",
            detail="Re-running with every optimisation off gave the same error.",
            fix="No action needed; look at the export instead.",
        ),
        Suggestion(
            rule="nan_output",
            title="NaN appears in the ONNX output of conv_last",
            detail="onnxruntime produced 12 NaN values where PyTorch produced none.",
            fix="Check for division by zero or log of negative values after the upsampler.",
            layers=("conv_last",),
        ),
        Suggestion(
            rule="fp16",
            title="Consider exporting in float32",
            detail="Only shown to exercise the '+N more' line.",
            fix="Pass --dtype float32.",
        ),
    )
    alignment = Alignment(
        pairs=(),
        aliases=((len(calls) - 1, len(calls) - 2), (3, -1)),
        unmatched_torch=(
            Unmatched("body.0.rdb.lrelu1", "fused into the preceding Conv by the exporter",
                      fused_into="/body.0/rdb/conv1/Conv"),
            Unmatched("body.2.rdb", "returns a tuple; no single ONNX tensor holds it"),
        ),
        unmatched_onnx=(Unmatched("/Add_3_output_0", "made by a functional op between modules (x + res)"),),
        has_scopes=True,
    )
    summary = (
        "The ONNX export diverges from PyTorch at upsample (Upsample → Resize): its output differs by "
        "up to 0.0417 while every input to it matches. Of 30 compared layers, 2 fail on their own "
        "and 2 only carry error from upstream."
    )
    return Diagnosis(
        verdict="diverged",
        summary=summary,
        model=_model(),
        onnx=_onnx(),
        settings=SETTINGS,
        versions=VERSIONS,
        outputs=(
            OutputResult(
                "output",
                metrics(2e-6, 1.0, shape=(1, 3, 256, 256)) if masked else
                metrics(0.061, 1.0, passed=False, shape=(1, 3, 256, 256)),
            ),
        ),
        layers=tuple(layers),
        first_divergence=fd,
        masked=masked,
        suggestions=sugg,
        alignment=alignment,
        calls=calls,
        facts=Facts(vanishes_without_ort_optimisation=False),
        notes=("2 modules were left out of the comparison by --ignore '*.dropout'.",),
        previews={"|diff| upsample": np.abs(np.random.default_rng(3).normal(size=(3, 32, 32))) * 0.01},
    )


def make_error() -> Diagnosis:
    return Diagnosis(
        verdict="error",
        summary="layerdiff could not load the model, so nothing was compared.",
        model=None,
        onnx=None,
        settings=SETTINGS,
        versions=VERSIONS,
        error="UntrustedPickleError: /models/weird.pth is a pickled Python object and loading it "
        "would execute code.\nhint: pass --trust-pickle if you trust its source.",
    )


def make_runtime_error() -> Diagnosis:
    d = make_diverged()
    k = next(i for i, r in enumerate(d.layers) if r.module == "conv_up1")
    layers = list(d.layers)
    for i in range(k, len(layers)):
        layers[i] = dataclasses.replace(layers[i], metrics=None, local=None, status="not_run")
    fd = FirstDivergence(
        module="conv_up1",
        onnx_node="/conv_up1/Conv",
        op_type="Conv",
        kind="runtime_error",
        max_abs=None,
        message="[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. "
        "Name:'/conv_up1/Conv' Status Message: Invalid input shape: {1,64,128,128}\n  at onnxruntime::Conv",
        layer=next(i for i, l in enumerate(layers) if l.module == "conv_up1"),
        module_type="Conv2d",
    )
    return dataclasses.replace(
        d,
        summary="onnxruntime failed while running /conv_up1/Conv (conv_up1), so the ONNX model "
        "produces no output; every layer before it matches PyTorch.",
        layers=tuple(layers),
        first_divergence=fd,
        suggestions=(),
        previews={},
        outputs=(),
    )


def make_drift() -> Diagnosis:
    """No layer fails on its own; the accumulated error creeps up until the later layers
    and the output fail: ordinary fp32 drift."""
    spec = _body(4)
    tol = dataclasses.replace(SETTINGS, rtol=1e-6, atol=0.0)
    layers = []
    for i, (m, t, node, op) in enumerate(spec):
        scale = 1.0 + (i % 3) * 0.5
        err = 2e-7 * 1.25**i * scale  # grows steadily, no jump
        passed = err / scale <= 1e-6
        layers.append(
            LayerResult(m, t, f"{node}_out", node, op, i, "scope",
                        metrics(err, scale, passed=passed),
                        status="pass" if passed else "propagated",
                        local=metrics(0.0 if op != "Conv" else 6e-8 * scale, scale))
        )
    return Diagnosis(
        verdict="diverged",
        summary="The final output differs from PyTorch (max error 2.1e-4), but no layer's own "
        "computation fails: the error grows slowly across 18 layers (ordinary float rounding drift, "
        "no single jump).",
        model=_model(),
        onnx=_onnx(),
        settings=tol,
        versions=VERSIONS,
        outputs=(OutputResult("output", metrics(2.1e-4, 1.0, passed=False, shape=(1, 3, 256, 256))),),
        layers=tuple(layers),
        calls=_calls(spec),
    )


def make_big(n: int = 5000) -> Diagnosis:
    d = make_diverged()
    base = d.layers
    layers = []
    for i in range(n):
        r = base[i % len(base)]
        layers.append(dataclasses.replace(r, module=f"blocks.{i}.{r.module}", order=i))
    fd = dataclasses.replace(d.first_divergence, module=layers[n // 2].module, onnx_node=layers[n // 2].onnx_node)
    return dataclasses.replace(d, layers=tuple(layers), first_divergence=fd)


# ======================================================================= fixtures


@pytest.fixture(params=["pass", "diverged", "masked", "error", "runtime_error", "drift"])
def any_diag(request) -> Diagnosis:
    return {
        "pass": make_pass,
        "drift": make_drift,
        "diverged": make_diverged,
        "masked": lambda: make_diverged(masked=True),
        "error": make_error,
        "runtime_error": make_runtime_error,
    }[request.param]()


@pytest.fixture
def diverged() -> Diagnosis:
    return make_diverged()


# ======================================================================= JSON

LAYER_KEYS = {
    "module", "module_type", "onnx_tensor", "onnx_node", "op_type", "max_abs", "mean_abs",
    "max_rel", "cosine", "passed", "ignored", "status", "method",
}


def test_json_schema(any_diag: Diagnosis):
    j = render.to_json_dict(any_diag)
    text = json.dumps(j, allow_nan=False)  # raises on NaN / inf
    j = json.loads(text)
    assert j["schema"] == "layerdiff/2"
    for key in ("verdict", "summary", "tolerance", "outputs", "layers", "first_divergence",
                "suggestions", "unmatched", "masked", "model", "onnx", "settings", "versions",
                "notes", "error"):
        assert key in j, key
    assert j["verdict"] == any_diag.verdict
    assert set(j["tolerance"]) >= {"rtol", "atol"}
    assert isinstance(j["masked"], bool)
    assert set(j["unmatched"]) == {"torch", "onnx"}
    assert isinstance(j["notes"], list)
    assert j["error"] is None or isinstance(j["error"], str)
    assert len(j["layers"]) == len(any_diag.layers)
    for row, lr in zip(j["layers"], any_diag.layers):
        assert LAYER_KEYS <= set(row)
        assert row["module"] == lr.module
        assert isinstance(row["ignored"], bool)
        if lr.metrics is None:
            assert row["passed"] is None and row["max_abs"] is None and row["cosine"] is None
        else:
            assert isinstance(row["passed"], bool)
    for o in j["outputs"]:
        assert {"name", "max_abs", "max_rel", "passed"} <= set(o)
    for s in j["suggestions"]:
        assert set(s) >= {"rule", "title", "detail", "fix", "layers"}
        assert isinstance(s["layers"], list)
    fd = j["first_divergence"]
    if any_diag.first_divergence is None:
        assert fd is None
    else:
        assert {"module", "onnx_node", "op_type", "kind", "max_abs", "message"} <= set(fd)
    if any_diag.model is None:
        assert j["model"] is None
    else:
        assert isinstance(j["model"]["path"], str)
        assert {"architecture", "kind"} <= set(j["model"])
    if any_diag.onnx is not None:
        assert isinstance(j["onnx"]["path"], str)
        assert {"exporter", "opset", "notes"} <= set(j["onnx"])


def test_json_nonfinite_become_null(diverged: Diagnosis):
    j = render.to_json_dict(diverged)
    last = j["layers"][-1]
    assert last["max_abs"] is None and last["cosine"] is None and last["max_rel"] is None
    assert last["nan_onnx"] == 12 and last["passed"] is False
    not_run = [r for r in j["layers"] if r["status"] == "not_run"]
    assert not_run and all(r["passed"] is None and r["max_abs"] is None for r in not_run)
    assert j["first_divergence"]["module"] == "upsample"
    assert j["first_divergence"]["max_abs"] == pytest.approx(0.0417)
    assert j["layers"][j["first_divergence"]["layer"]]["module"] == "upsample"
    # attrs with numpy arrays / bytes still serialise
    region = j["first_divergence"]["region"]
    assert region[1]["attrs"]["mode"] == "cubic"
    assert region[0]["attrs"]["value"] == [1.0, 1.0, 2.0, 2.0]
    assert j["unmatched"]["torch"][0] == {"name": "body.0.rdb.lrelu1",
                                          "reason": "fused into the preceding Conv by the exporter"}
    assert {"module": "body.0.rdb.conv2", "shares_with": "model input"} in j["aliases"]


def test_write_json(tmp_path: Path, diverged: Diagnosis):
    out = render.write_json(diverged, tmp_path / "a" / "b" / "report.json")
    assert out.is_file()
    text = out.read_text(encoding="utf-8")
    assert not re.search(r":\s*-?(NaN|Infinity)\b", text)
    assert json.loads(text)["verdict"] == "diverged"
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]  # no temp file left


# ======================================================================= HTML


def test_html_content(any_diag: Diagnosis):
    html = render.render_html(any_diag)
    assert html.startswith("<!DOCTYPE html>")
    label = {"pass": "PASS", "diverged": "DIVERGED", "error": "ERROR"}[any_diag.verdict]
    assert label in html
    for r in any_diag.layers:
        assert r.module in html
    if any_diag.first_divergence is not None:
        assert 'id="first-divergence"' in html
        assert any_diag.first_divergence.module in html
    if any_diag.error:
        assert "UntrustedPickleError" in html


def test_html_diverged_details(diverged: Diagnosis):
    html = render.render_html(diverged)
    # sections in order
    order = [html.index(f'id="{s}"') for s in
             ("verdict", "first-divergence", "suggestions", "outputs", "chart", "layers", "unmatched", "details")]
    assert order == sorted(order)
    for i in range(len(diverged.layers)):
        assert f'id="layer-{i}"' in html
    fd_row = next(i for i, r in enumerate(diverged.layers) if r.module == "upsample")
    assert f'href="#layer-{fd_row}"' in html
    assert "cubic_coeff_a" in html and "bicubic" in html
    assert "Bicubic upsampling uses a different kernel in ONNX" in html
    assert "fused into the preceding Conv" in html and "/Add_3_output_0" in html
    assert "<details" in html and "model input" in html  # aliases
    assert "data:image/png;base64," in html  # preview
    assert "4x_RealESRGAN_x4plus.onnx" in html and "1.22.0" in html
    if hasattr(diverged.settings, "ort_config"):  # field added to Settings later
        cfg = (("session.disable_gemm_fast_gelu_fusion", "1"),)
        d2 = dataclasses.replace(diverged, settings=dataclasses.replace(diverged.settings, ort_config=cfg))
        assert "session.disable_gemm_fast_gelu_fusion=1" in render.render_html(d2)
        assert render.to_json_dict(d2)["settings"]["ort_config"] == {"session.disable_gemm_fast_gelu_fusion": "1"}
    assert "Masked at the final output" not in html


def test_html_masked():
    html = render.render_html(make_diverged(masked=True))
    head = html.split('id="first-divergence"')[0]
    assert "Masked at the final output" in head


def test_html_runtime_error_pre():
    html = render.render_html(make_runtime_error())
    assert re.search(r"<pre[^>]*>\[ONNXRuntimeError\]", html)


def test_html_escapes():
    d = make_diverged()
    evil = "body.<script>alert(1)</script>"
    layers = (dataclasses.replace(d.layers[0], module=evil),) + d.layers[1:]
    d = dataclasses.replace(
        d,
        layers=layers,
        summary='diverged at "<b>x</b>" & more',
        first_divergence=dataclasses.replace(d.first_divergence, message="<img src=x onerror=alert(1)>"),
    )
    html = render.render_html(d)
    assert "<script>alert(1)" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # only our own inline script


def test_html_self_contained(any_diag: Diagnosis):
    html = render.render_html(any_diag)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html, re.I)
    assert "@import" not in html
    assert "<link" not in html


def test_html_empty_and_none():
    d = make_error()
    html = render.render_html(d)
    assert "No layers were compared" in html
    assert "Not loaded" in html
    d2 = dataclasses.replace(make_pass(), layers=(), alignment=None, calls=())
    assert "No layers were compared" in render.render_html(d2)


def test_html_big_is_light():
    d = make_big(5000)
    html = render.render_html(d)
    assert html.count("<circle") <= 2
    assert html.count('<tr id="layer-') == 5000
    assert len(html) < 8_000_000


def test_write_html(tmp_path: Path, diverged: Diagnosis):
    out = render.write_html(diverged, tmp_path / "sub" / "report.html")
    assert out.read_text(encoding="utf-8") == render.render_html(diverged)
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def test_write_html_atomic_on_render_error(tmp_path: Path, diverged: Diagnosis, monkeypatch):
    target = tmp_path / "report.html"

    def boom(*a, **k):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(render, "render_html", boom)
    with pytest.raises(RuntimeError):
        render.write_html(diverged, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_on_write_error(tmp_path: Path, diverged: Diagnosis, monkeypatch):
    """A failure while the bytes are being written keeps the old report and leaves no temp file."""
    target = tmp_path / "report.html"
    target.write_text("old report")
    real_fsync = render.os.fsync

    def failing_fsync(fd):
        real_fsync(fd)
        raise OSError("disk full")

    monkeypatch.setattr(render.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        render.write_html(diverged, target)
    assert target.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_template_autoescape_on():
    assert render._env().autoescape is True or render._env().autoescape("x.html")


# ======================================================================= console


def test_console_plain(diverged: Diagnosis):
    text = render.console_summary(diverged, color=False)
    assert "\x1b" not in text
    assert "DIVERGED" in text
    assert "upsample" in text and "/upsample/Resize" in text and "Resize" in text
    assert "0.0417" in text
    assert "Bicubic upsampling uses a different kernel in ONNX" in text
    assert "Consider exporting in float32" not in text  # only the top 3
    assert "+1 more" in text
    assert "--ignore" in text  # notes
    assert "masked" not in text.lower()


def test_console_color_and_masked():
    text = render.console_summary(make_diverged(masked=True), color=True)
    assert "\x1b[" in text
    assert "masked downstream" in text
    plain = render.console_summary(make_pass(), color=False)
    assert "PASS" in plain and "\x1b" not in plain
    assert "\x1b[1;32m" in render.console_summary(make_pass(), color=True)


def test_console_error():
    text = render.console_summary(make_error(), color=False)
    assert "ERROR" in text and "UntrustedPickleError" in text and "\x1b" not in text


# ======================================================================= formatting


@pytest.mark.parametrize(
    "x, s",
    [
        (None, "–"), (0.0, "0"), (math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "-inf"),
        (0.0417, "0.0417"), (1.0, "1"), (123.456, "123"), (1234.5, "1234"), (1.234e-5, "1.23e-5"),
        (1e-9, "1e-9"), (2.5e7, "2.5e7"), (-3.14159e-6, "-3.14e-6"),
    ],
)
def test_fmt_num(x, s):
    assert render.fmt_num(x) == s


# ======================================================================= edge cases


def test_every_suggestion_listed(diverged: Diagnosis):
    html = render.render_html(diverged)
    suggestions = html.split('id="suggestions"')[1].split('id="outputs"')[0]
    for s in diverged.suggestions:
        assert s.title in suggestions
    for s in diverged.suggestions[1:]:
        assert s.fix in suggestions


def test_chart_edge_cases():
    d = make_pass()
    zero = [dataclasses.replace(r, metrics=dataclasses.replace(r.metrics, max_abs=0.0, scale=0.0))
            for r in d.layers]
    d0 = dataclasses.replace(d, layers=tuple(zero), settings=dataclasses.replace(SETTINGS, rtol=0.0))
    html = render.render_html(d0)
    assert 'class="rtol"' not in html and 'id="chart-svg"' in html
    one = dataclasses.replace(d, layers=d.layers[:1])
    assert 'id="layer-0"' in render.render_html(one)
    # first divergence that matches no row: no marker, no link, no crash
    dv = make_diverged()
    dv = dataclasses.replace(dv, first_divergence=dataclasses.replace(dv.first_divergence, module="elsewhere",
                                                                      onnx_node="/nowhere", layer=None))
    html = render.render_html(dv)
    assert 'class="fd-line"' not in html and "in the layer table" not in html
    assert render.to_json_dict(dv)["first_divergence"]["layer"] is None


def test_previews_odd_arrays():
    d = make_diverged()
    d = dataclasses.replace(d, previews={
        "row": np.array([0.0, 1.0, np.nan, 3.0]),
        "scalar": np.float32(2.0),
        "all nan": np.full((4, 4), np.nan),
        "empty": np.zeros((0, 3)),
        "big": np.random.default_rng(0).random((2, 1200, 700)),
    })
    html = render.render_html(d)
    assert html.count("data:image/png;base64,") == 4  # the empty one is skipped
    assert "1 non-finite" in html


def test_attr_values_formatting():
    assert render.fmt_value(b"cubic") == "cubic"
    assert render.fmt_value((2,)) == "(2,)"
    assert render.fmt_value([1.0, 0.5]) == "[1, 0.5]"
    assert render.fmt_value(np.zeros((10, 10))).startswith("array(shape=10x10")
    assert len(render.fmt_value("x" * 1000)) == 160
    j = render._plain({"a": np.float32("nan"), "b": (1, np.int64(2)), "c": Path("/x"), "d": object})
    assert j["a"] is None and j["b"] == [1, 2] and j["c"] == "/x" and isinstance(j["d"], str)
    json.dumps(j, allow_nan=False)


def test_notes_deduplicated():
    d = make_diverged()
    d = dataclasses.replace(d, notes=d.notes + d.onnx.notes + d.model.notes)
    html = render.render_html(d)
    assert html.count(d.onnx.notes[0]) == 1
    text = render.console_summary(d, color=False)
    assert text.count(d.model.notes[0]) == 1


# ======================================================================= own (local) vs total error


def _section(html: str, start: str, end: str | None = None) -> str:
    part = html.split(f'id="{start}"', 1)[1]
    return part.split(f'id="{end}"', 1)[0] if end else part


def _path(html: str, cls: str) -> str:
    m = re.search(rf'<path class="{cls}"[^>]* d="([^"]*)"', html)
    return m.group(1) if m else ""


def test_json_local(any_diag: Diagnosis):
    j = json.loads(json.dumps(render.to_json_dict(any_diag), allow_nan=False))
    for row, lr in zip(j["layers"], any_diag.layers):
        assert "local" in row
        if lr.local is None:
            assert row["local"] is None
        else:
            loc = row["local"]
            assert {"max_abs", "mean_abs", "max_rel", "cosine", "scale", "outlier_share",
                    "passed", "reason", "shape_torch", "shape_onnx"} <= set(loc)
            assert loc["passed"] is bool(lr.local.passed)
            if math.isfinite(lr.local.max_abs):
                assert loc["max_abs"] == pytest.approx(lr.local.max_abs)
            else:
                assert loc["max_abs"] is None
    counts = j["layer_counts"]
    assert counts["compared"] == len(any_diag.layers)
    assert counts["propagated"] == sum(1 for r in any_diag.layers if r.status == "propagated" and not r.ignored)
    assert sum(v for k, v in counts.items() if k != "compared") == counts["compared"]


def test_json_local_values(diverged: Diagnosis):
    j = render.to_json_dict(diverged)
    fd = j["layers"][j["first_divergence"]["layer"]]
    assert fd["status"] == "fail" and fd["local"]["passed"] is False
    assert fd["local"]["max_abs"] == pytest.approx(0.0417)
    assert j["first_divergence"]["local_max_abs"] == pytest.approx(0.0417)
    assert j["first_divergence"]["accumulated_max_abs"] == pytest.approx(0.0417)
    carried = [r for r in j["layers"] if r["status"] == "propagated"]
    assert carried and all(r["passed"] is False and r["local"]["passed"] is True for r in carried)
    nan_row = j["layers"][-1]  # NaN in its own output: local metrics null, counts kept
    assert nan_row["local"]["max_abs"] is None and nan_row["local"]["nan_onnx"] == 12
    assert j["layer_counts"] == {"compared": 35, "pass": 26, "fail": 2, "propagated": 2,
                                 "ignored": 4, "not_run": 1}


def test_table_local_columns(diverged: Diagnosis):
    html = render.render_html(diverged)
    table = _section(html, "layer-table")
    head = table.split("</thead>")[0]
    assert "local max abs" in re.sub(r"<br>|\s+", " ", head) or "local max abs" in head
    assert 'data-col="local_max_abs"' in head and "local outliers" in head
    assert head.index('data-col="max_abs"') < head.index('data-col="local_max_abs"')
    fd_i = next(i for i, r in enumerate(diverged.layers) if r.module == "upsample")
    row = table.split(f'<tr id="layer-{fd_i}"')[1].split("</tr>")[0]
    # the cause's own error is shown, in red, next to its total error
    assert re.search(r'class="num local badtext" data-v="0\.0417">0\.0417<', row)
    assert re.search(r'class="num local badtext" data-v="0\.184">18\.4%<', row)
    # a layer without a local measurement shows a dash, sorts last
    nr = next(i for i, r in enumerate(diverged.layers) if r.status == "not_run")
    row = table.split(f'<tr id="layer-{nr}"')[1].split("</tr>")[0]
    assert 'class="num local" data-v="">–<' in row


def test_table_propagated_badge_and_filter(diverged: Diagnosis):
    html = render.render_html(diverged)
    table = _section(html, "layer-table")
    carried = [i for i, r in enumerate(diverged.layers) if r.status == "propagated"]
    assert carried
    for i in carried:
        row = table.split(f'<tr id="layer-{i}"')[1].split("</tr>")[0]
        assert row.startswith(' class="s-propagated')
        assert '<span class="pill p-propagated" title="its own segment passes' in row
        assert ">propagated</span>" in row
    assert table.count('class="pill p-propagated"') == len(carried)
    cause = next(i for i, r in enumerate(diverged.layers) if r.module == "upsample")
    row = table.split(f'<tr id="layer-{cause}"')[1].split("</tr>")[0]
    assert 'class="pill p-fail" title="its own segment fails on PyTorch' in row
    filters = _section(html, "layers", "layer-table")
    assert 'id="layer-fail"' in filters and 'id="layer-propagated"' in filters
    assert "fails on its own" in filters and "propagated" in filters
    assert '<span class="pill p-propagated">2</span>' in filters
    js = html.split("<script>")[1]
    assert 's-propagated' in js and 'layer-propagated' in js and 'layer-failing' not in js


def test_chart_two_series_and_legend(diverged: Diagnosis):
    html = render.render_html(diverged)
    chart = _section(html, "chart", "layers")
    assert _path(chart, "trend") and _path(chart, "trend-local")
    assert _path(chart, "ring-core")
    legend = chart.split('id="chart-legend"')[1]
    assert "total error" in legend and "accumulated" in legend
    assert "own error" in legend and "local" in legend
    assert "lg-local-line" in legend and "lg-acc-line" in legend
    assert "propagated: only carries error from upstream" in legend
    assert "fails on its own (cause)" in legend
    # colours follow the status: the cause red, the carried amber, not red
    n_fail = sum(1 for r in diverged.layers if r.status == "fail" and not r.ignored
                 and r.metrics is not None and math.isfinite(r.metrics.max_abs))
    n_carried = sum(1 for r in diverged.layers if r.status == "propagated")
    assert _path(chart, "d-fail").count("M") == n_fail == 1
    assert _path(chart, "d-propagated").count("M") == n_carried
    assert _path(chart, "r-fail").count("M") == 1  # upsample fails locally...
    assert _path(chart, "r-nonfinite").count("M") == 1  # ...and conv_last makes NaN itself
    # one shaded column per cause
    assert _path(chart, "cause-band").count("M") == 2
    assert "The first layer that fails on its own is #" in chart


def test_chart_zero_lane_and_line_skip():
    d = make_pass()
    html = render.render_html(d)
    chart = _section(html, "chart", "layers")
    assert 'class="zero-label">0<' in chart and "exactly zero" in chart
    c = report_visuals._chart(d, None)
    zeros = sum(1 for r in d.layers if r.local is not None and r.local.max_abs == 0 and not r.ignored)
    # the dashed line passes over exact zeros instead of dropping to the lane
    assert c["local_line"].count("L") + c["local_line"].count("M") == sum(
        1 for r in d.layers if r.local is not None and not r.ignored) - zeros
    lane = f"{c['zero_lane']:.1f}"
    assert all(not seg.endswith(" " + lane) for seg in re.split(r"[ML]", c["local_line"]) if seg)


def test_chart_without_local():
    """Older diagnoses (no local measurement): one series, no dashed line, no own-error legend."""
    d = make_diverged()
    d = dataclasses.replace(d, layers=tuple(dataclasses.replace(r, local=None) for r in d.layers))
    html = render.render_html(d)
    chart = _section(html, "chart", "layers")
    assert 'class="trend-local"' not in chart and 'class="ring-core"' not in chart
    assert "own error</b>" not in chart
    assert 'id="own-vs-total"' in html  # the card still shows the total, the own as "–"
    assert "its own error (its ONNX segment run on PyTorch&#39;s inputs) is not available" in html
    assert json.loads(render.to_json(d))["layers"][0]["local"] is None


def test_chart_drift_reads_as_drift():
    d = make_drift()
    html = render.render_html(d)
    head = html.split('id="outputs"')[0]
    assert "Slow drift, no single cause" in head
    assert "<b>0</b> fail on their own" in head
    assert "<b>27</b> only carry error from upstream" in head
    chart = _section(html, "chart", "layers")
    assert "No layer fails on its own" in chart and "slow drift, no single jump" in chart
    assert not _path(chart, "d-fail") and not _path(chart, "r-fail") and not _path(chart, "cause-band")
    assert _path(chart, "d-propagated").count("M") == 27
    assert 'class="fd-line"' not in chart
    # an ignored layer failing on its own is a cause, not drift
    layers = list(d.layers)
    layers[3] = dataclasses.replace(layers[3], ignored=True, status="ignored",
                                    local=dataclasses.replace(layers[3].local, passed=False))
    html = render.render_html(dataclasses.replace(d, layers=tuple(layers)))
    assert "Slow drift" not in html and "only ignored layers do (body.0.rdb.conv2)" in html


def test_chart_similar_own_errors_hint():
    """Many layers failing on their own by similar, tiny amounts: a too-tight tolerance,
    not a fault; the chart says so."""
    d = make_drift()
    layers = [dataclasses.replace(r, status="fail", local=dataclasses.replace(r.local, max_abs=(1 + i % 3) * 1e-7,
                                                                               passed=False))
              if r.op_type == "Conv" else r for i, r in enumerate(d.layers)]
    d = dataclasses.replace(d, layers=tuple(layers))
    reading = " ".join(report_visuals._chart(d, None)["reading"])
    assert "own errors are all of similar size" in reading
    assert "own errors are all of similar size" not in " ".join(report_visuals._chart(make_diverged(), None)["reading"])


def test_banner_and_card_own_vs_total(diverged: Diagnosis):
    html = render.render_html(diverged)
    head = html.split('id="first-divergence"')[0]
    assert "<b>2</b> fail on their own" in head
    assert "<b>2</b> only carry error from upstream" in head
    assert "own error 0.0417" in head and "total error 0.0417" in head
    assert "arriving from upstream" in head
    card = _section(html, "first-divergence", "suggestions")
    table = card.split('id="own-vs-total"')[1].split("</table>")[0]
    assert "own error" in table and "total error" in table
    assert table.count("0.0417") == 2 and table.count("18.4%") == 2
    assert "Its own segment produces this error" in card
    assert "After it, 2 layers only carry error from upstream" in card
    # a cause whose inputs were already off: own error smaller than the total
    d = dataclasses.replace(diverged, layers=tuple(
        dataclasses.replace(r, local=dataclasses.replace(r.local, max_abs=0.004)) if r.module == "upsample" else r
        for r in diverged.layers))
    assert "more error arrives from upstream, for 0.0417 in total" in render.render_html(d)


def test_singular_counts():
    d = make_diverged()
    layers = [dataclasses.replace(r, status="pass") if r.status == "propagated" and r.module != "conv_up1" else r
              for r in d.layers]
    layers[-1] = dataclasses.replace(layers[-1], status="pass")
    d = dataclasses.replace(d, layers=tuple(layers))
    html = render.render_html(d)
    assert "<b>1</b> fails on its own" in html and "<b>1</b> only carries error from upstream" in html
    text = render.console_summary(d, color=False)
    assert "1 fails on its own, 1 only carries error from upstream" in text


def test_console_counts(diverged: Diagnosis):
    text = render.console_summary(diverged, color=False)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("layers:"))
    assert line == ("  layers: 35 compared, 2 fail on their own, 2 only carry error from upstream, "
                    "4 ignored, 1 not run")
    assert "    own error 0.0417 (its segment on PyTorch's inputs), total 0.0417 at its output\n" in text
    colored = render.console_summary(diverged, color=True)
    assert "\x1b[31m2 fail on their own\x1b[0m" in colored and "\x1b[33m2 only carry" in colored
    drift = render.console_summary(make_drift(), color=False)
    assert "0 fail on their own, 27 only carry error from upstream" in drift
    assert "layers:" not in render.console_summary(make_error(), color=False)


def test_big_with_local_is_fast():
    import time

    d = make_big(5000)
    t0 = time.perf_counter()
    html = render.render_html(d)
    assert time.perf_counter() - t0 < 10
    assert len(html) < 6_000_000
    assert html.count("<circle") <= 2 and html.count("<path") < 40


# ======================================================================= referee, inputs, coverage, fp16

def _between(html: str, start: str, end: str) -> str:
    """The text after the first ``start`` up to the next ``end`` (both raw markup)."""
    part = html.split(start, 1)[1]
    return part.split(end, 1)[0]


CASES = (
    CaseResult("random (seed 0)", (1, 3, 64, 64), "diverged", "random", "upsample (numeric)", 0.061),
    CaseResult("cat.png", (1, 3, 48, 48), "diverged", "file", "upsample (numeric)", 0.052,
               note="alpha channel dropped"),
    CaseResult("random 49x81", (1, 3, 49, 81), "skipped", "size", note="export fixed at 64x64"),
)


def make_rich(n_cases: int = 3) -> Diagnosis:
    """The diverged fixture with a float64 referee, several inputs, pairs, fp16 findings."""
    d = make_diverged()
    fd_at = d.first_divergence.layer
    layers = []
    for i, r in enumerate(d.layers):
        side = "onnx" if i == fd_at else "torch" if i == 1 else "noise"
        ref = Referee(torch_error=2e-8, onnx_error=0.0417 if side == "onnx" else 3e-8, side=side)
        layers.append(dataclasses.replace(r, referee=ref, case=CASES[i % 2].label))
    fp16 = Fp16Findings(
        overflow=(Fp16Layer("boost", "Scale", "/boost/Mul", 84790.5, 0.0),),
        underflow=(),
        first_nonfinite=layers[fd_at],
        keep=(KeepFp32("boost", ("/boost/Constant", "/boost/Mul"), "its fp32 values reach 8.48e+04"),
              KeepFp32("norm", tuple(f"/norm/N{k}" for k in range(11)), "normalises large inputs")),
    )
    alignment = dataclasses.replace(d.alignment, pairs=tuple(
        Pair(k, f"t{k}", f"n{k}", "Conv", k, "scope" if k < 5 else "weights~") for k in range(8)))
    return dataclasses.replace(
        d, layers=tuple(layers), cases=CASES[:n_cases], alignment=alignment,
        first_divergence=dataclasses.replace(d.first_divergence, case="cat.png"),
        facts=Facts(vanishes_without_ort_optimisation=True, ort_rewrite="FastGelu (com.microsoft)",
                    fp16=fp16, fp16_fix=("/tmp/out/mixed.onnx", "pass")))


def test_layer_table_referee_marker():
    html = render.render_html(make_rich())
    table = _between(html, 'id="layer-table"', "</table>")
    assert table.count('class="ref ref-onnx"') == 1 and 'off: ONNX' in table
    assert table.count('class="ref ref-torch"') == 1 and 'off: PyTorch' in table
    assert 'class="ref ref-noise"' in table
    # both errors on hover
    assert 'title="vs a float64 PyTorch run: ONNX error 0.0417, PyTorch fp32 error 2e-8' in table
    # no referee, no marker
    assert 'class="ref ' not in render.render_html(make_diverged())


def test_layer_table_case_only_with_several_inputs():
    table = _between(render.render_html(make_rich()), 'id="layer-table"', "</table>")
    assert '<span class="case">cat.png</span>' in table
    assert '<span class="case">random (seed 0)</span>' in table
    one = _between(render.render_html(make_rich(n_cases=1)), 'id="layer-table"', "</table>")
    assert 'class="case"' not in one


def test_fd_card_referee_and_input():
    html = render.render_html(make_rich())
    card = _between(html, 'id="first-divergence"', "</section>")
    assert "ONNX is 2.08e6× further from float64 than PyTorch fp32 is" in card
    assert "ONNX is off by 0.0417, PyTorch fp32 by 2e-8" in card
    assert "Shows on input <b>cat.png</b>" in card
    assert "2 of 3 inputs diverge" in card
    # ORT rewrite among the checks
    assert "onnxruntime rewrite" in card and "FastGelu (com.microsoft)" in card
    plain = render.render_html(make_diverged())
    assert "further from float64" not in plain and "Shows on input" not in plain
    assert "onnxruntime rewrite" not in plain


def test_referee_words():
    w = render._referee_words
    assert "PyTorch fp32 is 5.0× further from float64 than ONNX is" in w(Referee(1e-6, 2e-7, "torch"))
    assert "ONNX is 2,085× further" in w(Referee(2e-5, 0.0417, "onnx"))
    assert "Neither is clearly wrong" in w(Referee(1e-7, 2e-7, "noise"))
    assert "ONNX is non-finite" in w(Referee(0.01, math.inf, "onnx"))
    assert "ONNX is off by 0.5, PyTorch fp32 by 0" in w(Referee(0.0, 0.5, "onnx"))


def test_inputs_table():
    html = render.render_html(make_rich())
    assert 'href="#inputs"' in html
    table = _between(html, 'id="inputs"', "</table>")
    for text in ("random (seed 0)", "cat.png", "random 49x81", "file", "size", "1×3×49×81",
                 "upsample (numeric)", "0.052", "alpha channel dropped", "export fixed at 64x64"):
        assert text in table, text
    assert table.count('class="pill p-fail">diverged') == 2
    assert 'class="pill p-ignored">skipped' in table
    # one input: no table
    one = render.render_html(make_rich(n_cases=1))
    assert 'id="inputs"' not in one and 'href="#inputs"' not in one
    assert "cases" in render.to_json_dict(make_rich()) and len(render.to_json_dict(make_rich())["cases"]) == 3


def test_alignment_coverage_line():
    html = render.render_html(make_rich())
    section = _between(html, 'id="unmatched"', "</section>")
    # 8 pairs + 2 unmatched (one fused) = 10 calls
    assert "10 module calls: 80% compared (scope 5, close weights 3), 10% fused, 10% not paired" in section
    assert render._coverage_line(make_error()) == ""
    # a fully paired run still gets the Alignment section, for the coverage line
    d = make_pass()
    paired = Alignment(pairs=(Pair(0, "t", "n", "Conv", 0, "scope"),), aliases=(), unmatched_torch=(),
                       unmatched_onnx=(), has_scopes=True)
    html = render.render_html(dataclasses.replace(d, alignment=paired))
    assert "1 module call: 100% compared (scope 1), 0% fused, 0% not paired" in html
    assert 'href="#unmatched"' in html and "Every PyTorch module and ONNX tensor was paired" in html


def test_fp16_between():
    html = render.render_html(make_rich())
    assert 'href="#fp16"' in html
    sec = _between(html, 'id="fp16"', "</section>")
    assert "1 layer(s) exceed float16&#39;s maximum 65504" in sec
    assert "Keep in float32" in sec
    assert "its fp32 values reach 8.48e+04" in sec and "normalises large inputs" in sec
    assert "/boost/Constant, /boost/Mul" in sec
    assert "/norm/N0, /norm/N1, /norm/N2, … +8 more" in sec  # long node lists are cut, full on hover
    assert 'title="/norm/N0, /norm/N1' in sec
    assert "/tmp/out/mixed.onnx" in sec and 'class="pill p-pass">PASS' in sec
    assert 'id="fp16"' not in render.render_html(make_diverged())
    # clean findings: a short all-clear, no keep table, no fix line
    clean = dataclasses.replace(make_pass(), facts=Facts(fp16=Fp16Findings((), (), None, ())))
    sec = _between(render.render_html(clean), 'id="fp16"', "</section>")
    assert "No layer leaves float16" in sec and "Keep in float32" not in sec and "Wrote" not in sec


def test_big_rich_is_fast():
    import time

    d = make_rich()
    base = d.layers
    layers = tuple(dataclasses.replace(base[i % len(base)], module=f"blocks.{i}.{base[i % len(base)].module}")
                   for i in range(5000))
    d = dataclasses.replace(d, layers=layers, first_divergence=dataclasses.replace(
        d.first_divergence, module=layers[2500].module, onnx_node=layers[2500].onnx_node))
    t0 = time.perf_counter()
    html = render.render_html(d)
    assert time.perf_counter() - t0 < 10
    assert html.count('<tr id="layer-') == 5000
    assert len(html) < 7_000_000


# ------------------------------------------------------------------ neighbourhood graph


def _with_graph(d: Diagnosis, extra_producers: int = 0) -> Diagnosis:
    """make_diverged with a chain of producers and every call paired with its layer."""
    fd_at = next(c.index for c in d.calls if c.label == d.first_divergence.module)
    calls = []
    for c in d.calls:
        prods: tuple[int, ...] = (c.index - 1,) if c.index else (-1,)
        if c.index == fd_at:
            prods = (c.index - 1, 0) + tuple(range(1, 1 + extra_producers))
        calls.append(dataclasses.replace(c, producers=prods))
    rows = {r.module: r for r in d.layers}
    pairs = tuple(Pair(c.index, rows[c.label].onnx_tensor, rows[c.label].onnx_node,
                       rows[c.label].op_type, rows[c.label].order, "scope")
                  for c in d.calls if c.label in rows)
    return dataclasses.replace(d, calls=tuple(calls),
                               alignment=dataclasses.replace(d.alignment, pairs=pairs))


def _nb_svg(html: str) -> str:
    m = re.search(r'<svg class="nb-svg".*?</svg>', html, re.S)
    assert m, "no neighbourhood graph"
    return m.group(0)


def test_neighbourhood_graph_shows_both_sides_and_links():
    d = _with_graph(make_diverged())
    svg = _nb_svg(render.render_html(d))
    assert "<script" not in svg and "http" not in svg.replace('xmlns="http', "")
    # PyTorch: the producers, the diverging module, the module it fed, each coloured by status
    assert re.search(r'<g class="nb-box nb-pass" data-role="up"><title>conv_body \(Conv2d\)', svg)
    assert re.search(r'<g class="nb-box nb-pass" data-role="up"><title>conv_first \(Conv2d\)', svg)
    assert re.search(r'<g class="nb-box nb-fail nb-fd" data-role="fd"><title>upsample \(Upsample\)', svg)
    assert re.search(r'<g class="nb-box nb-propagated" data-role="down"><title>conv_up1 \(Conv2d\)', svg)
    # ONNX: the region in order, the aligned upstream / downstream nodes
    region = re.findall(r'nb-region nb-fd" data-role="fd"><title>([^ ]+)', svg)
    assert region == ["/upsample/Constant", "/upsample/Resize"]
    for node in ("/conv_body/Conv", "/conv_first/Conv", "/conv_up1/Conv"):
        assert f"<title>{node} (Conv)" in svg
    # dashed links: conv_first, conv_body, upsample, conv_up1 with their ONNX nodes
    assert svg.count('class="nb-link"') == 4
    n = report_visuals._neighbourhood(d, d.first_divergence)
    assert n["links"] == 4 and n["torch"] == 4 and n["onnx"] == 5


def test_neighbourhood_graph_caps_and_edge_cases():
    d = _with_graph(make_diverged(), extra_producers=12)
    n = report_visuals._neighbourhood(d, d.first_divergence)
    assert n["torch"] <= report_visuals.NB_CAP and n["onnx"] <= report_visuals.NB_CAP
    assert re.search(r"\+\d+ more", str(n["svg"]))
    # no calls recorded, or the module is not among them: no graph, the page still renders
    assert report_visuals._neighbourhood(dataclasses.replace(d, calls=()), d.first_divergence) is None
    assert report_visuals._neighbourhood(d, None) is None
    other = dataclasses.replace(d.first_divergence, module="nowhere")
    assert report_visuals._neighbourhood(d, other) is None
    # the last module feeds nothing: said in words; no pairs at all: no links, no crash
    last = d.calls[-1]
    fd = dataclasses.replace(d.first_divergence, module=last.label, onnx_node="/conv_last/Conv",
                             op_type="Conv", region=())
    bare = dataclasses.replace(d, alignment=None)
    n = report_visuals._neighbourhood(bare, fd)
    # only the diverging module's own link to its ONNX node is left
    assert "no module takes its output directly" in str(n["svg"]) and n["links"] == 1
    assert 'id="nb-svg"' in render.render_html(make_runtime_error())  # no producers recorded
    # names are escaped
    evil = dataclasses.replace(d, calls=tuple(dataclasses.replace(c, module_type="<b>x</b>")
                                              for c in d.calls))
    assert "<b>x</b>" not in str(report_visuals._neighbourhood(evil, evil.first_divergence)["svg"])


# ------------------------------------------------------------------ error histograms


def _hist_svgs(html: str) -> list[str]:
    return re.findall(r'<svg class="hist-svg".*?</svg>', html, re.S)


def test_histogram_from_preview_maps_marks_the_tolerance():
    d = make_diverged()  # one |diff| map, named like no output: tolerance is atol alone
    html = render.render_html(d)
    svgs = _hist_svgs(html)
    assert len(svgs) == 1 and html.count("data:image/png;base64,") == 1
    assert svgs[0].count('class="hist-bar') == report_visuals.HIST_BINS
    assert 'class="hist-tol"' in svgs[0] and "1e-9" in svgs[0]
    arr = np.array([[0.0, 1e-12, 2e-6], [5e-4, 0.02, np.nan]])
    edges, counts, below, nonfinite = report_visuals._hist_counts(arr)
    assert len(edges) == report_visuals.HIST_BINS + 1 and edges[0] == pytest.approx(1e-9)
    assert edges[-1] == pytest.approx(0.02)
    assert counts.sum() == 3 and below == 2 and nonfinite == 1
    for hi in (0.0123456789, 7.77e-3, 1.3e-5):  # the max always lands in the last bin
        vals = np.linspace(1e-8, hi, 1001)
        e, c, b, _ = report_visuals._hist_counts(vals)
        assert c.sum() + b == vals.size and c[-1] >= 1


def test_histogram_entries_render_as_bar_charts_with_layer_tolerance():
    d = make_diverged()
    edges = np.logspace(-9, -1, 9)
    counts = np.array([0, 1, 2, 4, 8, 16, 300, 5, np.nan])  # n counts + one pad
    fd_name = f"first divergence |diff|: {d.first_divergence.module}"
    d = dataclasses.replace(d, previews={
        fd_name: np.full((8, 8), 0.04),
        "histogram: " + fd_name: np.stack([edges, counts]),
        "final output |diff|": np.full((8, 8), 5e-3),
        "histogram: broken": np.array([[1.0, 0.5], [3, 4]]),  # edges not increasing: skipped
    })
    html = render.render_html(d)
    assert html.count("data:image/png;base64,") == 2  # histogram entries are no heat maps
    svgs = _hist_svgs(html)
    assert len(svgs) == 2  # the explicit one replaces the binned fd map; the output's is binned
    assert svgs[0].count('class="hist-bar') == 8
    row = next(r for r in d.layers if r.module == d.first_divergence.module)
    tol = d.settings.atol + d.settings.rtol * row.metrics.scale
    assert f"tol {render.fmt_num(tol)}" in svgs[0]
    out = d.outputs[0].metrics
    assert f"tol {render.fmt_num(d.settings.atol + d.settings.rtol * out.scale)}" in svgs[1]
    assert 'class="hist-bar bad"' in svgs[0]  # 0.01…0.1 lies beyond the tolerance
    assert "binned from the preview map" in html


def test_layer_table_lists_fused_and_unpaired_modules_from_a_real_diagnosis(tmp_path):
    """A folded BatchNorm: its Conv gets a "fused" row with the reason, after the compared layers."""
    import torch

    from layerdiff import diagnose

    class ConvBN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-1, 1)
                self.bn.running_var.uniform_(0.5, 2)
            self.conv2 = torch.nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, x):
            return self.conv2(self.bn(self.conv1(x)))

    d = diagnose(ConvBN().eval(), input_shape=(1, 3, 16, 16), exporter="legacy",
                 output_dir=tmp_path, check_sizes=())
    html = render.render_html(d)
    table = html[html.index('id="layers"'):html.index('id="unmatched"')]
    assert 'id="unpaired-0" class="s-fused"' in table
    assert "fused into ONNX node" in table and ">conv1<" in table
    assert table.index('id="unpaired-0"') > table.index('id="layer-0"')
