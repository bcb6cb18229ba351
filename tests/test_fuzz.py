"""Property-based fuzzing (hypothesis) of everything a user hands layerdiff.

The property, for damaged model and ONNX files, garbage arguments and odd inputs: the
readers return or raise LayerdiffError (one line, with a hint), and the command line
ends with exit 0, 1 or 2, prints no traceback, writes nothing outside its output paths
and leaves every input file as it was. Most examples run in this process (the readers
directly, or ``cli.main``); a few run the real command in a subprocess with a timeout,
for the "never hangs" part. Examples are derandomized, so a CI failure reproduces.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from conftest import ROOT
from layerdiff.capture_onnx import load_graph
from layerdiff.cli import build_parser, main
from layerdiff.errors import LayerdiffError
from layerdiff.exporting import describe_onnx
from layerdiff.inputs import from_file
from layerdiff.models import load_model
from layerdiff.records import LoadedModel

sys.path.insert(0, str(ROOT / "fuzz"))
import make_corpus  # noqa: E402

# Every test's examples are fixed (derandomize) and none is remembered between runs
# (database=None): the suite is the same on every machine.
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.large_base_example])

# The smallest full run: the tiny Compact and its export, one input, no extra size, no
# float64 referee.
QUICK = ["--check-sizes", "none", "--reference", "none", "--input-shape", "1,3,16,16"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    """Valid files of every format layerdiff reads (fuzz/make_corpus.py)."""
    folder = tmp_path_factory.mktemp("seeds")
    make_corpus.main(folder)
    found = {p.name: p for p in folder.rglob("*") if p.is_file()}
    return found


# --------------------------------------------------------------------------- damage


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, bit in flips:
        out[position % len(out)] ^= 1 << bit
    return bytes(out)


@st.composite
def damaged(draw, data: bytes, regions: list[tuple[int, int]] = ()) -> bytes:
    """``data`` truncated, bit-flipped, overwritten, with bytes inserted or removed.
    Positions fall anywhere or, half the time, in one of ``regions`` (where a format
    keeps its structure: a zip's directory, a pickle, a header)."""
    n = len(data)
    spans = [(0, n)] + [r for r in regions if r[1] > r[0]]
    start, end = draw(st.sampled_from(spans))
    where = st.integers(start, max(start, end - 1))
    how = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete"]))
    if how == "truncate":
        return data[: draw(where)]
    if how == "flip":
        return _flip(data, draw(st.lists(st.tuples(where, st.integers(0, 7)), min_size=1,
                                         max_size=8)))
    at = draw(where)
    if how == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=16))
        return data[:at] + chunk + data[at + len(chunk):]
    if how == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    return data[:at] + data[at + draw(st.integers(1, 64)):]


def zip_regions(data: bytes) -> list[tuple[int, int]]:
    """The pickles, code and directory of a zip archive (torch.save, TorchScript)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return []
    regions = []
    for info in archive.infolist():
        if info.filename.endswith((".pkl", ".py", "version", "byteorder")) or "/code/" in info.filename:
            regions.append((info.header_offset, info.header_offset + 64 + info.compress_size))
    # The last member's header up to the end: the central directory.
    regions.append((max(i.header_offset for i in archive.infolist()), len(data)))
    return regions


def with_member(data: bytes, name_end: str, change) -> bytes:
    """The zip ``data`` with its member ending in ``name_end`` replaced by
    ``change(old bytes)``, CRCs correct: damage the reader sees past the zip layer."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename.endswith(name_end):
                content = change(content)
            target.writestr(info.filename, content)
    return out.getvalue()


def safetensors_regions(data: bytes) -> list[tuple[int, int]]:
    (length,) = struct.unpack("<Q", data[:8])
    return [(0, 8), (8, 8 + min(length, len(data) - 8))]


# --------------------------------------------------------------------------- checks


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused_or_loaded(load, path: Path, expected_type: type | None = None):
    """``load(path)`` returns, or raises a one-line LayerdiffError with a hint; the file
    is unchanged and nothing is written next to it."""
    before = digest(path.parent)
    try:
        result = load(path)
        event("loaded")
    except LayerdiffError as error:
        assert error.message and "\n" not in error.message, error.message
        assert error.hint, error.message
        event(f"refused: {type(error).__name__}")
        result = None
    if result is not None and expected_type is not None:
        assert isinstance(result, expected_type)
    assert digest(path.parent) == before
    return result


@contextlib.contextmanager
def inside(folder: Path):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def run_cli(argv: list[str], folder: Path, outputs: tuple[str, ...] = ("out",)) -> tuple[int, str]:
    """Run ``layerdiff`` in-process in ``folder`` and check the command-line contract;
    ``outputs``: the paths (relative to ``folder``) it may write to."""
    before = digest(folder)
    out, err = io.StringIO(), io.StringIO()
    with inside(folder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    text = err.getvalue()
    event(f"exit {code}")
    assert "Traceback" not in text, text
    assert code in (0, 1, 2), f"exit {code} for {argv}: {text}"
    after = digest(folder)
    changed = [name for name, h in before.items() if after.get(name) != h]
    assert not changed, f"{argv} changed or removed {changed}"
    allowed = tuple(Path(o) for o in outputs)
    stray = [name for name in after if name not in before
             and not any(Path(name) == a or a in Path(name).parents for a in allowed)]
    assert not stray, f"{argv} wrote {stray} outside {outputs}"
    if code == 2 and "error:" in text:
        lines = [line for line in text.split("\n") if line.strip()]
        if not any("usage:" in line for line in lines):  # not argparse's own message
            assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), text
            assert not any(name.endswith(".html") for name in after if name not in before)
    for name in after:
        if name.endswith(".html") and name not in before:
            assert (folder / name).read_text().rstrip().endswith("</html>"), name
    return code, text


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="layerdiff-fuzz-")


# --------------------------------------------------------------------------- model files

MODEL_SEEDS = ["compact_zip.pth", "compact_legacy.pth", "lightning.ckpt", "compact.safetensors",
               "traced.pt", "compact_x4.pth"]
SUFFIXES = [".pth", ".pt", ".ckpt", ".bin", ".safetensors"]


@settings(max_examples=600, **FUZZ)
@given(data=st.data())
def test_damaged_model_file_loads_or_is_refused(seeds, data):
    name = data.draw(st.sampled_from(MODEL_SEEDS), label="seed")
    original = seeds[name].read_bytes()
    regions = (safetensors_regions(original) if name.endswith(".safetensors")
               else zip_regions(original))
    content = data.draw(damaged(original, regions), label="damage")
    suffix = data.draw(st.sampled_from([Path(name).suffix] + SUFFIXES), label="suffix")
    with workdir() as folder:
        path = Path(folder) / f"model{suffix}"
        path.write_bytes(content)
        assert_refused_or_loaded(load_model, path, LoadedModel)


@settings(max_examples=300, **FUZZ)
@given(data=st.data())
def test_damaged_pickle_inside_a_valid_zip_loads_or_is_refused(seeds, data):
    # The zip layer is intact (CRCs fixed), so the damage reaches torch's unpickler and
    # TorchScript's deserializer.
    name = data.draw(st.sampled_from(["compact_zip.pth", "lightning.ckpt", "traced.pt"]))
    original = seeds[name].read_bytes()
    members = [i.filename for i in zipfile.ZipFile(seeds[name]).infolist()
               if not i.filename.split("/")[-2:-1] == ["data"]]
    member = data.draw(st.sampled_from(members), label="member")

    def change(old: bytes) -> bytes:
        return data.draw(damaged(old), label="damage") if old else b""

    content = with_member(original, member, change)
    with workdir() as folder:
        path = Path(folder) / f"model{Path(name).suffix}"
        path.write_bytes(content)
        assert_refused_or_loaded(load_model, path, LoadedModel)


@settings(max_examples=100, **FUZZ)
@given(data=st.binary(max_size=256), suffix=st.sampled_from(SUFFIXES))
def test_arbitrary_bytes_as_a_model_are_refused(data, suffix):
    with workdir() as folder:
        path = Path(folder) / f"model{suffix}"
        path.write_bytes(data)
        assert_refused_or_loaded(load_model, path, LoadedModel)


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_cli_on_a_damaged_model(seeds, data):
    name = data.draw(st.sampled_from(["compact_zip.pth", "compact.safetensors", "traced.pt"]))
    original = seeds[name].read_bytes()
    content = data.draw(damaged(original, zip_regions(original)), label="damage")
    with workdir() as folder:
        folder = Path(folder)
        (folder / f"m{Path(name).suffix}").write_bytes(content)
        shutil.copy(seeds["tiny.onnx"], folder / "t.onnx")
        run_cli(["report", f"m{Path(name).suffix}", "--onnx", "t.onnx", *QUICK,
                 "-o", "out/r.html", "--json", "out/d.json"], folder)


# --------------------------------------------------------------------------- ONNX files


def _onnx_readers(path: Path) -> None:
    describe_onnx(path)
    load_graph(path)


@settings(max_examples=300, **FUZZ)
@given(data=st.data())
def test_damaged_onnx_bytes_load_or_are_refused(seeds, data):
    name = data.draw(st.sampled_from(["tiny.onnx", "compact_x4.onnx"]))
    original = seeds[name].read_bytes()
    # The graph's structure sits before its weights in an export: weight the first KB.
    content = data.draw(damaged(original, [(0, 1024)]), label="damage")
    with workdir() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(content)
        assert_refused_or_loaded(_onnx_readers, path)


def _structural_change(model: onnx.ModelProto, data) -> str:
    """One change that keeps the protobuf valid but the model wrong."""
    graph = model.graph
    nodes = list(graph.node)
    i = data.draw(st.integers(0, len(nodes) - 1), label="node")
    node = graph.node[i]
    text = st.text(max_size=12)
    how = data.draw(st.sampled_from([
        "drop_node", "dangling_input", "cycle", "duplicate_output", "op_type", "domain",
        "attribute", "drop_attributes", "initializer_raw", "initializer_type",
        "initializer_dims", "scope_metadata", "opset", "no_inputs", "no_outputs",
        "input_dims", "input_type", "empty_names", "external_data"]), label="change")
    if how == "drop_node":
        del graph.node[i]
    elif how == "dangling_input" and node.input:
        node.input[0] = data.draw(text)
    elif how == "cycle":
        later = graph.node[data.draw(st.integers(i, len(nodes) - 1))]
        if node.input and later.output:
            node.input[0] = later.output[0]
    elif how == "duplicate_output" and i > 0 and node.output:
        node.output[0] = graph.node[i - 1].output[0]
    elif how == "op_type":
        node.op_type = data.draw(st.sampled_from(["", "Conv", "Relu", "Reshape", "Loop", "If"])
                                 | text)
    elif how == "domain":
        node.domain = data.draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "x.y"]) | text)
    elif how == "attribute":
        attribute = onnx.helper.make_attribute(
            data.draw(st.sampled_from(["kernel_shape", "pads", "mode", "blocksize", "value",
                                       "to", "axis"]) | text),
            data.draw(st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(), text,
                                st.lists(st.integers(-9, 9), min_size=1, max_size=5))))
        node.attribute.append(attribute)
    elif how == "drop_attributes":
        del node.attribute[:]
    elif how.startswith("initializer") and graph.initializer:
        init = graph.initializer[data.draw(st.integers(0, len(graph.initializer) - 1))]
        if how == "initializer_raw":
            init.raw_data = init.raw_data[: data.draw(st.integers(0, len(init.raw_data)))]
        elif how == "initializer_type":
            init.data_type = data.draw(st.integers(0, 30))
        else:
            init.dims[:] = data.draw(st.lists(st.integers(-3, 10**6), max_size=5))
    elif how == "scope_metadata":
        entry = node.metadata_props.add()
        entry.key = "pkg.torch.onnx.name_scopes"
        entry.value = data.draw(st.sampled_from(["5", "[]", "[1, 2]", "None", "{'a': 1}",
                                                 "((((", "[" * 200 + "]" * 200, "'x'"]) | text)
    elif how == "opset":
        model.opset_import[0].version = data.draw(st.integers(-5, 10**6))
    elif how == "no_inputs":
        del graph.input[:]
    elif how == "no_outputs":
        del graph.output[:1]
    elif how.startswith("input") and graph.input:
        tensor_type = graph.input[0].type.tensor_type
        if how == "input_dims":
            dim = tensor_type.shape.dim[data.draw(st.integers(0, len(tensor_type.shape.dim) - 1))]
            choice = data.draw(st.one_of(st.integers(-5, 10**7), text))
            if isinstance(choice, int):
                dim.dim_value = choice
            else:
                dim.dim_param = choice
        else:
            tensor_type.elem_type = data.draw(st.integers(0, 30))
    elif how == "empty_names":
        node.name = ""
        if node.output:
            node.output[0] = ""
    elif how == "external_data" and graph.initializer:
        init = graph.initializer[0]
        init.data_location = onnx.TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", data.draw(
            st.sampled_from(["missing.bin", "../../etc/passwd", "/etc/passwd", "", "model.onnx"]))
    return how


@settings(max_examples=400, **FUZZ)
@given(data=st.data())
def test_structurally_wrong_onnx_loads_or_is_refused(seeds, data):
    model = onnx.load(str(seeds["tiny.onnx"]))
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        _structural_change(model, data)
    with workdir() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        assert_refused_or_loaded(_onnx_readers, path)


@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_cli_on_a_wrong_onnx(seeds, data):
    model = onnx.load(str(seeds["tiny.onnx"]))
    if data.draw(st.booleans(), label="bytes"):
        content = data.draw(damaged(model.SerializeToString()), label="damage")
    else:
        _structural_change(model, data)
        content = model.SerializeToString()
    with workdir() as folder:
        folder = Path(folder)
        shutil.copy(seeds["compact_zip.pth"], folder / "m.pth")
        (folder / "t.onnx").write_bytes(content)
        run_cli(["report", "m.pth", "--onnx", "t.onnx", *QUICK,
                 "-o", "out/r.html", "--json", "out/d.json"], folder)


# --------------------------------------------------------------------------- arguments

# Values that are wrong in every way an option can be, plus a few right ones. Sizes stay
# small when they are valid, so that an example runs in well under a second.
GARBAGE = st.one_of(st.sampled_from(["", "-", "--", "nan", "inf", "-inf", "-1", "0", "1e309",
                                     "1,2", "1,3,16", "0,3,16,16", "1,3,-16,16", "x", "None",
                                     "none", "\u00e9", "a=b", "=", "1" * 40, " 1 ", "1e-3",
                                     "1,3,16,16", "16,20", "1G", "0G", "-5M", "12Q"]),
                      st.text(max_size=8))
OPTION_VALUES = {
    "--seed": st.one_of(st.integers(-2**70, 2**70).map(str), GARBAGE),
    "--samples": st.one_of(st.integers(-3, 3).map(str), GARBAGE),
    "--input-shape": st.one_of(st.sampled_from(["1,3,16,16", "2,3,8,12", "1,1,16,16",
                                                "1,4,16,16", "1,3,1,1", "1,3,1000000000000,5"]),
                               GARBAGE),
    "--check-sizes": st.one_of(st.sampled_from(["none", "9,13", "1,1", "0,5"]), GARBAGE),
    "--rtol": st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "1e-3", "1e300"]), GARBAGE),
    "--atol": st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "1e-5", "1e300"]), GARBAGE),
    "--ignore-layer": st.one_of(st.sampled_from(["*", "op:Conv", "op:", "[", "body.*", "op:*"]),
                                GARBAGE),
    "--ort-config": st.one_of(st.sampled_from([
        "session.intra_op.allow_spinning=0", "optimization.enable_gelu_approximation=1",
        "session.use_env_allocators=yes", "=1", "k=", "no.such.key=7"]), GARBAGE),
    "--provider": st.one_of(st.sampled_from(["CPUExecutionProvider", "CUDAExecutionProvider",
                                             "TensorrtExecutionProvider"]), GARBAGE),
    "--max-memory": st.one_of(st.sampled_from(["1", "1K", "64M", "4G", "1000T"]), GARBAGE),
    "--json": st.sampled_from(["out/d.json", "out", "out/sub/d.json", "t.onnx", "m.pth"]),
    "-o": st.sampled_from(["out/r.html", "out", "out/r", "out/sub/x.html", "m.pth"]),
    "--fix-fp16": st.sampled_from(["out/f.onnx", "out", "t.onnx"]),
    # A folder: its files must land under "out", or be refused (an input file, a file).
    "--model-explorer": st.sampled_from(["out/me", "out", "out/r.html", "t.onnx", "m.pth"]),
    "--input": st.sampled_from(["in.npy", "missing.npy", "out", "t.onnx", "m.pth"]),
    "--onnx": st.sampled_from(["t.onnx", "m.pth", "missing.onnx", "out", "in.npy"]),
}
# Not fuzzed: --open starts a browser, --verbose asks for tracebacks, and without
# --onnx every example would pay for an export (the exporter flags only matter then).
SKIPPED = {"--open", "--verbose", "-v", "--exporter", "--opset", "--fp16-method", "-h", "--help"}


def _report_options() -> list[tuple[str, object]]:
    parser = build_parser()
    report = parser._subparsers._group_actions[0].choices["report"]  # noqa: SLF001
    options = []
    for action in report._actions:  # noqa: SLF001
        flags = [f for f in action.option_strings if f not in SKIPPED]
        if not flags or set(action.option_strings) & SKIPPED:
            continue
        flag = max(flags, key=len) if flags[0] != "-o" else "-o"
        if action.nargs == 0:
            options.append((flag, None))
        elif action.choices:
            options.append((flag, st.one_of(st.sampled_from(list(action.choices)), GARBAGE)))
        else:
            options.append((flag, OPTION_VALUES.get(flag, GARBAGE)))
    return options


REPORT_OPTIONS = _report_options()
# The example's input files. Also drawn as -o/--json/--fix-fp16 values, where they must
# be refused: they are never allowed outputs, so overwriting one fails the example.
INPUT_FILES = ("m.pth", "t.onnx", "in.npy")


@settings(max_examples=400, **FUZZ)
@given(data=st.data())
def test_cli_with_random_arguments(seeds, data):
    chosen = data.draw(st.lists(st.sampled_from(REPORT_OPTIONS), max_size=6,
                                unique_by=lambda o: o[0]), label="options")
    argv = ["report", data.draw(st.sampled_from(["m.pth", "m.pth", "t.onnx", "missing.pth",
                                                 "out", ""]), label="model")]
    if not any(flag == "--onnx" for flag, _ in chosen):
        argv += ["--onnx", "t.onnx"]
    outputs = ["out"]
    for flag, values in chosen:
        if values is None:
            argv.append(flag)
            continue
        value = data.draw(values, label=flag)
        argv += [flag, value] if not value.startswith("-") else [f"{flag}={value}"]
        if flag in ("-o", "--json", "--fix-fp16"):
            outputs.append(value)
    if not any(flag == "-o" for flag, _ in chosen):
        argv += ["-o", "out/r.html"]
    if "--check-sizes" not in argv and "--input-shape" not in argv:
        argv += QUICK
    with workdir() as folder:
        folder = Path(folder)
        shutil.copy(seeds["compact_zip.pth"], folder / "m.pth")
        shutil.copy(seeds["tiny.onnx"], folder / "t.onnx")
        np.save(folder / "in.npy", np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32))
        (folder / "out").mkdir()
        run_cli(argv, folder, tuple(o for o in outputs if o not in INPUT_FILES))


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_align_with_random_arguments(seeds, data):
    argv = ["align", data.draw(st.sampled_from(["m.pth", "t.onnx", "missing.pth", "out"]))]
    if data.draw(st.booleans(), label="--onnx"):
        argv += ["--onnx", data.draw(OPTION_VALUES["--onnx"] | GARBAGE, label="onnx")]
    if data.draw(st.booleans(), label="--input-shape"):
        value = data.draw(OPTION_VALUES["--input-shape"], label="shape")
        argv += [f"--input-shape={value}"]
    if data.draw(st.booleans(), label="--trust-pickle"):
        argv.append("--trust-pickle")
    with workdir() as folder:
        folder = Path(folder)
        shutil.copy(seeds["compact_zip.pth"], folder / "m.pth")
        shutil.copy(seeds["tiny.onnx"], folder / "t.onnx")
        np.save(folder / "in.npy", np.zeros((1, 3, 8, 8), dtype=np.float32))
        (folder / "out").mkdir()
        run_cli(argv, folder, outputs=())


# --------------------------------------------------------------------------- --input files

NPY_DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int64", "bool", "complex64",
              "U3", "S3", "object", "datetime64[s]", "V4", [("a", "<f4"), ("b", "<i2")]]


@st.composite
def npy_files(draw) -> bytes:
    dtype = np.dtype(draw(st.sampled_from(NPY_DTYPES), label="dtype"))
    rank = draw(st.integers(0, 5), label="rank")
    shape = [draw(st.sampled_from([0, 1, 2, 3, 3, 4, 5, 16])) for _ in range(rank)]
    if rank >= 3 and draw(st.booleans()):
        shape[-3] = 3
    size = int(np.prod(shape))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(size)
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf, 1e30]))
    if special is not None and size:
        values[:: max(size // 3, 1)] = special
    if dtype.kind in "fc":
        with np.errstate(over="ignore"):  # 1e30 as float16 is inf, as wanted
            array = values.astype(dtype)
    elif dtype.kind in "iub":
        array = np.nan_to_num(values, posinf=1, neginf=-1).clip(-100, 100).astype(dtype)
    elif dtype.kind == "O":
        array = np.array([{"x": v} for v in values], dtype=object)
    else:
        array = np.zeros(size, dtype=dtype)
    array = array.reshape(shape)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    content = buffer.getvalue()
    how = draw(st.sampled_from(["as is", "as is", "truncate", "huge header", "flip"]), label="how")
    if how == "truncate":
        content = content[: draw(st.integers(0, len(content)))]
    elif how == "huge header":
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {
            "descr": np.lib.format.dtype_to_descr(np.dtype("float32")), "fortran_order": False,
            "shape": draw(st.sampled_from([(1, 3, 100000, 100000), (2**40, 3, 4, 4),
                                           (1, 3, 2**31, 2**31), (1, 3, -1, 4)]))})
        content = b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\0" * 64
    elif how == "flip":
        content = _flip(content, draw(st.lists(st.tuples(st.integers(0, 127), st.integers(0, 7)),
                                               min_size=1, max_size=4)))
    return content


def _png(width: int, height: int, mode: str, fmt: str, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.standard_normal((height, width)).astype(np.float32))
    else:
        rgb = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(rgb).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
IMAGE_MODES = {"PNG": ["L", "RGB", "RGBA", "LA", "P", "1", "I;16"], "JPEG": ["L", "RGB", "CMYK"],
               "BMP": ["L", "RGB", "P", "1"], "TIFF": ["L", "RGB", "RGBA", "CMYK", "I;16", "F"],
               "WEBP": ["RGB", "RGBA"]}


def _huge_png(width: int, height: int) -> bytes:
    """A PNG header announcing width x height, then a broken stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\0\0\0\x10IDAT" + b"x" * 20)


@st.composite
def image_files(draw) -> tuple[bytes, str]:
    fmt = draw(st.sampled_from(list(IMAGE_FORMATS)), label="format")
    suffix = IMAGE_FORMATS[fmt]
    how = draw(st.sampled_from(["as is", "as is", "truncate", "flip", "huge"]), label="how")
    if how == "huge":
        return _huge_png(*draw(st.sampled_from([(100000, 100000), (2**31 - 1, 1), (0, 5),
                                                 (30000, 30000)]))), ".png"
    mode = draw(st.sampled_from(IMAGE_MODES[fmt]), label="mode")
    content = _png(draw(st.integers(1, 24)), draw(st.integers(1, 24)), mode, fmt,
                   draw(st.integers(0, 99)))
    if how == "truncate":
        content = content[: draw(st.integers(0, len(content)))]
    elif how == "flip":
        content = _flip(content, draw(st.lists(st.tuples(st.integers(0, len(content) - 1),
                                                         st.integers(0, 7)), min_size=1, max_size=6)))
    return content, suffix


def _check_input(path: Path, channels: int) -> None:
    tensor = assert_refused_or_loaded(lambda p: from_file(p, channels), path)
    if tensor is not None:
        assert tensor.dtype.is_floating_point and tensor.dim() == 4
        assert tensor.shape[1] == channels and tensor.numel() > 0
        if path.suffix not in (".npy", ".tif"):  # float TIFFs are taken as they are
            assert 0 <= float(tensor.min()) and float(tensor.max()) <= 1, path.name


@settings(max_examples=400, **FUZZ)
@given(content=npy_files(), channels=st.sampled_from([3, 3, 1, 4]))
def test_npy_input_is_read_or_refused(content, channels):
    with workdir() as folder:
        path = Path(folder) / "input.npy"
        path.write_bytes(content)
        _check_input(path, channels)


@settings(max_examples=250, **FUZZ)
@given(image=image_files(), channels=st.sampled_from([3, 3, 1, 4, 2]))
def test_image_input_is_read_or_refused(image, channels):
    content, suffix = image
    with workdir() as folder:
        path = Path(folder) / f"input{suffix}"
        path.write_bytes(content)
        _check_input(path, channels)


@settings(max_examples=80, **FUZZ)
@given(data=st.data())
def test_cli_with_odd_inputs(seeds, data):
    if data.draw(st.booleans(), label="image"):
        content, suffix = data.draw(image_files())
    else:
        content, suffix = data.draw(npy_files()), ".npy"
    with workdir() as folder:
        folder = Path(folder)
        shutil.copy(seeds["compact_zip.pth"], folder / "m.pth")
        shutil.copy(seeds["tiny.onnx"], folder / "t.onnx")
        (folder / f"in{suffix}").write_bytes(content)
        run_cli(["report", "m.pth", "--onnx", "t.onnx", *QUICK, "--input", f"in{suffix}",
                 "-o", "out/r.html", "--json", "out/d.json"], folder)


# --------------------------------------------------------------------------- real processes


@settings(max_examples=4, **FUZZ)
@given(data=st.data())
def test_real_command_ends_in_time(seeds, data):
    """The console command, in its own process: no hang, no traceback, exit 0, 1 or 2."""
    with workdir() as folder:
        folder = Path(folder)
        model = seeds["compact_zip.pth"].read_bytes()
        (folder / "m.pth").write_bytes(data.draw(damaged(model, zip_regions(model))))
        onnx_bytes = seeds["tiny.onnx"].read_bytes()
        (folder / "t.onnx").write_bytes(data.draw(st.sampled_from([onnx_bytes, onnx_bytes[:-100]])))
        extra = data.draw(st.lists(st.sampled_from([
            ["--samples", "2"], ["--rtol", "nan"], ["--seed", "-1"], ["--input-shape", "1,3,0,4"],
            ["--ignore-layer", "["], ["--max-memory", "1K"]]), max_size=2), label="extra")
        argv = ["report", "m.pth", "--onnx", "t.onnx", *QUICK, "-o", "out/r.html",
                *[a for pair in extra for a in pair]]
        # Activations beyond --max-memory spill to TMPDIR: it must be left empty.
        spill = Path(tempfile.mkdtemp(prefix="layerdiff-spill-"))
        before = digest(folder)
        try:
            done = subprocess.run([sys.executable, "-m", "layerdiff.cli", *argv], cwd=folder,
                                  capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "TMPDIR": str(spill)})
            # Importing onnxruntime writes .ses and torch makes torchinductor_<user>/.
            left = [p.name for p in spill.iterdir()
                    if p.name != ".ses" and not p.name.startswith("torchinductor_")]
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode in (0, 1, 2), (argv, done.stderr)
        after = digest(folder)
        assert all(after.get(k) == v for k, v in before.items())
        assert all(k in before or k.startswith("out") for k in after)
        assert not left, f"{argv} left {left} in TMPDIR"
