"""Wall time and peak memory of layerdiff against the floor and the alternatives.

Reproduce (CPU; sizes default to 128 256 for esrgan, 64 128 for swinir and compact):

    python benchmarks/bench.py --suite   # issue 13's cases (SUITE), one table

    python benchmarks/bench.py --arch esrgan
    python benchmarks/bench.py --arch swinir
    python benchmarks/bench.py --arch esrgan --blocks 1 --sizes 32 --verify-timeout 60  # smoke test

Models, random weights (``torch.manual_seed(0)``):
- esrgan: spandrel ``ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)``,
  the standard size (``--blocks`` for a smaller one);
- swinir: spandrel SwinIR, lightweight x2 configuration (SwinIR-light).

Before any timing, the model's state dict is saved once with ``torch.save`` as a .pth, and
the model is exported to ONNX once per size (dynamo exporter, legacy if it fails), both into
a temporary folder. Neither is part of any method's time.

Methods, each run in its own process so that its peak memory (VmHWM) is its own:
- floor: one PyTorch forward plus one onnxruntime forward (session creation included) of
  the same model and input;
- layerdiff: the real command line, in-process: ``layerdiff.cli.main(["report", MODEL.pth,
  "--onnx", ONNX, "--input-shape", "1,3,S,S", "-o", "report-S.html", "--json",
  "report-S.json", "-q", *LAYERDIFF_ARGS])``, with the CLI's defaults unless
  ``--layerdiff-args "..."`` says otherwise; it loads the .pth itself (spandrel). Exit code
  0 (pass) or 1 (diverged) is a result, 2 an error. Notes: exit code, and the verdict and
  number of layers from the JSON;
- mark-all: every ONNX node output marked as a graph output, one onnxruntime run (what
  Polygraphy's mark-all does), plus the PyTorch forward with hooks it would compare to;
  not run (and the table says why) when the node outputs alone, from shape inference, are
  over 85% of the memory available: it would only end in the OOM killer;
- polygraphy: real Polygraphy (``pip install polygraphy``, for this benchmark only), in
  process: ``ModifyOutputs(..., outputs=MARK_ALL)`` and one ``OnnxrtRunner`` inference, what
  ``polygraphy run --onnxrt --onnx-outputs mark all`` does, plus the same PyTorch forward
  with hooks;
- verify: ``torch.onnx.verification.verify_onnx_program(..., compare_intermediates=True)``,
  export included; stopped after ``--verify-timeout`` seconds.

Each child imports torch and onnxruntime and builds the model (all but layerdiff,
which loads the .pth) before its clock starts; its peak memory includes them. With
``--repeat N`` each method runs N times (N processes): best wall time, highest peak.
Prints the machine's facts and a Markdown table; ``x floor`` is the wall time over floor's
at the same size. ``--suite`` also times each whole process, from its start to its exit
(``process s``: Python's start-up and every import and model load included, on both
sides), over the floor's whole process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("floor", "layerdiff", "mark-all", "polygraphy", "verify")
DEFAULT_SIZES = {"esrgan": [128, 256], "swinir": [64, 128], "compact": [64, 128]}
ARCHS = tuple(DEFAULT_SIZES)

# The runs issue 13 sets targets for (--suite): (title, arch, size, fault, dynamic, methods,
# extra layerdiff arguments). "fault": one convolution in the middle of the ONNX file has
# its weights scaled by 1.05. "dynamic": the file's height and width are free, so layerdiff
# also runs its default other size; the same file with --check-sizes none shows its cost.
# --no-photo and --reference none show what the bundled photo and the float64 referee cost.
SUITE = (
    ("clean", "esrgan", 256, False, False, ("floor", "layerdiff"), ""),
    ("clean", "esrgan", 256, False, False, ("layerdiff",), "--no-photo"),
    ("clean", "swinir", 128, False, False, ("floor", "layerdiff"), ""),
    ("diverging", "esrgan", 128, True, False, ("floor", "layerdiff"), ""),
    ("diverging", "esrgan", 128, True, False, ("layerdiff",), "--no-photo"),
    ("diverging", "esrgan", 128, True, False, ("layerdiff",), "--no-photo --reference none"),
    ("diverging", "esrgan", 256, True, False, ("floor", "layerdiff"), ""),
    ("small", "swinir", 64, False, False, ("floor", "layerdiff"), ""),
    ("small", "compact", 64, False, False, ("floor", "layerdiff", "mark-all", "polygraphy",
                                            "verify"), ""),
    ("extra size", "esrgan", 128, False, True, ("floor", "layerdiff"), ""),
    ("extra size", "esrgan", 128, False, True, ("layerdiff",), "--check-sizes none"),
)


def build(arch: str, blocks: int):
    import torch

    torch.manual_seed(0)
    if arch == "esrgan":
        from spandrel.architectures.ESRGAN import ESRGAN

        return ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=blocks, scale=4).eval()
    if arch == "compact":
        from spandrel.architectures.Compact import Compact

        # realesr-general-x4v3's configuration.
        return Compact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=32, upscale=4).eval()
    if arch == "swinir":
        from spandrel.architectures.SwinIR import SwinIR

        # SwinIR's "lightweight" configuration (SwinIR-light, x2).
        return SwinIR(img_size=64, in_chans=3, embed_dim=60, depths=[6, 6, 6, 6],
                      num_heads=[6, 6, 6, 6], window_size=8, mlp_ratio=2, upscale=2,
                      upsampler="pixelshuffledirect").eval()
    raise SystemExit(f"unknown arch {arch}")


def run_method(job: dict) -> dict:
    """Runs inside the child process: one method, timed; returns seconds, peak and notes."""
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import onnxruntime as ort
    import torch

    method, size, onnx_path = job["method"], job["size"], job["onnx"]
    if method != "layerdiff":
        model = build(job["arch"], job["blocks"])
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    notes = ""
    start = time.perf_counter()
    if method == "floor":
        with torch.no_grad():
            model(x)
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: x.numpy()})
    elif method == "layerdiff":
        from layerdiff import cli

        folder = Path(onnx_path).parent
        report_json = folder / f"report-{size}.json"
        report_json.unlink(missing_ok=True)  # never read a previous run's verdict
        argv = ["report", job["pth"], "--onnx", onnx_path, "--input-shape", f"1,3,{size},{size}",
                "-o", str(folder / f"report-{size}.html"), "--json", str(report_json), "-q",
                *job["layerdiff_args"]]
        stderr = io.StringIO()
        # stdout carries only this child's result line; the CLI's own lines go to stderr.
        with contextlib.redirect_stdout(sys.stderr), contextlib.redirect_stderr(stderr):
            try:
                code = cli.main(argv)
            except SystemExit as exc:
                code = exc.code
        if code not in (0, 1):
            lines = stderr.getvalue().strip().splitlines() or ["no message"]
            message = next((line for line in lines if line.startswith("error:")), lines[-1])
            return {"error": f"exit {code}: {message[:120]}"}
        report = json.loads(report_json.read_text())
        notes = f"exit {code}, {report['verdict']}, {len(report['layers'])} layers"
    elif method == "mark-all":
        import onnx

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
        nbytes = sum(np.asarray(v).nbytes for v in values)
        notes = f"{len(values)} tensors, {nbytes / 2**20:.0f} MiB"
    elif method == "polygraphy":
        from polygraphy import constants
        from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        from layerdiff import capture_torch

        capture_torch.capture(model, x)  # the PyTorch side it would be compared with
        marked = BytesFromOnnx(ModifyOutputs(OnnxFromPath(onnx_path), outputs=constants.MARK_ALL))
        with OnnxrtRunner(SessionFromOnnx(marked, providers=["cpu"])) as runner:
            name = runner.get_input_metadata().keys()
            values = runner.infer({next(iter(name)): x.numpy()})
        nbytes = sum(np.asarray(v).nbytes for v in values.values())
        notes = f"{len(values)} tensors, {nbytes / 2**20:.0f} MiB"
    elif method == "verify":
        from torch.onnx.verification import verify_onnx_program

        program = torch.onnx.export(model, (x,), dynamo=True)
        results = verify_onnx_program(program, compare_intermediates=True)
        notes = f"{len(results)} values compared"
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": own_peak(), "notes": notes}


def own_peak() -> int:
    """This process's peak resident memory: VmHWM, which belongs to its own address space
    (ru_maxrss would carry over the benchmark parent's, see peak.py)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def export_once(model, arch: str, size: int, folder: Path, *, fault: bool = False,
                dynamic: bool = False) -> str:
    """The model exported at ``size`` (dynamo, legacy if it fails); height and width free
    with ``dynamic``; with ``fault``, one convolution in the middle scaled by 1.05."""
    import onnx
    import torch

    x = torch.rand(1, 3, size, size)
    path = folder / f"{arch}-{size}{'-dynamic' if dynamic else ''}{'-fault' if fault else ''}.onnx"
    free = {"x": {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}} if dynamic else None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=free)
        except Exception:
            axes = {"input": {2: "height", 3: "width"}} if dynamic else None
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], dynamic_axes=axes)
    if fault:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples"))
        import faults

        proto = onnx.load(str(path))
        convs = sum(1 for n in proto.graph.node if n.op_type == "Conv")
        broken, _ = faults.scale_weight(proto, "Conv", convs // 2, 1.05, channel=None)
        onnx.save(broken, str(path))
    return str(path)


def mark_all_too_big(onnx_path: str) -> dict | None:
    """mark-all holds every node output at once, plus the PyTorch activations it compares
    with: when that alone is over 85% of the memory available, running it would only
    push the machine into the OOM killer. Returns the reason, or None to run it."""
    import numpy as np
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(onnx_path))
    sizes = {}
    for info in list(model.graph.value_info) + list(model.graph.output):
        dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
        if dims and all(dims):
            item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type))
            sizes[info.name] = int(np.prod(dims)) * item.itemsize
    needed = sum(sizes.values())
    available = available_memory()
    if needed > 0.85 * available:
        return {"error": f"not run: its {len(sizes)} outputs alone are {needed / 2**30:.1f} GiB "
                         f"(with the PyTorch side, more) of {available / 2**30:.1f} GiB available"}
    return None


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def run_child(job: dict, timeout: int) -> dict:
    """One method in a fresh process: its result, {"error": ...} or {"stopped": timeout}."""
    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"stopped": timeout}
    process = time.perf_counter() - start  # the whole process: start-up and imports too
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_seconds": process}


def measure(job: dict, timeout: int, repeat: int) -> dict:
    """Best wall time and highest peak over `repeat` runs; the first failure ends it."""
    runs = []
    for _ in range(repeat):
        result = run_child(job, timeout)
        if "seconds" not in result:
            return result
        runs.append(result)
    return {"seconds": min(r["seconds"] for r in runs),
            "process_seconds": min(r["process_seconds"] for r in runs),
            "peak_bytes": max(r["peak_bytes"] for r in runs), "notes": runs[0]["notes"]}


def machine_facts() -> list[str]:
    import onnxruntime
    import torch

    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return [f"- CPU: {os.cpu_count()} x {cpu}",
            f"- RAM: {ram / 2**30:.1f} GiB",
            f"- Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}"]


def table(rows: list[tuple[int, str, dict]]) -> list[str]:
    floors = {size: r["seconds"] for size, method, r in rows if method == "floor" and "seconds" in r}
    lines = ["| input | method | wall s | x floor | peak memory | notes |",
             "|---|---|---|---|---|---|"]
    for size, method, r in rows:
        if "stopped" in r:
            cells = [f"> {r['stopped']} s (stopped)", "-", "-", ""]
        elif "error" in r:
            cells = ["-", "-", "-", r["error"] if r["error"].startswith("not run") else f"failed: {r['error']}"]
        else:
            ratio = f"{r['seconds'] / floors[size]:.1f}" if size in floors else "-"
            cells = [f"{r['seconds']:.2f}", ratio, f"{r['peak_bytes'] / 2**30:.2f} GiB", r["notes"]]
        lines.append(f"| {size}x{size} | {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default="esrgan")
    parser.add_argument("--suite", action="store_true",
                        help="run issue 13's cases (SUITE): clean, diverging, small models and "
                             "the extra size check, each against its floor, in one run")
    parser.add_argument("--blocks", type=int, default=23, help="ESRGAN blocks (standard: 23)")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="input sizes (default: esrgan 128 256, swinir 64 128)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each method N times; best wall time, highest peak")
    parser.add_argument("--layerdiff-args", default="", metavar="ARGS",
                        help='extra arguments for "layerdiff report", one string split like a '
                             'shell, e.g. --layerdiff-args="--reference none"')
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per method run")
    parser.add_argument("--verify-timeout", type=int, default=600, help="seconds per verify run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_method(json.loads(args.child))))
        return

    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if args.suite:
        suite(args)
        return
    sizes = args.sizes or DEFAULT_SIZES[args.arch]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model = build(args.arch, args.blocks)
        pth = Path(folder) / f"{args.arch}.pth"
        torch.save(model.state_dict(), pth)
        for size in sizes:
            job = {"arch": args.arch, "blocks": args.blocks, "size": size, "pth": str(pth),
                   "onnx": export_once(model, args.arch, size, Path(folder)),
                   "layerdiff_args": shlex.split(args.layerdiff_args)}
            for method in args.methods:
                timeout = args.verify_timeout if method == "verify" else args.timeout
                too_big = mark_all_too_big(job["onnx"]) if method == "mark-all" else None
                result = too_big or measure({**job, "method": method}, timeout, args.repeat)
                rows.append((size, method, result))
                print(size, method, result, file=sys.stderr, flush=True)

    title = {"esrgan": f"esrgan ({args.blocks} blocks)", "swinir": "swinir (SwinIR-light x2)",
             "compact": "compact (realesr-general-x4v3's configuration)"}[args.arch]
    if args.repeat > 1:
        title += f", best of {args.repeat} runs"
    if args.layerdiff_args:
        title += f", layerdiff {args.layerdiff_args}"
    print("\n" + "\n".join([*machine_facts(), "", title, "", *table(rows)]))


def suite(args: argparse.Namespace) -> None:
    """SUITE in one run: per case the floor, layerdiff, the ratio and peak memory."""
    import torch

    lines = ["| case | model | input | method | wall s | x floor | process s | x floor | "
             "peak memory | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    floors: dict[tuple, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        built: dict[str, str] = {}
        for title, arch, size, fault, dynamic, methods, extra in SUITE:
            model = build(arch, args.blocks)
            if arch not in built:
                built[arch] = str(Path(folder) / f"{arch}.pth")
                torch.save(model.state_dict(), built[arch])
            onnx_path = export_once(model, arch, size, Path(folder), fault=fault, dynamic=dynamic)
            job = {"arch": arch, "blocks": args.blocks, "size": size, "pth": built[arch],
                   "onnx": onnx_path, "layerdiff_args": shlex.split(extra)}
            for method in methods:
                timeout = args.verify_timeout if method == "verify" else args.timeout
                too_big = mark_all_too_big(onnx_path) if method in ("mark-all", "polygraphy") else None
                r = too_big or measure({**job, "method": method}, timeout, args.repeat)
                print(title, arch, size, method, extra, r, file=sys.stderr, flush=True)
                key = (arch, size, fault, dynamic)
                if method == "floor" and "seconds" in r:
                    floors[key] = (r["seconds"], r["process_seconds"])
                if "seconds" in r:
                    timed, whole = floors.get(key, (None, None))
                    cells = [f"{r['seconds']:.1f}",
                             f"{r['seconds'] / timed:.1f}" if timed else "-",
                             f"{r['process_seconds']:.1f}",
                             f"{r['process_seconds'] / whole:.1f}" if whole else "-",
                             f"{r['peak_bytes'] / 2**30:.2f} GiB", r["notes"]]
                elif "stopped" in r:
                    cells = [f"> {r['stopped']} (stopped)", "-", "-", "-", "-", ""]
                else:
                    cells = ["-", "-", "-", "-", "-", r["error"]]
                name = f"{arch} ({args.blocks} blocks)" if arch == "esrgan" else arch
                how = " (dynamic H,W)" if dynamic else ""
                label = method + (f" `{extra}`" if extra else "")
                lines.append(f"| {title} | {name}{how} | {size}x{size} | {label} | "
                             + " | ".join(cells) + " |")
    print("\n" + "\n".join([*machine_facts(), "", *lines]))


if __name__ == "__main__":
    main()
