"""The models/ package: what spandrel's descriptors tell of the inputs (inpainting, face
restoration, size requirements), Python entry points, and --weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import spandrel
import torch
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.GFPGAN import GFPGAN
from spandrel.architectures.LaMa import LaMa
from spandrel.architectures.RestoreFormer import RestoreFormer

from layerdiff.cli import main
from layerdiff.errors import LayerdiffError, ModelLoadError, UsageError
from layerdiff.models import load_model, output_stem, parse_entry_point
from layerdiff.models.spandrel import input_specs
from layerdiff.records import InputKind


def random_state_dict(build) -> dict:
    """Random weights for an architecture built on the meta device: spandrel's LaMa and
    GFPGAN have one size only (tens of millions of weights), too slow to initialise."""
    with torch.device("meta"):
        module = build()
    generator = torch.Generator().manual_seed(0)
    return {key: torch.rand(value.shape, generator=generator) if value.is_floating_point()
            else torch.zeros(value.shape, dtype=value.dtype)
            for key, value in module.state_dict().items()}


def one_line(error: LayerdiffError) -> str:
    assert error.message and "\n" not in error.message and error.hint
    return error.message


# --------------------------------------------------------------------------- spandrel's inputs


def test_lama_takes_an_image_and_a_mask(tmp_path):
    path = tmp_path / "big-lama.safetensors"
    save_file(random_state_dict(lambda: LaMa(in_nc=4, out_nc=3)), str(path))

    loaded = load_model(path)

    assert loaded.architecture == "LaMa" and loaded.input_channels == 3
    image, mask = loaded.inputs
    assert (image.name, image.kind, image.shape) == ("img", InputKind.IMAGE, (1, 3, 64, 64))
    assert (mask.name, mask.kind, mask.shape) == ("mask", InputKind.MASK, (1, 1, 64, 64))
    assert image.dtype == mask.dtype == "float32"
    assert image.dynamic_axes == mask.dynamic_axes == (2, 3)
    # layerdiff runs the module itself, which takes (image, mask) as the specs say.
    with torch.no_grad():
        out = loaded.module(torch.rand(image.shape), (torch.rand(mask.shape) > 0.5).float())
    assert out.shape == (1, 3, 64, 64)


def test_gfpgan_takes_one_fixed_size(tmp_path):
    path = tmp_path / "GFPGANv1.4.safetensors"
    save_file(random_state_dict(lambda: GFPGAN(
        out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
        fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
        sft_half=True)), str(path))

    loaded = load_model(path)

    assert loaded.architecture == "GFPGAN"
    (image,) = loaded.inputs
    assert (image.name, image.shape, image.dynamic_axes) == ("x", (1, 3, 512, 512), ())


def test_restoreformer_takes_multiples_of_32(tmp_path):
    torch.manual_seed(0)
    # The smallest that spandrel recognises: GroupNorm needs 32 channels, and its
    # attention sits at the 16x16 level of a 512 resolution (six levels).
    model = RestoreFormer(n_embed=16, embed_dim=32, ch=32, out_ch=3, ch_mult=(1,) * 6,
                          num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, in_channels=3,
                          resolution=512, z_channels=32, double_z=False, enable_mid=True,
                          head_size=8)
    torch.save(model.state_dict(), tmp_path / "RestoreFormer.pth")

    loaded = load_model(tmp_path / "RestoreFormer.pth")

    assert loaded.architecture == "RestoreFormer"
    (image,) = loaded.inputs
    assert (image.name, image.shape, image.dynamic_axes) == ("input", (1, 3, 64, 64), (2, 3))


@pytest.mark.parametrize("requirements, size", [
    (spandrel.SizeRequirements(), (64, 64)),
    (spandrel.SizeRequirements(multiple_of=24), (72, 72)),
    (spandrel.SizeRequirements(minimum=100), (100, 100)),
    (spandrel.SizeRequirements(multiple_of=128, square=True), (128, 128)),  # Uformer
])
def test_image_size_meets_the_size_requirements(requirements, size):
    torch.manual_seed(0)
    model = Compact(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2, upscale=2)
    compact = spandrel.ModelLoader().load_from_state_dict(model.state_dict())
    descriptor = spandrel.ImageModelDescriptor(
        compact.model, model.state_dict(), architecture=compact.architecture, purpose="SR",
        tags=[], supports_half=True, supports_bfloat16=True, scale=2, input_channels=1,
        output_channels=1, size_requirements=requirements)

    (image,) = input_specs(descriptor)

    assert (image.name, image.kind, image.dynamic_axes) == ("x", InputKind.IMAGE, (2, 3))
    assert image.shape == (1, 1, *size)


# --------------------------------------------------------------------------- entry points

MODEL_PY = """
import torch
from torch import nn

from neighbour import WIDTH  # a module beside this file


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, WIDTH, 3, padding=1)
        self.head = nn.Conv2d(WIDTH, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


class Sized(nn.Module):
    def __init__(self, width):
        super().__init__()


def build():
    torch.manual_seed(0)
    return Net().eval()


instance = build()


class zoo:
    build = staticmethod(build)


def broken():
    raise ValueError("no checkpoint for this size")


def not_a_module():
    return 42


number = 3
"""


@pytest.fixture
def model_py(tmp_path):
    (tmp_path / "neighbour.py").write_text("WIDTH = 4\n")
    path = tmp_path / "model.py"
    path.write_text(MODEL_PY)
    return path


@pytest.mark.parametrize("name, notes", [
    ("instance", 0), ("Net", 1), ("build", 0), ("zoo.build", 0),
])
def test_entry_point_in_a_file(model_py, name, notes):
    path_before = list(sys.path)

    loaded = load_model(f"{model_py}:{name}")

    assert (loaded.kind, loaded.architecture, loaded.path) == ("entry_point", "Net", model_py)
    assert loaded.input_channels == 3 and loaded.stem == name.lower().replace(".", "_")
    assert not loaded.module.training
    # A class is built in training mode: put in eval mode, and said so.
    assert len([n for n in loaded.notes if "eval mode" in n]) == notes
    assert sys.path == path_before
    assert loaded.module(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)


def test_entry_point_in_a_package(tmp_path, monkeypatch):
    package = tmp_path / "lab_models_a"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "import torch\ndef tiny():\n    return torch.nn.Conv2d(2, 2, 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    loaded = load_model("lab_models_a.nets:tiny")

    assert (loaded.kind, loaded.architecture, loaded.path) == ("entry_point", "Conv2d", None)
    assert loaded.input_channels == 2


def test_what_names_an_entry_point(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "weights:v2.pth"  # an existing file is a file, whatever its name
    odd.write_bytes(b"")
    assert parse_entry_point(str(odd)) is None
    assert parse_entry_point("weights:v2.pth") is None
    assert parse_entry_point(r"C:\models\x4.pth") is None
    assert parse_entry_point("model.pth") is None
    assert str(parse_entry_point(r"C:\src\model.py:build")) == r"C:\src\model.py:build"
    assert parse_entry_point("zoo.nets:Build.small").module == "zoo.nets"
    assert output_stem("src/model.py:Zoo.Build") == "zoo_build"
    assert output_stem("models/x4.pth") == "x4"


# --------------------------------------------------------------------------- entry point errors


def test_entry_point_file_not_found(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        load_model(f"{tmp_path / 'nowhere.py'}:build")
    assert one_line(caught.value) == f"entry point file not found: {tmp_path / 'nowhere.py'}"


def test_module_not_found():
    with pytest.raises(ModelLoadError) as caught:
        load_model("no_such_package_here.nets:build")
    assert "no Python module named 'no_such_package_here.nets'" in one_line(caught.value)
    assert "PYTHONPATH" in caught.value.hint


def test_missing_dependency_is_named(tmp_path, monkeypatch):
    (tmp_path / "needs_dep.py").write_text("import not_installed_anywhere\n")
    (tmp_path / "pkg_with_dep").mkdir()
    (tmp_path / "pkg_with_dep" / "__init__.py").write_text("import not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    for source in (f"{tmp_path / 'needs_dep.py'}:build", "pkg_with_dep:build"):
        with pytest.raises(ModelLoadError) as caught:
            load_model(source)
        assert "imports 'not_installed_anywhere', which is not installed" in one_line(caught.value)


def test_name_not_found_lists_candidates(model_py):
    with pytest.raises(ModelLoadError) as caught:
        load_model(f"{model_py}:biuld")
    assert one_line(caught.value) == "model.py has no 'biuld'"
    for name in ("Net", "build", "instance"):
        assert name in caught.value.hint
    assert "torch" not in caught.value.hint.split(": ", 1)[1]  # imports are not candidates


@pytest.mark.parametrize("name, message", [
    ("number", "number in model.py is a int, not a torch.nn.Module or something that builds one"),
    ("broken", "broken() in model.py raised ValueError: no checkpoint for this size"),
    ("not_a_module", "not_a_module() in model.py returned a int, not a torch.nn.Module"),
    ("Sized", "Sized() in model.py raised TypeError: Sized.__init__() missing 1 required "
              "positional argument: 'width'"),
])
def test_entry_point_that_gives_no_module(model_py, name, message):
    with pytest.raises(ModelLoadError) as caught:
        load_model(f"{model_py}:{name}")
    assert one_line(caught.value) == message


def test_errors_exit_2_in_one_line_through_the_cli(model_py, tmp_path, capsys):
    code = main(["report", f"{model_py}:broken", "-o", str(tmp_path / "r.html")])
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == ["error: broken() in model.py raised ValueError: no checkpoint for this size",
                     "hint: run with --verbose for the traceback"]


# --------------------------------------------------------------------------- --weights


def save_weights(tmp_path, state_dict, name="w.pth"):
    path = tmp_path / name
    torch.save(state_dict, path)
    return path


def trained_net(model_py):
    net = load_model(f"{model_py}:Net").module
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(1.0)
    return net


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"params_ema": sd},
    lambda sd: {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in sd.items()}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
], ids=["plain", "params_ema", "lightning", "data-parallel"])
def test_weights_load_into_the_entry_point(model_py, tmp_path, wrap):
    trained = trained_net(model_py)
    weights = save_weights(tmp_path, wrap(trained.state_dict()))

    loaded = load_model(f"{model_py}:build", weights=weights)

    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)
    assert "weights loaded from w.pth" in loaded.notes


def test_weights_from_safetensors(model_py, tmp_path):
    trained = trained_net(model_py)
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))

    loaded = load_model(f"{model_py}:build", weights=tmp_path / "w.safetensors")

    assert torch.equal(loaded.module.conv.weight, trained.conv.weight)


def test_weights_with_missing_and_unexpected_keys(model_py, tmp_path):
    state_dict = trained_net(model_py).state_dict()
    del state_dict["head.bias"]
    state_dict["tail.weight"] = torch.zeros(1)
    weights = save_weights(tmp_path, state_dict)

    with pytest.raises(ModelLoadError) as caught:
        load_model(f"{model_py}:build", weights=weights)

    assert one_line(caught.value) == ("the weights in w.pth do not fit Net: 1 missing (head.bias), "
                                      "1 unexpected (tail.weight)")


def test_weights_with_a_wrong_shape(model_py, tmp_path):
    state_dict = trained_net(model_py).state_dict()
    state_dict["conv.weight"] = torch.zeros(8, 3, 3, 3)
    weights = save_weights(tmp_path, state_dict)

    with pytest.raises(ModelLoadError) as caught:
        load_model(f"{model_py}:build", weights=weights)

    assert one_line(caught.value) == ("the weights in w.pth do not fit Net: conv.weight is "
                                      "(8, 3, 3, 3) in the file, (4, 3, 3, 3) in the module")


class _Payload:
    """Unpickling this creates a marker file: what a hostile weights file could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mknod, (self.marker,)


@pytest.mark.parametrize("trust_pickle", [False, True])
def test_malicious_weights_never_run(model_py, tmp_path, trust_pickle):
    marker = tmp_path / "pwned"
    state_dict = dict(trained_net(model_py).state_dict(), extra=_Payload(str(marker)))
    weights = save_weights(tmp_path, state_dict)

    with pytest.raises(ModelLoadError) as caught:
        load_model(f"{model_py}:build", weights=weights, trust_pickle=trust_pickle)

    assert "refusing to unpickle it as --weights" in one_line(caught.value)
    assert "posix.mknod" in caught.value.message
    assert not marker.exists()


def test_weights_with_a_model_file_is_a_usage_error(tmp_path, capsys):
    torch.save(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict(),
               tmp_path / "x2.pth")
    with pytest.raises(UsageError):
        load_model(tmp_path / "x2.pth", weights=tmp_path / "x2.pth")

    code = main(["report", str(tmp_path / "x2.pth"), "--weights", str(tmp_path / "x2.pth"),
                 "-o", str(tmp_path / "r.html")])

    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: --weights goes with a Python entry point, and x2.pth is a "
                          "model file\nhint: ")


def test_outputs_never_replace_the_weights_or_the_code(model_py, tmp_path, capsys):
    weights = save_weights(tmp_path, trained_net(model_py).state_dict())
    for output in (weights, model_py):
        before = output.read_bytes()
        code = main(["report", f"{model_py}:build", "--weights", str(weights), "-o", str(output)])
        _, err = capsys.readouterr()
        assert code == 2 and "would destroy that file" in err
        assert output.read_bytes() == before


# --------------------------------------------------------------------------- end to end


def test_report_on_an_entry_point_with_weights(model_py, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = save_weights(tmp_path, trained_net(model_py).state_dict())

    code = main(["report", f"{model_py}:zoo.build", "--weights", str(weights),
                 "--input-shape", "1,3,16,16", "--check-sizes", "none", "--reference", "none",
                 "--exporter", "legacy", "--json", "d.json"])

    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["verdict"] == "pass"
    model = data["model"]
    assert (model["kind"], model["architecture"], model["path"]) == ("entry_point", "Net",
                                                                     str(model_py))
    assert "weights loaded from w.pth" in model["notes"]
    # Outputs are named after NAME, not after model.py.
    assert (tmp_path / "layerdiff_report" / "zoo_build.html").is_file()
    assert (tmp_path / "layerdiff_report" / "zoo_build.onnx").is_file()


def test_the_command_line_reads_entry_points_without_torch():
    # Output names and input files are worked out before torch is loaded (--help stays fast).
    code = ("import sys, layerdiff.cli, layerdiff.models as m; "
            "assert m.output_stem('a.py:B') == 'b'; assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
