"""The diagnosis as node data for Google's Model Explorer: the error painted on the graph.

Model Explorer (``ai-edge-model-explorer``, with the ONNX adapter ``model-explorer-onnx``)
overlays "node data" files on a graph: JSON of its ``node_data_builder.ModelNodeData``,
``{graph id: {"results": {node id: {"value": number, "bgColor": ...}}, "thresholds": [...]}}``.
Three files are written, one per question:

- ``total_error.json``: each compared node's error against PyTorch, ``max |onnx -
  torch| / max |torch|`` (the report's "of range");
- ``own_error.json``: the same for the node's own (local) error, its ONNX segment
  fed PyTorch's inputs; measured only for layers whose total error fails, so a passing
  layer carries its total error here (which passed; its own error was not needed);
- ``status.json``: the layer's status as a number (``STATUS_CODES``) with its
  colour, the first divergence marked apart.

Keys are the node ids the ONNX adapter gives (model_explorer_onnx/main.py, 0.4): the
node's name, made unique and given to unnamed nodes by onnx_ir's NameFixPass ("node",
"node_1", ...; ``NodeIds.of``), and ``[value] NAME`` for a graph output. The graph id is
the graph's name ("" when it has none). The web app also matches output tensor names,
but only through a ``tensor_name`` metadata key that the ONNX adapter does not write,
so ids it is.

Pure: ``node_data`` turns a Diagnosis and its ONNX model into the files' contents;
``write`` publishes them atomically. Model Explorer itself is not needed.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import Diagnosis, DivergenceKind, LayerStatus, Metrics

# The value of each status in status.json, worst highest; FIRST marks the first divergence.
STATUS_CODES = {LayerStatus.PASS: 0, LayerStatus.IGNORED: 1, LayerStatus.PROPAGATED: 2,
                LayerStatus.FAIL: 3, LayerStatus.NOT_RUN: 4}
FIRST = 5
STATUS_COLOURS = {0: "#a5d6a7", 1: "#e0e0e0", 2: "#ffcc80", 3: "#e57373", 4: "#b39ddb",
                  5: "#b71c1c"}
STATUS_LEGEND = {0: "pass", 1: "ignored (--ignore-layer)", 2: "propagated (carries error "
                 "from upstream)", 3: "fail (its own error fails: a cause)",
                 4: "not run (onnxruntime failed before it)", 5: "first divergence"}
# JSON has no infinity: an error with NaN / Inf in other places than PyTorch's is this.
NONFINITE = 1e300
# Error colours, by the share of the tensor's range (thresholds: value <= each bound).
ERROR_THRESHOLDS = ((1e-5, "#388e3c"), (1e-4, "#8bc34a"), (1e-3, "#c8e6c9"),
                    (1e-2, "#ffa000"), (1e-1, "#ff5722"), (NONFINITE, "#d32f2f"))
KINDS = ("total_error", "own_error", "status")


@dataclass(frozen=True)
class NodeIds:
    """How the ONNX adapter names the graph and its nodes."""

    graph: str
    by_tensor: dict[str, str]  # output tensor name -> id of the node producing it
    by_name: dict[str, str]  # node name -> id
    outputs: dict[str, str]  # graph output name -> id of its Output node

    @classmethod
    def of(cls, model: Any) -> NodeIds:
        """From an ``onnx.ModelProto`` (the main graph; subgraphs are not overlaid).

        The adapter first runs onnx_ir's NameFixPass: in file order, an unnamed node
        becomes "node", "node_1", ... and a name already taken gets "_1", "_2", ...
        (one counter per base name). Done here the same way, for the main graph.
        """
        used: set[str] = set()
        counter: dict[str, int] = {}

        def unique(preferred: str) -> str:
            name = preferred
            while name in used:
                counter[preferred] = counter.get(preferred, 0) + 1
                name = f"{preferred}_{counter[preferred]}"
            used.add(name)
            return name

        by_tensor, by_name = {}, {}
        for node in model.graph.node:
            node_id = unique(node.name or "node")
            if node.name:
                by_name.setdefault(node.name, node_id)
            for out in node.output:
                if out:
                    by_tensor[out] = node_id
        outputs = {o.name: f"[value] {o.name}" for o in model.graph.output}
        # The graph's name as it is, "" too (the adapter's "<main>" is for a None that
        # a file cannot hold).
        return cls(model.graph.name, by_tensor, by_name, outputs)

    def all(self) -> set[str]:
        return {*self.by_tensor.values(), *self.outputs.values()}


def _share(m: Metrics | None) -> float | None:
    """max_abs / max |torch| as the report shows it; NONFINITE for NaN / Inf."""
    if m is None:
        return None
    err, scale = float(m.max_abs), float(m.scale)
    if not math.isfinite(err) or m.nonfinite_differs:
        return NONFINITE
    return err / (scale if math.isfinite(scale) and scale > 0 else 1.0)


def node_data(d: Diagnosis, model: Any) -> dict[str, dict[str, Any]]:
    """The three files' contents (``KINDS``), each a ModelNodeData as JSON data, for the
    diagnosis ``d`` of the ONNX ``model`` (an ``onnx.ModelProto``: the file diagnosed)."""
    ids = NodeIds.of(model)
    total: dict[str, float] = {}
    own: dict[str, float] = {}
    status: dict[str, int] = {}

    def keep(table: dict, key: str, value) -> None:
        if value is not None and (key not in table or value > table[key]):
            table[key] = value

    for layer in d.layers:
        key = ids.by_tensor.get(layer.onnx_tensor) or ids.by_name.get(layer.onnx_node)
        if key is None:
            continue
        keep(total, key, _share(layer.metrics))
        mine = layer.local if layer.local is not None else layer.metrics
        keep(own, key, _share(mine))
        code = STATUS_CODES[LayerStatus.IGNORED if layer.ignored else layer.status]
        keep(status, key, code)
    first = _first_node(d, ids)
    if first is not None:
        status[first] = FIRST
    for out in d.outputs:
        key = ids.outputs.get(out.name)
        if key is not None:
            keep(total, key, _share(out.metrics))
            keep(status, key, STATUS_CODES[LayerStatus.PASS if out.passed else LayerStatus.FAIL])
    thresholds = [{"value": v, "bgColor": c} for v, c in ERROR_THRESHOLDS]
    return {
        "total_error": _model_data(ids.graph, "layerdiff total error (share of range)",
                                   {k: {"value": v} for k, v in total.items()}, thresholds),
        "own_error": _model_data(ids.graph, "layerdiff own error (share of range)",
                                 {k: {"value": v} for k, v in own.items()}, thresholds),
        "status": _model_data(ids.graph, "layerdiff status",
                              {k: {"value": v, "bgColor": STATUS_COLOURS[v]}
                               for k, v in status.items()},
                              [{"value": v, "bgColor": c} for v, c in STATUS_COLOURS.items()]),
    }


def _first_node(d: Diagnosis, ids: NodeIds) -> str | None:
    """The id of the first divergence's node: the failing layer's, or for a runtime
    error the node onnxruntime named."""
    fd = d.first_divergence
    if fd is None:
        return None
    if fd.kind != DivergenceKind.RUNTIME_ERROR and fd.layer is not None:
        layer = d.layers[fd.layer]
        found = ids.by_tensor.get(layer.onnx_tensor)
        if found is not None:
            return found
    return ids.by_name.get(fd.onnx_node)


def _model_data(graph: str, name: str, results: dict[str, dict], thresholds: list) -> dict:
    return {graph: {"results": results, "name": name, "thresholds": thresholds}}


def paths(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Where ``write`` puts each file: ``folder/<kind>.json``."""
    return {kind: Path(folder) / f"{kind}.json" for kind in KINDS}


def write(d: Diagnosis, folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the node data files of ``d`` into ``folder`` (atomically), reading the ONNX
    file it diagnosed; returns their paths by kind, none when that file is not there (a
    conversion that did not verify writes none)."""
    import onnx

    from .files import atomic_write_text

    if d.onnx is None or not Path(d.onnx.path).is_file():
        return {}
    model = onnx.load(str(d.onnx.path), load_external_data=False)
    targets = paths(folder)
    for kind, data in node_data(d, model).items():
        atomic_write_text(targets[kind], json.dumps(data, indent=1, allow_nan=False) + "\n")
    return targets


def command(onnx_path: str | os.PathLike[str], written: dict[str, Path]) -> str:
    """The shell command that opens the ONNX file in Model Explorer with the files."""
    data = ",".join(str(p) for p in written.values())
    return (f"model-explorer --extensions=model_explorer_onnx {shlex.quote(str(onnx_path))} "
            f"--node_data_paths={shlex.quote(data)}")
