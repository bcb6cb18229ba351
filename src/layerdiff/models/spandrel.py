"""State dicts handed to spandrel, which recognises the architecture and builds the module,
and what its descriptor tells of the inputs: an image, or an image and a mask
(inpainting), at a size the architecture takes."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import spandrel
import torch

from ..errors import ModelLoadError
from ..records import InputKind, InputSpec, LoadedModel, ModelKind
from .common import one_line

# The size an image input gets when the architecture takes any (adjusted to its
# size_requirements): small enough to diagnose in seconds, large enough for a few
# downsamplings.
DEFAULT_SIZE = 64

# Architectures that take one size only, which spandrel's size_requirements cannot say
# (it gives GFPGAN a minimum): GFPGAN's encoder ends in a Linear over its flattened 4x4
# feature map, which only a 512x512 face fills.
FIXED_SIZES = {"GFPGAN": 512}


def from_state_dict(path: Path, raw: dict) -> LoadedModel:
    # canonicalize unwraps training checkpoints ("state_dict", "params_ema", "params",
    # "model", ...) and strips the "module." prefix DataParallel adds.
    state_dict = spandrel.canonicalize_state_dict(raw)
    descriptor, notes = _recognise(path, state_dict)
    descriptor.eval()
    return LoadedModel(
        module=descriptor.model,
        path=path,
        kind=ModelKind.SPANDREL,
        architecture=descriptor.architecture.name,
        input_channels=descriptor.input_channels,
        output_channels=descriptor.output_channels,
        scale=getattr(descriptor, "scale", None),  # inpainting descriptors have none
        notes=notes,
        inputs=input_specs(descriptor),
        outputs=1,  # a descriptor returns one image (GFPGAN's module also its RGB pyramid)
    )


def input_specs(descriptor: spandrel.ModelDescriptor) -> tuple[InputSpec, ...]:
    """The inputs ``descriptor.model`` takes, by forward()'s parameter names.

    layerdiff runs ``descriptor.model`` itself, not the descriptor's ``__call__`` (which
    pads to the size requirements and may normalise or pick one of several outputs), so
    the sizes given here already meet the requirements. An inpainting model's forward
    takes (image, mask), the mask one channel of 0 (keep) and 1 (fill).
    """
    fixed = FIXED_SIZES.get(descriptor.architecture.id)
    if fixed is not None:
        height = width = fixed
        dynamic: tuple[int, ...] = ()
    else:
        pad_width, pad_height = descriptor.size_requirements.get_padding(DEFAULT_SIZE,
                                                                         DEFAULT_SIZE)
        height, width = DEFAULT_SIZE + pad_height, DEFAULT_SIZE + pad_width
        dynamic = (2, 3)
    names = _positional_names(descriptor.model)
    image = InputSpec(name=names[0] if names else "image", dtype="float32",
                      shape=(1, descriptor.input_channels, height, width),
                      kind=InputKind.IMAGE, dynamic_axes=dynamic)
    if not isinstance(descriptor, spandrel.MaskedImageModelDescriptor):
        return (image,)
    mask = InputSpec(name=names[1] if len(names) > 1 else "mask", dtype="float32",
                     shape=(1, 1, height, width), kind=InputKind.MASK, dynamic_axes=dynamic)
    return image, mask


def _positional_names(module: torch.nn.Module) -> list[str]:
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a signature (a builtin)
        return []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in positional]


def _recognise(path: Path, state_dict: dict) -> tuple[spandrel.ModelDescriptor, tuple[str, ...]]:
    for candidate, notes in _key_variants(state_dict):
        try:
            return spandrel.ModelLoader(device="cpu").load_from_state_dict(candidate), notes
        except spandrel.UnsupportedModelError:
            continue
        except Exception as error:  # an architecture's loader choking on odd weights
            raise ModelLoadError(
                f"spandrel could not build a model from {path.name}: {one_line(error)}",
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
    stripped = strip_shared_prefix(state_dict)
    if stripped is not None:
        yield stripped


def strip_shared_prefix(state_dict: dict) -> tuple[dict, tuple[str, ...]] | None:
    """The state dict without the first dotted part, when every key has that same
    part, with a note saying so; None otherwise."""
    keys = [key for key in state_dict if isinstance(key, str)]
    if not keys or len(keys) != len(state_dict) or "." not in keys[0]:
        return None
    prefix = keys[0].split(".", 1)[0] + "."
    if not all(key.startswith(prefix) for key in keys):
        return None
    stripped = {key.removeprefix(prefix): value for key, value in state_dict.items()}
    return stripped, (f"removed the prefix '{prefix}' shared by every weight name",)


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
