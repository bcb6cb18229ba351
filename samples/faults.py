"""One-node conversion faults injected into real ONNX files (for the demo and the tests).

Each function takes an onnx.ModelProto and returns a changed copy; the original is left
alone. Nodes are picked by op type and position, so the same call works on files from
either exporter and on files that lost every module name.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper


def nth_node(model: onnx.ModelProto, op_type: str, index: int = 0) -> onnx.NodeProto:
    nodes = [n for n in model.graph.node if n.op_type == op_type]
    if not nodes:
        raise ValueError(f"no {op_type} node in the model")
    return nodes[index]


def scale_weight(model: onnx.ModelProto, op_type: str = "Conv", index: int = 0,
                 factor: float = 1.5, channel: int | None = 0) -> tuple[onnx.ModelProto, str]:
    """Multiply the weight of one layer (one output channel, or all) by ``factor``."""
    model = copy.deepcopy(model)
    node = nth_node(model, op_type, index)
    name = node.input[1]
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(_scaled(numpy_helper.to_array(init), factor, channel), name))
            return model, node.name
    for const in model.graph.node:
        if const.op_type == "Constant" and const.output[0] == name:
            attr = next(a for a in const.attribute if a.name == "value")
            attr.t.CopyFrom(numpy_helper.from_array(_scaled(numpy_helper.to_array(attr.t), factor, channel), name))
            return model, node.name
    raise ValueError(f"weight {name} of {node.name} is not a constant")


def _scaled(weight: np.ndarray, factor: float, channel: int | None) -> np.ndarray:
    weight = weight.copy()
    if channel is None:
        weight *= factor
    else:
        weight[channel] *= factor
    return weight


def set_attribute(model: onnx.ModelProto, op_type: str, name: str, value,
                  index: int = 0) -> tuple[onnx.ModelProto, str]:
    """Change one attribute of one node, e.g. LeakyRelu alpha or DepthToSpace mode."""
    model = copy.deepcopy(model)
    node = nth_node(model, op_type, index)
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])
    return model, node.name


def pixel_shuffle_dcr(model: onnx.ModelProto, index: int = 0) -> tuple[onnx.ModelProto, str]:
    """The PixelShuffle layout fault: DepthToSpace in DCR order where torch uses CRD."""
    return set_attribute(model, "DepthToSpace", "mode", "DCR", index)


def leaky_slope(model: onnx.ModelProto, alpha: float = 0.1, index: int = 0) -> tuple[onnx.ModelProto, str]:
    """An activation exported with the wrong negative slope."""
    return set_attribute(model, "LeakyRelu", "alpha", alpha, index)


def export_without_names(module, example, path, opset: int = 17) -> None:
    """Export the way chaiNNer does: through a wrapper that is not an nn.Module.

    Tracing a plain function loses every module name (nodes become ``/Conv_12``) and
    turns the weights into Constant nodes: alignment by name is impossible.
    """
    import contextlib
    import io

    import torch

    module.requires_grad_(False)
    traced = torch.jit.trace(lambda t: module(t), example)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(traced, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {2: "height", 3: "width"},
                                        "output": {2: "height", 3: "width"}})
