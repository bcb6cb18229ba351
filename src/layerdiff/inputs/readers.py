"""Inputs read from files: images, ``.npy`` arrays (``--input``) and ``.npz`` archives of
named arrays (``--input-data``).

Images are converted to the model's channels and to [0, 1]; ``.npy`` files are taken as
they are (a missing batch dimension is added). No reader unpickles: an array of Python
objects is refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError, first_line
from ..store import available_memory, human_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


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


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The named arrays of an ``np.savez`` archive, each checked as a .npy file is (no
    pickles, a header that matches the data) before numpy allocates it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"input data file not found: {path}", hint="check the --input-data path")
    fmt = np.lib.format
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                name = member.filename.removesuffix(".npy")
                with archive.open(member) as file:
                    version = fmt.read_magic(file)
                    read_header = (fmt.read_array_header_1_0 if version == (1, 0)
                                   else fmt.read_array_header_2_0)
                    shape, fortran, dtype = read_header(file)
                    if dtype.hasobject:
                        raise ValueError(f"'{name}' holds Python objects, which would need "
                                         "unpickling")
                    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    # The archive's own size of the member bounds what is read: a header
                    # announcing TBs allocates nothing.
                    if expected > member.file_size:
                        raise ValueError(f"the header of '{name}' announces {shape} {dtype}, "
                                         f"more than the {member.file_size} bytes it holds")
                    if expected > available_memory():
                        raise ValueError(f"'{name}' needs {human_bytes(expected)}, more than "
                                         "the memory available")
                    data = file.read(expected + 1)
                if len(data) != expected:
                    raise ValueError(f"the header of '{name}' announces {shape} {dtype} "
                                     f"({expected} bytes) but it holds {len(data)} bytes")
                array = np.frombuffer(data, dtype=dtype)
                arrays[name] = array.reshape(shape, order="F" if fortran else "C").copy()
    except UsageError:
        raise
    except Exception as exc:  # zipfile, numpy: BadZipFile, ValueError, EOFError, OSError...
        raise UsageError(f"cannot read {path.name} as an .npz archive: {first_line(exc)}",
                         hint="save the inputs with np.savez(FILE, name=array, ...)") from None
    if not arrays:
        raise UsageError(f"{path.name} holds no arrays",
                         hint="save the inputs with np.savez(FILE, name=array, ...)")
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise UsageError(f"{path.name}: '{name}' holds {array.dtype} values, not numbers",
                             hint="save numeric arrays (float, int or bool)")
    return arrays
