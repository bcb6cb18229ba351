"""Untrusted pickles never run: a payload that creates a marker file, in every container
layerdiff opens, through the real command line.

Each case first proves that its file really carries a payload that runs when the file
is unpickled the unsafe way (so the test can fail), then runs ``layerdiff report`` on it
without ``--trust-pickle``: the marker must not appear, and the run either refuses the
file (exit 2, one line, a hint naming --trust-pickle when a pickle was refused) or loads
what is safe to load. With ``--trust-pickle``, a pickled payload does run: the marker
works, and the option means what it says.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact

from layerdiff.cli import main

QUICK = ["--check-sizes", "none", "--reference", "none", "--input-shape", "1,3,16,16"]


class Payload:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class PathPayload(Payload):
    """The same through pathlib: ``Path(MARKER).touch()``, no shell."""

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Compact(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=2).eval()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(tiny_model(), (torch.rand(1, 3, 8, 8),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"],
                          dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}})
    return path


# --------------------------------------------------------------------------- carriers
# Each writes a file carrying a payload for ``marker`` and returns a function that
# reaches the payload the unsafe way (pickle.loads / torch.load(weights_only=False)).


def _unsafe_torch_load(path: Path) -> Callable[[], object]:
    return lambda: torch.load(path, weights_only=False)


def raw_pickle(path: Path, marker: Path):
    with path.open("wb") as file:
        pickle.dump(Payload(marker), file)
    return lambda: pickle.loads(path.read_bytes())


def zip_torch_save(path: Path, marker: Path):
    torch.save(PathPayload(marker), path)
    return _unsafe_torch_load(path)


def legacy_torch_save(path: Path, marker: Path):
    torch.save(Payload(marker), path, _use_new_zipfile_serialization=False)
    return _unsafe_torch_load(path)


def in_state_dict(path: Path, marker: Path):
    state = dict(tiny_model().state_dict())
    state["body.0.extra"] = Payload(marker)
    torch.save(state, path)
    return _unsafe_torch_load(path)


def lightning_checkpoint(path: Path, marker: Path):
    state = {f"model.{k}": v for k, v in tiny_model().state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": Payload(marker), "epoch": 1}, path)
    return _unsafe_torch_load(path)


def _torchscript(path: Path, **extra) -> None:
    traced = torch.jit.trace(tiny_model(), torch.rand(1, 3, 8, 8))
    torch.jit.save(traced, str(path), **extra)


def _replace_member(path: Path, suffix: str, content: bytes) -> str:
    """Rewrite the zip at ``path`` with the member ending in ``suffix`` replaced."""
    source = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    name = next(i.filename for i in source.infolist() if i.filename.endswith(suffix))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, content if info.filename == name else source.read(info))
    return name


def _member_loader(path: Path, name: str):
    return lambda: pickle.loads(zipfile.ZipFile(path).read(name))


def torchscript_data_pkl(path: Path, marker: Path):
    _torchscript(path)
    name = _replace_member(path, "/data.pkl", pickle.dumps(Payload(marker), protocol=2))
    return _member_loader(path, name)


def torchscript_constants_pkl(path: Path, marker: Path):
    _torchscript(path)
    name = _replace_member(path, "/constants.pkl", pickle.dumps(Payload(marker), protocol=2))
    return _member_loader(path, name)


def torchscript_extra_file(path: Path, marker: Path):
    # A normal archive with a payload as an extra file: nothing ever unpickles it.
    _torchscript(path, _extra_files={"evil.pkl": pickle.dumps(Payload(marker))})
    name = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("evil.pkl"))
    return _member_loader(path, name)


def torch_save_dressed_as_torchscript(path: Path, marker: Path):
    # A torch.save zip with a code/ member, so that it is taken for TorchScript.
    torch.save(PathPayload(marker), path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{path.stem}/code/__torch__/evil.py", "")
    return _unsafe_torch_load(path)


def safetensors_metadata(path: Path, marker: Path):
    payload = base64.b64encode(pickle.dumps(Payload(marker))).decode()
    save_file(tiny_model().state_dict(), str(path), metadata={"pickle": payload})

    def unsafe() -> object:
        (length,) = struct.unpack("<Q", path.read_bytes()[:8])
        header = json.loads(path.read_bytes()[8:8 + length])
        return pickle.loads(base64.b64decode(header["__metadata__"]["pickle"]))

    return unsafe


def pickle_named_safetensors(path: Path, marker: Path):
    torch.save(Payload(marker), path)
    name = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data.pkl"))
    return _member_loader(path, name)


# name -> (writer, file suffixes, pickle refused: the hint names --trust-pickle)
CARRIERS = {
    "raw pickle": (raw_pickle, [".pth", ".pt", ".bin"], True),
    "zip torch.save": (zip_torch_save, [".pth", ".pt", ".ckpt", ".bin"], True),
    "legacy torch.save": (legacy_torch_save, [".pth", ".pt", ".ckpt", ".bin"], True),
    "state dict value": (in_state_dict, [".pth", ".bin"], True),
    "lightning hyper_parameters": (lightning_checkpoint, [".ckpt"], True),
    "TorchScript data.pkl": (torchscript_data_pkl, [".pt"], False),
    "TorchScript constants.pkl": (torchscript_constants_pkl, [".pt"], False),
    "TorchScript extra file": (torchscript_extra_file, [".pt"], False),
    "torch.save dressed as TorchScript": (torch_save_dressed_as_torchscript, [".pt"], False),
    "safetensors metadata": (safetensors_metadata, [".safetensors"], False),
    "pickle named .safetensors": (pickle_named_safetensors, [".safetensors"], False),
}
CASES = [(name, suffix) for name, (_, suffixes, _) in CARRIERS.items() for suffix in suffixes]


def run(argv: list[str], folder: Path) -> tuple[int, str]:
    err = io.StringIO()
    old = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(old)
    return code, err.getvalue()


def write_carrier(name: str, suffix: str, folder: Path) -> tuple[Path, Path, Callable]:
    marker = folder / "PWNED"
    path = folder / f"model{suffix}"
    unsafe = CARRIERS[name][0](path, marker)
    return path, marker, unsafe


@pytest.mark.parametrize(("name", "suffix"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_payload_never_runs_without_trust_pickle(name, suffix, tmp_path, tiny_onnx):
    path, marker, unsafe = write_carrier(name, suffix, tmp_path)
    # The file carries a live payload: reached the unsafe way, it runs.
    with contextlib.suppress(Exception):
        unsafe()
    assert marker.exists(), f"{name}: the payload did not run when unpickled unsafely"
    marker.unlink()
    before = path.read_bytes()

    code, err = run(["report", path.name, "--onnx", str(tiny_onnx), *QUICK,
                     "-o", "out/r.html"], tmp_path)

    assert not marker.exists(), f"{name}: the payload ran without --trust-pickle"
    assert path.read_bytes() == before
    assert "Traceback" not in err
    refused = CARRIERS[name][2]
    if refused:
        assert code == 2, err
        lines = err.strip().splitlines()
        assert lines[0].startswith("error: ") and "pickle" in lines[0], err
        assert lines[1].startswith("hint: ") and "--trust-pickle" in lines[1], err
    else:
        assert code in (0, 1, 2), err
        if code == 2:
            assert err.startswith("error: ") and "\nhint: " in err, err


def test_torchscript_payloads_never_run_even_when_trusted(tmp_path, tiny_onnx):
    # torch.jit.load reads its pickles with TorchScript's own unpickler, which knows
    # only torch types: --trust-pickle does not open a way in.
    for name in ("TorchScript data.pkl", "TorchScript constants.pkl", "TorchScript extra file"):
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        path, marker, _ = write_carrier(name, ".pt", folder)
        code, err = run(["report", path.name, "--onnx", str(tiny_onnx), *QUICK, "--trust-pickle",
                         "-o", "out/r.html"], folder)
        assert not marker.exists(), name
        assert code in (0, 1, 2) and "Traceback" not in err, (name, err)


@pytest.mark.parametrize("name", ["raw pickle", "zip torch.save", "legacy torch.save"])
def test_trust_pickle_does_run_the_payload(name, tmp_path, tiny_onnx):
    # The other side of the test above: the marker is a real detector, and
    # --trust-pickle really unpickles.
    path, marker, _ = write_carrier(name, ".pth", tmp_path)
    code, err = run(["report", path.name, "--onnx", str(tiny_onnx), *QUICK, "--trust-pickle",
                     "-o", "out/r.html"], tmp_path)
    assert marker.exists(), err
    assert code == 2 and "Traceback" not in err, err  # what it unpickled is not a model


def test_payload_in_an_npy_input_never_runs(tmp_path, tiny_onnx):
    marker = tmp_path / "PWNED"
    np.save(tmp_path / "evil.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    np.load(tmp_path / "evil.npy", allow_pickle=True)
    assert marker.exists()
    marker.unlink()
    torch.save(tiny_model().state_dict(), tmp_path / "m.pth")
    code, err = run(["report", "m.pth", "--onnx", str(tiny_onnx), *QUICK, "--input", "evil.npy",
                     "-o", "out/r.html"], tmp_path)
    assert not marker.exists()
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err


def test_every_pickle_carrier_holds_a_global_that_runs_code(tmp_path):
    # Independent of unpickling: the refused files name os.system / Path.touch in a
    # GLOBAL or STACK_GLOBAL opcode of one of their pickles.
    for name, (write, suffixes, refused) in CARRIERS.items():
        if not refused:
            continue
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        path, _, _ = write_carrier(name, suffixes[0], folder)
        if zipfile.is_zipfile(path):
            archive = zipfile.ZipFile(path)
            pickles = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        else:
            pickles = [path.read_bytes()]
        text = b"".join(pickles)
        assert (b"system" in text or b"touch" in text), name
        ops = [op.name for p in pickles for op, _, _ in _ops(p)]
        assert "REDUCE" in ops, name


def _ops(data: bytes):
    # A legacy torch.save file is several pickles back to back; walk them all.
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        try:
            found = list(pickletools.genops(stream))
        except Exception:
            return
        yield from found
        if not found:
            return
