"""Make the bundled samples: small real spandrel models and ONNX files with known faults.

    python samples/make_samples.py          # rewrites the files next to this script

Weights are random (seeded), the architectures are spandrel's own, so spandrel detects
them from the state dict exactly as it would a downloaded checkpoint.

- compact_x4.pth           Real-ESRGAN Compact (SRVGGNetCompact), x4, 32 features, 8 convs
- compact_x4.onnx          its clean legacy export (passes)
- compact_x4_dcr.onnx      PixelShuffle exported as DepthToSpace in DCR order (checkerboard)
- esrgan_x2.pth            ESRGAN (RRDBNet), x2, 16 filters, 1 block
- esrgan_x2_nameless_slope.onnx
                           exported chaiNNer-style (no module names, weights as Constant
                           nodes), one LeakyReLU slope changed to 0.1
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import onnx
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import faults  # noqa: E402


def _legacy_export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                        "output": {0: "batch", 2: "height", 3: "width"}})


def make_compact(folder: Path) -> None:
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(1)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=32, num_conv=8, upscale=4).eval()
    torch.save(model.state_dict(), folder / "compact_x4.pth")
    example = torch.rand(1, 3, 64, 64)
    _legacy_export(model, example, folder / "compact_x4.onnx")
    faulty, _ = faults.pixel_shuffle_dcr(onnx.load(str(folder / "compact_x4.onnx")))
    onnx.save(faulty, str(folder / "compact_x4_dcr.onnx"))


def make_esrgan(folder: Path) -> None:
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(2)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=2).eval()
    torch.save(model.state_dict(), folder / "esrgan_x2.pth")
    example = torch.rand(1, 3, 64, 64)
    nameless = folder / "esrgan_x2_nameless.onnx"
    faults.export_without_names(model, example, nameless)
    faulty, _ = faults.leaky_slope(onnx.load(str(nameless)), 0.1, index=3)
    onnx.save(faulty, str(folder / "esrgan_x2_nameless_slope.onnx"))
    nameless.unlink()


def main(folder: Path = HERE) -> None:
    make_compact(folder)
    make_esrgan(folder)
    for path in sorted(folder.glob("*.pth")) + sorted(folder.glob("*.onnx")):
        print(f"{path.name:36s} {path.stat().st_size / 1024:8.1f} KiB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
