"""What every loader shares: the one-line errors for unreadable files, and the input
channels read off a module when nothing else says. Free of torch at import, as the
command line reads entry points before torch is loaded."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from typing import Any

from ..errors import ModelLoadError, first_line

# Image models take RGB unless something in the model says otherwise.
DEFAULT_INPUT_CHANNELS = 3

CORRUPT_HINT = "the file may be truncated or corrupt, or not a PyTorch model; check the file"


def first_layer_in_channels(module: Any) -> int | None:
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.conv._ConvNd):
            return layer.in_channels
        if isinstance(layer, torch.nn.Linear):
            return layer.in_features
    return None


def first_weight_in_channels(module: Any) -> int | None:
    # TorchScript hides layer types, but a conv weight is (out, in, kh, kw).
    for tensor in module.state_dict().values():
        if tensor.dim() == 4:
            return tensor.shape[1]
    return None


def claimed(claims: Callable[[Path], bool], path: Path) -> bool:
    # A probe only guesses the format from the first bytes or the zip directory; when a
    # damaged file makes it fail (zipfile alone raises BadZipFile, NotImplementedError,
    # UnicodeDecodeError...), the format is not claimed and the checkpoint reader, which
    # reports damage with a hint, gets the file.
    try:
        return claims(path)
    except Exception:
        return False


def unreadable(path: Path, error: BaseException) -> ModelLoadError:
    return ModelLoadError(f"cannot read {path.name} as a model: {one_line(error)}",
                          hint=CORRUPT_HINT)


def one_line(error: BaseException) -> str:
    text = str(error)
    # torch's weights-only errors bury the actual cause after paragraphs of advice.
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        text = match.group(1)
    line = first_line(text)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
