"""safetensors files: tensors only, so nothing in them can run; handed to spandrel."""

from __future__ import annotations

import struct
from pathlib import Path

from safetensors.torch import load_file

from ..records import LoadedModel
from . import spandrel
from .common import unreadable


def claims(path: Path) -> bool:
    # The format starts with the JSON header's length (u64, little-endian), then "{".
    if path.suffix.lower() == ".safetensors":
        return True
    with path.open("rb") as file:
        head = file.read(9)
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and header_length <= path.stat().st_size - 8


def read(path: Path) -> dict:
    """The file's tensors by name, on the CPU."""
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError, and OSError
        raise unreadable(path, error) from None


def load(path: Path, trust_pickle: bool) -> LoadedModel:
    return spandrel.from_state_dict(path, read(path))
