"""The inputs a diagnosis runs on: random tensors, images, .npy files, other sizes.

Each becomes a ``Case``: a labelled input tensor. Random inputs are uniform in [0, 1]
and reproducible from their seed; images are converted to the model's channels and to
[0, 1]; ``.npy`` files are taken as they are (a missing batch dimension is added).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError, first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Case:
    label: str  # "random seed 0", "photo.png", "random 49x81"
    tensor: torch.Tensor
    kind: str  # "random" | "file" | "size"

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.tensor.shape[-2:])  # type: ignore[return-value]


def random_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform values in [0, 1], like an image, reproducible from ``seed``."""
    from .store import available_memory, human_bytes

    need = 4 * math.prod(shape)
    if need > available_memory():
        raise UsageError(f"an input of shape {tuple(shape)} needs {human_bytes(need)}, more "
                         f"than the {human_bytes(available_memory())} of memory available",
                         hint="give a smaller --input-shape")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float32)


def from_file(path: str | Path, channels: int) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"input file not found: {path}", hint="check the --input path")
    if path.suffix.lower() == ".npy":
        return _from_npy(path, channels)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _from_image(path, channels)
    raise UsageError(f"cannot read {path.name} as an input",
                     hint="give a PNG/JPEG/BMP/WebP/TIFF image or a .npy array")


def _from_npy(path: Path, channels: int) -> torch.Tensor:
    array = _read_npy(path)
    if array.dtype.kind not in "biuf":  # strings, objects, complex, dates...
        raise UsageError(f"{path.name} holds {array.dtype} values, not real numbers",
                         hint="save a float array (N,C,H,W) with np.save")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != channels:
        raise UsageError(f"{path.name} has shape {array.shape}; the model wants (N, {channels}, H, W)",
                         hint="save an N,C,H,W (or C,H,W) float array")
    if array.size == 0:
        raise UsageError(f"{path.name} is empty (shape {array.shape})",
                         hint="save an N,C,H,W array with every dimension at least 1")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _read_npy(path: Path) -> np.ndarray:
    """The array in ``path``, after checking that the size its header announces is the
    size of the file: numpy allocates what the header says before reading (a header
    announcing 1x3x100000x100000 asks for 112 GiB)."""
    fmt = np.lib.format
    try:
        with path.open("rb") as file:
            version = fmt.read_magic(file)
            read_header = (fmt.read_array_header_1_0 if version == (1, 0)
                           else fmt.read_array_header_2_0)
            shape, _, dtype = read_header(file)
            data_bytes = path.stat().st_size - file.tell()
        if dtype.hasobject:
            raise ValueError("it holds Python objects, which would need unpickling")
        expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if expected != data_bytes:
            raise ValueError(f"its header announces {shape} {dtype} ({expected} bytes) "
                             f"but it holds {data_bytes} bytes")
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError, TypeError...
        raise UsageError(f"cannot read {path.name} as a .npy array: {first_line(exc)}",
                         hint="save it with np.save; the file may be truncated") from None


def _from_image(path: Path, channels: int) -> torch.Tensor:
    from PIL import Image

    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise UsageError(f"the model takes {channels} channels; images give 1, 3 or 4",
                         hint="pass a .npy array with --input instead")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _DEEP_GREY:
                array = _grey_to(_deep_grey(image), channels)
            else:
                array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    except Exception as exc:  # Pillow: OSError, DecompressionBombError, ValueError, SyntaxError...
        raise UsageError(f"cannot read {path.name} as an image: {first_line(exc)}",
                         hint="check the file (damaged, or too large?), or pass a .npy array") from None
    if array.ndim == 2:
        array = array[..., None]
    # A copy: Pillow's buffer behind a float image is read-only.
    return torch.from_numpy(np.array(array.transpose(2, 0, 1)[None], order="C"))


# Pillow's modes for grey images deeper than 8 bits (16-bit PNG and TIFF, 32-bit TIFF).
# convert("L") clips them at 255, which turns nearly every pixel white.
_DEEP_GREY = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def _deep_grey(image) -> np.ndarray:
    """A 16-bit (or int32 / float) grey image in [0, 1]: 16-bit values over 65535; float
    images are taken as they are (they are usually in [0, 1] already)."""
    array = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        return array
    return array / 65535.0


def _grey_to(grey: np.ndarray, channels: int) -> np.ndarray:
    """Grey (H, W) as H, W, channels: repeated for colour, with an opaque alpha."""
    if channels == 1:
        return grey[..., None]
    planes = [grey] * 3 + ([np.ones_like(grey)] if channels == 4 else [])
    return np.stack(planes, axis=-1)


def default_check_size(height: int, width: int) -> tuple[int, int]:
    """An odd, non-square size near the main one: shapes frozen at export show there."""
    def odd(x: float) -> int:
        n = max(int(round(x)), 3)
        return n if n % 2 else n + 1

    return odd(height * 0.75), odd(width * 1.25)


def cases(shape: tuple[int, ...], seed: int, *, samples: int = 1, files: tuple[str, ...] = (),
          sizes: tuple[tuple[int, int], ...] = ()) -> list[Case]:
    """The main random input first, then more random ones, files, and other sizes."""
    found = [Case(f"random (seed {seed + i})", random_input(shape, seed + i), "random")
             for i in range(max(samples, 1))]
    found += [Case(Path(f).name, from_file(f, shape[1]), "file") for f in files]
    for height, width in sizes:
        if (height, width) != tuple(shape[-2:]):
            found.append(Case(f"random {height}x{width}",
                              random_input((shape[0], shape[1], height, width), seed), "size"))
    return found
