"""load_model and from_module on real files written by torch, safetensors and spandrel's archs."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SPAN import SPAN

from layerdiff.errors import ModelLoadError, UntrustedPickleError
from layerdiff.models import from_module, load_model

# Sizes small enough to build in milliseconds that spandrel still recognises, with the
# architecture name, input/output channels and scale it reports for them.
ARCHITECTURES = {
    "esrgan": (lambda: ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2),
               "ESRGAN", 3, 3, 2),
    "compact": (lambda: Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2),
                "RealESRGAN Compact", 3, 3, 2),
    "compact-gray": (lambda: Compact(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2, upscale=4),
                     "RealESRGAN Compact", 1, 1, 4),
    "span": (lambda: SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2),
             "SPAN", 3, 3, 2),
}


def make(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[arch][0]().eval()


def assert_same_outputs(original: torch.nn.Module, loaded: torch.nn.Module, channels: int = 3) -> None:
    x = torch.rand(1, channels, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)


def assert_one_line_error(error: ModelLoadError) -> None:
    assert error.message and "\n" not in error.message
    assert error.hint


def save_state_dict(module: torch.nn.Module, path) -> None:
    if path.suffix == ".safetensors":
        save_file(module.state_dict(), str(path))
    else:
        torch.save(module.state_dict(), path)


# --------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_state_dict_loads_through_spandrel(tmp_path, arch, suffix):
    original = make(arch)
    path = tmp_path / f"model{suffix}"
    save_state_dict(original, path)

    loaded = load_model(path)

    _, name, in_channels, out_channels, scale = ARCHITECTURES[arch]
    assert (loaded.kind, loaded.architecture) == ("spandrel", name)
    assert (loaded.input_channels, loaded.output_channels, loaded.scale) == (in_channels, out_channels, scale)
    assert loaded.path == path and loaded.notes == ()
    assert not loaded.module.training
    assert_same_outputs(original, loaded.module, in_channels)


@pytest.mark.parametrize("name, save", [
    ("model.bin", lambda module, path: torch.save(module.state_dict(), path)),
    ("model.weights", lambda module, path: save_file(module.state_dict(), str(path))),
])
def test_format_is_recognised_by_content_not_extension(tmp_path, name, save):
    original = make("compact")
    save(original, tmp_path / name)

    loaded = load_model(tmp_path / name)

    assert loaded.architecture == "RealESRGAN Compact"
    assert_same_outputs(original, loaded.module)


def test_lightning_checkpoint_is_unwrapped(tmp_path):
    original = make("esrgan")
    checkpoint = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{key}": value for key, value in original.state_dict().items()},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")

    loaded = load_model(tmp_path / "last.ckpt")

    assert loaded.architecture == "ESRGAN"
    assert any("model." in note for note in loaded.notes)
    assert_same_outputs(original, loaded.module)


# --------------------------------------------------------------------------- TorchScript, pickles


def test_torchscript_archive_loads(tmp_path):
    original = make("compact-gray")
    traced = torch.jit.trace(original, torch.rand(1, 1, 8, 8))
    torch.jit.save(traced, tmp_path / "model.pt")

    loaded = load_model(tmp_path / "model.pt")

    assert (loaded.kind, loaded.architecture) == ("torchscript", "SRVGGNetCompact")
    assert loaded.input_channels == 1  # read from the first conv weight, not assumed
    assert not loaded.module.training
    assert_same_outputs(original, loaded.module, channels=1)


def test_pickled_module_is_refused_by_default(tmp_path):
    torch.save(make("compact"), tmp_path / "model.pth")

    with pytest.raises(UntrustedPickleError) as caught:
        load_model(tmp_path / "model.pth")

    assert_one_line_error(caught.value)
    assert "--trust-pickle" in caught.value.message and "--trust-pickle" in caught.value.hint
    assert "SRVGGNetCompact" in caught.value.message


def test_pickled_module_loads_when_trusted(tmp_path):
    original = make("compact")
    torch.save(original, tmp_path / "model.pth")

    loaded = load_model(tmp_path / "model.pth", trust_pickle=True)

    assert (loaded.kind, loaded.architecture, loaded.input_channels) == ("pickle", "SRVGGNetCompact", 3)
    assert_same_outputs(original, loaded.module)


class _Payload:
    """Unpickling this creates a directory: the kind of side effect a hostile file could have."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(1), "extra": _Payload(str(marker))}, tmp_path / "model.pth")

    with pytest.raises(UntrustedPickleError):
        load_model(tmp_path / "model.pth")

    assert not marker.exists()


# --------------------------------------------------------------------------- bad files


def _truncated_checkpoint(path):
    torch.save(make("compact").state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("write", [
    lambda path: path.write_bytes(os.urandom(512)),
    lambda path: path.write_text("not a model\n"),
    lambda path: path.write_bytes(b""),
    lambda path: path.write_bytes(pickle.dumps([1, 2, 3])),
    _truncated_checkpoint,
], ids=["random-bytes", "text", "empty", "plain-list", "truncated"])
def test_unreadable_file_is_a_one_line_error(tmp_path, write):
    path = tmp_path / "model.pth"
    write(path)

    with pytest.raises(ModelLoadError) as caught:
        load_model(path)

    assert type(caught.value) is ModelLoadError
    assert_one_line_error(caught.value)
    assert "model.pth" in caught.value.message


def test_truncated_safetensors_is_a_one_line_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(make("compact").state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(ModelLoadError) as caught:
        load_model(path)

    assert_one_line_error(caught.value)


def test_unknown_architecture_names_file_and_keys(tmp_path):
    torch.save({"encoder.weight": torch.rand(4, 4), "encoder.bias": torch.rand(4)}, tmp_path / "mystery.pth")

    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path / "mystery.pth")

    assert_one_line_error(caught.value)
    message = caught.value.message
    assert "does not recognise" in message and "mystery.pth" in message
    assert "2 tensors" in message and "encoder.weight" in message
    assert "--onnx" in caught.value.hint


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path / "nowhere.pth")

    assert_one_line_error(caught.value)
    assert caught.value.message == f"model file not found: {tmp_path / 'nowhere.pth'}"


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path)

    assert_one_line_error(caught.value)


# --------------------------------------------------------------------------- in-memory modules


def test_from_module_infers_channels_and_keeps_training_mode():
    module = torch.nn.Sequential(torch.nn.Conv2d(5, 8, 3), torch.nn.BatchNorm2d(8))  # training mode

    loaded = from_module(module)

    assert (loaded.kind, loaded.architecture, loaded.input_channels) == ("module", "Sequential", 5)
    assert loaded.path is None
    assert loaded.module is module and module.training


def test_from_module_with_explicit_channels_and_name():
    loaded = from_module(torch.nn.Linear(7, 2).eval(), input_channels=4, name="Head")

    assert (loaded.architecture, loaded.input_channels) == ("Head", 4)
    assert not loaded.module.training


def test_from_module_without_layers_assumes_rgb():
    loaded = from_module(torch.nn.ReLU())

    assert loaded.input_channels == 3
    assert loaded.notes
