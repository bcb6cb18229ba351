"""Image outputs as pictures, end to end: PSNR and SSIM on every input (the bundled photo
by default), the report's picture arrays, the JSON and the console."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import faults
from conftest import SHAPE, make_model, with_fault
from layerdiff import diagnose, pictures, pipeline, render
from layerdiff.records import CaseKind, Visibility


@pytest.fixture(scope="module")
def clean_and_faulty(exported, tmp_path_factory):
    """Compact x4 (random weights) on its clean export and on one whose PixelShuffle became
    DepthToSpace in DCR order (the checkerboard people see)."""
    model = make_model("compact")
    path = exported("compact", "legacy")
    faulty, _ = with_fault(path, faults.pixel_shuffle_dcr, tmp_path_factory.mktemp("pictures"))
    clean = diagnose(model, path, input_shape=SHAPE, check_sizes=())
    bad = diagnose(model, faulty, input_shape=SHAPE, check_sizes=())
    return clean, bad


def test_the_bundled_photo_is_measured_as_a_picture(clean_and_faulty):
    clean, _ = clean_and_faulty
    assert clean.verdict == "pass"
    assert [c.kind for c in clean.cases] == [CaseKind.RANDOM, CaseKind.PHOTO]
    for case in clean.cases:
        (image,) = case.images
        assert image.output == clean.outputs[0].name and image.case == case.label
        assert image.psnr > 80  # float32 rounding only
        assert image.ssim == pytest.approx(1.0, abs=1e-6)
        assert image.visibility == Visibility.IDENTICAL
    # the output keeps its lowest PSNR over the inputs, with the input's label
    worst = clean.outputs[0].image
    assert worst.psnr == min(c.images[0].psnr for c in clean.cases)
    assert worst.case in {c.label for c in clean.cases}
    # pictures are made for the real image only: the photo
    (picture,) = clean.pictures
    assert picture.quality.case == "photo (bundled)"
    assert picture.size == (SHAPE[2] * 4, SHAPE[3] * 4) and picture.reduced == 1
    assert picture.torch.shape == picture.onnx.shape == picture.diff.shape == (96, 96, 3)
    assert picture.torch.dtype == np.uint8 and picture.input.shape == (24, 24, 3)
    assert picture.crop[2:] == (64, 64) and picture.crop_torch.shape == (64, 64, 3)
    assert picture.factor >= 1e4  # float32 noise amplified to a visible level


def test_a_faulty_export_costs_psnr_and_ssim(clean_and_faulty):
    clean, bad = clean_and_faulty
    assert bad.verdict == "diverged"
    for good, worse in zip(clean.cases, bad.cases):
        assert worse.images[0].psnr < good.images[0].psnr - 20
        assert worse.images[0].ssim < good.images[0].ssim
    photo = next(c for c in bad.cases if c.kind == CaseKind.PHOTO)
    assert photo.images[0].psnr < 40
    assert photo.images[0].visibility in (Visibility.CLOSE_INSPECTION, Visibility.VISIBLE)
    assert photo.images[0].max_abs == pytest.approx(photo.max_output_error)
    (picture,) = bad.pictures
    assert picture.factor < clean.pictures[0].factor
    # the crop holds the largest difference
    diff = np.abs(picture.crop_onnx.astype(int) - picture.crop_torch.astype(int)).max()
    assert diff >= np.abs(picture.onnx.astype(int) - picture.torch.astype(int)).max() - 1


def test_json_and_console_carry_the_figures(clean_and_faulty):
    clean, bad = clean_and_faulty
    for d in (clean, bad):
        data = json.loads(render.to_json(d))
        for case, record in zip(data["cases"], d.cases):
            (image,) = case["images"]
            assert set(image) == {"output", "psnr", "ssim", "visibility", "max_abs", "value_range"}
            assert image["psnr"] == pytest.approx(record.images[0].psnr)
            assert image["visibility"] == record.images[0].visibility.value
        out = data["outputs"][0]["image"]
        assert set(out) == {"psnr", "ssim", "visibility", "value_range", "case"}
        text = render.console_summary(d, color=False)
        assert "pictures (ONNX vs PyTorch, values clipped to [0, 1]):" in text
        assert f"photo (bundled): PSNR {d.cases[1].images[0].psnr:.2f} dB" in text
    assert "visually identical" in render.console_summary(clean, color=False)


def test_identical_outputs_give_inf_psnr_written_as_a_string(clean_and_faulty):
    import dataclasses

    clean, _ = clean_and_faulty
    case = clean.cases[0]
    same = dataclasses.replace(case.images[0], psnr=math.inf)
    d = dataclasses.replace(clean, cases=(dataclasses.replace(case, images=(same,)),))
    data = json.loads(render.to_json(d))
    assert data["cases"][0]["images"][0]["psnr"] == "inf"
    assert "PSNR ∞ dB" in render.console_summary(d, color=False)


def test_the_report_shows_the_pictures_and_the_figures(clean_and_faulty):
    _, bad = clean_and_faulty
    page = render.render_html(bad)
    section = page[page.index('id="pictures"'):page.index('id="first-divergence"')]
    # input, PyTorch, ONNX, diff; the flipping pair, the flipping crop pair, the crop's diff
    assert section.count("<img") == 9
    assert 'class="flip-btn"' in section and 'data-show="torch"' in section
    q = bad.pictures[0].quality
    assert f"{q.psnr:.2f} dB" in section and "×" in section
    assert q.visibility.words in section
    # next to max abs in the outputs table and the inputs table
    outputs = page[page.index('id="outputs"'):]
    assert ">PSNR</th>" in outputs and ">SSIM</th>" in outputs


def test_a_model_without_image_outputs_has_no_pictures(tmp_path):
    assert pictures.is_image_output((1, 3, 8, 8)) and pictures.is_image_output((2, 1, 5, 7))
    assert not pictures.is_image_output((1, 16, 8, 8)) and not pictures.is_image_output((1, 3, 8))
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 4))
    d = diagnose(model, inputs=torch.rand(1, 3, 4, 4), check_sizes=(), output_dir=tmp_path)
    assert d.pictures == () and all(o.image is None for o in d.outputs)
    assert all(not c.images for c in d.cases)
    assert "pictures" not in render.console_summary(d, color=False)


@pytest.mark.parametrize("largest, factor", [
    (0.0, 1.0), (0.5, 1.0), (0.114, 5.0), (3e-6, 2e5), (1e-3, 1000.0), (2.4e-7, 2e6),
])
def test_the_amplification_brings_the_largest_difference_to_a_visible_level(largest, factor):
    assert pictures.amplification(largest) == pytest.approx(factor)
    if largest:
        assert 0.4 <= largest * factor <= 1.0 or factor == 1.0


def test_large_outputs_are_reduced_and_cropped_at_full_resolution():
    rng = np.random.default_rng(0)
    torch_out = rng.random((1, 3, 700, 1000)).astype(np.float32)
    onnx_out = torch_out.copy()
    onnx_out[0, 1, 650, 20] += 0.3  # one pixel near the border
    (q,) = pictures.measure("x", [_output("out")], [torch_out], [onnx_out])
    p = pictures.picture(q, torch_out[:, :, ::4, ::4], torch_out, onnx_out)
    assert p.reduced == 4 and p.torch.shape == (175, 250, 3)
    assert p.factor == 2.0
    top, left, h, w = p.crop
    assert (h, w) == (64, 64) and top <= 650 < top + h and left == 0
    assert p.crop_diff[650 - top, 20 - left, 1] > 100  # visible in the crop ...
    assert p.diff[650 // 4, 20 // 4, 1] > 100  # ... and, block max, in the reduced picture


def _output(name):
    from layerdiff.compare import compare
    from layerdiff.records import OutputResult

    return OutputResult(name, compare(np.zeros(1), np.zeros(1), rtol=1e-3, atol=1e-5))


def test_first_divergence_previews_show_the_channels_with_the_largest_error():
    from layerdiff.report_visuals import _preview

    reference = np.zeros((1, 10, 16, 16), dtype=np.float32)
    value = reference.copy()
    for channel, error in ((1, 0.01), (3, 0.5), (4, 1e-6), (7, 0.2), (8, 0.03), (9, 0.02)):
        value[0, channel, 5, 5] = error
    maps = pipeline._channel_maps(reference, value)
    assert [(c, n) for c, n, _ in maps] == [(3, 10), (7, 10), (8, 10), (9, 10)]  # in channel order
    assert [float(m.max()) for _, _, m in maps] == pytest.approx([0.5, 0.2, 0.03, 0.02])
    histogram = pipeline._diff_histogram(reference, value)
    assert histogram.shape == (2, pipeline.HISTOGRAM_BINS + 1)
    assert histogram[1].sum() == 6 and histogram[0][-1] == pytest.approx(0.5)
    # a labelled colour scale from 0 (no error) to the map's max
    shown = _preview("first divergence |diff|: conv, channel 7 of 10", maps[1][2])
    assert (shown["min"], shown["mid"], shown["max"]) == ("0", "0.1", "0.2")
    assert shown["bar"].startswith("linear-gradient(to right, rgb(0,0,4)")


def test_the_report_labels_each_channel_preview_and_bins_the_whole_layer_once(clean_and_faulty):
    _, bad = clean_and_faulty
    names = list(bad.previews)
    channels = [n for n in names if ", channel " in n]
    assert channels and len(channels) <= pipeline.PREVIEW_CHANNELS
    assert any(n.startswith("histogram:first divergence |diff|: ") for n in names)
    page = render.render_html(bad)
    assert page.count('class="cbar"') == len([n for n in names if not n.startswith("histogram:")])
    # one histogram for the layer (its whole tensor), one for the final output
    assert page.count('class="hist-svg"') == 2



def test_outputs_read_back_from_disk_are_not_held_in_memory(tmp_path):
    # The store maps spilled outputs from .npy files: measuring and picturing them must
    # drop their pages once read, as compare() does, or a 4096 px output costs GBs.
    from layerdiff import store

    rng = np.random.default_rng(0)
    values = rng.random((1, 3, 2400, 2400), dtype=np.float32)
    np.save(tmp_path / "torch.npy", values)
    np.save(tmp_path / "onnx.npy", values + np.float32(1e-3))
    del values
    torch_out = np.load(tmp_path / "torch.npy", mmap_mode="r")
    onnx_out = np.load(tmp_path / "onnx.npy", mmap_mode="r")
    before = store.current_rss()
    (q,) = pictures.measure("x", [_output("out")], [torch_out], [onnx_out])
    p = pictures.picture(q, None, torch_out, onnx_out)
    grown = store.current_rss() - before
    assert grown < 0.4 * torch_out.nbytes, f"{grown / 2**20:.0f} MiB held"
    assert q.psnr == pytest.approx(60.0, abs=0.01) and p.reduced == 10
