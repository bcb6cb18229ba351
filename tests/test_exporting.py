"""export_onnx and describe_onnx with the real exporters, checked by running onnxruntime."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
from spandrel.architectures.Compact import Compact
from spandrel.architectures.SPAN import SPAN

from layerdiff.errors import ExportError, OnnxLoadError, UsageError
from layerdiff.exporting import describe_onnx, export_onnx
from layerdiff.models import from_module

EXAMPLE_SHAPE = (1, 3, 16, 16)


def example() -> torch.Tensor:
    return torch.rand(EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))


def compact() -> torch.nn.Module:
    torch.manual_seed(0)
    return Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).eval()


def assert_runs_like_torch(onnx_path, module, shapes=(EXAMPLE_SHAPE, (1, 3, 24, 20))) -> None:
    """onnxruntime agrees with torch at the export size and at another size."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    for shape in shapes:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
        (got,) = session.run(None, {input_name: x.numpy()})
        with torch.no_grad():
            expected = module(x).numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def leftovers(directory, keep) -> list[str]:
    """Files the export left beside the ones it should have (staging dirs, temp files)."""
    return sorted(path.name for path in directory.iterdir() if path.name not in keep)


class Refuses(torch.nn.Module):
    def forward(self, x):
        raise ValueError("this model cannot be traced")


class Hangs(torch.nn.Module):
    def forward(self, x):
        time.sleep(60)
        return x


# --------------------------------------------------------------------------- exporting


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_export_runs_in_onnxruntime_at_any_size(tmp_path, exporter):
    module = compact()
    out = tmp_path / "model.onnx"

    source = export_onnx(from_module(module), example(), out, exporter=exporter)

    assert (source.path, source.exporter, source.notes) == (out, exporter, ())
    if exporter == "legacy":
        assert source.opset == 17
    else:
        assert source.opset >= 18
    assert source.producer == f"torch {torch.__version__.split('+')[0]}"
    assert leftovers(tmp_path, {"model.onnx"}) == []
    assert_runs_like_torch(out, module)


def test_dynamo_crash_on_span_falls_back_to_legacy(tmp_path):
    # The dynamo exporter segfaults on SPAN with torch 2.14: the crash must stay in the child.
    torch.manual_seed(0)
    module = SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2).eval()
    out = tmp_path / "span.onnx"

    source = export_onnx(from_module(module), example(), out, exporter="dynamo")

    assert source.exporter == "legacy"
    assert len(source.notes) == 1
    assert "dynamo exporter crashed (SIGSEGV)" in source.notes[0]
    assert "legacy exporter instead" in source.notes[0]
    assert (tmp_path / "span.onnx.dynamo.log").stat().st_size > 0
    assert leftovers(tmp_path, {"span.onnx", "span.onnx.dynamo.log"}) == []
    assert_runs_like_torch(out, module)


def test_failed_exports_leave_no_file(tmp_path):
    out = tmp_path / "model.onnx"

    with pytest.raises(ExportError) as caught:
        export_onnx(from_module(Refuses()), example(), out)

    message = caught.value.message
    assert "\n" not in message
    assert "the dynamo exporter failed (ValueError: this model cannot be traced" in message
    assert "the legacy exporter failed (ValueError: this model cannot be traced)" in message
    assert "--onnx" in caught.value.hint
    assert not out.exists()
    assert leftovers(tmp_path, {"model.onnx.dynamo.log", "model.onnx.legacy.log"}) == []


def test_hanging_export_is_killed(tmp_path):
    out = tmp_path / "model.onnx"
    start = time.monotonic()

    with pytest.raises(ExportError) as caught:
        export_onnx(from_module(Hangs()), example(), out, exporter="legacy", timeout_s=1)

    assert time.monotonic() - start < 20
    assert "the legacy exporter timed out after 1 s" in caught.value.message
    assert "the dynamo exporter timed out after 1 s" in caught.value.message
    assert not out.exists()


def test_torchscript_goes_straight_to_legacy(tmp_path):
    module = compact()
    scripted = torch.jit.trace(module, example())
    out = tmp_path / "model.onnx"

    source = export_onnx(from_module(scripted), example(), out, exporter="dynamo")

    assert source.exporter == "legacy"
    assert "TorchScript" in source.notes[0]
    assert_runs_like_torch(out, module)


def test_dynamo_below_opset_18_is_noted(tmp_path):
    out = tmp_path / "model.onnx"

    source = export_onnx(from_module(compact()), example(), out, exporter="dynamo", opset=16)

    assert (source.exporter, source.opset) == ("dynamo", 16)
    assert "opset 16" in source.notes[0] and "module names" in source.notes[0]


def test_unknown_exporter_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError):
        export_onnx(from_module(compact()), example(), tmp_path / "model.onnx", exporter="tensorrt")


# --------------------------------------------------------------------------- user files


def test_describe_onnx_reads_opset_and_producer(tmp_path):
    out = tmp_path / "model.onnx"
    export_onnx(from_module(compact()), example(), out, exporter="legacy", opset=15)

    source = describe_onnx(out)

    assert (source.path, source.exporter, source.opset) == (out, "user", 15)
    assert source.producer.startswith("pytorch ")


@pytest.mark.parametrize("content", [b"\x08\x07garbage\xff\xff\xff" * 20, b""], ids=["corrupt", "empty"])
def test_describe_onnx_rejects_a_bad_file(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)

    with pytest.raises(OnnxLoadError) as caught:
        describe_onnx(path)

    assert "\n" not in caught.value.message and caught.value.hint


def test_describe_onnx_missing_file(tmp_path):
    with pytest.raises(OnnxLoadError) as caught:
        describe_onnx(tmp_path / "nowhere.onnx")

    assert caught.value.message == f"ONNX file not found: {tmp_path / 'nowhere.onnx'}"
