"""``torch.save`` checkpoints: a state dict, a training checkpoint, or a whole module.

Unpickling can run arbitrary code, so these files are read with torch's weights-only
unpickler (tensors, plain containers and numbers) and a file that needs more is refused
unless the user trusts it, naming the class or function it would import.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import torch

from ..errors import ModelLoadError, UntrustedPickleError
from ..records import LoadedModel, ModelKind
from . import spandrel
from .common import DEFAULT_INPUT_CHANNELS, first_layer_in_channels, one_line, unreadable

TRUST_HINT = ("unpickling runs code from the file: pass --trust-pickle only if you trust its "
              "source, or save model.state_dict() or a TorchScript archive instead")


def load(path: Path, trust_pickle: bool) -> LoadedModel:
    content = unpickle(path, trust_pickle)
    if isinstance(content, torch.nn.Module):
        return LoadedModel(
            module=content,
            path=path,
            kind=ModelKind.PICKLE,
            architecture=type(content).__name__,
            input_channels=first_layer_in_channels(content) or DEFAULT_INPUT_CHANNELS,
        )
    if not isinstance(content, dict):
        raise ModelLoadError(
            f"{path} holds a {type(content).__name__}, not a model or a state dict",
            hint="save the model's state_dict(), or a TorchScript archive with torch.jit.save",
        )
    return spandrel.from_state_dict(path, content)


def unpickle(path: Path, trust_pickle: bool, *, refusal: str = "without --trust-pickle",
             hint: str = TRUST_HINT) -> object:
    """The object in ``path``; an UntrustedPickleError ("refusing to unpickle it
    <refusal>", ``hint``) when it needs more than tensors and ``trust_pickle`` is off."""
    # weights_only=True is torch's restricted unpickler: tensors, plain containers and
    # numbers only, so it cannot run code. spandrel's own loader is safe as well, but
    # its allowlist is narrower and it picks formats by extension.
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        # torch names the global it refused; for a plain pickle (pickle.dump, not
        # torch.save) its restricted reader may stop earlier, at an opcode it does not
        # support, so the file's own first global is looked up.
        needed = _forbidden_global(error) or _first_global(path)
        if needed is None:
            raise unreadable(path, error) from None
        raise UntrustedPickleError(
            f"{path.name} is a pickled Python object (it needs {needed}); "
            f"refusing to unpickle it {refusal}",
            hint=hint,
        ) from None
    except (ImportError, AttributeError) as error:
        # Only reachable when trusted: the pickle names a class we cannot import.
        raise ModelLoadError(
            f"cannot unpickle {path.name}: {one_line(error)}",
            hint="run layerdiff where the model's code is importable (PYTHONPATH), "
            "or save model.state_dict() or a TorchScript archive instead",
        ) from None
    except Exception as error:  # truncated zips, bad magic numbers, EOF...
        raise unreadable(path, error) from None


def _first_global(path: Path, limit: int = 1 << 22) -> str | None:
    """The first class or function a plain pickle file imports ("posix.system"), read
    with pickletools (which runs nothing) from its first ``limit`` bytes."""
    if zipfile.is_zipfile(path):
        return None
    with path.open("rb") as file:
        head = file.read(limit)
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(head):
            if opcode.name in ("GLOBAL", "INST"):
                return str(arg).replace(" ", ".")
            if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            if isinstance(arg, str) and "UNICODE" in opcode.name:
                strings.append(arg)
    except Exception:  # damaged, or cut at ``limit``: nothing more to learn
        pass
    return None


def _forbidden_global(error: pickle.UnpicklingError) -> str | None:
    """The class or function that torch's weights-only unpickler refused, if that is why."""
    # "Unsupported global: GLOBAL pkg.Class was not an allowed global" for classes,
    # "unsupported GLOBAL posix.mkdir whose module posix is blocked" for functions.
    match = re.search(r"\bGLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else None
