"""End-to-end diagnosis on real spandrel architectures, real exports, real onnxruntime."""

from __future__ import annotations

import pytest

import faults
from conftest import SHAPE, make_model, with_fault
from layerdiff import diagnose

CLEAN_CASES = [
    ("esrgan", "legacy"), ("esrgan", "dynamo"), ("esrgan", "nameless"),
    ("compact", "legacy"), ("compact", "dynamo"), ("compact", "nameless"),
    ("span", "legacy"), ("span", "nameless"),
    ("swinir", "legacy"), ("swinir", "dynamo"), ("swinir", "nameless"),
]


@pytest.mark.parametrize("arch,how", CLEAN_CASES)
def test_clean_export_passes(arch, how, exported):
    # At the export size; other sizes are the subject of the next test.
    d = diagnose(make_model(arch), exported(arch, how), input_shape=SHAPE, check_sizes=())
    assert d.verdict == "pass", d.summary
    assert d.first_divergence is None
    assert all(layer.status == "pass" for layer in d.layers)
    assert d.outputs and all(o.passed for o in d.outputs)
    # Alignment really happened: most module calls are compared, none twice.
    real_calls = [c for c in d.calls if c.alias_of is None]
    assert len(d.layers) >= 0.5 * len(real_calls)
    assert len({layer.onnx_tensor for layer in d.layers}) == len(d.layers)


@pytest.mark.parametrize("arch,how,broken", [
    ("esrgan", "nameless", False), ("compact", "nameless", False),
    # Tracing SwinIR freezes its window padding as constants: right at the traced size,
    # wrong anywhere else. The default size check must find that.
    ("swinir", "nameless", True),
])
def test_other_sizes_are_checked_by_default(arch, how, broken, exported):
    d = diagnose(make_model(arch), exported(arch, how), input_shape=SHAPE)
    assert [c.kind for c in d.cases] == ["random", "photo", "size"]
    assert d.cases[0].verdict == "pass" and d.cases[1].verdict == "pass"
    # Inputs after the first are compared by their outputs; one whose outputs differ
    # while no layer was located yet is walked layer by layer to find where.
    assert [c.layer_by_layer for c in d.cases] == [True, False, broken]
    if broken:
        assert d.verdict == "diverged"
        assert d.first_divergence.case == d.cases[2].label
        assert "frozen_shape" in [s.rule for s in d.suggestions]
    else:
        assert d.verdict == "pass", d.summary


FAULTS = {
    "conv weight": lambda m: faults.scale_weight(m, "Conv", 3, 1.5),
    "one channel +1%": lambda m: faults.scale_weight(m, "Conv", 2, 1.01, channel=1),
    "leaky slope": lambda m: faults.leaky_slope(m, 0.1, index=2),
    "pixel shuffle DCR": faults.pixel_shuffle_dcr,
}
FAULT_CASES = [
    (arch, how, fault)
    for arch, names in (("esrgan", ("conv weight", "one channel +1%", "leaky slope")),
                        ("compact", ("conv weight", "pixel shuffle DCR")))
    for how in ("legacy", "dynamo", "nameless")
    for fault in names
]


@pytest.mark.parametrize("arch,how,fault", FAULT_CASES)
def test_one_node_fault_is_localised_to_its_module(arch, how, fault, exported, tmp_path):
    model = make_model(arch)
    clean_path = exported(arch, how)
    clean = diagnose(model, clean_path, input_shape=SHAPE)
    module_of = {layer.onnx_node: layer.module for layer in clean.layers}

    faulty_path, node = with_fault(clean_path, FAULTS[fault], tmp_path)
    d = diagnose(model, faulty_path, input_shape=SHAPE)

    assert d.verdict == "diverged"
    assert d.first_divergence is not None
    assert d.first_divergence.module == module_of[node]
    assert d.first_divergence.onnx_node == node
    # Everything before it in execution order still passes: a root cause, not propagation.
    before = [l for l in d.layers if l.order < d.layers[[l.module for l in d.layers].index(
        d.first_divergence.module)].order]
    assert all(l.status == "pass" for l in before)


def test_masked_divergence_is_reported(exported, tmp_path):
    # ESRGAN scales its residual branches by 0.2: a 1% change in one channel of an inner
    # conv does not reach the output beyond tolerance, but the layer itself fails.
    path, node = with_fault(exported("esrgan", "legacy"),
                            lambda m: faults.scale_weight(m, "Conv", 2, 1.01, channel=1), tmp_path)
    d = diagnose(make_model("esrgan"), path, input_shape=SHAPE)
    assert all(o.passed for o in d.outputs)
    assert d.verdict == "diverged" and d.masked
    assert "masked" in d.summary
    assert d.first_divergence.onnx_node == node


def test_ignored_layer_is_measured_but_not_blamed(exported, tmp_path):
    path, _ = with_fault(exported("compact", "legacy"), faults.pixel_shuffle_dcr, tmp_path)
    d = diagnose(make_model("compact"), path, input_shape=SHAPE, ignore=["op:DepthToSpace"])
    upsampler = next(l for l in d.layers if l.module == "upsampler")
    assert upsampler.ignored and upsampler.status == "ignored"
    assert upsampler.metrics is not None and not upsampler.metrics.passed  # still measured
    assert d.first_divergence is None
    # The output still differs, so the verdict stays honest.
    assert d.verdict == "diverged"


@pytest.mark.parametrize("pattern", ["upsampler", "up*", "/upsampler/*", "op:Depth*"])
def test_ignore_patterns_match_modules_nodes_and_ops(pattern, exported):
    d = diagnose(make_model("compact"), exported("compact", "legacy"), input_shape=SHAPE,
                 ignore=[pattern])
    ignored = [l.module for l in d.layers if l.ignored]
    assert ignored == ["upsampler"]


def test_ignoring_the_cause_blames_nothing_downstream(exported, tmp_path):
    # Downstream layers fail only through the error they receive; their own segments
    # are right, so once the cause is ignored none of them is blamed.
    path, node = with_fault(exported("esrgan", "legacy"),
                            lambda m: faults.scale_weight(m, "Conv", 1, 1.5), tmp_path)
    model = make_model("esrgan")
    plain = diagnose(model, path, input_shape=SHAPE)
    blamed = plain.first_divergence.module
    assert any(l.status == "propagated" for l in plain.layers)
    d = diagnose(model, path, input_shape=SHAPE, ignore=[blamed])
    assert d.first_divergence is None
    assert [l.status for l in d.layers if l.module == blamed] == ["ignored"]
    assert "fail" not in {l.status for l in d.layers}


def test_local_error_separates_cause_from_propagation(exported, tmp_path):
    path, node = with_fault(exported("compact", "dynamo"),
                            lambda m: faults.scale_weight(m, "Conv", 1, 1.5), tmp_path)
    d = diagnose(make_model("compact"), path, input_shape=SHAPE)
    causes = [l for l in d.layers if l.status == "fail"]
    assert [l.onnx_node for l in causes] == [node]
    after = [l for l in d.layers if l.order > causes[0].order]
    assert after and all(l.status == "propagated" for l in after)
    assert all(l.local is not None and l.local.passed for l in after)
    assert all(not l.metrics.passed for l in after)


def test_torch_and_onnx_get_separate_inputs_when_the_model_mutates_its_input(tmp_path):
    import torch

    class Mutating(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model("compact")

        def forward(self, x):
            x.mul_(1.0).add_(0.0)  # in place on the caller's tensor
            x *= 2.0
            return self.inner(x * 0.5)

    model = Mutating().eval()
    d = diagnose(model, input_shape=SHAPE, exporter="legacy", output_dir=tmp_path)
    assert d.facts.input_mutated
    assert d.verdict == "pass", d.summary


def test_diagnosing_a_training_model_does_not_change_it(tmp_path):
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diagnose(model, input_shape=(1, 3, 16, 16), exporter="legacy", output_dir=tmp_path)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


class _WithStrength(__import__("torch").nn.Module):
    """Like RealCUGAN's original export: a second graph input with a default in forward()."""

    def __init__(self):
        import torch

        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, alpha=0.5):
        return self.conv(x) * alpha


def _two_input_onnx(tmp_path, model):
    import torch

    path = tmp_path / "two_inputs.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 16, 16), torch.tensor(0.5)), str(path),
                      dynamo=False, opset_version=17, input_names=["input", "alpha"])
    return path


def test_extra_onnx_input_is_fed_from_the_forward_default(tmp_path):
    model = _WithStrength().eval()
    d = diagnose(model, _two_input_onnx(tmp_path, model), input_shape=(1, 3, 16, 16))
    assert d.verdict == "pass", d.summary


def test_extra_onnx_input_without_a_default_is_drawn_like_any_input(tmp_path):
    import torch

    class NoDefault(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, alpha):
            return self.conv(x) * alpha

    exported = _WithStrength().eval()
    path = _two_input_onnx(tmp_path, exported)
    model = NoDefault().eval()
    model.load_state_dict(exported.state_dict())
    d = diagnose(model, path, input_shape=(1, 3, 16, 16), check_sizes=())
    # Paired by name and filled as a plain value in [0, 1), the same on both sides.
    assert d.verdict == "pass", d.summary
    alpha = d.settings.input_specs[1]
    assert (alpha.name, alpha.onnx_name, alpha.kind, alpha.fill) == ("alpha", "alpha", "value", None)


def test_torchscript_compares_outputs_and_says_so(tmp_path):
    import torch

    model = make_model("compact")
    scripted = torch.jit.trace(model, torch.rand(1, 3, 16, 16))
    archive = tmp_path / "compact.pt"
    scripted.save(str(archive))
    d = diagnose(archive, input_shape=(1, 3, 16, 16), exporter="legacy", output_dir=tmp_path)
    assert d.verdict == "pass" and d.model.kind == "torchscript"
    assert d.outputs and all(o.passed for o in d.outputs)
    assert any("only the final outputs" in n for n in d.notes)


def test_float64_referee_says_which_side_is_off(exported, tmp_path):
    path, node = with_fault(exported("compact", "legacy"),
                            lambda m: faults.scale_weight(m, "Conv", 1, 1.5), tmp_path)
    d = diagnose(make_model("compact"), path, input_shape=SHAPE, check_sizes=())
    first = next(l for l in d.layers if l.module == d.first_divergence.module)
    assert first.referee is not None and first.referee.side == "onnx"
    assert first.referee.onnx_error > 100 * first.referee.torch_error
    # Layers within the fixed tolerance need no referee (a noise floor only widens it);
    # every layer that failed it was judged.
    clean = [l for l in d.layers if l.status == "pass"]
    assert clean and all(l.referee is None for l in clean)
    # Every layer that failed it up to the first divergence was judged; there the float64
    # run stopped (nothing later can move the first divergence) and a note says so.
    failed = [l for l in d.layers if l.status in ("fail", "propagated")]
    assert all(l.referee is not None for l in failed if l.order <= first.order)
    later = [l for l in failed if l.order > first.order]
    assert later and any(l.referee is None for l in later)
    assert any(n.startswith(f"The float64 referee stopped at {first.module}") for n in d.notes)


def test_float64_noise_floor_adapts_the_tolerance(exported):
    # At a tolerance far below fp32 rounding every layer fails against fp32 PyTorch;
    # measured against PyTorch's own error in float64 they are all within noise.
    kwargs = dict(input_shape=SHAPE, check_sizes=(), rtol=1e-9, atol=0.0)
    strict = diagnose(make_model("esrgan"), exported("esrgan", "legacy"), reference="none", **kwargs)
    assert strict.verdict == "diverged"
    refereed = diagnose(make_model("esrgan"), exported("esrgan", "legacy"), **kwargs)
    assert refereed.verdict == "pass", refereed.summary
    assert all(l.referee is not None for l in refereed.layers)


def test_several_inputs_keep_each_layers_worst_case(exported, tmp_path):
    import numpy as np
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((24, 24, 3)) * 255).astype("uint8")).save(image)
    array = tmp_path / "tensor.npy"
    np.save(array, np.random.default_rng(1).random((3, 24, 24)).astype("float32"))
    path, _ = with_fault(exported("compact", "legacy"), faults.pixel_shuffle_dcr, tmp_path)
    d = diagnose(make_model("compact"), path, input_shape=SHAPE, samples=2,
                 input_files=[str(image), str(array)], check_sizes=())
    assert [c.label for c in d.cases] == ["random (seed 0)", "random (seed 1)", "photo.png", "tensor.npy"]
    assert all(c.verdict == "diverged" for c in d.cases)
    upsampler = next(l for l in d.layers if l.module == "upsampler")
    assert upsampler.case in {c.label for c in d.cases}
    worst = max(c.max_output_error for c in d.cases)
    assert d.outputs[0].metrics.max_abs == pytest.approx(worst)


def test_first_divergence_carries_its_row_when_inputs_are_combined(exported, tmp_path):
    # Two inputs: the layer list is each layer's worst, re-sorted; the index must point
    # into that list, not into the input's own.
    from layerdiff.render import to_json_dict

    path, node = with_fault(exported("compact", "nameless"), faults.pixel_shuffle_dcr, tmp_path)
    d = diagnose(make_model("compact"), path, input_shape=SHAPE, samples=2, check_sizes=())
    first = d.first_divergence
    assert [c.kind for c in d.cases] == ["random", "random", "photo"]
    assert first.onnx_node == node
    row = d.layers[first.layer]
    assert (row.module, row.onnx_node, row.status) == (first.module, node, "fail")
    assert to_json_dict(d)["first_divergence"]["layer"] == first.layer


def test_a_later_input_is_compared_by_its_outputs_once_a_divergence_is_located(exported, tmp_path):
    from layerdiff.render import to_json_dict

    path, node = with_fault(exported("compact", "dynamo"), faults.pixel_shuffle_dcr, tmp_path)
    d = diagnose(make_model("compact"), path, input_shape=SHAPE, check_sizes=())
    main, photo = d.cases
    assert d.first_divergence.onnx_node == node and d.first_divergence.case == main.label
    assert main.layer_by_layer and main.verdict == "diverged"
    assert not photo.layer_by_layer and photo.verdict == "diverged" and photo.max_output_error > 0
    assert photo.note.startswith(f"outputs compared; the layers were compared on {main.label}")
    assert all(layer.case != photo.label for layer in d.layers)
    assert [c["layer_by_layer"] for c in to_json_dict(d)["cases"]] == [True, False]
