"""Pair each PyTorch module call with the ONNX tensor that holds the same value.

Matchers run in order; each records how it matched, and a tensor is claimed once:

1. scope: the module path each exporter leaves (legacy node names such as
   ``/body/body.0/conv1/Conv``, dynamo's ``pkg.torch.onnx.name_scopes``). The nodes of a
   module are split into one instance per call; the instance's output is the tensor it
   hands to nodes outside it.
2. weights: a Conv / ConvTranspose / Gemm / MatMul whose weight equals a module's
   weight (transposed for MatMul and Gemm), for files that lost every name.
3. structure, repeated until nothing changes: a paired module's ONNX input is its
   producer's output (torch's data flow says which module produced it); and a module
   whose producer is paired takes the single consumer of that tensor with a matching
   op type.

Every pair is checked against the shapes onnx shape inference gives. A module with
several candidate tensors is left unmatched with that reason: a wrong pair would show
a divergence that does not exist.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import networkx as nx
import numpy as np

from .capture_onnx import OnnxGraph, OnnxNode
from .records import Alignment, Pair, PairMethod, TorchCall, Unmatched

# onnxruntime's saved optimised models hold its own fused ops (com.microsoft domain).
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}
# Ops whose second input is a module's 1-D weight (a norm's scale, PReLU's slope).
SCALED_OPS = {"LayerNormalization", "BatchNormalization", "InstanceNormalization",
              "GroupNormalization", "PRelu"}

# Module types whose output is a single ONNX op's output (used to follow data flow).
MODULE_OPS: dict[str, set[str]] = {
    "LeakyReLU": {"LeakyRelu"}, "ReLU": {"Relu"}, "ReLU6": {"Clip"}, "PReLU": {"PRelu"},
    "Sigmoid": {"Sigmoid"}, "Tanh": {"Tanh"}, "ELU": {"Elu"}, "SELU": {"Selu"},
    "GELU": {"Gelu"}, "Softmax": {"Softmax"}, "Hardswish": {"HardSwish"},
    "Hardsigmoid": {"HardSigmoid"}, "Softplus": {"Softplus"}, "Mish": {"Mish"},
    "PixelShuffle": {"DepthToSpace"}, "PixelUnshuffle": {"SpaceToDepth"},
    "Upsample": {"Resize"}, "UpsamplingNearest2d": {"Resize"}, "UpsamplingBilinear2d": {"Resize"},
    "BatchNorm1d": {"BatchNormalization"}, "BatchNorm2d": {"BatchNormalization"},
    "InstanceNorm2d": {"InstanceNormalization"}, "GroupNorm": {"GroupNormalization"},
    "LayerNorm": {"LayerNormalization"}, "MaxPool2d": {"MaxPool"}, "AvgPool2d": {"AveragePool"},
    "AdaptiveAvgPool2d": {"GlobalAveragePool", "ReduceMean"},
    "Conv1d": {"Conv"}, "Conv2d": {"Conv"}, "Conv3d": {"Conv"},
    "ConvTranspose2d": {"ConvTranspose"}, "Linear": {"Gemm", "MatMul", "Add"},
}

# Ops that pass their input's value on unchanged (exporters insert them freely).
PASS_THROUGH = {"Identity", "Cast", "Dropout"}


@dataclass
class _State:
    graph: OnnxGraph
    calls: list[TorchCall]
    input_tensors: tuple[str | None, ...]  # the ONNX input of model input k (call -(k + 1))
    pairs: dict[int, Pair] = field(default_factory=dict)
    instance: dict[int, set[int]] = field(default_factory=dict)  # call -> its ONNX nodes
    # Calls whose instance is known to be the whole module (scope, weights, one-op
    # modules): only their inputs can be attributed to their producers.
    complete: set[int] = field(default_factory=set)
    claimed: dict[str, int] = field(default_factory=dict)  # tensor -> call
    why_not: dict[int, str] = field(default_factory=dict)  # see not_paired
    fused_into: dict[int, str] = field(default_factory=dict)
    # Calls whose own output is known to be absent from the file (weights folded with a
    # later factor): no later matcher may pair them with a guess.
    absent: set[int] = field(default_factory=set)
    # Modules called several times whose calls are not all paired yet: retried when
    # data flow has paired more of their neighbours.
    reused: list[_Reused] = field(default_factory=list)
    _upstream: _Upstream | None = None

    def upstream(self) -> _Upstream:
        if self._upstream is None:
            self._upstream = _Upstream(self.graph)
        return self._upstream

    def real(self, call: int | None) -> int | None:
        """Follow aliases to the call that produced the value (-(k + 1): model input k)."""
        seen = 0
        while call is not None and call >= 0 and self.calls[call].alias_of is not None:
            call = self.calls[call].alias_of
            seen += 1
            if seen > len(self.calls):
                return None
        return call

    def tensor_of(self, call: int | None) -> str | None:
        call = self.real(call)
        if call is not None and call < 0:
            position = -call - 1
            return self.input_tensors[position] if position < len(self.input_tensors) else None
        pair = self.pairs.get(call) if call is not None else None
        return pair.onnx_tensor if pair else None

    def not_paired(self, call: int, reason: str, fused_into: str | None = None) -> None:
        """Say why ``call`` has no tensor of its own: ``reason`` in words and, when it was
        fused with a neighbour, the ONNX node they share."""
        self.why_not[call] = reason
        if fused_into is None:
            self.fused_into.pop(call, None)
        else:
            self.fused_into[call] = fused_into

    def add(self, call: int, tensor: str, method: PairMethod, nodes: set[int]) -> bool:
        if (call in self.pairs or call in self.absent or tensor in self.claimed
                or tensor in self.graph.constants):
            return False
        if not _shape_fits(self.graph.shapes.get(tensor), self.calls[call].shape):
            return False
        node = self.graph.node_of(tensor)
        if node is None:  # a graph input: nothing computed it
            return False
        ops = MODULE_OPS.get(self.calls[call].module_type)
        if method == PairMethod.STRUCTURE and ops is not None and node.op_type not in ops:
            return False  # a one-op module must land on its op
        if method != PairMethod.STRUCTURE or ops is not None:
            self.complete.add(call)
        self.pairs[call] = Pair(
            call=call, onnx_tensor=tensor, onnx_node=node.name, op_type=node.op_type,
            order=node.index, method=method,
        )
        self.instance[call] = nodes or {node.index}
        self.claimed[tensor] = call
        return True


def align(calls: list[TorchCall], parameters: dict[int, dict[str, np.ndarray]],
          graph: OnnxGraph, input_tensors: Sequence[str | None] | None = None) -> Alignment:
    """Pair module calls with ONNX tensors. ``input_tensors`` names the ONNX input each
    model input feeds, in the order capture_torch numbered them (default: the first
    graph input for the only one)."""
    if input_tensors is None:
        input_tensors = (graph.inputs[0][0],) if graph.inputs else ()
    state = _State(graph=graph, calls=calls, input_tensors=tuple(input_tensors))
    scopes = _resolve_scopes(graph, calls)
    has_scopes = bool(graph.nodes) and sum(s is not None for s in scopes.values()) > len(graph.nodes) / 2

    if has_scopes:
        _match_by_scope(state, scopes)
    _match_by_weights(state, parameters)
    _check_weights(state, parameters)
    _pair_folded_batchnorm(state, parameters)
    _pair_fused_activations(state)
    # A reused module's calls can often be told apart only once data flow has paired
    # their neighbours; each round of one may unlock the other.
    while _follow_data_flow(state) or _retry_reused(state):
        # A Conv found by data flow alone may hold folded weights too (all zero, say,
        # which no weight matcher finds).
        _check_weights(state, parameters)

    aliases = tuple((c.index, state.real(c.index)) for c in calls
                    if c.alias_of is not None and state.real(c.index) is not None)
    unmatched_torch = tuple(
        Unmatched(c.label, state.why_not.get(c.index, _default_reason(c, has_scopes)),
                  fused_into=state.fused_into.get(c.index))
        for c in calls if c.alias_of is None and c.index not in state.pairs
    )
    return Alignment(
        pairs=tuple(sorted(state.pairs.values(), key=lambda p: (p.order, p.call))),
        aliases=aliases,
        unmatched_torch=unmatched_torch,
        unmatched_onnx=_unmatched_onnx(state),
        has_scopes=has_scopes,
        changed_weights=_changed_weights(state, parameters),
    )


# --------------------------------------------------------------------------- scope


def _resolve_scopes(graph: OnnxGraph, calls: list[TorchCall]) -> dict[int, str | None]:
    """Node index -> module path (or None) for every node, legacy names resolved."""
    paths = {c.module for c in calls}
    paths |= {p.rsplit(".", 1)[0] for p in list(paths) if "." in p}
    by_component: dict[str, list[str]] = defaultdict(list)
    for path in sorted(paths, key=len):
        by_component[_legacy_component(path)].append(path)
    result = {}
    for node in graph.nodes:
        if node.scope_style == "legacy":
            result[node.index] = _resolve_legacy(node.scope or "", by_component)
        else:
            result[node.index] = node.scope
    return result


def _legacy_component(path: str) -> str:
    """The legacy exporter's name for a module: its path from the last non-numeric atom."""
    atoms = path.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return path


def _resolve_legacy(raw: str, by_component: dict[str, list[str]]) -> str:
    current = ""
    for component in raw.split("/") if raw else []:
        found = _below(current, component, by_component)
        if found is None:  # a second call is named "act_1"
            base = re.sub(r"_\d+$", "", component)
            found = _below(current, base, by_component) if base != component else None
        if found is None:
            break
        current = found
    return current


def _below(prefix: str, component: str, by_component: dict[str, list[str]]) -> str | None:
    for path in by_component.get(component, ()):
        if not prefix or path.startswith(prefix + "."):
            return path
    return None


def _match_by_scope(state: _State, scopes: dict[int, str | None]) -> None:
    graph = state.graph
    members: dict[str, list[int]] = defaultdict(list)
    for index, scope in scopes.items():
        if scope is None or graph.nodes[index].op_type == "Constant":
            continue
        # A node belongs to its module and to every enclosing one.
        parts = scope.split(".") if scope else []
        for depth in range(1, len(parts) + 1):
            members[".".join(parts[:depth])].append(index)

    # module path -> one list per invocation of the tensors it returned
    invocations: dict[str, dict[int, list[TorchCall]]] = defaultdict(lambda: defaultdict(list))
    for call in state.calls:
        invocations[call.module][call.call].append(call)

    for path, by_call in invocations.items():
        nodes = members.get(path)
        if not nodes:
            continue
        instances = _instances(graph, nodes, len(by_call))
        if instances is None:
            for call in (c for cs in by_call.values() for c in cs):
                state.not_paired(
                    call.index, f"its ONNX nodes do not split into {len(by_call)} calls; not paired")
            continue
        if len(by_call) > 1:
            # ONNX order is not call order (independent branches may be sorted either
            # way): which instance is which call is decided from data flow, below.
            state.reused.append(_Reused(path, list(by_call.values()), instances,
                                        [PairMethod.SCOPE] * len(instances)))
            continue
        for returned, inst in zip(by_call.values(), instances):
            for call, outs in _scope_outputs(state, returned, inst):
                if len(outs) == 1:
                    state.add(call.index, outs[0], PairMethod.SCOPE, inst)
                elif len(outs) > 1:
                    state.not_paired(
                        call.index, f"{len(outs)} tensors leave its ONNX scope with its shape; not paired")
    _retry_reused(state)


def _scope_outputs(state: _State, returned: list[TorchCall],
                   inst: set[int]) -> list[tuple[TorchCall, list[str]]]:
    """Each non-alias call of one invocation with the unclaimed tensors leaving its
    instance that have its shape."""
    graph = state.graph
    boundary = _boundary_outputs(graph, inst)
    return [(call, [t for t in boundary if _shape_fits(graph.shapes.get(t), call.shape)
                    and t not in state.claimed])
            for call in returned if call.alias_of is None]


def _instances(graph: OnnxGraph, nodes: list[int], calls: int) -> list[set[int]] | None:
    """Split a module's nodes into one set per call (connected pieces, in order)."""
    if calls == 1:
        return [set(nodes)]
    sub = nx.Graph()
    sub.add_nodes_from(nodes)
    node_set = set(nodes)
    for i in nodes:
        for out in graph.nodes[i].outputs:
            for j in graph.consumers.get(out, ()):
                if j in node_set:
                    sub.add_edge(i, j)
    pieces = sorted((set(c) for c in nx.connected_components(sub)), key=min)
    return pieces if len(pieces) == calls else None


def _boundary_outputs(graph: OnnxGraph, nodes: set[int]) -> list[str]:
    """Tensors made inside ``nodes`` and read outside them (or by the graph's caller)."""
    outputs = set(graph.outputs)
    found = []
    for i in sorted(nodes):
        for out in graph.nodes[i].outputs:
            readers = graph.consumers.get(out, ())
            if out in outputs or any(r not in nodes for r in readers):
                found.append(out)
    return found


# --------------------------------------------------------------------------- reused modules


class _Upstream:
    """For each ONNX node, the nodes its value is computed from (itself included): one
    Python int per node used as a bitset, built in one pass over the topological order."""

    def __init__(self, graph: OnnxGraph) -> None:
        self._bits: list[int] = []
        for node in graph.nodes:
            bits = 1 << node.index
            for name in node.inputs:
                producer = graph.producer.get(name)
                if producer is not None and producer < node.index:
                    bits |= self._bits[producer]
            self._bits.append(bits)

    def of(self, nodes: set[int]) -> int:
        bits = 0
        for i in nodes:
            bits |= self._bits[i]
        return bits


def _bits(nodes: set[int]) -> int:
    return sum(1 << i for i in nodes)


@dataclass
class _Reused:
    """A module called several times and the ONNX pieces its calls may be: its scope's
    instances, or the nodes that hold its weights. ``groups`` holds one list per
    invocation (the tensors it returned), in execution order; ``candidates`` the node
    sets, in no meaningful order, each with the pairing method it would give."""

    module: str
    groups: list[list[TorchCall]]
    candidates: list[set[int]]
    methods: list[PairMethod]  # scope, weights or close weights, one per candidate


SOLUTIONS_LIMIT = 64  # pairings of one reused module enumerated before giving up
STEPS_LIMIT = 20_000


def _retry_reused(state: _State) -> bool:
    """Pair the calls of reused modules that data flow now tells apart; True on progress."""
    progress = False
    for reused in state.reused:
        progress |= _pair_reused(state, reused)
    state.reused = [r for r in state.reused
                    if any(c.index not in state.pairs for g in r.groups for c in g
                           if c.alias_of is None)]
    return progress


def _pair_reused(state: _State, reused: _Reused) -> bool:
    """Pair a reused module's calls with its candidates where data flow leaves one choice.

    ONNX's topological order is not PyTorch's call order (two independent branches
    through one shared norm may be sorted either way), so neither order nor position
    decides. A call may take a candidate only when:
    1. its returned tensors fit the candidate's outputs (shape, unclaimed);
    2. no tensor paired with a call that finished *after* it feeds the candidate (a
       value cannot depend on one computed later; enclosing modules excepted, whose
       output may be a value they computed before calling it);
    3. the tensor paired with each module that produced its input feeds the candidate:
       first tried as a direct input (past Identity/Cast), then anywhere upstream;
    4. a later call's candidate never feeds an earlier call's.
    Every assignment meeting these is enumerated; a call is paired only when all of
    them give it the same candidate. Otherwise it stays unpaired, with the reason: a
    wrong pair would show a divergence that does not exist.
    """
    graph, up = state.graph, state.upstream()
    mine = [c for g in reused.groups for c in g if c.alias_of is None]
    if all(c.index in state.pairs for c in mine):
        return False
    taken = {k for k, cand in enumerate(reused.candidates)
             if any(state.instance.get(c.index) == cand for c in mine)}
    open_groups = [g for g in reused.groups if not any(c.index in state.pairs for c in g)]
    free = [k for k in range(len(reused.candidates)) if k not in taken]
    cand_bits = {k: _bits(reused.candidates[k]) for k in free}
    cand_up = {k: up.of(reused.candidates[k]) for k in free}
    kind = "instances" if PairMethod.SCOPE in reused.methods else "nodes holding its weights"
    label = f"called {len(reused.groups)} times"
    if len(free) < len(open_groups):
        for call in (c for g in open_groups for c in g if c.alias_of is None):
            state.not_paired(call.index, f"{label}, with {len(free)} ONNX {kind} left for "
                                         f"{len(open_groups)} calls; not paired")
        return False
    fits = {(j, k): _fit(state, reused, group, k) for j, group in enumerate(open_groups) for k in free}
    later = [_later_mask(state, group) for group in open_groups]

    solutions: list[tuple[int, ...]] | None = []
    for strict in (True, False):
        options = [[k for k in free if fits[j, k] is not None
                    and not cand_up[k] & later[j] & ~cand_bits[k]
                    and _fed_by_producers(state, group, reused.candidates[k], cand_up[k], strict)]
                   for j, group in enumerate(open_groups)]
        solutions = _solutions(options, cand_bits, cand_up)
        if solutions is None or solutions:
            break
    progress = False
    for j, group in enumerate(open_groups):
        chosen = {solution[j] for solution in solutions or ()}
        if len(chosen) == 1:
            k = chosen.pop()
            for call, tensors in fits[j, k]:
                if len(tensors) == 1:
                    progress |= state.add(call.index, tensors[0], reused.methods[k],
                                          reused.candidates[k])
                elif len(tensors) > 1:
                    state.not_paired(
                        call.index, f"{len(tensors)} tensors leave its ONNX scope with its shape; not paired")
            continue
        if solutions is None:
            reason = f"{label}: too many ways to pair its calls with its ONNX {kind}; not paired"
        elif not solutions:
            reason = (f"{label}: no pairing of its calls with its ONNX {kind} fits the data "
                      "flow; not paired")
        else:
            reason = (f"{label}: {len(chosen)} of its ONNX {kind} fit this call's data flow; "
                      "not paired")
        for call in group:
            if call.alias_of is None and call.index not in state.pairs:
                state.not_paired(call.index, reason)
    return progress


def _fit(state: _State, reused: _Reused, group: list[TorchCall],
         k: int) -> list[tuple[TorchCall, list[str]]] | None:
    """The tensors each call of ``group`` could take in candidate ``k`` (None: none fits)."""
    graph, nodes = state.graph, reused.candidates[k]
    if reused.methods[k] == PairMethod.SCOPE:
        found = _scope_outputs(state, group, nodes)
    else:  # one weighted node (and its bias Add): the output is the last of them
        tensor = graph.nodes[max(nodes)].outputs[0]
        found = [(call, [tensor] if tensor not in state.claimed
                  and _shape_fits(graph.shapes.get(tensor), call.shape) else [])
                 for call in group if call.alias_of is None]
    return None if any(not tensors for _, tensors in found) else found


def _later_mask(state: _State, group: list[TorchCall]) -> int:
    """Rule 2 of _pair_reused: the nodes holding tensors paired with calls that finished
    after ``group``, as a bitset (enclosing modules excepted)."""
    last = max(c.index for c in group)
    module = group[0].module
    mask = 0
    for call, pair in state.pairs.items():
        if call > last and not module.startswith(state.calls[call].module + "."):
            node = state.graph.producer.get(pair.onnx_tensor)
            if node is not None:
                mask |= 1 << node
    return mask


def _fed_by_producers(state: _State, group: list[TorchCall], nodes: set[int], upstream: int,
                      strict: bool) -> bool:
    """Rule 3 of _pair_reused: the tensors of the modules that made this invocation's
    input reach the candidate (``strict``: as its direct inputs)."""
    graph = state.graph
    first = min(c.index for c in group)
    inputs = None
    for producer in {state.real(p) for p in state.calls[first].producers}:
        if producer is None or producer >= first:
            continue
        tensor = state.tensor_of(producer)
        if tensor is None:
            continue
        if strict:
            if inputs is None:
                inputs = {_before_pass_through(graph, t) for t in _external_inputs(graph, nodes)}
            if tensor not in inputs:
                return False
        else:
            node = graph.producer.get(tensor)
            if node is not None and (node in nodes or not upstream >> node & 1):
                return False
    return True


def _solutions(options: list[list[int]], cand_bits: dict[int, int],
               cand_up: dict[int, int]) -> list[tuple[int, ...]] | None:
    """Every injective choice of one option per group (groups in execution order) in
    which no later group's candidate feeds an earlier one's; None past the limits."""
    found: list[tuple[int, ...]] = []
    chosen: list[int] = []
    steps = 0

    def extend(j: int) -> bool:
        nonlocal steps
        if j == len(options):
            found.append(tuple(chosen))
            return len(found) < SOLUTIONS_LIMIT
        for k in options[j]:
            steps += 1
            if steps > STEPS_LIMIT:
                return False
            if k in chosen or any(cand_up[i] & cand_bits[k] for i in chosen):
                continue
            chosen.append(k)
            going = extend(j + 1)
            chosen.pop()
            if not going:
                return False
        return True

    return found if extend(0) else None


# --------------------------------------------------------------------------- weights


def _digest(array: np.ndarray) -> str:
    data = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.blake2b(data.tobytes() + str(data.shape).encode(), digest_size=16).hexdigest()


def _match_by_weights(state: _State, parameters: dict[int, dict[str, np.ndarray]]) -> None:
    graph = state.graph
    nodes_by_weight: dict[str, list[OnnxNode]] = defaultdict(list)
    for node in graph.nodes:
        if node.op_type not in WEIGHTED_OPS | SCALED_OPS or len(node.inputs) < 2:
            continue
        weight = graph.constants.get(node.inputs[1])
        if weight is None or weight.dtype.kind != "f":
            continue
        nodes_by_weight[_digest(weight)].append(node)
        if weight.ndim == 2:  # MatMul holds Linear's weight transposed
            nodes_by_weight[_digest(weight.T)].append(node)

    # Weights that several *different* modules share (an untrained LayerNorm's ones)
    # say nothing about which is which.
    owners: dict[str, set[str]] = defaultdict(set)
    for call in state.calls:
        weight = parameters.get(call.index, {}).get("weight")
        if weight is not None:
            owners[_digest(weight)].add(call.module)

    # A module called several times owns as many nodes with its weight, in an order
    # that need not be its calls' order: those are paired from data flow (_Reused).
    calls_of: dict[str, list[TorchCall]] = defaultdict(list)
    for call in state.calls:
        if call.index in parameters and call.alias_of is None:
            calls_of[call.module].append(call)

    used: set[int] = set()
    for call in state.calls:
        weight = parameters.get(call.index, {}).get("weight")
        if call.index in state.pairs or weight is None:
            continue
        digest = _digest(weight)
        if len(owners[digest]) > 1:
            continue
        if len(calls_of[call.module]) > 1:
            continue  # _match_reused_weights
        for node in nodes_by_weight.get(digest, ()):
            if node.index in used:
                continue
            if _add_weighted(state, call, node, parameters, PairMethod.WEIGHTS):
                used.add(node.index)
                break
    reused = {module for module, calls in calls_of.items() if len(calls) > 1}
    _match_reused_weights(state, parameters, calls_of, owners, used)
    _match_by_close_weights(state, parameters, used, reused)


def _match_reused_weights(state: _State, parameters: dict[int, dict[str, np.ndarray]],
                          calls_of: dict[str, list[TorchCall]], owners: dict[str, set[str]],
                          used: set[int]) -> None:
    """A module called several times owns as many nodes with its weight (or, in a changed
    file, nearly its weight), in an order that need not be its calls' order: they are
    paired from data flow (_pair_reused), never in the order they come."""
    graph = state.graph
    for module, calls in calls_of.items():
        weight = parameters[calls[0].index].get("weight")
        groups = [[c] for c in calls if c.index not in state.pairs]
        if len(calls) < 2 or not groups or weight is None or len(owners[_digest(weight)]) > 1:
            continue
        found = _weight_candidates(graph, weight, used)
        exact = [(node, method) for node, method in found if method == PairMethod.WEIGHTS]
        if len(exact) >= len(groups):  # a close one would only add doubt
            found = exact
        if not found:
            continue
        used.update(node.index for node, _ in found)
        bias = parameters[calls[0].index].get("bias")
        candidates = [{node.index, graph.producer[_with_bias(graph, node, bias)]}
                      for node, _ in found]
        state.reused.append(_Reused(module, groups, candidates, [m for _, m in found]))
    _retry_reused(state)


def _weight_candidates(graph: OnnxGraph, weight: np.ndarray,
                       used: set[int]) -> list[tuple[OnnxNode, str]]:
    """Unclaimed nodes whose weight is ``weight`` ("weights", transposed for MatMul) or,
    for a 2-D+ weight, nearly it ("weights~", see _match_by_close_weights)."""
    found = []
    for node in graph.nodes:
        if (node.index in used or node.op_type not in WEIGHTED_OPS | SCALED_OPS
                or len(node.inputs) < 2):
            continue
        onnx_weight = graph.constants.get(node.inputs[1])
        if onnx_weight is None or onnx_weight.dtype.kind != "f":
            continue
        onnx_weight = onnx_weight.astype(np.float32)
        if onnx_weight.shape != weight.shape and onnx_weight.T.shape == weight.shape:
            onnx_weight = onnx_weight.T
        if onnx_weight.shape != weight.shape:
            continue
        if np.array_equal(onnx_weight, weight):
            found.append((node, PairMethod.WEIGHTS))
        elif (weight.ndim >= 2 and node.op_type in WEIGHTED_OPS
              and _channel_similarity(weight, onnx_weight) >= CLOSE_COSINE):
            found.append((node, PairMethod.CLOSE_WEIGHTS))
    return found


def _add_weighted(state: _State, call: TorchCall, node: OnnxNode,
                  parameters: dict[int, dict[str, np.ndarray]], method: PairMethod) -> bool:
    tensor = _with_bias(state.graph, node, parameters[call.index].get("bias"))
    return state.add(call.index, tensor, method, {node.index, state.graph.producer[tensor]})


CLOSE_COSINE = 0.9  # weights this similar are the same layer, changed (fp16, folded BN, a fault)
CLOSE_MARGIN = 0.2  # ...and clearly closer than any other candidate


def _match_by_close_weights(state: _State, parameters: dict[int, dict[str, np.ndarray]],
                            used: set[int], reused: set[str]) -> None:
    """Pair modules whose weight is *nearly* an unclaimed node's weight.

    The weight of a converted layer may differ from the checkpoint's: rounded to fp16,
    BatchNorm folded in (each output channel scaled), or simply wrong. Same shape and a
    cosine similarity above CLOSE_COSINE, clearly ahead of the runner-up, still
    identifies the layer; the pair's method, "weights~", tells the rules they differ.
    """
    graph = state.graph
    free = [n for n in graph.nodes if n.op_type in WEIGHTED_OPS and n.index not in used
            and len(n.inputs) > 1 and n.inputs[1] in graph.constants]
    for call in state.calls:
        weight = parameters.get(call.index, {}).get("weight")
        if call.index in state.pairs or weight is None or weight.ndim < 2 or call.module in reused:
            continue
        scored = []
        for node in free:
            if node.index in used:
                continue
            onnx_weight = graph.constants[node.inputs[1]].astype(np.float32)
            if onnx_weight.shape != weight.shape and onnx_weight.T.shape == weight.shape:
                onnx_weight = onnx_weight.T
            if onnx_weight.shape == weight.shape:
                scored.append((_channel_similarity(weight, onnx_weight), node))
        scored.sort(key=lambda item: -item[0])
        if not scored or scored[0][0] < CLOSE_COSINE:
            continue
        if len(scored) > 1 and scored[0][0] - scored[1][0] < CLOSE_MARGIN:
            state.not_paired(call.index, "several ONNX layers have nearly its weights; not paired")
            continue
        if _add_weighted(state, call, scored[0][1], parameters, PairMethod.CLOSE_WEIGHTS):
            used.add(scored[0][1].index)


def _channel_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |cosine| between matching output channels: 1.0 when ``b`` is ``a`` with each
    output channel scaled (folded BatchNorm, fp16 rounding, one channel changed); 0.0 for
    an empty weight (CRAFT has convolutions with no output channel), which says nothing."""
    if a.size == 0 or b.size == 0:
        return 0.0
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    live = norms > 0
    if not live.any():
        return 0.0
    return float(np.mean(np.abs((a * b).sum(axis=1)[live] / norms[live])))


FOLDED = 0.999  # per-channel similarity of a conv weight with BatchNorm folded into it


def _channel_scales(torch_weight: np.ndarray, onnx_weight: np.ndarray) -> np.ndarray:
    """Per output channel, the factor that best maps the module's weight onto the file's."""
    a = torch_weight.reshape(torch_weight.shape[0], -1).astype(np.float64)
    b = onnx_weight.reshape(onnx_weight.shape[0], -1).astype(np.float64)
    norms = (a * a).sum(axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)


FACTOR_RTOL = 1e-3  # per-channel fit of a folded weight: fp16 rounding stays inside it


def _channel_factors(torch_weight: np.ndarray, onnx_weight: np.ndarray) -> np.ndarray | None:
    """Per output channel, the factor f with onnx = f * torch, when every channel is
    exactly such a multiple (NaN for a channel the module's weight has all zero); None
    when the file's weight is not the module's scaled per channel (another weight)."""
    a = torch_weight.reshape(torch_weight.shape[0], -1).astype(np.float64)
    b = onnx_weight.reshape(onnx_weight.shape[0], -1).astype(np.float64)
    factors = _channel_scales(torch_weight, onnx_weight)
    size = np.abs(a).max(axis=1)
    off = np.abs(b - factors[:, None] * a).max(axis=1)
    if np.any(off > FACTOR_RTOL * np.maximum(size * np.maximum(np.abs(factors), 1.0), 1e-30)):
        return None
    return np.where(size > 0, factors, np.nan)


def _factor_source(state: _State, parameters: dict[int, dict[str, np.ndarray]], call_index: int,
                   factors: np.ndarray) -> tuple[int, str] | None:
    """The parameter of the PyTorch model that holds ``factors``: (owning call, or -1 for
    the root model; its name). Only a multiplication that exists in the model can have
    been folded, by the module around the layer or one that consumes its output (a
    layer scale ``x * gamma``, zeros included); per-channel factors found nowhere mean
    the file's weights were changed."""
    module = state.calls[call_index].module
    known = ~np.isnan(factors)
    for owner, params in parameters.items():
        if owner == call_index:
            continue
        if owner >= 0:
            other = state.calls[owner]
            encloses = module.startswith(other.module + ".") and owner > call_index
            consumes = call_index in {state.real(p) for p in other.producers}
            if not (encloses or consumes):
                continue
        for name, value in params.items():
            flat = value.reshape(-1).astype(np.float64)
            if name.endswith("bias") or flat.size != factors.size:
                continue
            scale = max(float(np.abs(flat).max()), 1e-12)
            if np.allclose(flat[known], factors[known], rtol=FACTOR_RTOL, atol=1e-6 * scale):
                return owner, name
    return None


def _check_weights(state: _State, parameters: dict[int, dict[str, np.ndarray]]) -> None:
    """Unpair (or move) a weighted module whose node's weight is its own times a factor.

    Optimisers (onnxruntime's ConvMulFusion, onnxslim) fold a following ``* 0.2``, or a
    layer scale ``x * gamma`` (one factor per channel, zeros included), into the Conv:
    the node then computes a later value, and the module's own output exists nowhere in
    the file. Comparing them would show a divergence that is not there. A per-channel
    factor counts as folded only when the PyTorch model holds it (_factor_source): the
    pair then moves to the module that applies it, or is dropped with the reason. Other
    per-channel changes (a wrong checkpoint, an edited channel) stay paired: they are
    real divergences, and a folded BatchNorm is paired later (_pair_folded_batchnorm).
    """
    graph = state.graph
    for call_index, pair in list(state.pairs.items()):
        if pair.op_type not in WEIGHTED_OPS:
            continue
        node = graph.node_of(pair.onnx_tensor)
        weight = parameters.get(call_index, {}).get("weight")
        onnx_weight = graph.constants.get(node.inputs[1]) if node and len(node.inputs) > 1 else None
        if weight is None or onnx_weight is None or onnx_weight.shape != weight.shape:
            continue
        if np.array_equal(onnx_weight, weight):
            continue
        factors = _channel_factors(weight, onnx_weight)
        known = factors[~np.isnan(factors)] if factors is not None else np.array([])
        if factors is None or not known.size or np.all(np.abs(known - 1) <= 1e-2):
            continue  # another weight, or fp16 rounding: compared as it is
        source = _factor_source(state, parameters, call_index, factors)
        if source is not None:
            _fold_into(state, call_index, node, source)
        elif np.allclose(known, known[0], rtol=1e-3):
            _unpair(state, call_index)
            state.absent.add(call_index)
            state.not_paired(
                call_index, f"its weights in '{node.name}' are its own times {known[0]:.3g}: a "
                "following multiplication was folded into it, so its own output is not in the file")


def _changed_weights(state: _State, parameters: dict[int, dict[str, np.ndarray]]) -> tuple[int, ...]:
    """Paired modules whose node's weights differ from theirs beyond fp16 rounding (a
    factor within 1% of 1 per channel): after _check_weights, no folding explains it."""
    changed = []
    for call_index, pair in state.pairs.items():
        node = state.graph.node_of(pair.onnx_tensor) if pair.op_type in WEIGHTED_OPS else None
        weight = parameters.get(call_index, {}).get("weight")
        if node is None or weight is None or len(node.inputs) < 2 or pair.method == PairMethod.FUSED:
            continue
        onnx_weight = state.graph.constants.get(node.inputs[1])
        if onnx_weight is None or onnx_weight.shape != weight.shape or np.array_equal(onnx_weight, weight):
            continue
        factors = _channel_factors(weight, onnx_weight)
        known = factors[~np.isnan(factors)] if factors is not None else None
        if known is None or np.any(np.abs(known - 1) > 1e-2):
            changed.append(call_index)
    return tuple(sorted(changed))


def _fold_into(state: _State, call_index: int, node: OnnxNode, source: tuple[int, str]) -> None:
    """A module's node holds its weights times ``source``'s per-channel factor: pair the
    node with the module that applies the factor when that module consumes this one's
    output, otherwise leave the module unpaired."""
    owner, name = source
    nodes = state.instance.get(call_index, set())
    tensor = state.pairs[call_index].onnx_tensor
    _unpair(state, call_index)
    state.absent.add(call_index)
    holder = "the model" if owner < 0 else state.calls[owner].label
    consumer = owner >= 0 and {state.real(p) for p in state.calls[owner].producers} == {call_index}
    if consumer and state.add(owner, tensor, PairMethod.FUSED, nodes):
        state.not_paired(call_index, f"fused into ONNX node '{node.name}' with {holder}",
                         fused_into=node.name)
        return
    state.not_paired(
        call_index, f"weights folded with a per-channel factor: its weights in '{node.name}' are "
        f"its own times {holder}'s '{name}' (a following multiplication folded into it), so its "
        "own output is not in the file")


def _unpair(state: _State, call_index: int) -> None:
    pair = state.pairs.pop(call_index)
    state.claimed.pop(pair.onnx_tensor, None)
    state.complete.discard(call_index)
    state.instance.pop(call_index, None)


def _pair_fused_activations(state: _State) -> None:
    """onnxruntime's FusedConv / FusedGemm apply an activation: their output is the
    activation module's, and the Conv or Linear before it is fused into them."""
    graph = state.graph
    for call in state.calls:
        if call.alias_of is not None or call.index in state.pairs or call.module_type not in MODULE_OPS:
            continue
        producers = {state.real(p) for p in call.producers}
        layer = producers.pop() if len(producers) == 1 else None
        pair = state.pairs.get(layer) if layer is not None else None
        if pair is None or pair.op_type not in ("FusedConv", "FusedGemm"):
            continue
        node = graph.node_of(pair.onnx_tensor)
        # Only the activation the node applies: a Conv left unpaired after a FusedConv
        # (its weights folded, say) is no activation of it.
        if node.attrs.get("activation") not in MODULE_OPS[call.module_type]:
            continue
        nodes = state.instance.get(layer, set())
        _unpair(state, layer)
        if state.add(call.index, pair.onnx_tensor, PairMethod.FUSED, nodes):
            state.not_paired(layer, f"fused into ONNX node '{node.name}' with {call.label}",
                             fused_into=node.name)


def _pair_folded_batchnorm(state: _State, parameters: dict[int, dict[str, np.ndarray]]) -> None:
    """Conv + BatchNorm exported as one Conv: the tensor belongs to the BatchNorm.

    Exporters fold an eval-mode BatchNorm into the Conv before it, leaving no node for
    the BatchNorm and a Conv whose output is the BatchNorm's. The Conv's weight is then
    the module's weight scaled per output channel. The pair moves to the last module
    the node covers; the Conv is reported as fused into it.
    """
    graph = state.graph
    for call in state.calls:
        if (call.alias_of is not None or call.index in state.pairs
                or not call.module_type.startswith("BatchNorm")):
            continue
        producers = {state.real(p) for p in call.producers}
        conv = producers.pop() if len(producers) == 1 else None
        pair = state.pairs.get(conv) if conv is not None else None
        if pair is None or pair.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        node = graph.node_of(pair.onnx_tensor)
        torch_weight = parameters.get(conv, {}).get("weight")
        onnx_weight = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
        if (torch_weight is None or onnx_weight is None or onnx_weight.shape != torch_weight.shape
                or np.array_equal(onnx_weight, torch_weight)
                or _channel_similarity(torch_weight, onnx_weight) < FOLDED):
            continue
        nodes = state.instance.get(conv, set())
        _unpair(state, conv)
        if state.add(call.index, pair.onnx_tensor, PairMethod.FUSED, nodes):
            state.not_paired(conv, f"fused into ONNX node '{node.name}' with "
                             f"{state.calls[call.index].label}", fused_into=node.name)


def _with_bias(graph: OnnxGraph, node: OnnxNode, bias: np.ndarray | None) -> str:
    """MatMul + Add(bias) is one Linear: its output is the Add's."""
    out = node.outputs[0]
    readers = graph.consumers.get(out, [])
    if bias is None or node.op_type != "MatMul" or len(readers) != 1:
        return out
    add = graph.nodes[readers[0]]
    if add.op_type != "Add":
        return out
    for name in add.inputs:
        value = graph.constants.get(name)
        if value is not None and value.shape == bias.shape and np.array_equal(value, bias):
            return add.outputs[0]
    return out


# --------------------------------------------------------------------------- structure


def _follow_data_flow(state: _State) -> bool:
    """One sweep of both structural rules; True when something new was paired."""
    progress = False
    graph = state.graph
    for call in state.calls:
        # Rule 1: a paired module's outside input is what its producer made.
        if call.index in state.complete:
            # Only when torch says every input came straight from a module (no
            # functional op in between, which ONNX would show as extra nodes).
            producers = {state.real(p) for p in call.producers}
            unpaired = [p for p in producers if p is not None and p >= 0 and p not in state.pairs]
            if len(unpaired) == 1 and len(producers) == 1:
                inputs = _external_inputs(graph, state.instance[call.index])
                fitting = [t for t in inputs if t not in state.claimed
                           and _shape_fits(graph.shapes.get(t), state.calls[unpaired[0]].shape)]
                if len(fitting) == 1:
                    progress |= state.add(unpaired[0], _before_pass_through(graph, fitting[0]),
                                          PairMethod.STRUCTURE, set())
            continue
        if call.index in state.pairs:
            continue
        # Rule 2: the single consumer of the producer's tensor with this module's op.
        if call.alias_of is not None or call.module_type not in MODULE_OPS or not call.producers:
            continue
        source = state.tensor_of(call.producers[0])
        if source is None:
            continue
        ops = MODULE_OPS[call.module_type]
        candidates = [graph.nodes[i] for i in graph.consumers.get(source, ())
                      if graph.nodes[i].op_type in ops
                      and graph.nodes[i].outputs[0] not in state.claimed]
        if len(candidates) == 1:
            node = candidates[0]
            progress |= state.add(call.index, node.outputs[0], PairMethod.STRUCTURE, {node.index})
    return progress


def _external_inputs(graph: OnnxGraph, nodes: set[int]) -> list[str]:
    found = []
    for i in sorted(nodes):
        for name in graph.nodes[i].inputs:
            if not name or name in graph.constants or name in found:
                continue
            if graph.producer.get(name) not in nodes:
                found.append(name)
    return found


def _before_pass_through(graph: OnnxGraph, tensor: str) -> str:
    """Skip exporter-inserted Identity/Cast nodes back to the tensor the module made."""
    node = graph.node_of(tensor)
    while node is not None and node.op_type in PASS_THROUGH and node.inputs:
        tensor = node.inputs[0]
        node = graph.node_of(tensor)
    return tensor


# --------------------------------------------------------------------------- leftovers


def _default_reason(call: TorchCall, has_scopes: bool) -> str:
    if not has_scopes and call.module_type not in MODULE_OPS:
        return "no module names in the ONNX file and no weights or data flow to pair it by"
    return "no ONNX tensor holds its output (fused, folded or optimised away)"


def _unmatched_onnx(state: _State) -> tuple[Unmatched, ...]:
    """Weighted ONNX nodes nothing was paired with: the most telling leftovers."""
    covered = set().union(*state.instance.values()) if state.instance else set()
    found = []
    for node in state.graph.nodes:
        if node.op_type in WEIGHTED_OPS and node.index not in covered:
            found.append(Unmatched(node.name, f"{node.op_type}: no torch module call paired with it"))
    return tuple(found)


def _shape_fits(onnx_shape: tuple | None, torch_shape: tuple[int, ...]) -> bool:
    if onnx_shape is None:
        return True
    if len(onnx_shape) != len(torch_shape):
        return False
    return all(not isinstance(a, int) or a == b for a, b in zip(onnx_shape, torch_shape))


def misfit(pair: Pair, calls: list[TorchCall], value: np.ndarray | None,
           torch_values: Mapping[int, np.ndarray] | None = None) -> Unmatched | None:
    """Why ``pair`` was a wrong guess, given its tensor's value at run time (None: fine).

    Shape inference cannot size every tensor of a graph with dynamic axes; the run can.
    A structural pair of the wrong shape was a wrong guess, not a divergence. So is any
    pair whose tensor has the same number of elements in another shape and whose values
    do not match in torch's layout: optimisers move Transposes across module boundaries,
    leaving the module's scope holding another layout of its neighbour's value. A tensor
    of another *size* stays paired: that is a real shape divergence.
    """
    shape = calls[pair.call].shape
    if value is None or value.shape == shape:
        return None
    if pair.method == PairMethod.STRUCTURE:
        return Unmatched(calls[pair.call].label,
                         f"the tensor it was paired with by structure has shape "
                         f"{tuple(value.shape)}; not paired")
    reference = (torch_values or {}).get(pair.call)
    if reference is not None and value.size == reference.size and not _same_values(reference, value):
        return Unmatched(calls[pair.call].label,
                         f"its ONNX tensor '{pair.onnx_tensor}' holds another layout "
                         f"{tuple(value.shape)} of the values; not compared")
    return None


def unpair(alignment: Alignment, dropped: Mapping[int, Unmatched]) -> Alignment:
    """``alignment`` without the pairs at positions ``dropped``, which become unmatched."""
    if not dropped:
        return alignment
    return replace(alignment,
                   pairs=tuple(p for k, p in enumerate(alignment.pairs) if k not in dropped),
                   unmatched_torch=alignment.unmatched_torch + tuple(dropped.values()))


def _same_values(reference: np.ndarray, value: np.ndarray) -> bool:
    """Whether ``value`` holds ``reference``'s values in its order, up to rounding."""
    a = reference.astype(np.float64).ravel()
    b = value.astype(np.float64).ravel()
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    return bool(np.all(np.abs(a - b) <= 1e-3 * scale + 1e-6))
