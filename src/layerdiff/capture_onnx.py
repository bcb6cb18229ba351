"""Read an ONNX graph; onnxruntime's own features (optimisation levels, session config,
the optimised model); read a runtime's failures.

With segments.py and runtimes/, the only modules that import onnx-graphsurgeon and
onnxruntime. It hands the aligner a plain view of the graph (``OnnxGraph``); segments.py
runs that graph in pieces with the aligned tensors exposed, on a runtime (runtimes/). A
node that fails at run time is located from onnxruntime's message (``_failure``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .errors import OnnxLoadError, first_line

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_SCOPE_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class OnnxNode:
    index: int  # position in topological order
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    scope: str | None  # module path from the exporter's names, None when there is none
    scope_style: str  # "dynamo" | "legacy" | ""


@dataclass
class OnnxGraph:
    path: Path | None
    model: onnx.ModelProto  # as given: what runs (shapes and dtypes below are inferred)
    nodes: list[OnnxNode]
    inputs: list[tuple[str, str, tuple]]  # (name, numpy dtype name, shape with str/None dims)
    outputs: list[str]
    constants: dict[str, np.ndarray]  # initializers and Constant-node outputs
    shapes: dict[str, tuple]  # tensor -> inferred shape (ints, strs for symbols, None)
    dtypes: dict[str, np.dtype]
    producer: dict[str, int] = field(default_factory=dict)  # tensor -> node index
    consumers: dict[str, list[int]] = field(default_factory=dict)
    opset: int | None = None

    def node_of(self, tensor: str) -> OnnxNode | None:
        index = self.producer.get(tensor)
        return None if index is None else self.nodes[index]

    def descendants(self, index: int) -> set[str]:
        """Every tensor computed, directly or not, from node ``index``'s outputs."""
        tainted = set(self.nodes[index].outputs)
        for node in self.nodes[index + 1:]:
            if any(i in tainted for i in node.inputs):
                tainted.update(node.outputs)
        return tainted


# Ops that draw random numbers when the graph runs (training-mode Dropout is read apart).
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform",
                        "RandomUniformLike", "Multinomial", "Bernoulli"})


def random_nodes(graph: OnnxGraph) -> tuple[OnnxNode, ...]:
    """The nodes that draw random numbers: no two runs, nor PyTorch, agree after them."""
    return tuple(n for n in graph.nodes if n.op_type in RANDOM_OPS)


@dataclass(frozen=True)
class RuntimeFailure:
    node: str
    op_type: str
    message: str


# --------------------------------------------------------------------------- loading


def load_graph(path: str | Path) -> OnnxGraph:
    path = Path(path)
    if not path.is_file():
        raise OnnxLoadError(f"ONNX file not found: {path}", hint="check the --onnx path")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise OnnxLoadError(
            f"cannot read {path} as ONNX: {first_line(exc)}",
            hint="the file may be truncated or not an ONNX model; re-export it",
        ) from exc
    return graph_from_model(model, path)


def graph_from_model(model: onnx.ModelProto, path: Path | None = None) -> OnnxGraph:
    try:
        return _graph_from_model(model, path)
    except OnnxLoadError:
        raise
    except Exception as exc:
        # A file that parses can still be inconsistent in many ways (a cycle, an unknown
        # element type, an initializer shorter than its shape, a name used twice), and
        # onnx-graphsurgeon and numpy each fail on them with their own exception types.
        raise OnnxLoadError(
            f"cannot read the graph in {path or 'the ONNX model'}: "
            f"{type(exc).__name__}: {first_line(exc)}",
            hint="the file may be damaged or hand-edited; `python -m onnx.checker FILE` "
                 "says more; re-export it",
        ) from exc


def _graph_from_model(model: onnx.ModelProto, path: Path | None) -> OnnxGraph:
    if not model.graph.node:
        raise OnnxLoadError(f"{path or 'the ONNX model'} has no nodes", hint="re-export it")
    _check_names(model, path)
    # Inferred shapes and types guide alignment only. The model that runs is the one
    # given: inferred value_info written into it can contradict onnxruntime's own shape
    # inference (stale sizes in traced graphs) and stop the model from loading.
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    graph = gs.import_onnx(inferred)
    graph.toposort()
    constants = {
        name: np.asarray(t.values)
        for name, t in graph.tensors().items()
        if isinstance(t, gs.Constant)
    }
    # onnx-graphsurgeon drops node metadata, so read the dynamo scopes from the proto.
    metadata = {n.name: {p.key: p.value for p in n.metadata_props} for n in model.graph.node}
    nodes = []
    for i, node in enumerate(graph.nodes):
        if node.op == "Constant" and node.outputs:
            value = node.attrs.get("value")
            if isinstance(value, gs.Constant):
                constants[node.outputs[0].name] = np.asarray(value.values)
        scope, style = _scope(node.name, metadata.get(node.name, {}))
        nodes.append(
            OnnxNode(
                index=i,
                name=node.name or f"{node.op}_{i}",
                op_type=node.op,
                inputs=tuple(t.name for t in node.inputs),
                outputs=tuple(t.name for t in node.outputs),
                attrs=_plain_attrs(node.attrs),
                scope=scope,
                scope_style=style,
            )
        )
    shapes, dtypes = {}, {}
    for name, t in graph.tensors().items():
        if t.shape is not None:
            shapes[name] = tuple(t.shape)
        if t.dtype is not None:
            dtypes[name] = np.dtype(t.dtype) if not isinstance(t.dtype, np.dtype) else t.dtype
    result = OnnxGraph(
        path=path,
        model=model,
        nodes=nodes,
        inputs=[(t.name, _dtype_name(t.dtype), tuple(t.shape or ())) for t in graph.inputs],
        outputs=[t.name for t in graph.outputs],
        constants=constants,
        shapes=shapes,
        dtypes=dtypes,
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    )
    for node in nodes:
        for out in node.outputs:
            result.producer[out] = node.index
        for inp in node.inputs:
            if inp:
                result.consumers.setdefault(inp, []).append(node.index)
    return result


def _check_names(model: onnx.ModelProto, path: Path | None) -> None:
    """Every text in the file is UTF-8 and every tensor a node reads is made by
    something: the graph is cut and re-exported in segments, which fails on either."""
    graph = model.graph
    undecodable = _undecodable(model)
    if undecodable:
        raise OnnxLoadError(
            f"{path or 'the ONNX model'} has text that is not UTF-8 ({undecodable})",
            hint="the file may be damaged; re-export it")
    known = {t.name for t in graph.initializer} | {t.name for t in graph.input} | {""}
    known.update(t.values.name for t in graph.sparse_initializer)
    known.update(name for node in graph.node for name in node.output)
    for node in graph.node:
        # Subgraphs (If, Loop) read outer tensors too; only top-level nodes are checked.
        missing = [name for name in node.input if name not in known]
        if missing:
            raise OnnxLoadError(
                f"{path or 'the ONNX model'}: node '{node.name}' ({node.op_type}) reads "
                f"'{missing[0]}', which no node, initializer or graph input provides",
                hint="the file may be damaged or hand-edited; `python -m onnx.checker FILE` "
                     "says more; re-export it")


def _undecodable(message) -> str | None:
    """The first text field in ``message``, at any depth, that is not UTF-8 (protobuf
    hands such a field back as bytes), as "field b'...'"; None when all decode."""
    for descriptor, value in message.ListFields():
        if descriptor.type not in (descriptor.TYPE_STRING, descriptor.TYPE_MESSAGE):
            continue
        # protobuf 5.28+ has is_repeated; older versions only label
        repeated = getattr(descriptor, "is_repeated", None)
        if repeated is None:
            repeated = descriptor.label == descriptor.LABEL_REPEATED
        for item in (value if repeated else [value]):
            if descriptor.type == descriptor.TYPE_STRING:
                if isinstance(item, bytes):
                    return f"{descriptor.name} {item[:40]!r}"
            else:
                found = _undecodable(item)
                if found:
                    return found
    return None


def _scope(name: str, metadata: dict[str, str]) -> tuple[str | None, str]:
    """The module scope an exporter recorded for a node.

    dynamo: the exact module path (``name_scopes`` ends with the FX node's own name; the
    entry before it is its module). legacy: the raw "/"-joined components of the node
    name, e.g. "model/model.1/sub/sub.0"; each is a module path cut at its last
    non-numeric atom, so only the aligner, which knows the module paths, can resolve it.
    """
    if _SCOPE_KEY in metadata:
        # Metadata only helps alignment: when it is not the exporter's list of names,
        # the node is treated as having none.
        try:
            scopes = ast.literal_eval(metadata[_SCOPE_KEY])
        except Exception:  # SyntaxError, ValueError, tokenize's TokenError, RecursionError...
            scopes = None
        if isinstance(scopes, (list, tuple)) and all(isinstance(s, str) for s in scopes):
            return (scopes[-2] if len(scopes) >= 2 else ""), "dynamo"
    if name and name.startswith("/"):
        return "/".join(name.strip("/").split("/")[:-1]), "legacy"
    return None, ""


def _plain_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    plain = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, (int, float, str)):
            plain[key] = value
        elif isinstance(value, (list, tuple)) and len(value) <= 16 and all(
            isinstance(v, (int, float, str)) for v in value
        ):
            plain[key] = list(value)
        elif isinstance(value, gs.Constant) and np.asarray(value.values).size <= 16:
            plain[key] = np.asarray(value.values).tolist()
    return plain


def _dtype_name(dtype) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:
        return "float32"


# --------------------------------------------------------------------------- running


def optimised_producer(graph: OnnxGraph, node_name: str, *, level: str, provider: str,
                       config: tuple[tuple[str, str], ...] = ()) -> str:
    """What onnxruntime's optimiser made of ``node_name``: the op that now produces its
    output (e.g. "FastGelu (com.microsoft)"), or "" when it is unchanged or unknown."""
    import tempfile

    node = next((n for n in graph.nodes if n.name == node_name), None)
    if node is None or not node.outputs:
        return ""
    options = _options(level, config)
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimised.onnx")
        try:
            ort.InferenceSession(_exposing(graph, node.outputs[0]),
                                 options, providers=[provider])
            optimised = onnx.load(options.optimized_model_filepath)
        except Exception:  # only an explanation; the diagnosis stands without it
            return ""
    for candidate in optimised.graph.node:
        if node.outputs[0] in candidate.output:
            if candidate.op_type == node.op_type and candidate.domain in ("", "ai.onnx"):
                return ""
            return f"{candidate.op_type} ({candidate.domain or 'ai.onnx'})"
    return ""


def save_optimised(source: str | Path, target: str | Path, level: str = "basic") -> None:
    """onnxruntime's offline optimisation of ``source`` at ``level``, saved to ``target``
    (the file onnxruntime would run). "basic" rewrites keep to standard ONNX operators, so
    the file runs on every provider; above it the fusions are the CPU provider's own."""
    options = _options(level, ())
    options.optimized_model_filepath = str(target)
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxLoadError(f"onnxruntime cannot optimise the file: {first_line(exc)}") from None


class PlainRunner:
    """The model as the user runs it on ``runtime`` (no marked outputs), its session made
    on the first run and kept for the next. Without onnxruntime's CPU arena (it changes no
    value): the arena grows in powers of two and kept ESRGAN at 1568 px some 2 GiB above
    what the run needs. Raises OnnxLoadError when the runtime cannot load the model, and
    the runtime's own exception when a run fails."""

    def __init__(self, graph: OnnxGraph, runtime, *, level: str,
                 config: tuple[tuple[str, str], ...] = ()) -> None:
        self._graph, self._runtime, self._level, self._config = graph, runtime, level, config
        self._session = None

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._session is None:
            self._session = self._runtime.session(self._graph.model.SerializeToString(),
                                                  level=self._level, config=self._config,
                                                  arena=False)
        return self._session.run(None, feeds)


def _exposing(graph: OnnxGraph, name: str) -> bytes:
    """The model with tensor ``name`` exposed as an extra output."""
    g = gs.import_onnx(graph.model)
    tensor = g.tensors().get(name)
    if tensor is not None and not isinstance(tensor, gs.Constant):
        if tensor.dtype is None:
            tensor.dtype = graph.dtypes.get(name, np.float32)
        g.outputs = list(g.outputs) + [tensor]
    return gs.export_onnx(g).SerializeToString()


def check_config(provider: str, level: str, config: tuple[tuple[str, str], ...]) -> None:
    """Refuse, before any work, session config entries onnxruntime rejects with
    ``provider`` (they would otherwise be blamed on the ONNX file). The provider itself
    is checked by runtimes.get."""
    from .errors import UsageError

    if not config:
        return
    probe = _probe_model()
    for key, value in config:  # one at a time, so that the error names the bad one
        try:
            # onnxruntime prints an "EP Error" banner before raising; the error says it.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ort.InferenceSession(probe, _options(level, ((key, value),)), providers=[provider])
        except Exception as exc:
            raise UsageError(f"onnxruntime rejects --ort-config {key}={value}: "
                             f"{_readable(first_line(exc, 400))}",
                             hint="check the key and value against onnxruntime's "
                                  "onnxruntime_session_options_config_keys.h") from None


def _probe_model() -> bytes:
    """The smallest valid model (Identity): lets session options be tried on their own."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _options(level: str, config: tuple[tuple[str, str], ...], *,
             arena: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    # onnxruntime's CPU arena grows to a run's peak and lives as long as any tensor it
    # handed out: one small value kept from a segment would hold the whole arena.
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = 4  # failures reach us as exceptions; keep stderr clean
    for key, value in config:  # session options the user deploys with
        options.add_session_config_entry(key, value)
    return options


def _needed(session, feeds: dict[str, np.ndarray]) -> dict:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


_NODE_IN_MESSAGE = re.compile(r"running (\w+) node\. Name:'([^']*)'")


def _failure(exc: Exception) -> RuntimeFailure:
    message = str(exc).strip()
    match = _NODE_IN_MESSAGE.search(message)
    if match:
        return RuntimeFailure(node=match.group(2), op_type=match.group(1), message=_readable(message))
    return RuntimeFailure(node="", op_type="", message=_readable(message))


_SOURCE_LOCATION = re.compile(r"^\S+\.(?:h|cc|cpp):\d+\s.*?\bwas false\.\s*", re.DOTALL)


def _readable(message: str) -> str:
    """onnxruntime's message without its prefix and C++ source location: what went wrong,
    e.g. "The input tensor cannot be reshaped to the requested shape. Input shape:{...}"."""
    text = message.split("Status Message:", 1)[-1].strip()
    text = _SOURCE_LOCATION.sub("", text).strip()
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text or message
