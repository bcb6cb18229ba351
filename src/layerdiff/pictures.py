"""Image outputs as pictures: PSNR and SSIM of each on each input, and the small arrays
the report shows of them (input, PyTorch's output, ONNX's, the difference amplified, and
full-resolution crops where the difference is largest).

An output is an image output when its array is float N,C,H,W with C in 1, 3 or 4 and the
model's first input is an image (an N,C,H,W float input, InputKind.IMAGE): the outputs
of super-resolution, restoration and inpainting models. A detector's N,4,H,W box map fed
by an image would pass this test too; its PSNR is then a plain figure of its values.

Outputs are read as pictures: values clipped to [0, 1], the first batch item shown. The
full-size outputs are read a band of rows at a time (an SR output at 4096 px is GBs);
what is kept is uint8 and at most SIDE px per side, a few hundred KB per picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import quality
from .records import CaseKind, ImageQuality, InputKind, InputSpec, OutputResult, Picture

SIDE = 256  # longest side of a reduced picture, pixels
CROP = 64  # side of the full-resolution crop around the largest difference
CHANNELS = (1, 3, 4)
BAND = 1 << 20  # elements of one output read at a time
# Inputs that are pictures a person would look at; random values are not.
REAL = (CaseKind.FILE, CaseKind.DATA, CaseKind.GIVEN, CaseKind.PHOTO)


def image_model(specs: Sequence[InputSpec]) -> bool:
    """Whether the model's first input is an image (N,C,H,W float)."""
    return bool(specs) and specs[0].kind == InputKind.IMAGE and len(specs[0].shape) == 4


def is_image_output(shape: Sequence[int]) -> bool:
    return len(shape) == 4 and shape[1] in CHANNELS and shape[2] > 0 and shape[3] > 0


def measure(label: str, outputs: Sequence[OutputResult], torch_outputs: Sequence[np.ndarray],
            onnx_outputs: Sequence[np.ndarray] | None) -> tuple[ImageQuality, ...]:
    """PSNR and SSIM of each image output of one input (none when onnxruntime failed)."""
    if onnx_outputs is None:
        return ()
    found = []
    for k, result in enumerate(outputs):
        reference = torch_outputs[k]
        if not is_image_output(reference.shape) or not np.issubdtype(reference.dtype, np.floating):
            continue
        candidate = onnx_outputs[k]
        if candidate.shape != reference.shape:
            continue
        db = quality.psnr(quality.mse_of(reference, candidate))
        found.append(ImageQuality(
            output=result.name, psnr=db, ssim=quality.ssim(reference, candidate),
            visibility=quality.visibility(db), max_abs=float(result.metrics.max_abs),
            value_range=_finite_range(reference), case=label))
    return tuple(found)


def picture(measured: ImageQuality, image_input: Any, reference: np.ndarray,
            candidate: np.ndarray) -> Picture:
    """The report's arrays of one image output on one input: ``image_input`` is the
    model's first input (N,C,H,W; a tensor or array), the outputs PyTorch's and ONNX's."""
    t, o = reference[0], candidate[0]  # C,H,W of the first batch item
    channels, height, width = t.shape
    step = _step(height, width)
    # Channel by channel, a band of rows at a time: the order the values lie in memory,
    # so the pages of an output mapped from disk are dropped once read.
    rows = step * max(1, BAND // (step * width))
    done = quality.read_once(reference, candidate)
    small_t, small_o, small_d = [], [], []
    worst, where = -1.0, (0, 0)
    for c in range(channels):
        bands_t, bands_o, bands_d = [], [], []
        for lo in range(0, height, rows):
            # float32 is exact enough for what becomes 8 bits
            a = quality.clipped(t[c:c + 1, lo:lo + rows], np.float32)
            b = quality.clipped(o[c:c + 1, lo:lo + rows], np.float32)
            diff = np.abs(b - a)
            at = int(np.argmax(diff))
            if diff.flat[at] > worst:
                worst, where = float(diff.flat[at]), (lo + at // width, at % width)
            bands_t.append(_reduce(a, step, np.mean))
            bands_o.append(_reduce(b, step, np.mean))
            bands_d.append(_reduce(diff, step, np.max))
            done((c * height + lo + rows) * width)
        small_t.append(np.concatenate(bands_t, axis=1))
        small_o.append(np.concatenate(bands_o, axis=1))
        small_d.append(np.concatenate(bands_d, axis=1))
    factor = amplification(worst)
    top, left, h, w = _crop_box(where, height, width)
    crop_t = quality.clipped(t[:, top:top + h, left:left + w])
    crop_o = quality.clipped(o[:, top:top + h, left:left + w])
    shown_input = None
    if image_input is not None:
        first = np.asarray(image_input[0].detach().cpu().numpy() if hasattr(image_input, "detach")
                           else image_input[0])
        if first.ndim == 3 and first.shape[0] in CHANNELS:
            shown_input = _rgb(_reduce(quality.clipped(first), _step(*first.shape[1:]), np.mean))
    return Picture(
        quality=measured, input=shown_input,
        torch=_rgb(np.concatenate(small_t)), onnx=_rgb(np.concatenate(small_o)),
        diff=_rgb(np.minimum(np.concatenate(small_d) * factor, 1.0)),
        factor=factor, reduced=step, size=(height, width), crop=(top, left, h, w),
        crop_torch=_rgb(crop_t), crop_onnx=_rgb(crop_o),
        crop_diff=_rgb(np.minimum(np.abs(crop_o - crop_t) * factor, 1.0)))


def amplification(largest: float) -> float:
    """The factor (1, 2 or 5 x 10^k, at least 1) that brings the largest difference to
    between 0.4 and 1 of full brightness: visible, never saturated."""
    if not (largest > 0 and math.isfinite(largest)) or largest >= 0.4:
        return 1.0
    target = 1.0 / largest
    power = 10.0 ** math.floor(math.log10(target))
    return max(1.0, max(m * power for m in (1, 2, 5) if m * power <= target * (1 + 1e-9)))


def _step(height: int, width: int) -> int:
    return max(1, math.ceil(max(height, width) / SIDE))


def _reduce(values: np.ndarray, step: int, how) -> np.ndarray:
    """C,H,W reduced by ``how`` (mean or max) over step x step blocks; the last blocks
    take what is there (edge pixels repeated), so a seam at the border stays."""
    if step == 1:
        return values
    c, h, w = values.shape
    padded = values
    if h % step or w % step:
        padded = np.pad(values, ((0, 0), (0, -h % step), (0, -w % step)), mode="edge")
    return how(padded.reshape(c, padded.shape[1] // step, step, padded.shape[2] // step, step),
               axis=(2, 4))


def _crop_box(where: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """A CROP x CROP box centred on ``where``, moved inside the picture."""
    h, w = min(CROP, height), min(CROP, width)
    top = min(max(where[0] - h // 2, 0), height - h)
    left = min(max(where[1] - w // 2, 0), width - w)
    return top, left, h, w


def _rgb(values: np.ndarray) -> np.ndarray:
    """C,H,W in [0, 1] as H,W,3 uint8: grey repeated, RGBA without its alpha."""
    if values.shape[0] == 1:
        values = np.repeat(values, 3, axis=0)
    return np.ascontiguousarray((values[:3].transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8))


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    low, high = math.inf, -math.inf
    flat = values.reshape(-1)
    done = quality.read_once(values)
    for lo in range(0, flat.size, BAND):
        chunk = flat[lo:lo + BAND]
        chunk = chunk[np.isfinite(chunk)]
        if chunk.size:
            low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        done(lo + BAND)
    return (low, high) if low <= high else (0.0, 0.0)
