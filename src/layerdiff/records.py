"""Plain, frozen records passed between the pipeline's stages.

load -> export -> capture torch -> capture onnx -> align -> compare -> diagnose -> render.
Every stage takes and returns these; none reaches back into an earlier stage.

A field that takes one of a closed set of values (a status, a kind, a verdict) holds a
``str`` Enum member with no default: it reads, prints and serialises as its plain value
("fail"), and a record built with a value outside the set is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "layerdiff/2"


def _members(record: Any, **closed: type[Enum]) -> None:
    """Hold each named field of a frozen ``record`` as a member of its Enum: a plain
    string with a member's value (from a caller not yet converted, or JSON) becomes that
    member, and a value outside the set is refused here, not passed on silently."""
    for name, enum in closed.items():
        value = getattr(record, name)
        if not isinstance(value, enum):
            object.__setattr__(record, name, enum(value))


# --------------------------------------------------------------------------- load / export


class InputKind(str, Enum):
    """What an input holds, which decides how layerdiff fills it (inputs.py)."""

    IMAGE = "image"  # float N,C,H,W in [0, 1)
    MASK = "mask"  # an inpainting mask, N,1,H,W: 1 inside a few rectangles, 0 elsewhere
    TOKENS = "tokens"  # integer ids in [low, high): a vocabulary
    ATTENTION_MASK = "attention_mask"  # ones: every position attended
    VALUE = "value"  # anything else: uniform in [low, high), [0, 1) for floats

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class InputSpec:
    """One input of the model: how forward takes it, which ONNX input it feeds, and what
    values it is filled with. A loader may give partial specs (``shape`` with -1 where any
    size goes); inputs.resolve() completes them from the ONNX graph, forward's signature and
    the user's --input-shape / --input-range."""

    name: str  # forward()'s parameter name ("x", "input_ids"); the ONNX name for a bare graph
    dtype: str = "float32"  # numpy dtype name: float32, float16, int64, int32, bool
    shape: tuple[int, ...] = ()
    kind: InputKind = InputKind.IMAGE
    low: float | None = None  # values drawn from [low, high); None: the kind's default
    high: float | None = None
    fill: float | None = None  # a constant instead (forward()'s default for an ONNX input)
    onnx_name: str | None = None  # the ONNX graph input fed with it
    keyword: bool = False  # passed to forward() by keyword, not by position
    # Axes whose size may change (exported dynamic, checked at other sizes): for an image
    # the last two, for tokens the sequence axis.
    dynamic_axes: tuple[int, ...] = ()



class ModelKind(str, Enum):
    """How the model was loaded (models/)."""

    SPANDREL = "spandrel"  # a state dict spandrel recognised
    TORCHSCRIPT = "torchscript"
    PICKLE = "pickle"  # a whole pickled module (--trust-pickle)
    MODULE = "module"  # an nn.Module given to the library
    ENTRY_POINT = "entry_point"  # a Python entry point, file.py:NAME (--weights)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LoadedModel:
    """A PyTorch model ready to run, plus what we learnt while loading it."""

    module: Any  # torch.nn.Module (or a TorchScript module)
    path: Path | None
    kind: ModelKind
    architecture: str  # e.g. "ESRGAN", or the class name
    input_channels: int
    output_channels: int | None = None
    scale: int | None = None
    notes: tuple[str, ...] = ()
    # What the loader knows of the inputs (spandrel's inpainting models take an image and
    # a mask; face restoration models a fixed size): () when only the module can tell.
    inputs: tuple[InputSpec, ...] = ()
    # What output files are named after when not the file's stem (an entry point's NAME).
    stem: str | None = None
    # How many of forward()'s leading outputs the model's users take (spandrel runs the
    # module and keeps the first): an ONNX file with only those is compared on them.
    outputs: int | None = None

    def __post_init__(self) -> None:
        _members(self, kind=ModelKind)


class Exporter(str, Enum):
    """What wrote the ONNX file under diagnosis."""

    DYNAMO = "dynamo"
    LEGACY = "legacy"
    USER = "user"  # given with --onnx

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ExportFallback:
    """The exporter asked for failed and the other one wrote the file."""

    failed: Exporter
    reason: str  # completes "the dynamo exporter ...": "crashed (SIGSEGV)", "failed (...)"
    crashed: bool  # crashed or hung, as opposed to raising an error
    log: str | None = None  # the file holding what the failed exporter printed

    def __post_init__(self) -> None:
        _members(self, failed=Exporter)


@dataclass(frozen=True)
class OnnxSource:
    """The ONNX file under diagnosis and where it came from."""

    path: Path
    exporter: Exporter
    opset: int | None = None
    producer: str = ""
    notes: tuple[str, ...] = ()  # e.g. "dynamo exporter crashed (SIGSEGV); used legacy"
    fallback: ExportFallback | None = None
    asked_opset: int | None = None  # --opset, when layerdiff exported
    # What `layerdiff convert` wrote into the file's metadata_props (keys "layerdiff.*",
    # README "Convert"): how the file was verified when it was written. Empty for others.
    verified_by: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _members(self, exporter=Exporter)


# --------------------------------------------------------------------------- capture


@dataclass(frozen=True)
class TorchCall:
    """One call of one submodule during the reference forward pass.

    ``producers`` names, for each tensor argument, the call that produced it
    (index into the call list), -1 for the model input, None when unknown
    (made by a functional op between modules). ``alias_of`` is set when the module
    returned, unchanged, a tensor another call produced (a Sequential returning its
    last child's output, an Identity): it shares that call's ONNX tensor.
    """

    index: int
    module: str  # module path, e.g. "body.0.conv1"
    call: int  # 0 for the first call of this module, 1 for the second...
    module_type: str  # class name, e.g. "Conv2d"
    shape: tuple[int, ...]
    dtype: str
    producers: tuple[int | None, ...] = ()
    alias_of: int | None = None  # call index, or -1 for the model input
    mutated_later: bool = False  # output changed in place after the hook ran (res += x)
    attrs: dict[str, Any] = field(default_factory=dict)  # simple module attributes
    output: int = 0  # which tensor of a module that returns several
    outputs: int = 1  # how many tensors that call returned

    @property
    def label(self) -> str:
        """Module path, ``#n`` for later calls of a shared module, ``[i]`` for one of several outputs."""
        label = self.module if self.call == 0 else f"{self.module}#{self.call}"
        return label if self.outputs == 1 else f"{label}[{self.output}]"


# --------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class OnnxNodeInfo:
    name: str
    op_type: str
    attrs: dict[str, Any] = field(default_factory=dict)


class PairMethod(str, Enum):
    """How a torch call was paired with an ONNX tensor (align.py)."""

    SCOPE = "scope"  # the node's recorded module path
    WEIGHTS = "weights"  # the node holds the module's weights, equal
    CLOSE_WEIGHTS = "weights~"  # ... close to them, not equal
    STRUCTURE = "structure"  # data flow between paired neighbours
    FUSED = "fused"  # a node the module shares with a neighbour it was fused with

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Pair:
    """A torch call aligned with the ONNX tensor that holds the same value."""

    call: int  # TorchCall.index
    onnx_tensor: str
    onnx_node: str  # node producing the tensor
    op_type: str
    order: int  # position of the producing node in ONNX topological order
    method: PairMethod

    def __post_init__(self) -> None:
        _members(self, method=PairMethod)

    @property
    def confidence(self) -> str:
        """How sure the pairing is: exact evidence (a recorded module path, equal weights)
        is "high"; inference (close weights, data flow, a fused node) is "medium"."""
        return "high" if self.method in (PairMethod.SCOPE, PairMethod.WEIGHTS) else "medium"


@dataclass(frozen=True)
class Unmatched:
    name: str
    reason: str  # why, in words
    # The ONNX node it shares with a neighbour it was fused with (a Conv and the activation
    # after it), when that is why it has no tensor of its own.
    fused_into: str | None = None


@dataclass(frozen=True)
class Alignment:
    pairs: tuple[Pair, ...]
    aliases: tuple[tuple[int, int], ...]  # (call, call it shares a tensor with)
    unmatched_torch: tuple[Unmatched, ...]
    unmatched_onnx: tuple[Unmatched, ...]
    has_scopes: bool  # the ONNX file kept module names
    # Paired calls whose ONNX node holds weights that are not the module's and that no
    # folding explains (another checkpoint, an edited file): TorchCall indices.
    changed_weights: tuple[int, ...] = ()

    def coverage(self) -> dict[str, float | int]:
        """How much of the PyTorch model was compared: shares of module calls that
        produce a tensor of their own (aliases share one and are not counted)."""
        fused = sum(1 for u in self.unmatched_torch if u.fused_into is not None)
        total = len(self.pairs) + len(self.unmatched_torch)
        share = (lambda n: n / total) if total else (lambda n: 0.0)
        return {"modules": total, "compared": share(len(self.pairs)), "fused": share(fused),
                "unmatched": share(len(self.unmatched_torch) - fused),
                "by_method": {m: sum(1 for p in self.pairs if p.method == m)
                              for m in sorted({p.method for p in self.pairs})}}


# --------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Metrics:
    """How far an ONNX tensor is from its torch reference. See compare.py for the rule."""

    shape_torch: tuple[int, ...]
    shape_onnx: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    scale: float  # max |torch value|: what "large" means for this tensor
    outlier_share: float  # share of elements outside atol + rtol * |torch|
    nan_torch: int = 0
    nan_onnx: int = 0
    inf_torch: int = 0
    inf_onnx: int = 0
    nonfinite_differs: bool = False  # NaN / Inf are not in the same places on both sides
    passed: bool = True
    reason: str = ""  # why it failed, in words; "" when it passed
    mse: float | None = None  # mean of (onnx - torch)**2 over finite pairs; None: not measured


class RefereeSide(str, Enum):
    """Which fp32 side a float64 PyTorch run finds off (see Referee)."""

    ONNX = "onnx"
    TORCH = "torch"
    NOISE = "noise"  # both within a few times PyTorch fp32's own rounding error

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Referee:
    """Both fp32 sides measured against a float64 PyTorch run of the same input.

    ``torch_error`` is PyTorch fp32's own rounding error (the layer's noise floor);
    ``onnx_error`` the ONNX model's. ``side`` says which is off: "onnx", "torch", or
    "noise" when both are within a few times that floor.
    """

    torch_error: float
    onnx_error: float
    side: RefereeSide

    def __post_init__(self) -> None:
        _members(self, side=RefereeSide)


class LayerStatus(str, Enum):
    """How a layer did (divergence.py says how each is decided)."""

    PASS = "pass"
    FAIL = "fail"  # its own segment fails: a cause
    PROPAGATED = "propagated"  # only carries error from upstream
    IGNORED = "ignored"  # left out by --ignore-layer
    NOT_RUN = "not_run"  # onnxruntime never produced its tensor

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LayerResult:
    module: str  # TorchCall.label
    module_type: str
    onnx_tensor: str
    onnx_node: str
    op_type: str
    order: int
    method: PairMethod
    metrics: Metrics | None  # None when onnxruntime never produced the tensor
    status: LayerStatus
    ignored: bool = False
    # The layer's own error: its ONNX segment run on the PyTorch values of its inputs.
    local: Metrics | None = None
    referee: Referee | None = None
    case: str = ""  # the input on which this layer was worst (several inputs or sizes)

    def __post_init__(self) -> None:
        _members(self, method=PairMethod, status=LayerStatus)

    @property
    def passed(self) -> bool | None:
        return None if self.metrics is None else self.metrics.passed


@dataclass(frozen=True)
class OutputResult:
    name: str  # the ONNX output's
    metrics: Metrics
    model_output: str = ""  # what forward() returned there: "output", "logits", "0.hidden"
    # An image output as a picture, on the input where its PSNR is lowest; None otherwise.
    image: ImageQuality | None = None

    @property
    def passed(self) -> bool:
        return self.metrics.passed


# --------------------------------------------------------------------------- diagnosis


class Visibility(str, Enum):
    """What a PSNR of ONNX against PyTorch means to someone looking at the picture
    (quality.visibility; README "Pictures" gives the reasoning behind the thresholds)."""

    IDENTICAL = "visually_identical"  # >= 50 dB: under one 8-bit level RMS
    INVISIBLE = "invisible_differences"  # 40 .. 50 dB
    CLOSE_INSPECTION = "visible_on_close_inspection"  # 30 .. 40 dB
    VISIBLE = "visibly_different"  # < 30 dB

    def __str__(self) -> str:
        return self.value

    @property
    def words(self) -> str:
        return self.value.replace("_", " ")


@dataclass(frozen=True)
class ImageQuality:
    """An image output (N,C,H,W, C in 1, 3, 4, of a model whose first input is an image)
    on one input, as pictures: its values clipped to [0, 1], data range 1 (quality.py)."""

    output: str  # the ONNX output's name
    psnr: float  # dB of ONNX against PyTorch; inf when the clipped outputs are identical
    ssim: float | None  # None when the picture is smaller than SSIM's 11 px window
    visibility: Visibility
    max_abs: float  # max |onnx - torch| of this output on this input, unclipped
    value_range: tuple[float, float]  # PyTorch's output, min and max (finite values)
    case: str = ""  # the input's label

    def __post_init__(self) -> None:
        _members(self, visibility=Visibility)

    @property
    def far_outside(self) -> bool:
        """Values far outside [0, 1] (not an overshoot at edges): the pictures, PSNR and
        SSIM see them clipped, which may not be how the model's users read them."""
        low, high = self.value_range
        return low < -0.25 or high > 1.25


@dataclass(frozen=True)
class Picture:
    """What the report shows of an image output on one input, small and bounded
    (pictures.py): uint8 H,W,3 arrays, never serialised."""

    quality: ImageQuality
    input: np.ndarray | None  # the model's image input, reduced to at most SIDE px
    torch: np.ndarray  # PyTorch's output, reduced (area mean) to at most SIDE px
    onnx: np.ndarray
    diff: np.ndarray  # |onnx - torch| per channel x factor, reduced by block max
    factor: float  # the amplification of diff (1, 2, 5 x 10^k)
    reduced: int  # pixels of the output per pixel shown (1: full resolution)
    size: tuple[int, int]  # the output's H, W
    crop: tuple[int, int, int, int]  # top, left, height, width at full resolution
    crop_torch: np.ndarray  # the crop at full resolution, around the largest difference
    crop_onnx: np.ndarray
    crop_diff: np.ndarray  # x factor




class DivergenceKind(str, Enum):
    """What the first divergence is."""

    NUMERIC = "numeric"
    SHAPE_MISMATCH = "shape_mismatch"
    NONFINITE = "nonfinite"  # NaN / Inf in other places
    RUNTIME_ERROR = "runtime_error"  # onnxruntime failed

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class FirstDivergence:
    module: str
    onnx_node: str
    op_type: str
    kind: DivergenceKind
    max_abs: float | None
    message: str
    # Its row in the layer list of the Diagnosis (or input) it belongs to: the failing
    # layer, or for a runtime error the first layer computed from the failing node; None
    # when no aligned layer is.
    layer: int | None
    # ONNX nodes that computed this tensor from passing, aligned inputs: the suspects.
    region: tuple[OnnxNodeInfo, ...] = ()
    module_type: str = ""
    torch_attrs: dict[str, Any] = field(default_factory=dict)
    downstream_of_ignored: tuple[str, ...] = ()
    case: str = ""  # the input it shows on, when several were run

    def __post_init__(self) -> None:
        _members(self, kind=DivergenceKind)


@dataclass(frozen=True)
class Suggestion:
    rule: str
    title: str
    detail: str
    fix: str
    layers: tuple[str, ...] = ()


class CaseKind(str, Enum):
    """Where an input came from (inputs/)."""

    RANDOM = "random"
    FILE = "file"  # an image or .npy for the image input (--input)
    DATA = "data"  # real values for every input (--input-data)
    GIVEN = "given"  # values passed to diagnose(inputs=...)
    SIZE = "size"  # a random input at another size (--check-sizes)
    PHOTO = "photo"  # the bundled photograph, for an image model given no real image

    def __str__(self) -> str:
        return self.value


class CaseVerdict(str, Enum):
    """How the model did on one input."""

    PASS = "pass"
    DIVERGED = "diverged"
    SKIPPED = "skipped"  # could not be run (see the case's note)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CaseResult:
    """One input (a random tensor, a file, another size) and how the model did on it."""

    label: str
    shape: tuple[int, ...]
    verdict: CaseVerdict
    kind: CaseKind
    first_divergence: str = ""  # module or node, with the kind
    max_output_error: float | None = None
    note: str = ""
    layer_by_layer: bool = True  # False: its outputs alone were compared (screened)
    images: tuple[ImageQuality, ...] = ()  # each image output as a picture

    def __post_init__(self) -> None:
        _members(self, verdict=CaseVerdict, kind=CaseKind)


class Side(str, Enum):
    """One of the two models compared."""

    TORCH = "torch"
    ONNX = "onnx"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RandomOp:
    """An op that draws random numbers during the forward pass: the two sides draw
    different numbers, so their values cannot agree downstream of it."""

    side: Side
    where: str  # torch: the module path it ran in (the model's class name at the top); onnx: node name
    op: str  # torch: the aten op ("randn_like"); onnx: the op type ("RandomNormalLike")

    def __post_init__(self) -> None:
        _members(self, side=Side)


@dataclass(frozen=True)
class Facts:
    """Observations the rules read besides the layer table."""

    input_mutated: bool = False
    training_modules: tuple[str, ...] = ()  # modules left in training mode that matter
    random_ops: tuple[RandomOp, ...] = ()  # random numbers drawn in forward, on either side
    onnx_training_nodes: tuple[str, ...] = ()  # BatchNormalization training_mode=1, ...
    mutated_outputs: tuple[str, ...] = ()  # modules whose output changed after the hook
    onnx_input_shape: tuple[int | str | None, ...] = ()  # as declared by the graph
    # Re-run with every onnxruntime graph optimisation off (only when diverged):
    # None = not re-run; True = the divergence vanished; False = it stayed.
    vanishes_without_ort_optimisation: bool | None = None
    ort_optimisation_level: str = "all"
    # The op onnxruntime's optimiser turned the first diverging node into, when the
    # divergence depends on the optimisation level (e.g. "FastGelu").
    ort_rewrite: str = ""
    # Largest change of the final output caused by exposing intermediate tensors
    # (None when not checked): exposing outputs can stop onnxruntime fusing nodes.
    instrumentation_delta: float | None = None
    export_size: tuple[int, int] | None = None  # H, W the file was exported at, when known
    fp16: Any = None  # fp16.Fp16Findings when the ONNX file is float16
    fp16_fix: tuple[str, Verdict] | None = None  # (mixed-precision file written, its verdict)
    # Memory (see store.py): this diagnosis's peak resident memory in bytes (None when
    # the process had already peaked higher before it began), whether that exceeded
    # Settings.max_memory, PyTorch activations written to disk, and the number of ONNX
    # segments the main input ran in.
    peak_memory: int | None = None
    over_memory: bool = False
    spilled_bytes: int = 0
    segments: int = 1
    # The float32 forward's estimated need at the largest input (None when unknown), and
    # the checks skipped because they would not fit Settings.max_memory.
    forward_memory: int | None = None
    skipped_for_memory: tuple[str, ...] = ()
    # The precision a runtime computed the model at when it chose one itself (OpenVINO's
    # inference precision: "bf16", "f16", "f32"); "" when it runs the file's types.
    runtime_precision: str = ""
    runtime_detail: str = ""  # what ran, when not onnxruntime: "OpenVINO 2026.4.1 on CPU, ..."


@dataclass(frozen=True)
class Settings:
    """What a diagnosis ran with, as resolved (the JSON's "settings")."""

    rtol: float
    atol: float
    input_specs: tuple[InputSpec, ...]  # the model's inputs, at the main case's shapes
    seed: int
    ignore: tuple[str, ...]
    provider: str = "CPUExecutionProvider"  # the runtime this diagnosis ran on (runtimes/)
    ort_level: str = "all"
    ort_config: tuple[tuple[str, str], ...] = ()  # onnxruntime session config entries
    reference: str = "float64"  # "float64" referee run, or "none"
    samples: int = 1
    fp16: bool = False
    input_files: tuple[str, ...] = ()  # --input files, then an --input-data archive
    photo: bool = False  # the bundled photo ran as an input (inputs/photo.py)
    check_sizes: tuple[tuple[int, ...], ...] = ()  # other extents of the dynamic axes
    max_memory: int = 0  # bytes the diagnosis may hold (--max-memory)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The first input's shape (the image, for an image model)."""
        return tuple(self.input_specs[0].shape) if self.input_specs else ()


class Verdict(str, Enum):
    """The diagnosis's answer; each has its exit code (Diagnosis.exit_code)."""

    PASS = "pass"
    DIVERGED = "diverged"
    ERROR = "error"  # the diagnosis could not run to the end

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Attempt:
    """One file ``layerdiff convert`` tried: how it was made, which repair made it, what
    failed, and its diagnosis's verdict."""

    exporter: str  # "dynamo" | "legacy"
    dtype: str  # "fp32" | "fp16" | "bf16"
    method: str = ""  # fp16: "convert" | "half" | "keep-fp32" (mixed precision); "bfloat16"
    failed: str = ""  # why no file came out ("" when one did)
    verdict: Verdict | None = None  # None: not diagnosed (no file, or verify=False)
    repair: str = ""  # the remedy that produced this try ("" for the first tries)
    optimizer: str = ""  # --optimize: "onnxslim" | "ort" ran over the file ("" none)

    def as_json(self) -> dict[str, Any]:
        return {"exporter": self.exporter, "dtype": self.dtype, "method": self.method or None,
                "failed": self.failed or None,
                "verdict": None if self.verdict is None else self.verdict.value,
                "repair": self.repair or None, "optimizer": self.optimizer or None}


@dataclass(frozen=True)
class ConversionLog:
    """What ``layerdiff convert`` did around the diagnosis it reports: shown in the
    report's run details and the JSON's "conversion"."""

    verification: str  # converting.Verification's value
    attempts: tuple[Attempt, ...]
    reason: str = ""  # why the file is not verified ("" when it is)


# A preview named HISTOGRAM_PREFIX + title is a histogram of |diff| ([edges, counts + one
# pad], log-spaced edges), not a map; it stands for the maps whose names begin with title.
HISTOGRAM_PREFIX = "histogram:"


@dataclass(frozen=True)
class RuntimeResult:
    """How the model did on one runtime (``--provider``, several given): across_runtimes.py."""

    runtime: str  # "CPUExecutionProvider", "openvino", ...
    verdict: Verdict
    first_divergence: str = ""  # "module (ONNX node)"; "" when none
    onnx_node: str = ""
    max_output_error: float | None = None  # largest |onnx - torch| of any output
    failing_layers: int = 0  # layers whose total error fails (causes and propagated)
    summary: str = ""
    detail: str = ""  # what ran ("OpenVINO 2026.4.1 on CPU, inference precision bf16...")

    def __post_init__(self) -> None:
        _members(self, verdict=Verdict)


@dataclass(frozen=True)
class RuntimeDeparture:
    """The first layer, in execution order, where some runtimes depart from PyTorch (its
    total error fails) while others do not."""

    module: str
    onnx_node: str
    op_type: str
    departs: tuple[str, ...]  # runtimes whose value there fails
    holds: tuple[str, ...]  # runtimes whose value there passes
    errors: tuple[tuple[str, float | None], ...] = ()  # (runtime, max |onnx - torch|) there


@dataclass(frozen=True)
class Diagnosis:
    verdict: Verdict
    summary: str
    model: LoadedModel | None
    onnx: OnnxSource | None
    settings: Settings
    versions: dict[str, str]
    outputs: tuple[OutputResult, ...] = ()
    layers: tuple[LayerResult, ...] = ()
    first_divergence: FirstDivergence | None = None
    masked: bool = False  # a layer failed but the final output passes
    suggestions: tuple[Suggestion, ...] = ()
    alignment: Alignment | None = None
    calls: tuple[TorchCall, ...] = ()
    cases: tuple[CaseResult, ...] = ()
    facts: Facts = Facts()
    notes: tuple[str, ...] = ()
    error: str | None = None
    # Minimal reproducer of the first divergence written next to the report: (.onnx, .npz)
    reproducer: tuple[str, str] | None = None
    # Small arrays the report shows (|diff| of the first divergence, ...), never serialised.
    previews: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    conversion: ConversionLog | None = None  # set only by layerdiff convert
    # The image outputs as pictures on the real images (--input, the bundled photo), or on
    # the main input when none ran; a few hundred KB each, never serialised.
    pictures: tuple[Picture, ...] = field(default=(), repr=False, compare=False)
    # Several runtimes (--provider given more than once, or all): each one's outcome, in
    # the order given, and where they first disagree. The rest of the record is the
    # diagnosis on settings.provider (the first runtime with the worst verdict).
    runtimes: tuple[RuntimeResult, ...] = ()
    runtime_departure: RuntimeDeparture | None = None

    def __post_init__(self) -> None:
        _members(self, verdict=Verdict)

    @property
    def exit_code(self) -> int:
        return {Verdict.PASS: 0, Verdict.DIVERGED: 1}.get(self.verdict, 2)
