"""Export every tests/zoo.py model with both exporters and measure the result.

    python benchmarks/zoo_exports.py [NAME ...] [--out DIR] [--json FILE]

For each model and exporter (dynamo / legacy): works or the error (one line), seconds, file
size, the ONNX inputs and outputs as written (name, dtype, shape), max |torch - onnxruntime|
on the example input and on inputs of another size, and a one-node fault
(samples/faults.py scale_weight) with the node it changed, the module that node belongs to
and the output error it causes.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ort.set_default_logger_severity(4)
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "samples"))

import faults  # noqa: E402
import zoo  # noqa: E402

warnings.filterwarnings("ignore")

# Output names we pass, per model (forward's structure, flattened).
OUTPUT_NAMES = {
    "bert": ["last_hidden_state", "pooler_output"],
    "bert_wrapped": ["last_hidden_state", "pooler_output"],
    "dict_output": ["features", "logits"],
}
# Dynamic axes per input name (None: static). gfpgan is fixed at 512 (a Linear on 4x4).
IMAGE_AXES = {0: "batch", 2: "height", 3: "width"}
DYNAMIC = {
    "lama": {"img": {2: "height", 3: "width"}, "mask": {2: "height", 3: "width"}},
    "gfpgan": None,
    "resnet": {"x": IMAGE_AXES},
    "convnext": {"x": IMAGE_AXES},
    "vit": {"x": IMAGE_AXES},
    "bert": {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}},
    "bert_wrapped": {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}},
    "keyword_optional": {"x": IMAGE_AXES, "gain": {0: "batch"}},
    "dict_output": {"x": IMAGE_AXES},
    "keyword": {"x": IMAGE_AXES, "gain": {0: "batch"}},
}
OUTPUT_AXES = {
    "lama": {"output": {2: "height", 3: "width"}},
    "resnet": {"output": {0: "batch"}},
    "convnext": {"output": {0: "batch"}},
    "vit": {"output": {0: "batch"}},
    "bert": {"last_hidden_state": {1: "sequence"}},
    "bert_wrapped": {"last_hidden_state": {1: "sequence"}},
    "keyword_optional": {"output": IMAGE_AXES},
    "dict_output": {"features": {0: "batch", 2: "feat_height", 3: "feat_width"}, "logits": {0: "batch"}},
    "keyword": {"output": IMAGE_AXES},
}
# The fault: (op_type, index, factor, channel) for samples/faults.scale_weight; index counts
# only the nodes of that type whose weight (input 1) is a constant.
FAULT = {
    "lama": ("Conv", 9, 1.5, None),      # the conv between rfftn and irfftn (FourierUnit)
    "gfpgan": ("Conv", 39, 1.5, None),
    "resnet": ("Conv", 5, 1.5, 0),
    "convnext": ("Conv", 6, 1.5, None),
    "vit": ("MatMul", 2, 1.5, None),
    "bert": ("MatMul", 10, 3.0, None),   # query/key faults barely show: attention is ~uniform
    "bert_wrapped": ("MatMul", 10, 3.0, None),
    "dict_output": ("Conv", 1, 1.5, 0),
    "keyword": ("Conv", 0, 1.5, 0),
    "keyword_optional": ("Conv", 0, 1.5, 0),
}


def split(name: str, inputs: dict) -> tuple[tuple, dict]:
    kw = zoo.KEYWORD_ONLY.get(name, ())
    return tuple(v for k, v in inputs.items() if k not in kw), {k: inputs[k] for k in kw}


def flatten(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().numpy()]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in flatten(o)]


def export(name: str, model, inputs: dict, path: Path, how: str) -> None:
    args, kwargs = split(name, inputs)
    out_names = OUTPUT_NAMES.get(name, ["output"])
    dyn = DYNAMIC[name]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if how == "dynamo":
            torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True,
                              input_names=list(inputs), output_names=out_names,
                              dynamic_shapes=dyn, optimize=True)
        else:
            dyn_axes = None if dyn is None else {**dyn, **OUTPUT_AXES.get(name, {})}
            torch.onnx.export(model, args, str(path), kwargs=kwargs or None, dynamo=False,
                              opset_version=17, input_names=list(inputs),
                              output_names=out_names, dynamic_axes=dyn_axes)


def describe(values) -> list[str]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append(f"{v.name}:{onnx.TensorProto.DataType.Name(t.elem_type).lower()}{dims}")
    return out


ORT_NOTES: set[str] = set()


def run_ort(path: Path, inputs: dict) -> list[np.ndarray]:
    """Run on onnxruntime CPU with default options; on failure, retry at ORT_ENABLE_BASIC."""
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
        return sess.run(None, feed)
    except Exception as e:  # noqa: BLE001
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
        out = sess.run(None, feed)
        ORT_NOTES.add("default ORT options failed (" + str(e).strip().splitlines()[0][-160:]
                      + "); ran with ORT_ENABLE_BASIC")
        return out


def err(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """max |ref - got| over all outputs, and the same relative to max |ref|."""
    a = max(float(np.abs(r - g).max()) for r, g in zip(ref, got))
    scale = max(float(np.abs(r).max()) for r in ref)
    return a, a / max(scale, 1e-12)


def node_module(node: onnx.NodeProto) -> str:
    meta = {p.key: p.value for p in node.metadata_props}
    for key in ("pkg.torch.onnx.name_scopes", "namespace"):
        if key in meta:
            return f"{key}={meta[key]}"
    return "(from name)"


def measure(name: str, how: str, tmp: Path) -> dict:
    model = zoo.BUILDERS[name]()
    inputs, other = zoo.EXAMPLES[name](), zoo.OTHER[name]()
    args, kwargs = split(name, inputs)
    with torch.no_grad():
        ref = flatten(model(*args, **kwargs))
        a2, k2 = split(name, other)
        ref2 = flatten(model(*a2, **k2))
    path = tmp / f"{name}_{how}.onnx"
    row = {"model": name, "exporter": how}
    ORT_NOTES.clear()
    t = time.perf_counter()
    try:
        export(name, model, inputs, path, how)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        row["seconds"] = round(time.perf_counter() - t, 2)
        return row
    row["seconds"] = round(time.perf_counter() - t, 2)
    row["bytes"] = path.stat().st_size
    data = path.with_name(path.name + ".data")  # the dynamo exporter's external weights
    if data.exists():
        row["data_bytes"] = data.stat().st_size
    m = onnx.load(str(path))
    row["opset"] = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    row["inputs"] = describe(m.graph.input)
    row["outputs"] = describe(m.graph.output)
    row["nodes"] = len(m.graph.node)
    try:
        row["err_example"] = err(ref, run_ort(path, inputs))
    except Exception as e:  # noqa: BLE001
        row["err_example"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    try:
        row["err_other"] = err(ref2, run_ort(path, other))
    except Exception as e:  # noqa: BLE001
        row["err_other"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    if ORT_NOTES:
        row["ort_note"] = "; ".join(sorted(ORT_NOTES))
        ORT_NOTES.clear()
    op, index, factor, channel = FAULT[name]
    try:
        consts = {i.name for i in m.graph.initializer} | {
            n.output[0] for n in m.graph.node if n.op_type == "Constant"}
        of_type = [n for n in m.graph.node if n.op_type == op]
        with_weight = [i for i, n in enumerate(of_type) if len(n.input) > 1 and n.input[1] in consts]
        bad, node_name = faults.scale_weight(m, op, with_weight[index], factor, channel)
        node = next(n for n in m.graph.node if n.name == node_name)
        fpath = tmp / f"{name}_{how}_fault.onnx"
        onnx.save(bad, str(fpath))
        row["fault"] = f"scale_weight({op!r}, {with_weight[index]}, {factor}, channel={channel})"
        row["fault_node"] = node_name
        row["fault_module"] = node_module(node)
        row["err_fault"] = err(ref, run_ort(fpath, inputs))
        if ORT_NOTES:
            row["ort_note"] = "; ".join(sorted(ORT_NOTES))
    except Exception as e:  # noqa: BLE001
        row["fault_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="*", default=list(zoo.BUILDERS))
    parser.add_argument("--exporters", default="dynamo,legacy")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = a.out or Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        for name in a.names:
            for how in a.exporters.split(","):
                try:
                    row = measure(name, how, tmp)
                except Exception:  # noqa: BLE001
                    row = {"model": name, "exporter": how, "error": traceback.format_exc(limit=2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
