"""Shared fixtures: small real spandrel architectures with random weights, and their ONNX."""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))

import faults  # noqa: E402

warnings.filterwarnings("ignore")


def make_model(arch: str) -> torch.nn.Module:
    """Small configurations of real spandrel architectures, random weights, eval mode."""
    torch.manual_seed(0)
    if arch == "esrgan":
        from spandrel.architectures.ESRGAN import ESRGAN

        model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)
    elif arch == "compact":
        from spandrel.architectures.Compact import Compact

        model = Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4)
    elif arch == "span":
        from spandrel.architectures.SPAN import SPAN

        model = SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2)
    elif arch == "swinir":
        from spandrel.architectures.SwinIR import SwinIR

        model = SwinIR(img_size=16, in_chans=3, embed_dim=12, depths=[1], num_heads=[2],
                       window_size=4, mlp_ratio=2, upscale=2, upsampler="pixelshuffledirect")
    else:
        raise ValueError(arch)
    return model.eval()


def export(model: torch.nn.Module, example: torch.Tensor, path: Path, how: str) -> Path:
    """'legacy' / 'dynamo' with torch.onnx.export, or 'nameless' like chaiNNer."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if how == "legacy":
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17)
        elif how == "dynamo":
            torch.onnx.export(model, (example,), str(path), dynamo=True)
        elif how == "nameless":
            faults.export_without_names(model, example, path)
        else:
            raise ValueError(how)
    return path


SHAPE = (1, 3, 24, 24)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(arch, how) -> path of a clean export at SHAPE, made once per test session."""
    cache: dict[tuple[str, str], Path] = {}
    folder = tmp_path_factory.mktemp("exports")

    def get(arch: str, how: str) -> Path:
        if (arch, how) not in cache:
            from layerdiff.pipeline import make_input

            cache[arch, how] = export(make_model(arch), make_input(SHAPE, 0),
                                      folder / f"{arch}-{how}.onnx", how)
        return cache[arch, how]

    return get


def with_fault(path: Path, inject, tmp_path: Path) -> tuple[Path, str]:
    """Apply a samples/faults.py injector to an ONNX file; return the new file and node."""
    model, node = inject(onnx.load(str(path)))
    out = tmp_path / f"{path.stem}-fault.onnx"
    onnx.save(model, str(out))
    return out, node
