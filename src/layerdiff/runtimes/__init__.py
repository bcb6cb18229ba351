"""The runtimes a diagnosis can run the ONNX model with, by the names ``--provider`` takes.

- onnxruntime execution providers by their names (``CPUExecutionProvider``,
  ``CUDAExecutionProvider``, ``TensorrtExecutionProvider``, ``DmlExecutionProvider``,
  ``OpenVINOExecutionProvider``...) or short aliases (``cpu``, ``cuda``, ``tensorrt``,
  ``dml`` / ``directml``, ``coreml``, ``rocm``, ``migraphx``, ``openvino-ep``);
- OpenVINO's own runtime: ``openvino`` (the device's default hints, as deployed),
  ``openvino-fp32`` (``INFERENCE_PRECISION_HINT=f32``), each with ``:DEVICE`` for a device
  other than the CPU (``openvino:GPU``);
- ``all``: every onnxruntime provider that starts here, then ``openvino`` when installed.

A name that is not available is a UsageError naming those that are.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import UsageError
from .base import Runtime, Session

__all__ = ["Runtime", "Session", "resolve", "get", "available", "ALIASES"]

ALIASES = {
    "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider", "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider", "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider", "openvino-ep": "OpenVINOExecutionProvider",
}
OPENVINO = ("openvino", "openvino-fp32")


def available() -> list[str]:
    """Every runtime name ``all`` stands for: the onnxruntime providers that start here,
    then OpenVINO (when installed, once per device besides the CPU)."""
    from . import onnxruntime as ort_runtime, openvino

    names = []
    for provider in ort_runtime.listed():
        if provider in ort_runtime.NOT_COMPUTE:
            continue
        try:
            ort_runtime.OnnxRuntime(provider).check()
        except UsageError:
            continue
        names.append(provider)
    if openvino.installed():
        names += ["openvino" if d == "CPU" else f"openvino:{d}" for d in openvino.devices()]
    return names


def _known() -> list[str]:
    """What to offer in an error: every name that works here, with the other forms."""
    from . import onnxruntime as ort_runtime, openvino

    names = [p for p in ort_runtime.listed() if p not in ort_runtime.NOT_COMPUTE]
    if openvino.installed():
        names += ["openvino", "openvino-fp32"]
    return names


def get(name: str) -> Runtime:
    """The runtime called ``name`` (not ``all``), checked to be available here."""
    from . import onnxruntime as ort_runtime, openvino

    base, _, device = name.partition(":")
    if base.lower() in OPENVINO:
        if not openvino.installed():
            raise UsageError(f"--provider {name}: OpenVINO is not installed",
                             hint=f"pip install openvino, or use one of: {', '.join(_known())}")
        device = device or "CPU"
        if device not in openvino.devices():
            raise UsageError(f"--provider {name}: OpenVINO has no device {device} here",
                             hint="OpenVINO's devices here: " + ", ".join(openvino.devices()))
        hints = (("INFERENCE_PRECISION_HINT", "f32"),) if base.lower() == "openvino-fp32" else ()
        return openvino.OpenVino(name, device, hints)
    provider = ALIASES.get(name.lower(), name)
    if provider not in ort_runtime.listed():
        raise UsageError(f"execution provider '{name}' is not available in this onnxruntime "
                         f"{ort_runtime.version()}",
                         hint="available: " + ", ".join(_known()) + " (other providers come "
                              "with other onnxruntime packages, e.g. onnxruntime-gpu; "
                              "'all' runs every one)")
    runtime = ort_runtime.OnnxRuntime(provider)
    runtime.check()
    return runtime


def resolve(names: str | Iterable[str]) -> tuple[str, ...]:
    """``--provider`` as given (one name or several, ``all`` among them) as the runtime
    names to run, each once, each checked; a UsageError for one that is not available."""
    given = [names] if isinstance(names, str) else list(names)
    if not given:
        given = ["CPUExecutionProvider"]
    out: list[str] = []
    for name in given:
        expanded = available() if name.lower() == "all" else [get(name).name]
        out += [n for n in expanded if n not in out]
    if not out:
        raise UsageError("--provider all: no runtime starts here",
                         hint="install onnxruntime's CPU provider or openvino")
    return tuple(out)
