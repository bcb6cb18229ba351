"""--weights: a state dict loaded, strictly, into the module an entry point builds.

The file is read as tensors only (safetensors, or torch's weights-only unpickler): a
pickle that needs anything more is refused, never run, whatever --trust-pickle says.
"""

from __future__ import annotations

from pathlib import Path

import spandrel
import torch

from ..errors import ModelLoadError, UntrustedPickleError
from . import checkpoint, safetensors
from .common import claimed, one_line
from .spandrel import strip_shared_prefix

FIT_HINT = ("the weights were saved from another architecture or configuration: check that "
            "the entry point builds the model they come from")


def load_into(module: torch.nn.Module, path: str | Path) -> tuple[str, ...]:
    """Load the state dict in ``path`` into ``module`` (strict); notes on what was done."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}" if not path.exists()
                             else f"--weights {path} is not a file",
                             hint="give the path of a state dict (.pth, .pt, .safetensors)")
    state_dict = spandrel.canonicalize_state_dict(_read(path))
    expected = module.state_dict()
    variants = [(state_dict, ())]
    stripped = strip_shared_prefix(state_dict)
    if stripped is not None:
        variants.append(stripped)
    # The variant whose names fit best: a Lightning "model." prefix is stripped only
    # when that is what makes the names fit.
    state_dict, notes = min(variants, key=lambda v: len(set(v[0]) ^ set(expected)))
    _check_fit(path, module, state_dict, expected)
    try:
        module.load_state_dict(state_dict, strict=True)
    except Exception as error:  # what the checks above did not foresee
        raise ModelLoadError(f"cannot load {path.name} into {type(module).__name__}: "
                             f"{one_line(error)}", hint=FIT_HINT) from None
    return (f"weights loaded from {path.name}", *notes)


def _read(path: Path) -> dict:
    if claimed(safetensors.claims, path):
        content: object = safetensors.read(path)
    else:
        try:
            content = checkpoint.unpickle(
                path, trust_pickle=False, refusal="as --weights (tensors only)",
                hint="save the weights only: torch.save(model.state_dict(), path), "
                "or a safetensors file")
        except UntrustedPickleError as error:
            raise ModelLoadError(error.message, hint=error.hint) from None
    if not isinstance(content, dict):
        raise ModelLoadError(f"{path.name} holds a {type(content).__name__}, not a state dict",
                             hint="save model.state_dict() with torch.save or safetensors")
    return content


def _check_fit(path: Path, module: torch.nn.Module, state_dict: dict, expected: dict) -> None:
    target = type(module).__name__
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        parts = [f"{len(keys)} {what} ({_first(keys)})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ModelLoadError(f"the weights in {path.name} do not fit {target}: "
                             + ", ".join(parts), hint=FIT_HINT)
    wrong = [key for key, value in state_dict.items()
             if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape]
    if wrong:
        key = wrong[0]
        value = state_dict[key]
        given = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        others = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ModelLoadError(f"the weights in {path.name} do not fit {target}: {key} is "
                             f"{given} in the file, {tuple(expected[key].shape)} in the "
                             f"module{others}", hint=FIT_HINT)


def _first(keys: list[str], count: int = 3) -> str:
    shown = ", ".join(keys[:count])
    return shown + ", ..." if len(keys) > count else shown
