"""The model's inputs, named and typed: which ones, in what order, how forward() takes
them, which ONNX input each feeds, and what values fill them.

Four sources, in order of authority: what the user said (``--input-shape NAME:dims``,
``--input-range NAME:LOW,HIGH``, the arrays of ``--input-data``), the ONNX graph's inputs
(names, dtypes, ranks, fixed and symbolic dimensions), what the loader knows
(``LoadedModel.inputs``: spandrel's inpainting models take an image and a mask), and
forward()'s signature (names, defaults, keyword-only parameters). ONNX inputs pair with
forward()'s parameters by name where the names match, else by position, and the notes
say which.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import UsageError
from ..records import InputKind, InputSpec

IMAGE_SIDE = 64  # default height and width of an image input
SEQUENCE = 16  # default length of a token sequence, and of other free dimensions

# Names that say what an input holds (Hugging Face's, and the common spellings).
_TOKEN_NAMES = ("input_ids", "token_type_ids", "position_ids", "decoder_input_ids", "ids",
                "tokens", "labels")
_ATTENTION_NAMES = ("attention_mask", "decoder_attention_mask", "padding_mask")
_FLOAT_DTYPES = ("float32", "float16", "float64", "bfloat16")

GraphInput = tuple[str, str, tuple]  # (name, dtype, declared dims), as OnnxGraph.inputs


@dataclass(frozen=True)
class Param:
    """One parameter of forward()."""

    name: str
    keyword_only: bool
    default: Any = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass(frozen=True)
class Request:
    """What the user asked about the inputs. A shape keyed by None is the plain
    ``--input-shape N,C,H,W``: it goes to the first image input."""

    shapes: Mapping[str | None, tuple[int, ...]] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    data: Mapping[str, np.ndarray] = field(default_factory=dict)

    def named(self) -> set[str]:
        return {n for n in (*self.shapes, *self.ranges, *self.data) if n is not None}


def forward_params(module: Any) -> list[Param] | None:
    """forward()'s named parameters (not *args / **kwargs); None when it has no
    readable signature (a TorchScript module may not)."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError, AttributeError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    return [Param(p.name, p.kind == inspect.Parameter.KEYWORD_ONLY, p.default)
            for p in signature.parameters.values() if p.kind in kinds]


def resolve(module: Any, hints: Sequence[InputSpec], graph_inputs: Sequence[GraphInput] | None,
            request: Request = Request(), *, channels: int = 3,
            exported: bool = False) -> tuple[tuple[InputSpec, ...], list[str]]:
    """The model's inputs as complete specs (shape, dtype, range, ONNX name, keyword),
    and notes on how they were paired. ``graph_inputs`` is None before an export;
    ``exported`` says the graph is layerdiff's own export (paired by position silently)."""
    params = forward_params(module)
    notes: list[str] = []
    chosen = _choose(params, hints, graph_inputs, request, notes, exported)
    _check_named(request, chosen)
    hint_of = {h.name: h for h in hints}
    specs = []
    for name, onnx, keyword, default in chosen:
        declared = onnx[1:] if onnx else None
        specs.append(_describe(name, onnx[0] if onnx else None, keyword, default,
                               hint_of.get(name), declared, request, module))
    if any(s.kind == InputKind.MASK for s in specs) and channels > 1 \
            and not any(h.kind == InputKind.IMAGE and h.shape for h in hints):
        # The first layer of an inpainting model takes the image and its mask stacked.
        channels -= 1
    specs = _shapes(specs, graph_inputs, request, channels)
    return tuple(specs), notes


# --------------------------------------------------------------------------- which inputs


def _choose(params: list[Param] | None, hints: Sequence[InputSpec],
            graph_inputs: Sequence[GraphInput] | None, request: Request, notes: list[str],
            exported: bool) -> list[tuple[str, GraphInput | None, bool, Any]]:
    """(name, ONNX input, by keyword, forward()'s default) of each input, in call order."""
    if params is None:  # no signature: the graph's inputs, or the loader's, by position
        if graph_inputs:
            return [(g[0], g, False, inspect.Parameter.empty) for g in graph_inputs]
        names = [h.name for h in hints] or ["input"]
        return [(n, None, False, inspect.Parameter.empty) for n in names]
    by_name = {p.name: p for p in params}
    if graph_inputs is None:
        wanted = [p for p in params
                  if p.required or p.name in request.named() or p.name in {h.name for h in hints}]
        # forward(input_ids=None, attention_mask=None, ...) (Hugging Face): all optional;
        # the first is the one the model cannot do without.
        if params and not any(p.required and not p.keyword_only for p in params) \
                and not params[0].keyword_only and params[0] not in wanted:
            wanted.insert(0, params[0])
        return _call_order(params, [(p.name, None) for p in wanted])
    # Pair each ONNX input with a parameter: by name first, then the rest by position.
    paired: dict[str, GraphInput] = {}
    left = []
    for graph_input in graph_inputs:
        if graph_input[0] in by_name:
            paired[graph_input[0]] = graph_input
        else:
            left.append(graph_input)
    free = [p for p in params if p.name not in paired and not p.keyword_only]
    if len(left) > len(free):
        extra = ", ".join(g[0] for g in left[len(free):])
        raise UsageError(f"the ONNX file has inputs that forward() does not take: {extra}",
                         hint="diagnose the ONNX file exported from this model: forward("
                              + ", ".join(p.name for p in params) + ")")
    by_position = list(zip(free, left))
    for param, graph_input in by_position:
        paired[param.name] = graph_input
    if by_position and not exported and (len(graph_inputs) > 1 or paired.keys() - {params[0].name}):
        notes.append("ONNX inputs paired with forward()'s parameters by position (the names "
                     "differ): " + ", ".join(f"{g[0]} -> {p.name}" for p, g in by_position))
    missing = [p.name for p in params if p.required and p.name not in paired]
    if missing:
        raise UsageError(
            f"forward() needs {', '.join(missing)}, which the ONNX file has no input for",
            hint="the ONNX file takes " + (", ".join(g[0] for g in graph_inputs) or "nothing")
                 + "; diagnose the file exported with every input the model needs")
    return _call_order(params, [(name, paired[name]) for name in paired])


def _call_order(params: list[Param], chosen: list[tuple[str, GraphInput | None]]):
    """In forward()'s order; positional while no parameter before is skipped."""
    given = dict(chosen)
    found, skipped = [], False
    for param in params:
        if param.name not in given:
            skipped = True
            continue
        found.append((param.name, given[param.name], param.keyword_only or skipped,
                      param.default))
    return found


def _check_named(request: Request, chosen) -> None:
    """Every input the user named is one of the model's."""
    known = {name for name, *_ in chosen} | {onnx[0] for _, onnx, *_ in chosen if onnx}
    unknown = sorted(request.named() - known)
    if unknown:
        names = ", ".join(name for name, *_ in chosen)
        raise UsageError(f"the model has no input named {', '.join(unknown)}",
                         hint=f"its inputs: {names}")


# --------------------------------------------------------------------------- each input


def _describe(name: str, onnx_name: str | None, keyword: bool, default: Any,
              hint: InputSpec | None, declared: tuple | None, request: Request,
              module: Any) -> InputSpec:
    """dtype, kind and range of one input (its shape comes later, with the others')."""
    data = request.data.get(name, request.data.get(onnx_name) if onnx_name else None)
    dtype = (declared[0] if declared else None) or (hint.dtype if hint else None) \
        or (_dtype_of(data) if data is not None else None) or _dtype_by_name(name)
    if dtype in _FLOAT_DTYPES:  # PyTorch gets its own precision; the ONNX feed is cast
        dtype = _float_dtype(module)
    kind = hint.kind if hint else _kind(name, dtype, declared)
    spec = InputSpec(name=name, dtype=dtype, kind=kind, onnx_name=onnx_name, keyword=keyword,
                     shape=hint.shape if hint else (), dynamic_axes=hint.dynamic_axes if hint else ())
    given = request.ranges.get(name) or (request.ranges.get(onnx_name) if onnx_name else None)
    if given is not None:
        return replace(spec, low=float(given[0]), high=float(given[1]))
    if isinstance(default, (int, float, bool)) and not isinstance(default, np.ndarray) \
            and declared is not None and default is not None:
        return replace(spec, fill=float(default), kind=InputKind.VALUE)
    if kind == InputKind.TOKENS or (kind == InputKind.VALUE and not dtype.startswith(("float", "bfloat", "bool"))):
        if data is not None and data.size:
            return replace(spec, low=float(data.min()), high=float(data.max()) + 1)
        table = _embedding_size(module, name)
        if table is not None:
            return replace(spec, low=0.0, high=float(table))
    return spec


def _float_dtype(module: Any) -> str:
    """The model's floating-point precision: its first floating parameter's (float32 when
    it has none, or cannot say)."""
    try:
        for parameter in module.parameters():
            if parameter.is_floating_point():
                return str(parameter.dtype).removeprefix("torch.")
    except Exception:  # noqa: BLE001 - a module that cannot list its parameters
        pass
    return "float32"


def _dtype_of(array: np.ndarray) -> str:
    return "float32" if array.dtype.kind == "f" else array.dtype.name


def _dtype_by_name(name: str) -> str:
    lowered = name.lower()
    if lowered in _TOKEN_NAMES or lowered.endswith("_ids") or lowered in _ATTENTION_NAMES:
        return "int64"
    return "float32"


def _kind(name: str, dtype: str, declared: tuple | None) -> InputKind:
    lowered = name.lower()
    rank = len(declared[1]) if declared else None
    if lowered in _ATTENTION_NAMES:
        return InputKind.ATTENTION_MASK
    if dtype not in _FLOAT_DTYPES and dtype != "bool":
        return InputKind.TOKENS if (lowered in _TOKEN_NAMES or lowered.endswith("_ids")) \
            else InputKind.VALUE
    if "mask" in lowered and rank in (None, 4):
        return InputKind.MASK
    if dtype in _FLOAT_DTYPES and rank in (None, 4):
        return InputKind.IMAGE
    return InputKind.VALUE


def _embedding_size(module: Any, name: str) -> int | None:
    """The vocabulary of token ids: the embedding table named after the input
    (``token_type_ids`` -> ``token_type_embeddings``), else the model's first one."""
    try:
        import torch

        tables = [(path, m.num_embeddings) for path, m in module.named_modules()
                  if isinstance(m, torch.nn.Embedding)]
    except Exception:  # TorchScript, or a module that cannot list its children
        return None
    stem = name.lower().removesuffix("_ids")
    for path, size in tables:
        if stem and stem not in ("input", "decoder_input") and stem in path.lower():
            return size
    return tables[0][1] if tables else None


# --------------------------------------------------------------------------- shapes


def _shapes(specs: list[InputSpec], graph_inputs, request: Request,
            channels: int) -> list[InputSpec]:
    """Each input's shape: given (--input-shape, --input-data), else the ONNX file's fixed
    dimensions with its symbolic ones shared between inputs (a mask's height is the
    image's), else the loader's, else the kind's default."""
    declared = {g[0]: tuple(g[2]) for g in graph_inputs or ()}
    symbols: dict[str, int] = {}
    plain = request.shapes.get(None)
    main = next((s.name for s in specs if s.kind == InputKind.IMAGE), specs[0].name if specs else None)
    given: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        shape = request.shapes.get(spec.name) or (request.shapes.get(spec.onnx_name)
                                                   if spec.onnx_name else None)
        if shape is None and spec.name == main and plain is not None:
            shape = plain
        data = request.data.get(spec.name, request.data.get(spec.onnx_name or ""))
        if shape is None and data is not None:
            shape = tuple(data.shape)
        if shape is not None:
            dims = declared.get(spec.onnx_name or "")
            if dims is not None:
                _check_rank(spec, shape, dims)
                for dim, size in zip(dims, shape):
                    if isinstance(dim, str):
                        symbols.setdefault(dim, size)
            given[spec.name] = tuple(shape)
    if plain is not None and main is None:
        raise UsageError("the model has no inputs", hint="check MODEL")
    done = []
    reference = {}  # kind -> shape of the first input of that kind, for the others
    for spec in specs:
        dims = declared.get(spec.onnx_name or "")
        shape = given.get(spec.name)
        if shape is None and dims is not None:
            shape = tuple(_fill(d, axis, spec, symbols, reference, channels, len(dims))
                          for axis, d in enumerate(dims))
        if shape is None and spec.shape:
            shape = tuple(d if d > 0 else _free(axis, spec, reference, channels, len(spec.shape))
                          for axis, d in enumerate(spec.shape))
        if shape is None:
            shape = _default_shape(spec, reference, channels)
        like = reference.get("image")
        if spec.kind == InputKind.MASK and spec.name not in given and like is not None \
                and len(shape) == len(like) == 4:
            shape = (*shape[:2], *like[-2:])  # a mask covers its image
        spec = replace(spec, shape=tuple(int(d) for d in shape))
        if dims is not None or not spec.dynamic_axes:
            spec = replace(spec, dynamic_axes=_dynamic(spec, dims, len(shape)))
        reference.setdefault(_family(spec.kind), spec.shape)
        done.append(spec)
    return done


def _check_rank(spec: InputSpec, shape: tuple[int, ...], dims: tuple) -> None:
    from ..preflight import MismatchError, HINT

    if len(shape) != len(dims):
        raise MismatchError(
            f"input '{spec.name}' is given {len(shape)} dimensions {tuple(shape)}; the ONNX "
            f"file's input '{spec.onnx_name}' has {len(dims)} "
            f"({', '.join(str(d) if d is not None else '?' for d in dims)})", hint=HINT)
    for axis, (dim, size) in enumerate(zip(dims, shape)):
        if axis == 1 and isinstance(dim, int) and dim != size and len(dims) == 4 \
                and spec.kind in (InputKind.IMAGE, InputKind.MASK):
            raise MismatchError(f"the ONNX file's input '{spec.onnx_name}' has {dim} channels; "
                                f"the model takes {size}", hint=HINT)


def _family(kind: InputKind) -> str:
    return {InputKind.IMAGE: "image", InputKind.MASK: "image", InputKind.TOKENS: "tokens",
            InputKind.ATTENTION_MASK: "tokens"}.get(kind, kind.value)


def _fill(dim, axis: int, spec: InputSpec, symbols: dict, reference: dict, channels: int,
          rank: int) -> int:
    if rank == 4 and axis == 1 and spec.kind == InputKind.IMAGE:
        # The model's channels, not the file's: a file of another model must show as one.
        return spec.shape[1] if len(spec.shape) == 4 and spec.shape[1] > 0 else channels
    if isinstance(dim, int) and dim > 0:
        return dim
    if isinstance(dim, str) and dim in symbols:
        return symbols[dim]
    size = _free(axis, spec, reference, channels, rank)
    if isinstance(dim, str):
        symbols[dim] = size
    return size


def _free(axis: int, spec: InputSpec, reference: dict, channels: int, rank: int) -> int:
    """A size for a dimension nothing fixes: the batch is 1; an image's height and width
    64 (or the image's, for a mask), its channels the model's; a sequence 16."""
    like = reference.get(_family(spec.kind))
    if like is not None and len(like) == rank and axis != 1:
        return like[axis]
    if axis == 0:
        return 1
    if rank == 4 and axis == 1:
        return 1 if spec.kind == InputKind.MASK else channels
    if rank == 4:
        return IMAGE_SIDE
    return SEQUENCE


def _default_shape(spec: InputSpec, reference: dict, channels: int) -> tuple[int, ...]:
    like = reference.get(_family(spec.kind))
    if spec.kind == InputKind.IMAGE:
        return (1, channels, IMAGE_SIDE, IMAGE_SIDE) if like is None else like
    if spec.kind == InputKind.MASK:
        return (1, 1, *(like[-2:] if like else (IMAGE_SIDE, IMAGE_SIDE)))
    if spec.kind in (InputKind.TOKENS, InputKind.ATTENTION_MASK):
        return like or (1, SEQUENCE)
    raise UsageError(f"layerdiff cannot tell the shape of input '{spec.name}'",
                     hint=f"give it: --input-shape {spec.name}:D0,D1,...")


def _dynamic(spec: InputSpec, dims: tuple | None, rank: int) -> tuple[int, ...]:
    """Axes other sizes vary: the ONNX file's symbolic ones past the batch, or, before
    an export, an image's height and width and a sequence's length."""
    if dims is not None:
        return tuple(a for a, d in enumerate(dims) if a > 0 and not (isinstance(d, int) and d > 0))
    if spec.kind in (InputKind.IMAGE, InputKind.MASK) and rank == 4 and spec.shape[2:] != (1, 1):
        return (2, 3)
    if spec.kind in (InputKind.TOKENS, InputKind.ATTENTION_MASK) and rank == 2:
        return (1,)
    return ()
