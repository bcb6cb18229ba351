"""Peak memory of `layerdiff report --max-memory SIZE` at large inputs: is the budget held?

Reproduce (CPU; about 9 minutes on 2 cores, most of it Compact at 2048 and ESRGAN at 1024):

    python benchmarks/memory.py
    python benchmarks/memory.py --models compact --sizes 1024 --budgets 3G   # one run

Models, random weights (``torch.manual_seed(0)``), spandrel architectures:
- compact: ``Compact(num_in_ch=3, num_out_ch=3, num_feat=32, num_conv=8, upscale=4)``,
  Real-ESRGAN Compact x4 as in samples/make_samples.py;
- esrgan: ``ESRGAN(in_nc=3, out_nc=3, num_filters=32, num_blocks=1, scale=2)``, RRDBNet
  reduced from the standard 64 filters, 23 blocks, x4, so that a run at 1024 px takes
  minutes on 2 cores (the standard one needs over 13 GB for its forward at 1024 px).

Each model is saved as a .pth and exported once, with the legacy exporter and dynamic
height and width, at 64x64 (exporting at 4096 px would itself take minutes and GBs); both
go into a temporary folder. Each run is the real command line in its own process:
``python -m layerdiff.cli report MODEL.pth --onnx MODEL.onnx --input-shape 1,3,S,S
--max-memory BUDGET --json OUT.json -q`` with the CLI's other defaults (so also the extra
odd size, 0.75 x 1.25 of the main one). Its peak resident memory comes from the kernel's
accounting of that child (``os.wait4``: ru_maxrss, started by a bare launcher so that it
does not inherit this script's high-water mark: peak.py), its wall time from the clock. Outcome:
pass / diverged (exit 0 / 1, with the JSON's segments and what went to disk), refused
(exit 2: the message), or the error. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

from peak import run_measured  # benchmarks/peak.py, next to this script

DEFAULT_SIZES = (1024, 2048, 4096)
# Per size: a budget the machine can give (24 GB, shared) that grows with the input.
DEFAULT_BUDGETS = {1024: "3G", 2048: "6G", 4096: "8G"}


def build(name: str):
    import torch

    torch.manual_seed(0)
    if name == "compact":
        from spandrel.architectures.Compact import Compact

        return Compact(num_in_ch=3, num_out_ch=3, num_feat=32, num_conv=8, upscale=4).eval()
    if name == "esrgan":
        from spandrel.architectures.ESRGAN import ESRGAN

        return ESRGAN(in_nc=3, out_nc=3, num_filters=32, num_blocks=1, scale=2).eval()
    raise SystemExit(f"unknown model {name}")


def prepare(name: str, folder: Path) -> tuple[Path, Path]:
    """The model's .pth and its ONNX export with dynamic height and width."""
    import torch

    model = build(name)
    pth, onnx_path = folder / f"{name}.pth", folder / f"{name}.onnx"
    torch.save(model.state_dict(), pth)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (torch.rand(1, 3, 64, 64),), str(onnx_path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                        "output": {0: "batch", 2: "height", 3: "width"}})
    return pth, onnx_path


def run(pth: Path, onnx_path: Path, size: int, budget: str, folder: Path, timeout: int) -> dict:
    """One `layerdiff report` in a child process: exit code, peak RSS, seconds, outcome."""
    report = folder / f"{pth.stem}-{size}.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "layerdiff.cli", "report", str(pth), "--onnx", str(onnx_path),
           "--input-shape", f"1,3,{size},{size}", "--max-memory", budget,
           "-o", str(folder / f"{pth.stem}-{size}.html"), "--json", str(report), "-q"]
    with tempfile.TemporaryFile("w+") as err:
        code, peak, seconds, timed_out = run_measured(cmd, err, timeout)
        err.seek(0)
        stderr = err.read()
    if code in (0, 1) and report.is_file():
        facts = json.loads(report.read_text())["facts"]
        outcome = (f"{'pass' if code == 0 else 'diverged'}: {facts['segments']} segments, "
                   f"{facts['spilled_bytes'] / 2**30:.1f} GiB to disk")
        if facts.get("skipped_for_memory"):
            outcome += "; skipped " + ", ".join(facts["skipped_for_memory"])
    elif code == 2:
        lines = [line for line in stderr.splitlines() if line.startswith(("error:", "hint:"))]
        outcome = "refused: " + " ".join(lines)
    elif timed_out:
        outcome = f"stopped after {timeout} s"
    else:
        outcome = f"exit {code}: " + ((stderr.strip().splitlines() or ["?"])[-1])[:160]
    return {"peak": peak, "seconds": seconds, "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("compact", "esrgan"),
                        default=["compact", "esrgan"])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--budgets", nargs="+", metavar="SIZE",
                        help="one --max-memory per size (default: 3G, 6G, 8G for 1024, "
                             "2048, 4096)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    args = parser.parse_args()
    budgets = args.budgets or [DEFAULT_BUDGETS.get(s, "4G") for s in args.sizes]
    if len(budgets) != len(args.sizes):
        raise SystemExit("give one budget per size")

    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from layerdiff.store import parse_size

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models:
            pth, onnx_path = prepare(name, folder)
            for size, budget in zip(args.sizes, budgets):
                result = run(pth, onnx_path, size, budget, folder, args.timeout)
                ratio = result["peak"] / parse_size(budget)
                rows.append((name, size, budget, result, ratio))
                print(name, size, budget, result, file=sys.stderr, flush=True)

    print("\n| model | input | --max-memory | peak RSS | peak / budget | wall s | outcome |")
    print("|---|---|---|---|---|---|---|")
    for name, size, budget, r, ratio in rows:
        print(f"| {name} | {size}x{size} | {budget} | {r['peak'] / 2**30:.2f} GiB | {ratio:.2f} "
              f"| {r['seconds']:.1f} | {r['outcome']} |")


if __name__ == "__main__":
    main()
