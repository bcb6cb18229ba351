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
from .records import InputKind, InputSpec, LoadedModel

HINT = "check that --onnx is the export of this model (same architecture and settings)"


class MismatchError(UsageError):
    """The ONNX file does not fit the model: not its export, or exported differently."""


def check_pairing(loaded: LoadedModel, graph: OnnxGraph, specs: Sequence[InputSpec]) -> None:
    """Refuse an ONNX file whose declared inputs and outputs cannot be this model's: the
    rank of each paired input, an image's channels, the output's channels."""
    if not graph.inputs:
        raise MismatchError("the ONNX file has no inputs", hint="re-export the model with its input")
    declared = {name: dims for name, _, dims in graph.inputs}
    for spec in specs:
        dims = declared.get(spec.onnx_name) if spec.onnx_name else None
        if dims is None:
            continue
        shape = spec.shape
        if len(dims) != len(shape):
            raise MismatchError(
                f"the ONNX file's input '{spec.onnx_name}' has {len(dims)} dimensions "
                f"{_dims(dims)}; the model's input {_called(spec)} has {len(shape)} "
                f"{tuple(shape)}", hint=HINT)
        if len(shape) == 4 and spec.kind in (InputKind.IMAGE, InputKind.MASK):
            _same_channels(f"input '{spec.onnx_name}'", dims[1], shape[1], "takes")
    first = specs[0].shape if specs else ()
    out = graph.outputs[0] if graph.outputs else None
    out_shape = graph.shapes.get(out) or () if out else ()
    if len(first) == 4 and len(out_shape) == 4 and loaded.output_channels:
        _same_channels(f"output '{out}'", out_shape[1], loaded.output_channels, "gives")


def _called(spec: InputSpec) -> str:
    return f"'{spec.name}'" if spec.name != spec.onnx_name else ""


def pair_outputs(model_outputs: Sequence[str], onnx_outputs: Sequence[str],
                 architecture: str) -> list[int]:
    """After the PyTorch forward: for each ONNX output, the index of the model's output
    it holds (capture_torch.named_tensors names them). By name where the names match,
    the rest by position; the two sides must return as many."""
    if len(model_outputs) != len(onnx_outputs):
        raise MismatchError(
            f"the ONNX file has {len(onnx_outputs)} output(s) ({', '.join(onnx_outputs)}); "
            f"the model ({architecture}) returns {len(model_outputs)} tensor(s)"
            + (f" ({', '.join(model_outputs)})" if len(model_outputs) > 1 else ""), hint=HINT)
    position = {name: k for k, name in enumerate(model_outputs)}
    order: list[int | None] = [position.get(name) for name in onnx_outputs]
    left = iter(k for k in range(len(model_outputs)) if k not in set(order))
    return [k if k is not None else next(left) for k in order]


def _same_channels(what: str, onnx_dim: object, model_channels: int, verb: str) -> None:
    if isinstance(onnx_dim, int) and onnx_dim != model_channels:
        raise MismatchError(f"the ONNX file's {what} has {onnx_dim} channels; the model "
                            f"{verb} {model_channels}", hint=HINT)


def _dims(dims: tuple) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in dims) + ")"
