"""Capture every submodule's output during one PyTorch forward pass.

Forward hooks on every submodule store a detached copy of each output (residual code
such as ``res += x`` mutates a tensor after its hook ran, so a reference would be wrong),
and record which earlier call produced each input: the data-flow graph the aligner walks.
Hooks are always removed, also when the forward raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from .errors import LayerdiffError, first_line
from .records import TorchCall

# Module attributes worth showing and reasoning about (LeakyReLU.negative_slope,
# Upsample.mode, GELU.approximate...): plain values only.
_SIMPLE = (bool, int, float, str, type(None))


@dataclass
class TorchCapture:
    calls: list[TorchCall]
    activations: MutableMapping[int, np.ndarray]  # call index -> output values (or a store)
    outputs: list[np.ndarray]  # the model's final outputs, flattened
    input_mutated: bool
    training_modules: tuple[str, ...]
    # (module path, aten op) of every random draw in forward, first occurrence each
    random_ops: tuple[tuple[str, str], ...] = ()
    # call -> its module's own parameters; key -1: the root model's own, which no hook sees
    # (a layer scale ``self.gamma`` used in the top-level forward, say).
    parameters: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    # Their names, in the same order: "output" for a lone tensor, dict keys and dataclass
    # fields ("logits", "last_hidden_state"), positions in tuples ("0"), dotted when nested.
    output_names: list[str] = field(default_factory=list)


def _tensors(value: Any) -> list[torch.Tensor]:
    """Flatten a module output (tensor, tuple, list, dict, dataclass) into its tensors, in order."""
    return [tensor for _, tensor in named_tensors(value)]


def named_tensors(value: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors in ``value`` with their paths: dict keys and dataclass fields (a Hugging
    Face ModelOutput is both: its fields that are set), tuple positions, dotted when
    nested. A lone tensor is named "output"."""
    if isinstance(value, torch.Tensor):
        return [(prefix or "output", value)]
    if isinstance(value, Mapping):
        items = list(value.items())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return []
    found = []
    for key, item in items:
        found += named_tensors(item, f"{prefix}.{key}" if prefix else str(key))
    return found


def _simple_attrs(module: torch.nn.Module) -> dict[str, Any]:
    attrs = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _SIMPLE) or (
            isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)
        ):
            attrs[key] = value
    return attrs


# aten ops that draw from the random generator. Dropout in training mode is left to
# training_modules (the training_mode rule): its draws happen inside native_dropout.
RANDOM_ATEN_OPS = frozenset({
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm",
    "normal", "normal_", "uniform", "uniform_", "bernoulli", "bernoulli_", "multinomial",
    "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "poisson",
    "rrelu_with_noise",
})


class _RandomDraws(TorchDispatchMode):
    """Notes every random aten op run during the forward, with the module it ran in."""

    def __init__(self, where: Callable[[], str]) -> None:
        super().__init__()
        self._where = where
        self.found: dict[tuple[str, str], None] = {}  # ordered set

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in RANDOM_ATEN_OPS:
            self.found[(self._where(), name)] = None
        return func(*args, **(kwargs or {}))


class _Recorder:
    """Hook state: the calls so far and which live tensor each call produced."""

    def __init__(self, model_inputs: list[torch.Tensor], store: MutableMapping[int, np.ndarray],
                 visit: Callable[[int, torch.Tensor], None] | None, parameters: bool,
                 tick: Callable[[int], None] | None = None) -> None:
        self.calls: list[TorchCall] = []
        self._tick = tick
        self.activations = store
        self._copy = isinstance(store, dict)
        self._visit = visit
        self._parameters = parameters
        self.parameters: dict[int, dict[str, np.ndarray]] = {}
        # id(tensor) -> (weakref to it, its version when recorded, producing call).
        # Weak, so that capture does not keep every original activation alive.
        self._producer: dict[int, tuple[weakref.ref, int, int]] = {}
        self._count: dict[str, int] = {}
        self._pending: list[tuple[int | None, ...]] = []  # producers of calls in progress
        self.running: list[str] = []  # paths of the modules whose forward is in progress
        for position, tensor in enumerate(model_inputs):  # input k is "call" -(k + 1)
            self._remember(tensor, -(position + 1))

    def _remember(self, tensor: torch.Tensor, call: int) -> None:
        self._producer[id(tensor)] = (weakref.ref(tensor), tensor._version, call)

    def producer_of(self, tensor: torch.Tensor) -> tuple[int | None, bool]:
        """The call that produced ``tensor`` and whether its values are unchanged since."""
        entry = self._producer.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None, False
        _, version, call = entry
        return call, tensor._version == version

    def before(self, path: str, args: tuple) -> None:
        """Forward pre-hook: note the producers now, before an in-place module changes them."""
        self.running.append(path)
        # A producer counts only if its tensor still holds the values it made:
        # `x += skip` between two modules makes the input a functional op's result.
        self._pending.append(
            tuple(c if same else None for c, same in map(self.producer_of, _tensors(args))))

    def hook(self, path: str, module: torch.nn.Module, output: Any) -> None:
        producers = self._pending.pop() if self._pending else ()
        if self.running:
            self.running.pop()
        outs = _tensors(output)
        if not outs:
            return
        nth = self._count.get(path, 0)
        self._count[path] = nth + 1
        attrs = _simple_attrs(module)
        params = {} if not self._parameters else {
            name: p.detach().float().cpu().numpy().copy()
            for name, p in module.named_parameters(recurse=False)
        }
        for position, tensor in enumerate(outs):
            index = len(self.calls)
            source, unchanged = self.producer_of(tensor)
            alias = source if unchanged else None
            self.calls.append(
                TorchCall(
                    index=index, module=path, call=nth, module_type=type(module).__name__,
                    shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."),
                    producers=producers, alias_of=alias, attrs=attrs,
                    output=position, outputs=len(outs),
                )
            )
            if alias is None:
                if self._visit is not None:
                    self._visit(index, tensor.detach())
                else:  # a view: the store keeps a copy of it (or writes it to disk)
                    self.activations[index] = _to_numpy(tensor, copy=self._copy)
                if params:
                    self.parameters[index] = params
            self._remember(tensor, index)
        if self._tick is not None:
            self._tick(len(self.calls))

    def mutated_later(self) -> set[int]:
        """Calls whose output tensor was changed in place after its hook copied it."""
        changed = set()
        for ref, version, call in self._producer.values():
            tensor = ref()
            if call >= 0 and tensor is not None and tensor._version != version:
                changed.add(call)
        return changed


def _to_numpy(tensor: torch.Tensor, copy: bool = True) -> np.ndarray:
    t = tensor.detach()
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.float()
    values = t.cpu().numpy()
    return values.copy() if copy else values


def _is_view_of_more(tensor: torch.Tensor) -> bool:
    return (not tensor.is_contiguous()
            or tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size())


@contextlib.contextmanager
def _hooks(model: torch.nn.Module, recorder: _Recorder) -> Iterator[None]:
    handles = []
    try:
        for path, module in model.named_modules():
            if module is model:
                continue
            handles.append(module.register_forward_pre_hook(
                lambda m, a, _p=path: recorder.before(_p, a)))
            handles.append(module.register_forward_hook(
                lambda m, a, o, _p=path: recorder.hook(_p, m, o)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def training_modules(model: torch.nn.Module) -> tuple[str, ...]:
    """Modules whose output depends on training mode and that are in it."""
    kinds = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd,
             torch.nn.modules.instancenorm._InstanceNorm)
    return tuple(
        path or type(model).__name__
        for path, m in model.named_modules()
        if m.training and isinstance(m, kinds)
        and not (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p == 0)
    )


class StopCapture(Exception):
    """Raised by a ``visit`` that has seen what it needs: the forward stops there."""


def capture(model: torch.nn.Module, example: torch.Tensor | tuple[tuple, dict], *,
            hooks: bool = True, store: MutableMapping[int, np.ndarray] | None = None,
            visit: Callable[[int, torch.Tensor], None] | None = None,
            parameters: bool = True, tick: Callable[[int], None] | None = None) -> TorchCapture:
    """Run ``model`` once on private copies of ``example`` and record every submodule call.

    ``example`` is one input tensor, or forward()'s ``(args, kwargs)`` (inputs.as_call).
    Each output's values go into ``store`` (a dict of copies by default; a
    store.TensorStore, which copies or writes what it is given, keeps them within a
    memory budget), or, with ``visit``, are handed to ``visit(index,
    tensor)`` as they are made and not kept. TorchScript modules take no hooks: for them
    only the final outputs are captured.
    """
    args, kwargs = ((example,), {}) if isinstance(example, torch.Tensor) else example
    originals = [*args, *kwargs.values()]
    own_args = tuple(a.clone() for a in args)
    own_kwargs = {k: v.clone() for k, v in kwargs.items()}
    own = [*own_args, *own_kwargs.values()]
    recorder = _Recorder(own, {} if store is None else store, visit, parameters, tick)
    use_hooks = hooks and not isinstance(model, torch.jit.ScriptModule)
    top = type(model).__name__
    draws = _RandomDraws(lambda: recorder.running[-1] if recorder.running else top)
    try:
        with torch.no_grad(), _buffers_kept(model), draws:
            if use_hooks:
                with _hooks(model, recorder):
                    result = model(*own_args, **own_kwargs)
            else:
                result = model(*own_args, **own_kwargs)
    except StopCapture:
        raise
    except Exception as exc:  # the user's model failed on our input
        raise _failed(exc, originals) from exc
    if parameters and isinstance(model, torch.nn.Module):
        root = {name: p.detach().float().cpu().numpy().copy()
                for name, p in model.named_parameters(recurse=False)}
        if root:
            recorder.parameters[-1] = root
    # The outputs are the model's own: no one changes them after, so a copy is needed
    # only to let go of a larger tensor they are a view of (a full-size output is GBs).
    named = named_tensors(result)
    outputs = [_to_numpy(t, copy=_is_view_of_more(t)) for _, t in named]
    output_names = [name for name, _ in named]
    del result, named
    mutated = recorder.mutated_later()
    calls = [
        TorchCall(**{**vars(c), "mutated_later": True}) if c.index in mutated else c
        for c in recorder.calls
    ]
    return TorchCapture(
        calls=calls,
        activations=recorder.activations,
        outputs=outputs,
        output_names=output_names,
        input_mutated=not all(same_values(a, b) for a, b in zip(own, originals)),
        training_modules=training_modules(model) if isinstance(model, torch.nn.Module) else (),
        random_ops=tuple(draws.found),
        parameters=recorder.parameters,
    )


def output_names(model: torch.nn.Module, example: tuple[tuple, dict]) -> list[str]:
    """The names of what ``model`` returns on ``example`` (named_tensors), from a plain run."""
    args, kwargs = example
    try:
        with torch.no_grad(), _buffers_kept(model):
            result = model(*(a.clone() for a in args), **{k: v.clone() for k, v in kwargs.items()})
    except Exception as exc:  # the user's model failed on our input
        raise _failed(exc, [*args, *kwargs.values()]) from exc
    return [name for name, _ in named_tensors(result)]


@contextlib.contextmanager
def _buffers_kept(model: torch.nn.Module) -> Iterator[None]:
    """A model in training mode updates BatchNorm running statistics as it runs: restore
    them, so that diagnosing a model does not change it."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in model.named_buffers():
                if name in buffers:
                    value.copy_(buffers[name])


def _failed(exc: Exception, inputs: list[torch.Tensor]) -> LayerdiffError:
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    return LayerdiffError(
        f"the PyTorch model failed on input{'s' if len(inputs) > 1 else ''} of shape "
        f"{shapes}: {type(exc).__name__}: {first_line(exc)}",
        hint="check --input-shape: channels and a size the model accepts"
             + ("" if len(inputs) == 1 else ", for each input (NAME:D0,D1,...)"))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values, NaN equal to NaN: an input holding NaN is not "changed"
    by a forward that leaves it alone (NaN != NaN would say it was)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point() and not a.is_complex():
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
