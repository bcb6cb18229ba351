"""Is this ONNX file an export of this model at all? Checked before anything heavy runs.

An ONNX file of another model (other channels, another number of outputs) would
otherwise be run, fail, and be misread as a shape frozen at export. What is checked is
what both sides declare: the number and rank of the inputs, fixed channel counts, the
number of outputs (after the PyTorch forward, which tells how many it returns).
Dimensions the ONNX leaves symbolic are not judged here; sizes the graph fixes (height,
width) are the frozen_shape rule's.
"""

from __future__ import annotations

from collections.abc import Sequence

from .capture_onnx import OnnxGraph
from .errors import UsageError
from .records import LoadedModel

HINT = "check that --onnx is the export of this model (same architecture and settings)"


class MismatchError(UsageError):
    """The ONNX file does not fit the model: not its export, or exported differently."""


def check_pairing(loaded: LoadedModel, graph: OnnxGraph, shape: tuple[int, ...]) -> None:
    """Refuse an ONNX file whose declared inputs and outputs cannot be this model's."""
    if not graph.inputs:
        raise MismatchError("the ONNX file has no inputs", hint="re-export the model with its input")
    name, _, declared = graph.inputs[0]
    if len(declared) != len(shape):
        raise MismatchError(
            f"the ONNX file's input '{name}' has {len(declared)} dimensions "
            f"{_dims(declared)}; the model's input has {len(shape)} {tuple(shape)}", hint=HINT)
    if len(shape) == 4:
        _same_channels(f"input '{name}'", declared[1], shape[1], "takes")
    out = graph.outputs[0] if graph.outputs else None
    out_shape = graph.shapes.get(out) or () if out else ()
    if len(shape) == 4 and len(out_shape) == 4 and loaded.output_channels:
        _same_channels(f"output '{out}'", out_shape[1], loaded.output_channels, "gives")


def check_outputs(torch_outputs: Sequence[object], graph: OnnxGraph, architecture: str) -> None:
    """After the PyTorch forward: the two sides must return as many outputs."""
    if len(torch_outputs) != len(graph.outputs):
        raise MismatchError(
            f"the ONNX file has {len(graph.outputs)} output(s) ({', '.join(graph.outputs)}); "
            f"the model ({architecture}) returns {len(torch_outputs)} tensor(s)", hint=HINT)


def _same_channels(what: str, onnx_dim: object, model_channels: int, verb: str) -> None:
    if isinstance(onnx_dim, int) and onnx_dim != model_channels:
        raise MismatchError(f"the ONNX file's {what} has {onnx_dim} channels; the model "
                            f"{verb} {model_channels}", hint=HINT)


def _dims(dims: tuple) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in dims) + ")"
