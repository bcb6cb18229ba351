"""How much memory the model's own forward needs at an input size, estimated cheaply.

A diagnosis can keep its own buffers within --max-memory (spilling, segments), but not
the PyTorch forward itself: at 4096x4096 an SR model's forward alone can need more than
the machine has, and finding that out by running it costs minutes and ends in the OOM
killer. So before anything runs at full size, the model runs at two small sizes under a
dispatch mode that tracks the bytes of live tensors, and their peak is fitted to
``a + b * pixels``. For convolutional models this is exact: every activation scales with
the pixel count (measured: Compact and ESRGAN gave the same bytes per pixel at 64, 128
and 1000 px). Attention over the whole image grows faster, and the fit then gives too
little: the estimate errs towards running, never towards refusing a run that fits.

Live tensors are not the whole resident memory: oneDNN's scratch buffers and the
allocator added 33-38% on top at 1000x1000 (Compact and ESRGAN, VmHWM against the
tracked peak). ``RSS_FACTOR`` takes 20% of that, so a refusal keeps a margin.

onnxruntime runs the same graph, cut into segments (segments.py), but no cut goes
through a node: the node making the largest tensor has it live with its inputs, and the
tensors a segment exposes stay live until it ends. At the end of an SR model that is
three tensors of the output's size (Compact at 4096 px: the pixel-shuffled features, the
upscaled input recomputed for the residual add, and the sum; measured), and comparing
the largest tensor holds onnxruntime's value and PyTorch's read back. So the diagnosis
needs at least ``ORT_LARGEST`` times the largest tensor too: of the two, the larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Measured resident memory over tracked tensor bytes was 1.33 to 1.38 (see above). A
# refusal takes a lower factor, so it refuses only runs short by a clear margin; sharing
# the budget out and deciding whether an optional check fits take the high end.
RSS_FACTOR = 1.2
RSS_FACTOR_HIGH = 1.4
# Probe sizes (the shorter side): small enough to cost a fraction of a second on most
# models, large enough that per-pixel tensors dominate the fixed ones.
PROBE_SIDES = (64, 128)
ORT_LARGEST = 3


@dataclass(frozen=True)
class Footprint:
    """The PyTorch forward's peak of live tensors, ``fixed + per_pixel * H * W`` bytes,
    and its largest single tensor, ``largest_per_pixel * H * W`` bytes."""

    fixed: float
    per_pixel: float
    largest_per_pixel: float

    def tensors(self, height: int, width: int) -> int:
        return int(self.fixed + self.per_pixel * height * width)

    def torch_forward(self, height: int, width: int, factor: float = RSS_FACTOR) -> int:
        """Resident memory PyTorch's forward needs at H x W (tensors, scratch, allocator)."""
        return int(factor * self.tensors(height, width))

    def forward(self, height: int, width: int, factor: float = RSS_FACTOR) -> int:
        """Resident memory the larger of the two forwards needs at H x W, with the
        comparison of the largest tensor: what no budget can cut."""
        return max(self.torch_forward(height, width, factor),
                   int(ORT_LARGEST * self.largest_per_pixel * height * width))

    def largest_fitting(self, room: int, height: int, width: int) -> tuple[int, int] | None:
        """The largest H, W with the aspect of ``height`` x ``width`` whose forward fits
        ``room`` bytes, in multiples of 16 (None when not even 16 x 16 fits). On the
        high end of the estimate: a size offered must fit (ESRGAN at the size the low
        end gave peaked 13% over)."""
        pixels = min((room / RSS_FACTOR_HIGH - self.fixed) / self.per_pixel,
                     room / (ORT_LARGEST * self.largest_per_pixel))
        if pixels <= 0:
            return None
        scale = math.sqrt(pixels / (height * width))
        fit = (int(height * scale) // 16 * 16, int(width * scale) // 16 * 16)
        return fit if min(fit) >= 16 else None


def estimate(module: torch.nn.Module, shape: tuple[int, ...]) -> Footprint | None:
    """The forward's footprint, from two small runs shaped like ``shape`` (N, C, H, W).
    None when it cannot be estimated: not an image-shaped input, a TorchScript module
    (not dispatched through Python), a model that rejects the small sizes, or peaks that
    do not grow with the size."""
    if len(shape) != 4 or isinstance(module, torch.jit.ScriptModule):
        return None
    n, c, height, width = shape
    points = []
    for side in PROBE_SIDES:
        scale = side / min(height, width)
        if scale >= 1:
            return None  # the input is small: nothing to fear
        h, w = max(round(height * scale), 1), max(round(width * scale), 1)
        try:
            peak, largest = _peak_tensor_bytes(module, torch.rand(n, c, h, w))
        except Exception:  # the model does not take this size: no estimate, no refusal
            return None
        points.append((h * w, peak, largest))
    (p1, b1, _), (p2, b2, largest) = points
    per_pixel = (b2 - b1) / (p2 - p1)
    if per_pixel <= 0:
        return None
    return Footprint(fixed=max(b1 - per_pixel * p1, 0.0), per_pixel=per_pixel,
                     largest_per_pixel=largest / p2)


def _peak_tensor_bytes(module: torch.nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """The peak bytes of live tensors made by the forward, and its largest one."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.multiprocessing.reductions import StorageWeakRef

    class _Peak(TorchDispatchMode):
        """Storages made during the forward, by address, until they are freed."""

        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.now = self.peak = self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key, (ref, nbytes) in list(self.live.items()):
                if ref.expired():
                    del self.live[key]
                    self.now -= nbytes
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor) and value.device.type != "meta":
                    storage = value.untyped_storage()
                    key = storage.data_ptr()
                    if key not in self.live:  # in-place ops return a storage already counted
                        self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                        self.now += storage.nbytes()
                        self.largest = max(self.largest, storage.nbytes())
            self.peak = max(self.peak, self.now)
            return out

    tracker = _Peak()
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    try:
        with torch.no_grad(), tracker:
            module(example)
    finally:
        with torch.no_grad():  # a model left in training mode updates running stats
            for name, value in module.named_buffers():
                if name in buffers:
                    value.copy_(buffers[name])
    return tracker.peak, tracker.largest


@dataclass(frozen=True)
class Budget:
    """How a diagnosis shares --max-memory out (pipeline.budgets)."""

    limit: int  # --max-memory: what the whole process may hold, in bytes
    store: int  # PyTorch activations and model outputs kept in RAM; the rest on disk
    segment: int  # exposed tensors per ONNX segment
    footprint: Footprint | None = None  # the float32 forward's, when it could be estimated
