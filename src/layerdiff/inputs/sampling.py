"""Random values for an input, by its kind, reproducible from a seed.

An image is uniform in [0, 1) (as before: the first input of seed S is the tensor earlier
versions drew); an inpainting mask is a real mask, 1 inside a few rectangles and 0
elsewhere (a uniform [0, 1) "mask" is no mask any model was trained on); token ids and
other integers are uniform in their half-open range [low, high), as ``torch.randint``
draws them; an attention mask is all ones (every position attended); a constant input
(forward()'s default for an extra ONNX input) is that value.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UsageError
from ..records import InputKind, InputSpec

# Torch dtypes of the numpy names InputSpec.dtype holds.
TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}


def random_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform values in [0, 1], like an image, reproducible from ``seed``."""
    _check_fits(shape, 4)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float32)


def sample(spec: InputSpec, seed: int, position: int = 0) -> torch.Tensor:
    """Values for ``spec`` at its shape. ``position`` (the input's place among the model's
    inputs) keeps two inputs of one seed from drawing the same numbers."""
    dtype = torch_dtype(spec.dtype)
    shape = tuple(spec.shape)
    _check_fits(shape, max(torch.empty((), dtype=dtype).element_size(), 4))
    generator = torch.Generator().manual_seed(seed + 7919 * position)
    if spec.fill is not None:
        return torch.full(shape, spec.fill, dtype=dtype)
    if spec.kind == InputKind.ATTENTION_MASK and spec.low is None:
        return torch.ones(shape, dtype=dtype)
    if spec.kind == InputKind.MASK and spec.low is None:
        return _rectangles(shape, generator).to(dtype)
    low, high = value_range(spec)
    if dtype.is_floating_point:
        values = torch.rand(shape, generator=generator, dtype=torch.float32)
        return (low + (high - low) * values).to(dtype) if (low, high) != (0.0, 1.0) \
            else values.to(dtype)
    return torch.randint(int(low), int(high), shape, generator=generator,
                         dtype=torch.int64).to(dtype)


def value_range(spec: InputSpec) -> tuple[float, float]:
    """The half-open range [low, high) values of ``spec`` are drawn from."""
    if spec.low is not None and spec.high is not None:
        return spec.low, spec.high
    if spec.dtype == "bool":
        return 0, 2
    if spec.dtype.startswith(("int", "uint")):
        raise UsageError(f"input '{spec.name}' holds integers and layerdiff cannot tell "
                         "their range",
                         hint=f"give it: --input-range {spec.name}:LOW,HIGH (values drawn "
                              "from [LOW, HIGH), e.g. a vocabulary's 0,30522)")
    return 0.0, 1.0


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise UsageError(f"inputs of type {name} are not supported",
                         hint="supported: " + ", ".join(TORCH_DTYPES)) from None


def _rectangles(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """1 inside one to three rectangles per image (each an eighth to a half of each side),
    0 elsewhere, over the last two axes."""
    mask = torch.zeros(shape, dtype=torch.float32)
    if len(shape) < 2:
        return mask
    height, width = shape[-2:]
    flat = mask.reshape(-1, height, width)
    for plane in flat:
        count = int(torch.randint(1, 4, (), generator=generator))
        for _ in range(count):
            h = _between(max(height // 8, 1), max(height // 2, 1), generator)
            w = _between(max(width // 8, 1), max(width // 2, 1), generator)
            top = _between(0, height - h, generator)
            left = _between(0, width - w, generator)
            plane[top:top + h, left:left + w] = 1.0
    return mask


def _between(low: int, high: int, generator: torch.Generator) -> int:
    """An integer in [low, high] (inclusive)."""
    return low + int(torch.randint(0, high - low + 1, (), generator=generator))


def _check_fits(shape: tuple[int, ...], item_bytes: int) -> None:
    from ..store import available_memory, human_bytes

    need = item_bytes * math.prod(shape)
    if need > available_memory():
        raise UsageError(f"an input of shape {tuple(shape)} needs {human_bytes(need)}, more "
                         f"than the {human_bytes(available_memory())} of memory available",
                         hint="give a smaller --input-shape")


def as_dtype(array: np.ndarray, spec: InputSpec, source: str) -> torch.Tensor:
    """``array`` (from a file) as ``spec``'s dtype: floats stay floats and integers
    integers; an integer input given fractional values is refused rather than truncated."""
    dtype = torch_dtype(spec.dtype)
    if not dtype.is_floating_point and array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise UsageError(f"{source}: input '{spec.name}' takes {spec.dtype} but the array "
                             "holds fractional values",
                             hint=f"save '{spec.name}' as an integer array")
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
