"""Turn a model file (or a module already in memory) into a LoadedModel.

This module owns recognising what a model file holds -- a TorchScript archive, a
safetensors file, or a ``torch.save`` checkpoint -- deciding whether it is safe to
unpickle, and handing state dicts to spandrel, which recognises the architecture and
builds the module. Formats are recognised by content, not by extension.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import spandrel
import torch
from safetensors.torch import load_file as load_safetensors_file

from .errors import ModelLoadError, UntrustedPickleError, first_line
from .records import LoadedModel

# Image models take RGB unless something in the model says otherwise.
DEFAULT_INPUT_CHANNELS = 3

CORRUPT_HINT = "the file may be truncated or corrupt, or not a PyTorch model; check the file"


def load_model(path: str | Path, *, trust_pickle: bool = False) -> LoadedModel:
    """Load the model in ``path`` on the CPU.

    Unpickling can run arbitrary code, so a file that is more than tensors and plain
    containers (a whole pickled ``nn.Module``) is refused unless ``trust_pickle``.
    """
    path = Path(path)
    _check_openable(path)
    if path.suffix.lower() == ".onnx":  # the arguments swapped: a common slip
        raise ModelLoadError(f"{path.name} is an ONNX file; MODEL is the PyTorch model",
                             hint=f"run: layerdiff report MODEL.pth --onnx {path}")
    load = next((load for claims, load in _FORMATS if _claims(claims, path)), _load_checkpoint)
    try:
        return load(path, trust_pickle)
    except ModelLoadError:
        raise
    except Exception as error:
        # A damaged file can fail anywhere in torch's, safetensors' or spandrel's readers,
        # each with its own exception types; every such failure is the file's fault.
        raise _unreadable(path, error) from None


def from_module(
    module: torch.nn.Module, *, input_channels: int | None = None, name: str | None = None
) -> LoadedModel:
    """Wrap an in-memory module, leaving its train/eval mode as the caller set it."""
    notes: tuple[str, ...] = ()
    if input_channels is None:
        input_channels = _first_layer_in_channels(module)
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


# --------------------------------------------------------------------------- formats


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


def _claims(claims: Callable[[Path], bool], path: Path) -> bool:
    # A probe only guesses the format from the first bytes or the zip directory; when a
    # damaged file makes it fail (zipfile alone raises BadZipFile, NotImplementedError,
    # UnicodeDecodeError...), the format is not claimed and the checkpoint reader, which
    # reports damage with a hint, gets the file.
    try:
        return claims(path)
    except Exception:
        return False


def _is_torchscript(path: Path) -> bool:
    # A torch.save checkpoint is a zip too; only TorchScript archives carry code.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in name or name.endswith("/constants.pkl") for name in names)


def _load_torchscript(path: Path, trust_pickle: bool) -> LoadedModel:
    # TorchScript archives hold code as TorchScript, not as pickled Python objects, so
    # loading one does not need --trust-pickle.
    _check_archive(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch raises assorted types for damaged archives
        raise _unreadable(path, error) from None
    module.eval()
    return LoadedModel(
        module=module,
        path=path,
        kind="torchscript",
        architecture=module.original_name,
        input_channels=_first_weight_in_channels(module) or DEFAULT_INPUT_CHANNELS,
    )


def _check_archive(path: Path) -> None:
    """Refuse a damaged TorchScript archive before torch reads it.

    torch.jit.load checks neither CRCs nor the pickles' own lengths: a few flipped bits
    in a 16 KB archive made it allocate 19 GB and run for minutes. Every member but the
    tensor storages (their damage only changes weights) is read through zipfile, which
    checks its CRC and decompression, and each pickle is walked by pickletools, which
    checks opcodes and lengths without building anything.
    """
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename or info.is_dir():
                continue
            try:
                content = archive.read(info)
                if info.filename.endswith(("pkl", "debug_pkl")):
                    for _ in pickletools.genops(content):
                        pass
            except Exception as error:
                raise ModelLoadError(
                    f"{path.name} is a damaged TorchScript archive ({info.filename}: "
                    f"{_one_line(error)})",
                    hint=CORRUPT_HINT,
                ) from None


def _is_safetensors(path: Path) -> bool:
    # The format starts with the JSON header's length (u64, little-endian), then "{".
    if path.suffix.lower() == ".safetensors":
        return True
    with path.open("rb") as file:
        head = file.read(9)
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and header_length <= path.stat().st_size - 8


def _load_safetensors(path: Path, trust_pickle: bool) -> LoadedModel:
    try:
        state_dict = load_safetensors_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError, and OSError
        raise _unreadable(path, error) from None
    return _from_state_dict(path, state_dict)


def _load_checkpoint(path: Path, trust_pickle: bool) -> LoadedModel:
    """A ``torch.save`` file: a state dict, a training checkpoint, or a whole module."""
    content = _unpickle(path, trust_pickle)
    if isinstance(content, torch.nn.Module):
        return LoadedModel(
            module=content,
            path=path,
            kind="pickle",
            architecture=type(content).__name__,
            input_channels=_first_layer_in_channels(content) or DEFAULT_INPUT_CHANNELS,
        )
    if not isinstance(content, dict):
        raise ModelLoadError(
            f"{path} holds a {type(content).__name__}, not a model or a state dict",
            hint="save the model's state_dict(), or a TorchScript archive with torch.jit.save",
        )
    return _from_state_dict(path, content)


# Tried in order; a file none of them claims is read as a torch.save checkpoint.
_FORMATS: tuple[tuple[Callable[[Path], bool], Callable[[Path, bool], LoadedModel]], ...] = (
    (_is_torchscript, _load_torchscript),
    (_is_safetensors, _load_safetensors),
)


# --------------------------------------------------------------------------- unpickling


def _unpickle(path: Path, trust_pickle: bool) -> object:
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
            raise _unreadable(path, error) from None
        raise UntrustedPickleError(
            f"{path.name} is a pickled Python object (it needs {needed}); "
            "refusing to unpickle it without --trust-pickle",
            hint="unpickling runs code from the file: pass --trust-pickle only if you trust "
            "its source, or save model.state_dict() or a TorchScript archive instead",
        ) from None
    except (ImportError, AttributeError) as error:
        # Only reachable when trusted: the pickle names a class we cannot import.
        raise ModelLoadError(
            f"cannot unpickle {path.name}: {_one_line(error)}",
            hint="run layerdiff where the model's code is importable (PYTHONPATH), "
            "or save model.state_dict() or a TorchScript archive instead",
        ) from None
    except Exception as error:  # truncated zips, bad magic numbers, EOF...
        raise _unreadable(path, error) from None


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


# --------------------------------------------------------------------------- state dicts


def _from_state_dict(path: Path, raw: dict) -> LoadedModel:
    # canonicalize unwraps training checkpoints ("state_dict", "params_ema", "params",
    # "model", ...) and strips the "module." prefix DataParallel adds.
    state_dict = spandrel.canonicalize_state_dict(raw)
    descriptor, notes = _recognise(path, state_dict)
    descriptor.eval()
    return LoadedModel(
        module=descriptor.model,
        path=path,
        kind="spandrel",
        architecture=descriptor.architecture.name,
        input_channels=descriptor.input_channels,
        output_channels=descriptor.output_channels,
        scale=getattr(descriptor, "scale", None),  # inpainting descriptors have none
        notes=notes,
    )


def _recognise(path: Path, state_dict: dict) -> tuple[spandrel.ModelDescriptor, tuple[str, ...]]:
    for candidate, notes in _key_variants(state_dict):
        try:
            return spandrel.ModelLoader(device="cpu").load_from_state_dict(candidate), notes
        except spandrel.UnsupportedModelError:
            continue
        except Exception as error:  # an architecture's loader choking on odd weights
            raise ModelLoadError(
                f"spandrel could not build a model from {path.name}: {_one_line(error)}",
                hint="the weights may be incomplete or from a modified architecture; "
                "export the model yourself and pass --onnx",
            ) from None
    raise _unknown_architecture(path, state_dict)


def _key_variants(state_dict: dict) -> Iterator[tuple[dict, tuple[str, ...]]]:
    """The state dict as saved, then without a prefix every key shares.

    Lightning and similar wrappers store the network under an attribute name
    ("model.", "net_g.", "generator.") that spandrel does not know to strip.
    """
    yield state_dict, ()
    prefix = _shared_prefix(state_dict)
    if prefix is not None:
        stripped = {key.removeprefix(prefix): value for key, value in state_dict.items()}
        yield stripped, (f"removed the prefix '{prefix}' shared by every weight name",)


def _shared_prefix(state_dict: dict) -> str | None:
    keys = [key for key in state_dict if isinstance(key, str)]
    if not keys or len(keys) != len(state_dict) or "." not in keys[0]:
        return None
    prefix = keys[0].split(".", 1)[0] + "."
    return prefix if all(key.startswith(prefix) for key in keys) else None


def _unknown_architecture(path: Path, state_dict: dict) -> ModelLoadError:
    tensors = sum(isinstance(value, torch.Tensor) for value in state_dict.values())
    first_keys = ", ".join(str(key) for key in list(state_dict)[:3]) or "none"
    detail = f"{tensors} tensor{'' if tensors == 1 else 's'}, first keys: {first_keys}"
    return ModelLoadError(
        f"spandrel does not recognise the architecture of {path.name} ({detail})",
        hint="check that the file holds a supported image model's weights; otherwise save it "
        "as TorchScript (torch.jit.save) or a whole pickled model (with --trust-pickle), "
        "or export it yourself and pass --onnx",
    )


# --------------------------------------------------------------------------- helpers


def _first_layer_in_channels(module: torch.nn.Module) -> int | None:
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.conv._ConvNd):
            return layer.in_channels
        if isinstance(layer, torch.nn.Linear):
            return layer.in_features
    return None


def _first_weight_in_channels(module: torch.nn.Module) -> int | None:
    # TorchScript hides layer types, but a conv weight is (out, in, kh, kw).
    for tensor in module.state_dict().values():
        if tensor.dim() == 4:
            return tensor.shape[1]
    return None


def _unreadable(path: Path, error: BaseException) -> ModelLoadError:
    return ModelLoadError(f"cannot read {path.name} as a model: {_one_line(error)}",
                          hint=CORRUPT_HINT)


def _one_line(error: BaseException) -> str:
    text = str(error)
    # torch's weights-only errors bury the actual cause after paragraphs of advice.
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        text = match.group(1)
    line = first_line(text)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
