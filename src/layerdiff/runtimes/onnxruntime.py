"""onnxruntime with one execution provider: the CPU provider, CUDA, TensorRT, DirectML...

Every provider is this one class with another name. onnxruntime quietly falls back to
the CPU provider when a provider fails to start (no GPU, a missing CUDA or TensorRT
library), and a report would then name a provider that never ran; ``check`` starts a
session on a tiny model and refuses the provider when onnxruntime did not use it.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import onnxruntime as ort

from ..capture_onnx import _options, _probe_model
from ..errors import OnnxLoadError, UsageError, first_line

# Listed by onnxruntime but not a place to compute a model: left out of "all".
NOT_COMPUTE = frozenset({"AzureExecutionProvider"})


def listed() -> list[str]:
    """The execution providers this onnxruntime build lists."""
    return list(ort.get_available_providers())


def version() -> str:
    return ort.__version__


@dataclass(frozen=True)
class OnnxRuntime:
    """onnxruntime's InferenceSession with ``provider`` (and onnxruntime's own fallback
    to the CPU provider for the nodes ``provider`` cannot run, as in deployment)."""

    name: str  # the execution provider, e.g. "CUDAExecutionProvider"
    onnxruntime: bool = True

    def session(self, model: bytes, *, level: str, config: tuple[tuple[str, str], ...] = (),
                arena: bool = True) -> ort.InferenceSession:
        options = _options(level, config, arena=arena)
        try:
            return ort.InferenceSession(model, options, providers=[self.name])
        except Exception as exc:
            raise OnnxLoadError(
                f"onnxruntime cannot load the model: {first_line(exc)}",
                hint="check the opset and custom ops; `python -m onnx.checker` may say more",
            ) from exc

    def describe(self) -> str:
        return ""

    def precision(self) -> str:
        return ""

    def check(self) -> None:
        """A UsageError when onnxruntime does not really run ``name`` here."""
        try:
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                session = ort.InferenceSession(_probe_model(), _options("all", ()),
                                               providers=[self.name])
            used = session.get_providers()
        except Exception as exc:
            raise UsageError(f"onnxruntime cannot start the {self.name}: {first_line(exc)}",
                             hint="check the provider's libraries (CUDA, cuDNN, TensorRT) "
                                  "and drivers") from None
        if not used or used[0] != self.name:
            raise UsageError(f"onnxruntime lists {self.name} but fell back to "
                             f"{used[0] if used else 'nothing'} when starting it",
                             hint="check the provider's libraries (CUDA, cuDNN, TensorRT) "
                                  "and drivers")
