"""Write the seed corpora for the atheris harnesses: small, valid files of every format.

    python fuzz/make_corpus.py fuzz/corpus

makes ``model/`` (state dicts as zip and legacy torch.save, safetensors, TorchScript,
a Lightning-style checkpoint, the bundled sample) and ``onnx/`` (the bundled sample and a
tiny legacy export). Small seeds mutate faster than the 360 KB samples alone.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=2).eval()
    state = model.state_dict()
    models, onnxes = out / "model", out / "onnx"
    models.mkdir(parents=True, exist_ok=True)
    onnxes.mkdir(parents=True, exist_ok=True)
    torch.save(state, models / "compact_zip.pth")
    torch.save(state, models / "compact_legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
               models / "lightning.ckpt")
    save_file(state, str(models / "compact.safetensors"))
    torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, 8, 8)), str(models / "traced.pt"))
    shutil.copy(ROOT / "samples" / "compact_x4.pth", models / "compact_x4.pth")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, (torch.rand(1, 3, 8, 8),), str(onnxes / "tiny.onnx"),
                          dynamo=False, opset_version=17, input_names=["input"],
                          dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}})
    shutil.copy(ROOT / "samples" / "compact_x4.onnx", onnxes / "compact_x4.onnx")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "corpus"))
