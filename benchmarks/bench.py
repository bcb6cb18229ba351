"""Wall time and peak memory of layerdiff against the floor and the alternatives.

    python benchmarks/bench.py --arch esrgan --blocks 23 --sizes 64 128
    python benchmarks/bench.py --arch swinir --sizes 64

Methods, each run in its own process so that its peak memory (max RSS) is its own:
- floor: one PyTorch forward plus one onnxruntime forward of the same model and input;
- layerdiff: ``layerdiff.diagnose(model, onnx)`` with its defaults for the given size
  (float64 referee on, no extra size: ``check_sizes=()``);
- mark-all: every ONNX node output marked as a graph output, one onnxruntime run (what
  Polygraphy's mark-all does), plus the PyTorch forward with hooks it would compare to;
- verify: ``torch.onnx.verification.verify_onnx_program(..., compare_intermediates=True)``.

The ONNX file is exported once (dynamo exporter, legacy if it fails) before timing, and
is not part of any method's time. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("floor", "layerdiff", "mark-all", "verify")


def build(arch: str, blocks: int):
    import torch

    torch.manual_seed(0)
    if arch == "esrgan":
        from spandrel.architectures.ESRGAN import ESRGAN

        return ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=blocks, scale=4).eval()
    if arch == "swinir":
        from spandrel.architectures.SwinIR import SwinIR

        # SwinIR's "lightweight" configuration (SwinIR-light, x2).
        return SwinIR(img_size=64, in_chans=3, embed_dim=60, depths=[6, 6, 6, 6],
                      num_heads=[6, 6, 6, 6], window_size=8, mlp_ratio=2, upscale=2,
                      upsampler="pixelshuffledirect").eval()
    raise SystemExit(f"unknown arch {arch}")


def run_method(method: str, arch: str, blocks: int, size: int, onnx_path: str) -> dict:
    """Runs inside the child process."""
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    model = build(arch, blocks)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if method == "floor":
        with torch.no_grad():
            model(x)
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: x.numpy()})
    elif method == "layerdiff":
        from layerdiff import diagnose

        d = diagnose(model, onnx_path, input_shape=tuple(x.shape), check_sizes=())
        extra = {"verdict": d.verdict, "layers": len(d.layers)}
    elif method == "mark-all":
        from layerdiff import capture_torch

        capture_torch.capture(model, x)
        proto = onnx.load(onnx_path)
        known = {o.name for o in proto.graph.output}
        for node in proto.graph.node:
            for out in node.output:
                if out and out not in known and node.op_type != "Constant":
                    proto.graph.output.append(onnx.ValueInfoProto(name=out))
                    known.add(out)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        values = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        extra = {"tensors": len(values), "bytes": int(sum(np.asarray(v).nbytes for v in values))}
    elif method == "verify":
        from torch.onnx.verification import verify_onnx_program

        program = torch.onnx.export(model, (x,), dynamo=True)
        results = verify_onnx_program(program, compare_intermediates=True)
        extra = {"values": len(results)}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_bytes": peak, **(extra if method != "floor" else {})}


def export_once(arch: str, blocks: int, size: int, folder: Path) -> str:
    import contextlib
    import io
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    model = build(arch, blocks)
    x = torch.rand(1, 3, size, size)
    path = folder / f"{arch}-{size}.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False)
        except Exception:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("esrgan", "swinir"), default="esrgan")
    parser.add_argument("--blocks", type=int, default=23, help="ESRGAN blocks (standard: 23)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per method")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, arch, blocks, size, onnx_path = args.child
        print(json.dumps(run_method(method, arch, int(blocks), int(size), onnx_path)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            onnx_path = export_once(args.arch, args.blocks, size, Path(folder))
            for method in args.methods:
                cmd = [sys.executable, __file__, "--child", method, args.arch, str(args.blocks),
                       str(size), onnx_path]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    result = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                              else {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:80]})
                except subprocess.TimeoutExpired:
                    result = {"error": f"over {args.timeout} s"}
                rows.append((size, method, result))
                print(size, method, result, file=sys.stderr, flush=True)

    print(f"\n{args.arch} ({args.blocks} blocks)" if args.arch == "esrgan" else f"\n{args.arch}")
    print("| input | method | wall s | peak memory | notes |\n|---|---|---|---|---|")
    for size, method, r in rows:
        if "error" in r:
            print(f"| {size}x{size} | {method} | - | - | failed: {r['error']} |")
            continue
        notes = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("seconds", "peak_bytes"))
        print(f"| {size}x{size} | {method} | {r['seconds']:.1f} | {r['peak_bytes'] / 2**30:.2f} GiB | {notes} |")


if __name__ == "__main__":
    main()
