"""A minimal reproducer of the first divergence: the ONNX subgraph that computes the
first diverging layer's tensor from aligned tensors and graph inputs, and its inputs.

``<report stem>.first_divergence.onnx``: that subgraph alone (constants included).
``<report stem>.first_divergence.npz``: one array per subgraph input (named as the
ONNX input; the PyTorch value for an aligned tensor, the fed value for a graph input)
plus ``expected``, PyTorch's output of the module. Running the subgraph with
onnxruntime on those inputs shows the layer's own error, free of upstream error::

    data = np.load("r.first_divergence.npz")
    sess = onnxruntime.InferenceSession("r.first_divergence.onnx")
    got = sess.run(None, {i.name: data[i.name] for i in sess.get_inputs()})[0]
    abs(got - data["expected"]).max()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .capture_onnx import OnnxGraph
from .files import atomic_write, reproducer_paths
from .records import DivergenceKind

EXPECTED = "expected"
# First divergences whose tensor can be compared number by number.
KINDS = (DivergenceKind.NUMERIC, DivergenceKind.NONFINITE)


@dataclass(frozen=True)
class Parts:
    """What the files are made of: the subgraph, its inputs, PyTorch's answer."""

    model: onnx.ModelProto
    output: str  # the diverging ONNX tensor, the subgraph's only output
    inputs: dict[str, np.ndarray]  # subgraph input name -> value
    expected: np.ndarray
    module: str = ""


def boundary(graph: OnnxGraph, target: str, aligned: set[str]) -> list[str]:
    """Tensors the subgraph computing ``target`` starts from: aligned tensors (other
    than ``target``) and graph inputs reached walking back from it. Constants and
    initializers belong to the subgraph and are not inputs."""
    graph_inputs = {name for name, _, _ in graph.inputs}
    found: list[str] = []
    seen: set[str] = {target}
    stack = [target]
    while stack:
        name = stack.pop()
        if name != target and (name in aligned or name in graph_inputs):
            found.append(name)
            continue
        node = graph.node_of(name)
        if node is None:  # initializer, or an optional input left empty
            continue
        for tensor in node.inputs:
            if tensor and tensor not in seen and tensor not in graph.constants:
                seen.add(tensor)
                stack.append(tensor)
    order = {n: graph.producer.get(n, -1) for n in found}
    return sorted(found, key=lambda n: (order[n], n))


def build(graph: OnnxGraph, target: str, values: dict[str, np.ndarray], expected: np.ndarray,
          module: str = "") -> Parts:
    """The subgraph from ``values``' tensors (boundary inputs, name -> value) to ``target``."""
    g = gs.import_onnx(graph.model)
    tensors = g.tensors()
    inputs = []
    feeds: dict[str, np.ndarray] = {}
    for name, value in values.items():
        tensor = tensors[name]
        dtype = np.dtype(tensor.dtype if tensor.dtype is not None
                         else graph.dtypes.get(name, value.dtype))
        feeds[name] = np.ascontiguousarray(value, dtype=dtype)
        tensor.dtype, tensor.shape = dtype, list(feeds[name].shape)
        # A producer left in place would compute it again: cut it off.
        for producer in list(tensor.inputs):
            producer.outputs = [t for t in producer.outputs if t is not tensor]
        inputs.append(tensor)
    out = tensors[target]
    if out.dtype is None:
        out.dtype = graph.dtypes.get(target, np.float32)
    out.shape = list(np.shape(expected))  # this input's sizes, not the export's
    g.inputs, g.outputs = inputs, [out]
    g.cleanup(remove_unused_graph_inputs=True).toposort()
    for tensor in g.tensors().values():  # stale intermediate shapes from the export
        if isinstance(tensor, gs.Variable) and tensor not in inputs and tensor is not out:
            tensor.shape = None
    model = gs.export_onnx(g)
    model.graph.doc_string = (f"layerdiff minimal reproducer: first divergence at "
                              f"{module or target} (output {target})")
    return Parts(model, target, feeds, np.asarray(expected), module)


paths = reproducer_paths  # <report stem>.first_divergence.onnx / .npz


def write(parts: Parts, report: str | Path) -> tuple[Path, Path]:
    """Write the subgraph and its inputs next to ``report``; atomic (temp file + rename)."""
    onnx_path, npz_path = paths(report)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(parts.inputs)
    arrays[EXPECTED] = parts.expected
    atomic_write(onnx_path, lambda f: f.write(parts.model.SerializeToString()))
    atomic_write(npz_path, lambda f: np.savez_compressed(f, **arrays))
    return onnx_path, npz_path
