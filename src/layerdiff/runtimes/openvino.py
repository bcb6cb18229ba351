"""OpenVINO's own runtime (the ``openvino`` package): it reads ONNX itself.

Not onnxruntime's OpenVINO execution provider (that one is ``OpenVINOExecutionProvider``
through runtimes/onnxruntime.py). OpenVINO compiles the model for a device ("CPU" by
default) with that device's default hints, as a deployment does: on a CPU with bfloat16
instructions (AVX512-BF16, AMX) the CPU plugin computes in bfloat16 unless told
otherwise, so ``openvino-fp32`` sets ``INFERENCE_PRECISION_HINT=f32`` to compare the
model at float32. The precision a session ran at is in ``describe()``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import OnnxLoadError, first_line


@functools.cache
def _core():
    import openvino

    return openvino.Core()


def installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def devices() -> list[str]:
    return list(_core().available_devices)


def version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


_PREAMBLE = ("Exception from", "Check 'false' failed", "FrontEnd API failed with OpConversion",
             "Model wasn't fully converted", "Summary:")


def _readable(exc: Exception) -> str:
    """OpenVINO's message without its source locations: what failed, in two lines at most."""
    lines = [line.strip(" -") for line in str(exc).splitlines()
             if line.strip() and not line.startswith(_PREAMBLE)]
    return " ".join(lines[:2]) or first_line(exc)


@dataclass(frozen=True)
class _Port:
    name: str


class OpenVinoSession:
    """A compiled OpenVINO model behind the Session protocol (runtimes/base.py)."""

    def __init__(self, compiled, inputs: list[str], outputs: list[str]) -> None:
        self._compiled = compiled
        self._inputs = [_Port(n) for n in inputs]
        self._outputs = [_Port(n) for n in outputs]

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    def run(self, output_names: Sequence[str] | None,
            feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = [p.name for p in self._outputs] if output_names is None else list(output_names)
        request = self._compiled.create_infer_request()
        result = request.infer({name: np.ascontiguousarray(value) for name, value in feeds.items()})
        return [np.asarray(result[self._compiled.output(name)]) for name in names]


@dataclass(frozen=True)
class OpenVino:
    """OpenVINO on ``device``; ``properties`` are compile hints (none: the device's defaults)."""

    name: str  # "openvino", "openvino-fp32", "openvino:GPU"
    device: str = "CPU"
    properties: tuple[tuple[str, str], ...] = ()
    onnxruntime: bool = False
    _seen: dict = field(default_factory=dict, compare=False, repr=False)

    def session(self, model: bytes, *, level: str, config: tuple[tuple[str, str], ...] = (),
                arena: bool = True) -> OpenVinoSession:
        import onnx

        proto = onnx.load_from_string(model)
        initialisers = {t.name for t in proto.graph.initializer}
        inputs = [i.name for i in proto.graph.input if i.name not in initialisers]
        outputs = [o.name for o in proto.graph.output]
        try:
            core = _core()
            compiled = core.compile_model(core.read_model(model=model, weights=b""),
                                          self.device, dict(self.properties))
        except Exception as exc:
            raise OnnxLoadError(
                f"OpenVINO cannot load the model on {self.device}: {_readable(exc)}",
                hint="OpenVINO's ONNX reader lacks some ops and opsets; try another "
                     "--provider, or check the file with `python -m onnx.checker`",
            ) from exc
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")
        self._seen.setdefault("precision", getattr(precision, "to_string", lambda: str(precision))())
        return OpenVinoSession(compiled, inputs, outputs)

    def precision(self) -> str:
        return self._seen.get("precision", "")

    def describe(self) -> str:
        precision = self.precision()
        hints = ", ".join(f"{k}={v}" for k, v in self.properties)
        return (f"OpenVINO {version()} on {self.device}"
                + (f", inference precision {precision}" if precision else "")
                + (f" ({hints})" if hints else " (the device's default hints)"))
