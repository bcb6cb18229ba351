"""Any model (issue 11): several named inputs of any dtype, keyword arguments, structured
outputs, from a module or a Python entry point. Real models with random weights from
tests/zoo.py (spandrel LaMa and GFPGAN, timm ResNet / ConvNeXt / ViT, a Hugging Face BERT,
plain modules returning a dict or taking a keyword): each clean export passes, and a
one-node fault injected into the ONNX file is localised to the module that holds it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from layerdiff import diagnose
from layerdiff.cli import main
from samples import faults

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import zoo  # noqa: E402

pytest.importorskip("timm")
pytest.importorskip("transformers")

ZOO = str(ROOT / "tests" / "zoo.py")

# model, exporter, diagnose() options, fault: (op type, n-th node of it with a stored
# weight, factor, output channel or None for all), what forward() returns (names).
CASES = [
    ("resnet", "legacy", {}, ("Conv", 5, 1.5, 0), ["output"]),
    ("resnet", "dynamo", {}, ("Conv", 5, 1.5, 0), ["output"]),
    ("convnext", "legacy", {}, ("Conv", 6, 1.5, None), ["output"]),
    ("vit", "dynamo", {"check_sizes": [(48, 80)]}, ("MatMul", 2, 1.5, None), ["output"]),
    ("bert", "dynamo", {}, ("MatMul", 10, 3.0, None), ["last_hidden_state", "pooler_output"]),
    ("bert_wrapped", "legacy", {}, ("MatMul", 10, 3.0, None),
     ["last_hidden_state", "pooler_output"]),
    ("dict_output", "legacy", {}, ("Conv", 1, 1.5, 0), ["features", "logits"]),
    ("dict_output", "dynamo", {}, ("Conv", 1, 1.5, 0), ["features", "logits"]),
    ("keyword", "dynamo", {}, ("Conv", 0, 1.5, 0), ["output"]),
    ("keyword_optional", "legacy", {}, ("Conv", 0, 1.5, 0), ["output"]),
    # LaMa's FFTs export only with dynamo, and onnxruntime's buffer reuse breaks its DFTs
    # above the basic level when height and width are free: diagnosed at "basic".
    ("lama", "dynamo", {"ort_level": "basic", "check_sizes": [(48, 64)]},
     ("Conv", 9, 1.5, None), ["output"]),
    # The legacy exporter cannot export StyleGAN's modulated convolutions.
    ("gfpgan", "dynamo", {"check_sizes": ()}, ("Conv", 39, 1.5, None), ["output"]),
]


def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in zoo.EXAMPLES[name]().items()}


def _fault(path: Path, spec, out: Path) -> str:
    """Apply the fault to the n-th node of the op type whose weight is stored; the
    changed node's name."""
    op, nth, factor, channel = spec
    model = onnx.load(str(path))
    stored = {i.name for i in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    of_type = [n for n in model.graph.node if n.op_type == op]
    node = [n for n in of_type if len(n.input) > 1 and n.input[1] in stored][nth]
    changed, name = faults.scale_weight(model, op, of_type.index(node), factor, channel)
    onnx.save(changed, str(out))
    return name


@pytest.mark.parametrize("name, exporter, options, fault, returns", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_clean_export_passes_and_a_fault_is_localised(name, exporter, options, fault, returns,
                                                       tmp_path):
    model = zoo.BUILDERS[name]()
    clean = diagnose(model, None, input_shape=_shapes(name), exporter=exporter,
                     output_dir=tmp_path, **options)
    assert clean.verdict == "pass", clean.summary
    assert clean.onnx.exporter == exporter, clean.notes
    assert [o.model_output for o in clean.outputs] == returns
    specs = clean.settings.input_specs
    assert [s.name for s in specs] == list(zoo.EXAMPLES[name]())
    assert all(s.onnx_name for s in specs)
    if name == "keyword":  # keyword-only: it cannot go by position
        assert [s.name for s in specs if s.keyword] == ["gain"]
    assert clean.alignment.coverage()["compared"] > 0.6

    broken = tmp_path / "fault.onnx"
    changed = _fault(clean.onnx.path, fault, broken)
    found = diagnose(model, broken, input_shape=_shapes(name), output_dir=tmp_path,
                     **{**options, "check_sizes": ()})
    assert found.verdict == "diverged", found.summary
    first = found.first_divergence
    # Localised: the changed node is the first diverging layer's own, or among the nodes
    # that computed it from inputs that still agree (its region).
    suspects = {first.onnx_node, *(n.name for n in first.region)}
    assert changed in suspects, (changed, first.module, sorted(suspects)[:8], found.summary)


def test_token_model_from_the_command_line(tmp_path, capsys):
    """A Hugging Face encoder as an entry point: int64 ids drawn from its vocabulary (the
    embedding table's size), an all-ones attention mask, outputs by name, another length."""
    report = tmp_path / "bert.json"
    code = main(["report", f"{ZOO}:bert", "--input-shape", "input_ids:1,16",
                 "--input-shape", "attention_mask:1,16", "-o", str(tmp_path / "bert.html"),
                 "--json", str(report), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["schema"] == "layerdiff/2"
    inputs = {i["name"]: i for i in data["settings"]["inputs"]}
    assert inputs["input_ids"]["dtype"] == "int64" and inputs["input_ids"]["kind"] == "tokens"
    assert inputs["input_ids"]["range"] == [0, 512]  # BertConfig(vocab_size=512)
    assert inputs["attention_mask"]["kind"] == "attention_mask"
    assert data["settings"]["check_sizes"] == [[13]]  # another sequence length
    assert [o["model_output"] for o in data["outputs"]] == ["last_hidden_state", "pooler_output"]
    assert all(c["verdict"] == "pass" for c in data["cases"])


def test_input_range_and_input_data(tmp_path, capsys):
    ids = np.random.default_rng(0).integers(0, 100, (1, 12)).astype(np.int64)
    data = tmp_path / "tokens.npz"
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids))
    report = tmp_path / "r.json"
    code = main(["report", f"{ZOO}:bert", "--input-data", str(data),
                 "--input-range", "input_ids:0,100", "--check-sizes", "none",
                 "-o", str(tmp_path / "r.html"), "--json", str(report), "-q"])
    assert code == 0, capsys.readouterr().err
    got = json.loads(report.read_text())
    inputs = {i["name"]: i for i in got["settings"]["inputs"]}
    assert inputs["input_ids"]["range"] == [0, 100]
    assert inputs["input_ids"]["shape"] == [1, 12]  # the data's shape
    assert [c["label"] for c in got["cases"]] == ["random (seed 0)", "tokens.npz"]


def test_an_inpainting_mask_is_a_mask():
    from layerdiff.inputs import sample
    from layerdiff.records import InputKind, InputSpec

    mask = sample(InputSpec("mask", shape=(1, 1, 64, 64), kind=InputKind.MASK), 0)
    values = set(mask.unique().tolist())
    assert values == {0.0, 1.0}
    assert 0.01 < float(mask.mean()) < 0.9  # some rectangles, not all or nothing


def test_the_bundled_photo_is_a_real_image_at_the_input_size():
    import torch

    from layerdiff.inputs import cases, photo
    from layerdiff.records import CaseKind, InputKind, InputSpec

    rgb = photo.photo((2, 3, 37, 81))
    assert rgb.shape == (2, 3, 37, 81) and rgb.dtype == torch.float32
    assert 0 <= float(rgb.min()) and float(rgb.max()) <= 1 and torch.equal(rgb[0], rgb[1])
    # A photograph, not noise: neighbouring pixels are close, the picture is not flat.
    assert float((rgb[..., 1:] - rgb[..., :-1]).abs().mean()) < 0.05 and float(rgb.std()) > 0.1
    grey = photo.photo((1, 1, 64, 64))
    assert torch.allclose(grey, (photo.photo((1, 3, 64, 64))
                                 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True))
    assert torch.all(photo.photo((1, 4, 16, 16))[:, 3] == 1)  # opaque alpha

    image = InputSpec("x", shape=(1, 3, 24, 24), kind=InputKind.IMAGE)
    mask = InputSpec("mask", shape=(1, 1, 24, 24), kind=InputKind.MASK)
    ran = cases([image, mask], 0, photo=True)
    assert [c.kind for c in ran] == [CaseKind.RANDOM, CaseKind.PHOTO]
    assert ran[1].label == "photo (bundled)" and ran[1].values["x"].shape == (1, 3, 24, 24)
    assert set(ran[1].values["mask"].unique().tolist()) == {0.0, 1.0}  # the mask is drawn
    # Not when real values are given, nor for 2-channel images or integer inputs.
    assert [c.kind for c in cases([image], 0, photo=True, given={"x": rgb[:1, :, :24, :24]})] \
        == [CaseKind.GIVEN]
    assert len(cases([InputSpec("x", shape=(1, 2, 8, 8), kind=InputKind.IMAGE)], 0, photo=True)) == 1
    assert len(cases([InputSpec("ids", dtype="int64", shape=(1, 8), kind=InputKind.TOKENS,
                                low=0, high=9)], 0, photo=True)) == 1


@pytest.mark.parametrize("args, message", [
    # An input the --input-data archive lacks.
    (["--input-data", "{npz_missing}"], "no value for input 'input_ids'"),
    # A shape that disagrees with the ONNX input's rank.
    (["--onnx", "{onnx}", "--input-shape", "input_ids:1,16,4"],
     "input 'input_ids' is given 3 dimensions"),
    # An input name the model does not have.
    (["--input-shape", "pixel_values:1,3,8,8"], "no input named pixel_values"),
    # An empty range.
    (["--input-range", "input_ids:5,5"], "is not a range"),
], ids=["missing input", "shape vs onnx", "unknown input", "empty range"])
def test_input_errors_are_one_line(args, message, tmp_path, capsys, bert_onnx):
    npz = tmp_path / "partial.npz"
    np.savez(npz, attention_mask=np.ones((1, 8), np.int64))
    args = [a.format(npz_missing=npz, onnx=bert_onnx) for a in args]
    code = main(["report", f"{ZOO}:bert", *args, "-o", str(tmp_path / "r.html"), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and "hint:" in err
    assert not (tmp_path / "r.html").exists()


def test_integer_input_without_a_range_asks_for_one(tmp_path, capsys):
    entry = tmp_path / "ids.py"
    entry.write_text(
        "import torch\n"
        "class Lookup(torch.nn.Module):\n"
        "    def forward(self, ids):\n"
        "        return torch.nn.functional.one_hot(ids, 10).float()\n")
    code = main(["report", f"{entry}:Lookup", "--input-shape", "ids:1,4",
                 "-o", str(tmp_path / "r.html"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "input 'ids' holds integers" in err, err
    assert "--input-range ids:LOW,HIGH" in err


def test_missing_entry_point_is_one_line(tmp_path, capsys):
    code = main(["report", f"{ZOO}:no_such_model", "-o", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_model" in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    d = diagnose(zoo.bert(), None, input_shape=_shapes("bert"), output_dir=folder,
                 check_sizes=(), reference="none")
    return d.onnx.path


def test_library_takes_input_tensors_as_a_tuple_or_a_dict(tmp_path, bert_onnx):
    example = zoo.EXAMPLES["bert"]()
    model = zoo.bert()
    by_name = diagnose(model, bert_onnx, inputs=example, check_sizes=(), reference="none",
                       output_dir=tmp_path)
    in_order = diagnose(model, bert_onnx, inputs=tuple(example.values()), check_sizes=(),
                        reference="none", output_dir=tmp_path)
    for d in (by_name, in_order):
        assert d.verdict == "pass", d.summary
        assert [s.shape for s in d.settings.input_specs] == [(1, 16), (1, 16)]
    # The given values are the main input: no random draw replaces them.
    assert [c.label for c in by_name.cases] in ([], ["given inputs"])
    with pytest.raises(Exception, match="1 input tensor"):
        diagnose(model, bert_onnx, inputs=(example["input_ids"],), output_dir=tmp_path)


def test_leading_outputs_the_loader_names_are_compared(tmp_path):
    """spandrel keeps the first of what GFPGAN's module returns (the image, not its RGB
    pyramid): an ONNX file exported with that one output is compared on it."""
    import torch

    from layerdiff.records import LoadedModel, ModelKind

    class ImageAndExtras(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y, [y * 2, y.mean()]

    class FirstOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    torch.manual_seed(0)
    module = ImageAndExtras().eval()
    path = tmp_path / "first.onnx"
    torch.onnx.export(FirstOnly(module), (torch.rand(1, 3, 16, 16),), str(path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["output"])
    loaded = LoadedModel(module=module, path=None, kind=ModelKind.MODULE,
                         architecture="ImageAndExtras", input_channels=3, outputs=1)
    d = diagnose(loaded, path, input_shape=(1, 3, 16, 16), check_sizes=(), output_dir=tmp_path)
    assert d.verdict == "pass", d.summary
    assert [o.model_output for o in d.outputs] == ["0"]
    assert any("its users take the first 1" in n for n in d.notes), d.notes
    # Without that knowledge the counts differ, and that is said plainly.
    from layerdiff.preflight import MismatchError

    with pytest.raises(MismatchError, match="returns 3 tensor"):
        diagnose(module, path, input_shape=(1, 3, 16, 16), check_sizes=(), output_dir=tmp_path)


def test_input_specs_pair_by_name_then_position_and_share_sizes():
    import torch

    from layerdiff.errors import UsageError
    from layerdiff.inputs import Request, resolve
    from layerdiff.records import InputKind, InputSpec

    class Inpaint(torch.nn.Module):
        def forward(self, img, mask, strength: float = 0.5):
            return img * mask * strength

    graph = [("input.1", "float32", (1, 3, "height", "width")),
             ("onnx::Mul_1", "float32", (1, 1, "height", "width"))]
    specs, notes = resolve(Inpaint(), (), graph, Request(shapes={None: (1, 3, 40, 24)}))
    assert [(s.name, s.onnx_name, s.kind) for s in specs] == [
        ("img", "input.1", InputKind.IMAGE), ("mask", "onnx::Mul_1", InputKind.MASK)]
    assert specs[1].shape == (1, 1, 40, 24)  # the shared symbols: the image's size
    assert "by position" in notes[0] and "input.1 -> img" in notes[0]
    # By name when the names match; a default the graph takes is fed as that number.
    graph = [("img", "float32", (1, 3, 8, 8)), ("mask", "float32", (1, 1, 8, 8)),
             ("strength", "float32", ())]
    specs, notes = resolve(Inpaint(), (), graph, Request())
    assert notes == [] and specs[2].fill == 0.5
    # A loader's mask follows the image it covers.
    hints = (InputSpec("img", shape=(1, 3, 64, 64)), InputSpec("mask", shape=(1, 1, 64, 64),
                                                               kind=InputKind.MASK))
    specs, _ = resolve(Inpaint(), hints, None, Request(shapes={"img": (1, 3, 96, 32)}))
    assert specs[1].shape == (1, 1, 96, 32)
    with pytest.raises(UsageError, match="inputs that forward\\(\\) does not take: extra"):
        resolve(Inpaint(), (), [*graph, ("extra", "float32", (1,))], Request())


def test_inpainting_model_from_the_command_line(tmp_path, capsys):
    """LaMa (image + mask) as an entry point, a fault in its ONNX file, as README shows."""
    clean = diagnose(zoo.lama(), None, input_shape=_shapes("lama"), output_dir=tmp_path,
                     ort_level="basic", check_sizes=(), reference="none")
    broken = tmp_path / "lama-fault.onnx"
    changed = _fault(clean.onnx.path, ("Conv", 9, 1.5, None), broken)
    report = tmp_path / "lama.json"
    code = main(["report", f"{ZOO}:lama", "--onnx", str(broken), "--input-shape",
                 "img:1,3,32,32", "--ort-level", "basic", "--check-sizes", "none",
                 "-o", str(tmp_path / "lama.html"), "--json", str(report), "-q"])
    assert code == 1, capsys.readouterr().err
    data = json.loads(report.read_text())
    inputs = {i["name"]: i for i in data["settings"]["inputs"]}
    assert inputs["mask"]["kind"] == "mask" and inputs["mask"]["shape"] == [1, 1, 32, 32]
    first = data["first_divergence"]
    assert changed in {first["onnx_node"], *(n["name"] for n in first["region"])}, first
    # The align command pairs the same two-input model.
    assert main(["align", f"{ZOO}:lama", "--onnx", str(broken),
                 "--input-shape", "img:1,3,32,32"]) == 0
    assert "module calls" in capsys.readouterr().out


def test_a_model_that_takes_only_aligned_sizes_gets_an_aligned_other_size(tmp_path):
    d = diagnose(zoo.vit(), None, exporter="dynamo", output_dir=tmp_path, reference="none")
    by_label = {c.label: c for c in d.cases}
    assert by_label["random 49x81"].verdict == "skipped"
    assert "ran random 48x80 instead" in by_label["random 49x81"].note
    assert by_label["random 48x80"].verdict == "pass"


def test_bool_int32_and_float16_inputs_of_any_rank(tmp_path):
    import torch

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x, keep, index, scale):
            y = self.linear(x) * keep + scale.float()
            return torch.gather(y, 1, index.long())

    torch.manual_seed(0)
    model = Mixed().eval()
    example = (torch.rand(2, 8), torch.ones(2, 8, dtype=torch.bool),
               torch.zeros(2, 3, dtype=torch.int32), torch.ones(1, dtype=torch.float16))
    path = tmp_path / "mixed.onnx"
    torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17,
                      input_names=["x", "keep", "index", "scale"])
    d = diagnose(model, path, input_range={"index": (0, 8)}, output_dir=tmp_path)
    assert d.verdict == "pass", d.summary
    specs = {s.name: s for s in d.settings.input_specs}
    assert {n: s.dtype for n, s in specs.items()} == {
        "x": "float32", "keep": "bool", "index": "int32", "scale": "float32"}
    assert specs["index"].shape == (2, 3) and (specs["index"].low, specs["index"].high) == (0, 8)
    # Without a range the integer input is refused with the flag to give.
    from layerdiff.errors import UsageError

    with pytest.raises(UsageError, match="'index' holds integers") as refused:
        diagnose(model, path, output_dir=tmp_path)
    assert "--input-range index:LOW,HIGH" in refused.value.hint
