"""Bad input ends in one line and exit 2, never in a lost file or a false verdict.

Each test is a class of failure found by trying layerdiff as a new user and as an
attacker would (issue 10): outputs that are inputs, unwritable outputs, numbers that
would fake a verdict, an ONNX file of another model, settings onnxruntime does not
have, inputs that were misread. Real torch, onnxruntime and files throughout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, make_model
from layerdiff import files
from layerdiff.cli import EXIT_BUG, main
from layerdiff.errors import UsageError

SAMPLES = ROOT / "samples"
FAST = ["--check-sizes", "none", "--reference", "none", "--input-shape", "1,3,16,16"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def workdir(tmp_path):
    """A copy of the bundled model and its clean ONNX, and an input image."""
    from PIL import Image

    model = tmp_path / "model.pth"
    model.write_bytes((SAMPLES / "compact_x4.pth").read_bytes())
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes((SAMPLES / "compact_x4.onnx").read_bytes())
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    return tmp_path


# --------------------------------------------------------------------------- no output replaces an input

@pytest.mark.parametrize("flag", ["-o", "--json", "--fix-fp16"])
@pytest.mark.parametrize("victim", ["model.pth", "model.onnx", "photo.png"])
@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink"])
def test_an_output_never_replaces_an_input(workdir, capsys, flag, victim, alias):
    target = workdir / victim
    before = digest(target)
    path = {"same": target, "symlink": workdir / "link", "hardlink": workdir / "hard"}[alias]
    if alias == "symlink":
        path.symlink_to(target)
    elif alias == "hardlink":
        os.link(target, path)
    code, err = cli(["report", workdir / "model.pth", "--onnx", workdir / "model.onnx",
                     "--input", workdir / "photo.png", flag, path, *FAST], capsys)
    assert code == 2
    assert "would destroy that file" in err and "hint:" in err
    assert digest(target) == before


def test_derived_outputs_are_checked_too(workdir, capsys):
    """The reproducer and the float16 file sit next to the report under derived names."""
    onnx = workdir / "report.first_divergence.onnx"
    onnx.write_bytes((workdir / "model.onnx").read_bytes())
    code, err = cli(["report", workdir / "model.pth", "--onnx", onnx,
                     "-o", workdir / "report.html", *FAST], capsys)
    assert code == 2 and "reproducer" in err
    half_source = workdir / "model_fp16.onnx"
    half_source.write_bytes((workdir / "model.onnx").read_bytes())
    code, err = cli(["report", workdir / "model.pth", "--onnx", half_source, "--fix-fp16",
                     workdir / "fixed.onnx", "-o", workdir / "model.html", *FAST], capsys)
    assert code == 2 and "would destroy" in err


def test_two_outputs_may_not_be_one_file(workdir, capsys):
    code, err = cli(["report", workdir / "model.pth", "-o", workdir / "r.html",
                     "--json", workdir / "r.html", *FAST], capsys)
    assert code == 2 and "same file" in err


@pytest.mark.parametrize("case", ["json_is_folder", "under_a_file", "unwritable"])
def test_unwritable_outputs_are_refused_before_any_work(workdir, capsys, case):
    path = {"json_is_folder": workdir, "under_a_file": workdir / "model.pth" / "r.json",
            "unwritable": Path("/proc/layerdiff/r.json")}[case]
    started = time.perf_counter()
    code, err = cli(["report", workdir / "model.pth", "--json", path, *FAST], capsys)
    assert code == 2 and err.startswith("error: ") and "hint: " in err
    assert time.perf_counter() - started < 5  # refused up front, not after the diagnosis


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def fail_halfway(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        files.atomic_write(target, fail_halfway)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left


@pytest.mark.parametrize("command, which", [("report", "model"), ("report", "onnx"),
                                            ("report", "input"), ("align", "model"),
                                            ("align", "onnx")])
def test_a_device_or_pipe_is_refused_not_read_forever(tmp_path, capsys, command, which):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    model, onnx = SAMPLES / "compact_x4.pth", SAMPLES / "compact_x4.onnx"
    args = {"model": [command, "/dev/zero", "--onnx", onnx],
            "onnx": [command, model, "--onnx", fifo],
            "input": [command, model, "--onnx", onnx, "--input", fifo]}[which]
    code, err = cli(args, capsys)
    assert code == 2 and "not a regular file" in err


# --------------------------------------------------------------------------- exit codes

@pytest.mark.parametrize("args, message", [
    (["--rtol", "nan"], "--rtol nan is not a tolerance"),
    (["--rtol", "-1"], "--rtol -1.0 is not a tolerance"),
    (["--atol", "inf"], "--atol inf is not a tolerance"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--samples", "0"], "--samples 0 is out of range"),
    (["--opset", "3"], "--opset 3 is out of range"),
    (["--max-memory", "nan"], "not a size"),
    (["--max-memory", "0"], "not a size"),
    (["--input-shape", "1,3,0,8"], "not a shape"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_settings_exit_2_with_a_hint(capsys, args, message):
    try:
        code = main(["report", str(SAMPLES / "compact_x4.pth"), *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "hint: " in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # error and hint, no usage block


def test_a_nan_tolerance_cannot_pass_a_faulty_model_from_the_library():
    from layerdiff import diagnose

    with pytest.raises(UsageError, match="--rtol nan"):
        diagnose(str(SAMPLES / "compact_x4.pth"), str(SAMPLES / "compact_x4_dcr.onnx"),
                 rtol=float("nan"))


def test_verbose_user_error_still_exits_2_with_its_traceback(capsys):
    code = main(["report", "missing.pth", "--verbose"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" in err and "error: " in err


def test_a_bug_says_so_and_exits_3(workdir, capsys, monkeypatch):
    import layerdiff.pipeline

    def broken(*args, **kwargs):  # a real defect inside layerdiff, not in torch or ORT
        return {}["missing"]

    monkeypatch.setattr(layerdiff.pipeline, "diagnose", broken)
    code = main(["report", str(workdir / "model.pth"), "-o", str(workdir / "r.html")])
    err = capsys.readouterr().err
    assert code == EXIT_BUG == 3
    assert "internal error: KeyError" in err and "--verbose" in err and "Traceback" not in err


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(workdir):
    process = subprocess.Popen(
        [sys.executable, "-m", "layerdiff.cli", "report", str(workdir / "model.pth"),
         "-o", str(workdir / "r.html")], stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside `import torch`
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert not (workdir / "r.html").exists()


def test_help_does_not_import_torch():
    code = ("import sys; from layerdiff.cli import main\n"
            "try: main(['report', '--help'])\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# --------------------------------------------------------------------------- misleading diagnoses

def test_an_onnx_of_another_model_is_named_as_such(tmp_path, capsys):
    from spandrel.architectures.Compact import Compact

    grey = Compact(num_in_ch=1, num_out_ch=1, num_feat=16, num_conv=4, upscale=4).eval()
    model = tmp_path / "grey.pth"
    torch.save(grey.state_dict(), model)
    started = time.perf_counter()
    code, err = cli(["report", model, "--onnx", SAMPLES / "compact_x4.onnx", *FAST[:4],
                     "-o", tmp_path / "r.html"], capsys)
    assert code == 2
    assert "3 channels; the model takes 1" in err and "export of this model" in err
    assert time.perf_counter() - started < 15
    assert not (tmp_path / "r.html").exists()


class TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y * 2


def test_an_onnx_with_more_outputs_than_the_model_is_named_as_such(tmp_path):
    from layerdiff import diagnose
    from layerdiff.preflight import MismatchError

    two = TwoOutputs().eval()
    path = tmp_path / "two.onnx"
    torch.onnx.export(two, (torch.rand(1, 3, 8, 8),), str(path), dynamo=False)
    one = torch.nn.Sequential(two.conv).eval()
    with pytest.raises(MismatchError, match="2 output.*returns 1"):
        diagnose(one, path, input_shape=(1, 3, 8, 8), check_sizes=(), output_dir=tmp_path)


def test_an_unavailable_provider_is_an_error_naming_the_available_ones(workdir, capsys):
    code, err = cli(["report", workdir / "model.pth", "--provider", "CUDAExecutionProvider",
                     *FAST], capsys)
    assert code == 2
    assert "'CUDAExecutionProvider' is not available" in err and "CPUExecutionProvider" in err


def test_a_bad_ort_config_value_is_blamed_on_the_config_not_the_file(workdir, capsys):
    code, err = cli(["report", workdir / "model.pth", "--onnx", workdir / "model.onnx",
                     "--ort-config", "session.intra_op_thread_affinities=zz", *FAST], capsys)
    assert code == 2
    assert "--ort-config session.intra_op_thread_affinities=zz" in err
    assert "cannot load the model" not in err


def test_nan_in_an_input_is_not_called_a_mutation(tmp_path):
    from layerdiff import diagnose

    values = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    values[0, :, 3, 5] = np.nan
    npy = tmp_path / "nan.npy"
    np.save(npy, values)
    d = diagnose(make_model("compact"), None, input_shape=(1, 3, 16, 16), input_files=[str(npy)],
                 check_sizes=(), reference="none", output_dir=tmp_path, exporter="legacy")
    assert not d.facts.input_mutated
    assert "input_mutation" not in [s.rule for s in d.suggestions]


def test_a_16_bit_grey_image_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from layerdiff.inputs import from_file

    values = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    for channels in (1, 3):
        tensor = from_file(path, channels)
        assert tensor.shape == (1, channels, 16, 16)
        np.testing.assert_allclose(tensor[0, 0].numpy(), values / 65535.0, rtol=1e-6)
        assert float(tensor.max()) < 1.0  # 8-bit conversion would have made it all white


@pytest.mark.parametrize("array", [np.array([["a", "b"]]), np.zeros((1, 3, 4, 4), complex)])
def test_a_npy_of_non_numbers_is_refused(tmp_path, capsys, array):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    code, err = cli(["report", SAMPLES / "compact_x4.pth", "--input", path, *FAST,
                     "-o", tmp_path / "r.html"], capsys)
    assert code == 2 and "not real numbers" in err


def test_an_input_too_large_to_allocate_is_refused(tmp_path, capsys):
    code, err = cli(["report", SAMPLES / "compact_x4.pth", "--input-shape", "64,3,100000,100000",
                     "-o", tmp_path / "r.html"], capsys)
    assert code == 2 and "needs" in err and "--input-shape" in err


def test_json_exit_code_is_2_for_an_error_verdict(tmp_path, capsys):
    """Exit 1 means diverged and nothing else: an unloadable ONNX is an error (2)."""
    broken = tmp_path / "broken.onnx"
    model = __import__("onnx").load(str(SAMPLES / "compact_x4.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"
    __import__("onnx").save(model, str(broken))
    code, err = cli(["report", SAMPLES / "compact_x4.pth", "--onnx", broken, *FAST,
                     "-o", tmp_path / "r.html", "--json", tmp_path / "r.json"], capsys)
    assert code == 2
    assert json.loads((tmp_path / "r.json").read_text())["exit_code"] == 2


def test_an_error_stays_one_line_whatever_the_path_holds(capsys):
    code, err = cli(["report", "a\x1eb\nc.pth"], capsys)
    assert code == 2
    assert err.splitlines()[0] == "error: model file not found: a\\x1eb\\nc.pth"
    assert len(err.splitlines()) == 2


def test_an_onnx_file_given_as_the_model_is_named_as_such(capsys):
    code, err = cli(["report", SAMPLES / "compact_x4.onnx"], capsys)
    assert code == 2 and "is an ONNX file; MODEL is the PyTorch model" in err and "--onnx" in err
