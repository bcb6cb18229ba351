"""The inputs a diagnosis runs on, and the model's inputs they fill.

A model takes named inputs (``InputSpec``: name, dtype, shape, kind, range; specs.py
resolves them). A ``Case`` is one set of values for all of them, labelled: the main
random draw, more random draws (``--samples``), a file for the image input (``--input``,
the other inputs drawn to match its size), real data for every input (``--input-data``),
or the random draw at another size of the inputs' dynamic axes (``--check-sizes``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..records import CaseKind, InputKind, InputSpec
from . import photo as photo_
from .readers import from_file, read_npz
from .sampling import as_dtype, random_input, sample, torch_dtype
from .specs import Request, forward_params, resolve

__all__ = ["Case", "InputSpec", "Request", "aligned_other_size", "as_call", "cases",
           "default_check_size", "retries",
           "forward_params", "from_file", "photo_fits", "random_input", "read_npz", "resolve", "sample",
           "torch_dtype", "values_from"]


@dataclass(frozen=True)
class Case:
    label: str  # "random seed 0", "photo.png", "random 49x81"
    values: dict[str, torch.Tensor]  # input name -> values, in forward()'s order
    kind: CaseKind

    @property
    def tensor(self) -> torch.Tensor:
        """The first input's values (the image, for an image model)."""
        return next(iter(self.values.values()))

    @property
    def size(self) -> tuple[int, ...]:
        """The first input's dynamic extent: an image's height and width."""
        return tuple(self.tensor.shape[-2:])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)


def as_call(specs: Sequence[InputSpec], values: Mapping[str, Any]) -> tuple[tuple, dict]:
    """forward()'s positional and keyword arguments for ``values``."""
    args = tuple(values[s.name] for s in specs if not s.keyword)
    kwargs = {s.name: values[s.name] for s in specs if s.keyword}
    return args, kwargs


def values_from(specs: Sequence[InputSpec], given: Any, source: str = "inputs") -> dict[str, torch.Tensor]:
    """User-given tensors (one tensor, a tuple in forward()'s order, or a dict by name) as
    values by input name, checked against ``specs``."""
    if isinstance(given, torch.Tensor):
        given = (given,)
    if isinstance(given, (tuple, list)):
        if len(given) != len(specs):
            raise UsageError(f"{len(given)} input tensor(s) given; the model takes "
                             f"{len(specs)}: {', '.join(s.name for s in specs)}",
                             hint="pass one tensor per input, or a dict by name")
        given = {s.name: v for s, v in zip(specs, given)}
    if not isinstance(given, Mapping):
        raise UsageError(f"{source} must be a tensor, a tuple or a dict of tensors",
                         hint="pass torch tensors or numpy arrays")
    values = {}
    for spec in specs:
        value = given.get(spec.name, given.get(spec.onnx_name) if spec.onnx_name else None)
        if value is None:
            raise UsageError(f"{source}: no value for input '{spec.name}'",
                             hint="give every input: " + ", ".join(s.name for s in specs))
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        values[spec.name] = as_dtype(array, spec, source)
    extra = set(given) - {s.name for s in specs} - {s.onnx_name for s in specs}
    if extra:
        raise UsageError(f"{source}: the model has no input named {', '.join(sorted(extra))}",
                         hint="its inputs: " + ", ".join(s.name for s in specs))
    return values


def default_check_size(height: int, width: int) -> tuple[int, int]:
    """An odd, non-square size near the main one: shapes frozen at export show there."""
    return _odd(height * 0.75), _odd(width * 1.25)


def default_other_size(spec: InputSpec) -> tuple[int, ...] | None:
    """Another extent for ``spec``'s dynamic axes: for an image an odd, non-square size;
    for a sequence an odd length near three quarters of it. None when nothing varies."""
    axes = spec.dynamic_axes
    if not axes:
        return None
    if len(axes) == 2:
        return default_check_size(*(spec.shape[a] for a in axes))
    return tuple(_odd(spec.shape[a] * 0.75) for a in axes)


def aligned_other_size(spec: InputSpec, multiple: int = 16) -> tuple[int, ...] | None:
    """An image size near default_other_size() in multiples of ``multiple``: for a model
    that takes only such sizes (a ViT's patches, LaMa's downsamplings), where the odd one
    fails in PyTorch itself. None when not an image, or no other such size is near."""
    axes = spec.dynamic_axes
    if len(axes) != 2:
        return None
    height, width = (spec.shape[a] for a in axes)
    size = tuple(max(multiple, int(x / multiple + 0.5) * multiple)
                 for x in (height * 0.75, width * 1.25))
    return None if size == (height, width) else size


def retries(specs: Sequence[InputSpec], seed: int, sizes: Sequence[tuple[int, ...]]) -> dict[str, Case]:
    """For each default size case (by label), the case to run instead when PyTorch itself
    fails at it: the same at an aligned size (aligned_other_size)."""
    lead = next((s for s in specs if s.dynamic_axes), None)
    other = aligned_other_size(lead) if lead is not None else None
    if other is None or not sizes:
        return {}
    case = _sized_case(specs, lead, other, seed)
    return {_size_label(size): case for size in sizes}


def _sized_case(specs: Sequence[InputSpec], lead: InputSpec, size: tuple[int, ...],
                seed: int) -> Case:
    """The random input at ``size`` of ``lead``'s free axes."""
    return Case(_size_label(size), draw(_resized(specs, lead, size), seed), CaseKind.SIZE)


def _size_label(size: Sequence[int]) -> str:
    return f"random {'x'.join(map(str, size))}"


def _odd(x: float) -> int:
    n = max(int(round(x)), 3)
    return n if n % 2 else n + 1


def cases(specs: Sequence[InputSpec], seed: int, *, samples: int = 1,
          files: Sequence[str] = (), data: Mapping[str, np.ndarray] | None = None,
          data_label: str = "", sizes: Sequence[tuple[int, ...]] = (),
          given: Mapping[str, torch.Tensor] | None = None, photo: bool = False) -> list[Case]:
    """The main input first (``given`` values, or random), then more random ones, the
    bundled photo (``photo``, for an image model given no real values), files, the
    ``data`` arrays, and other sizes."""
    found = [Case("given inputs", dict(given), CaseKind.GIVEN)] if given else []
    found += [Case(f"random (seed {seed + i})", draw(specs, seed + i), CaseKind.RANDOM)
              for i in range(max(samples, 1) - len(found))]
    main = next((s for s in specs if s.kind == InputKind.IMAGE), None)
    if photo and photo_fits(specs) and not (given or files or data):
        values = draw(specs, seed)
        values[main.name] = photo_.photo(main.shape).to(torch_dtype(main.dtype))
        found.append(Case(photo_.LABEL, values, CaseKind.PHOTO))
    for path in files:
        if main is None:
            raise UsageError(f"--input {Path(path).name}: the model has no image input",
                             hint="give real values for every input with --input-data FILE.npz")
        image = from_file(path, main.shape[1]).to(torch_dtype(main.dtype))
        sized = _resized(specs, main, tuple(image.shape[-2:]))
        values = draw(sized, seed)
        values[main.name] = image
        found.append(Case(Path(path).name, values, CaseKind.FILE))
    if data:
        found.append(Case(data_label or "input data", values_from(specs, data, data_label),
                          CaseKind.DATA))
    lead = next((s for s in specs if s.dynamic_axes), None)
    for size in sizes:
        if lead is None or tuple(size) == tuple(lead.shape[a] for a in lead.dynamic_axes):
            continue
        if len(size) != len(lead.dynamic_axes):
            raise UsageError(f"--check-sizes {','.join(map(str, size))}: input '{lead.name}' "
                             f"varies along {len(lead.dynamic_axes)} axis/axes",
                             hint="give " + ("H,W" if len(lead.dynamic_axes) == 2 else "a length")
                                  + " per size")
        found.append(_sized_case(specs, lead, tuple(size), seed))
    return found


def photo_fits(specs: Sequence[InputSpec]) -> bool:
    """Whether the bundled photo can be an input: the model takes a floating-point image
    of 1, 3 or 4 channels."""
    main = next((s for s in specs if s.kind == InputKind.IMAGE), None)
    return (main is not None and len(main.shape) == 4 and main.shape[1] in photo_.CHANNELS
            and torch_dtype(main.dtype).is_floating_point)


def draw(specs: Sequence[InputSpec], seed: int) -> dict[str, torch.Tensor]:
    return {spec.name: sample(spec, seed, position) for position, spec in enumerate(specs)}


def _resized(specs: Sequence[InputSpec], lead: InputSpec, size: tuple[int, ...]) -> list[InputSpec]:
    """``specs`` with ``lead``'s dynamic axes at ``size``, and every input that varies along
    as many axes (an image's mask, a sequence's attention mask) resized alike."""
    out = []
    along = [lead.shape[a] for a in lead.dynamic_axes]
    for spec in specs:
        # Inputs that follow the lead along those axes (an image's mask) follow it here.
        if len(spec.dynamic_axes) == len(lead.dynamic_axes) \
                and [spec.shape[a] for a in spec.dynamic_axes] == along:
            shape = list(spec.shape)
            for axis, extent in zip(spec.dynamic_axes, size):
                shape[axis] = extent
            spec = replace(spec, shape=tuple(shape))
        out.append(spec)
    return out
