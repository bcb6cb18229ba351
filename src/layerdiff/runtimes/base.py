"""What layerdiff asks of a runtime that runs ONNX models: the interface, and why so small.

The pipeline builds many small models (the graph cut into segments, a layer's local run,
the plain model) and runs each once: ``Runtime.session`` loads one from its bytes and
``Session.run`` computes the outputs asked for. That is all a runtime must do, so adding
one is a small file (runtimes/onnxruntime.py, runtimes/openvino.py), not a fork of the
pipeline. The Session protocol is the part of onnxruntime's InferenceSession that
layerdiff uses, so an onnxruntime session is one as it is.

Features that exist only in onnxruntime (graph optimisation levels, the re-check with
optimisations off, the dump of the optimised model naming a rewrite) are asked of a
runtime whose ``onnxruntime`` is true; others skip them and the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np


class Port(Protocol):
    """A session input or output: its ONNX tensor name."""

    name: str


class Session(Protocol):
    """One model loaded by a runtime, ready to run (onnxruntime's InferenceSession is one)."""

    def get_inputs(self) -> Sequence[Port]: ...

    def get_outputs(self) -> Sequence[Port]: ...

    def run(self, output_names: Sequence[str] | None,
            feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs (all, in the model's order, for None), computed from
        ``feeds``; raises when the runtime fails on a node (its message names it when
        the runtime says)."""
        ...


class Runtime(Protocol):
    """A way to run ONNX models: onnxruntime with one execution provider, OpenVINO, ..."""

    name: str  # as the user names it and the report shows it: "CPUExecutionProvider"
    onnxruntime: bool  # onnxruntime's own features apply (optimisation levels, rewrites)

    def session(self, model: bytes, *, level: str, config: tuple[tuple[str, str], ...] = (),
                arena: bool = True) -> Session:
        """``model`` (a serialised ModelProto) loaded; OnnxLoadError when it cannot be.
        ``level`` and ``config``: onnxruntime's optimisation level and session config
        entries; ``arena``: onnxruntime's CPU memory arena. Other runtimes ignore them."""
        ...

    def describe(self) -> str:
        """What ran, for the report's notes ("" when the name says it all)."""
        ...

    def precision(self) -> str:
        """The precision the runtime chose to compute float32 at ("bf16", "f16", "f32"),
        once a session was made; "" when it computes in the file's own types."""
        ...
