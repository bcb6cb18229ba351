"""TorchScript archives (torch.jit.save): checked for damage, then loaded by torch.

TorchScript archives hold code as TorchScript, not as pickled Python objects, so loading
one does not need --trust-pickle.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..records import LoadedModel, ModelKind
from .common import CORRUPT_HINT, DEFAULT_INPUT_CHANNELS, first_weight_in_channels, one_line
from .common import unreadable


def claims(path: Path) -> bool:
    # A torch.save checkpoint is a zip too; only TorchScript archives carry code.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in name or name.endswith("/constants.pkl") for name in names)


def load(path: Path, trust_pickle: bool) -> LoadedModel:
    check_archive(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch raises assorted types for damaged archives
        raise unreadable(path, error) from None
    module.eval()
    return LoadedModel(
        module=module,
        path=path,
        kind=ModelKind.TORCHSCRIPT,
        architecture=module.original_name,
        input_channels=first_weight_in_channels(module) or DEFAULT_INPUT_CHANNELS,
    )


def check_archive(path: Path) -> None:
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
                    f"{one_line(error)})",
                    hint=CORRUPT_HINT,
                ) from None
