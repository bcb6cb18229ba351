"""Turn a model (a file, or a module in memory) into a LoadedModel.

One loader per kind, each in its own file: ``torchscript`` archives, ``safetensors``
files and ``checkpoint`` (torch.save) files are recognised by content, not by extension,
and their state dicts go to ``spandrel``, which recognises the architecture.

The loaders import torch; this file imports them where they are used, so that the command
line can import it before torch is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..records import LoadedModel
from .common import DEFAULT_INPUT_CHANNELS, claimed, first_layer_in_channels, unreadable

__all__ = ["from_module", "load_model"]


def load_model(source: str | os.PathLike[str], *, trust_pickle: bool = False) -> LoadedModel:
    """Load the model file ``source`` on the CPU.

    Unpickling can run arbitrary code, so a file that is more than tensors and plain
    containers (a whole pickled ``nn.Module``) is refused unless ``trust_pickle``.
    """
    path = Path(source)
    _check_openable(path)
    if path.suffix.lower() == ".onnx":  # the arguments swapped: a common slip
        raise ModelLoadError(f"{path.name} is an ONNX file; MODEL is the PyTorch model",
                             hint=f"run: layerdiff report MODEL.pth --onnx {path}")
    from . import checkpoint, safetensors, torchscript

    # Tried in order; a file none of them claims is read as a torch.save checkpoint.
    formats = ((torchscript.claims, torchscript.load), (safetensors.claims, safetensors.load))
    load = next((load for claims, load in formats if claimed(claims, path)), checkpoint.load)
    try:
        return load(path, trust_pickle)
    except ModelLoadError:
        raise
    except Exception as error:
        # A damaged file can fail anywhere in torch's, safetensors' or spandrel's readers,
        # each with its own exception types; every such failure is the file's fault.
        raise unreadable(path, error) from None


def from_module(module: Any, *, input_channels: int | None = None,
                name: str | None = None) -> LoadedModel:
    """Wrap an in-memory module, leaving its train/eval mode as the caller set it."""
    notes: tuple[str, ...] = ()
    if input_channels is None:
        input_channels = first_layer_in_channels(module)
    if input_channels is None:
        input_channels = DEFAULT_INPUT_CHANNELS
        notes = (f"no Conv or Linear layer found; assumed {DEFAULT_INPUT_CHANNELS} input channels",)
    return LoadedModel(
        module=module,
        path=None,
        kind="module",
        architecture=name or type(module).__name__,
        input_channels=input_channels,
        notes=notes,
    )


def _check_openable(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(
            f"model file not found: {path}", hint="check the path and the current directory"
        )
    try:
        path.open("rb").close()
    except OSError as error:
        raise ModelLoadError(
            f"cannot open model file {path}: {error.strerror}",
            hint="pass the path of a model file (.pth, .pt, .ckpt, .safetensors)",
        ) from None
