"""Turn a model (a file, a Python entry point, or a module in memory) into a LoadedModel.

One loader per kind, each in its own file: ``torchscript`` archives, ``safetensors``
files and ``checkpoint`` (torch.save) files are recognised by content, not by extension,
and their state dicts go to ``spandrel``, which recognises the architecture;
``entry_point`` imports the user's Python code (``file.py:NAME``, ``package.module:NAME``),
into whose module ``weights`` loads a state dict (--weights).

The loaders import torch; this file imports them where they are used, so that the command
line can read entry points (output names, input files) before torch is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, UsageError
from ..records import LoadedModel, ModelKind
from .common import DEFAULT_INPUT_CHANNELS, claimed, first_layer_in_channels, unreadable
from .entry_point import EntryPoint, parse as parse_entry_point

__all__ = ["EntryPoint", "from_module", "load_model", "model_file", "output_stem",
           "parse_entry_point"]


def load_model(source: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Load the model ``source`` names, on the CPU: a model file, or a Python entry point
    (``file.py:NAME``, ``package.module:NAME``) into which ``weights`` (a state dict
    file) is loaded when given.

    Unpickling can run arbitrary code, so a file that is more than tensors and plain
    containers (a whole pickled ``nn.Module``) is refused unless ``trust_pickle``;
    ``weights`` are always read as tensors only. An entry point runs the user's code.
    """
    entry = parse_entry_point(source)
    if entry is not None:
        return _load_entry_point(entry, weights)
    path = Path(source)
    if weights is not None:
        raise UsageError(f"--weights goes with a Python entry point, and {path.name} is a "
                         "model file",
                         hint="give MODEL as file.py:NAME or package.module:NAME to load "
                         "--weights into, or drop --weights")
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
        kind=ModelKind.MODULE,
        architecture=name or type(module).__name__,
        input_channels=input_channels,
        notes=notes,
    )


def output_stem(source: object) -> str:
    """What a run's output files are named after: an entry point's NAME, else the
    model file's stem."""
    entry = parse_entry_point(source)
    return entry.stem if entry is not None else Path(os.fspath(source)).stem


def model_file(source: object) -> object:
    """The file a MODEL argument reads: an entry point's .py file (None for a module on
    sys.path), or the path itself."""
    entry = parse_entry_point(source)
    return source if entry is None else entry.file


def _load_entry_point(entry: EntryPoint, weights: str | os.PathLike[str] | None) -> LoadedModel:
    from dataclasses import replace

    from . import entry_point
    from .weights import load_into

    loaded = entry_point.load(entry)
    if weights is None:
        return loaded
    notes = load_into(loaded.module, weights)
    return replace(loaded, notes=loaded.notes + notes)


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
