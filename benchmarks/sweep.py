"""Time `layerdiff sweep` over spandrel's architectures: 1 and 2 local workers, a local Dask
cluster, the per-entry times and the scheduler's overhead per task.

    python benchmarks/sweep.py [--out DIR] [--max-params N] [--json FILE]

Models: every architecture in spandrel's package that can be built small here, with random
weights. Each is built with smaller widths and depths where its constructor takes them
(`SMALL`), else with its defaults; it is kept when it has at most --max-params parameters,
spandrel detects the saved state dict as the same architecture, and a 1x3x32x32 forward runs.
The list of kept and left-out architectures (with why) is printed and written to the JSON.

Each entry is `layerdiff report MODEL --check-sizes none --reference none` (layerdiff exports
the model itself: the dynamo exporter, falling back to legacy), the same in every run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--check-sizes", "none", "--reference", "none"]
# Smaller widths and depths, tried first (only the keys the constructor takes are used).
SMALL = {"num_feat": 16, "num_filters": 16, "nf": 16, "feature_channels": 16, "dim": 16,
         "embed_dim": 16, "num_block": 1, "num_blocks": 1, "nb": 1, "num_conv": 2,
         "n_resgroups": 1, "n_resblocks": 1, "n_feats": 16, "depths": [2], "num_heads": [2],
         "window_size": 4, "img_size": 32, "upscale": 2, "scale": 2, "num_in_ch": 3,
         "num_out_ch": 3, "in_nc": 3, "out_nc": 3}


def build_models(folder: Path, max_params: int, only: list[str] | None = None
                 ) -> tuple[list[str], dict[str, str]]:
    from spandrel import ModelLoader

    root = Path(importlib.import_module("spandrel.architectures").__file__).parent
    kept, left_out = [], {}
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    for name in [n for n in names if only is None or n in only]:
        try:
            module = _build(name)
            params = sum(p.numel() for p in module.parameters())
            if params > max_params:
                raise ValueError(f"{params:,} parameters even small")
            path = folder / f"{name.lower()}.pth"
            torch.save(module.state_dict(), path)
            loaded = ModelLoader().load_from_file(path)
            with torch.no_grad():
                loaded.model.eval()(torch.rand(1, loaded.input_channels, 32, 32))
            kept.append(name)
        except Exception as error:  # noqa: BLE001 - recorded: why it was left out
            left_out[name] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
            (folder / f"{name.lower()}.pth").unlink(missing_ok=True)
    return kept, left_out


def _build(name: str) -> torch.nn.Module:
    import inspect

    cls = getattr(importlib.import_module(f"spandrel.architectures.{name}"), name)
    accepted = inspect.signature(cls).parameters
    small = {k: v for k, v in SMALL.items() if k in accepted}
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return cls(**small).eval()
        except Exception:  # noqa: BLE001 - the small widths do not fit together: defaults
            return cls().eval()


def run_sweep(models: Path, out: Path, *extra: str) -> tuple[float, dict]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "layerdiff.cli", "sweep", str(models), "-o",
                             str(out), "-q", "--timeout", "600", *extra, *FLAGS],
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    data = json.loads((out / "index.json").read_text())
    if result.returncode not in (0, 1, 2):
        raise RuntimeError(result.stderr)
    return wall, data


def scheduler_overhead(address: str, tasks: int = 40) -> float:
    """Seconds per task of a no-op round trip through the scheduler, with the MEMORY
    resource declared as the sweep's tasks do, one at a time."""
    from distributed import Client

    with Client(address) as client:
        client.submit(int, 0, resources={"MEMORY": 1}, pure=False).result()  # warm
        start = time.perf_counter()
        for i in range(tasks):
            client.submit(int, i, resources={"MEMORY": 1}, pure=False).result()
        return (time.perf_counter() - start) / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="sweep-bench-")))
    parser.add_argument("--max-params", type=int, default=2_000_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="+", metavar="ARCH",
                        help="these architectures only (spandrel's names: Compact ESRGAN ...)")
    args = parser.parse_args()
    models = args.out / "models"
    models.mkdir(parents=True, exist_ok=True)
    kept, left_out = build_models(models, args.max_params, args.only)
    print(f"{len(kept)} architectures: {', '.join(kept)}")
    for name, why in left_out.items():
        print(f"  left out {name}: {why}")

    runs = {}
    for label, extra in (("local, 1 worker", ["--workers", "1"]),
                         ("local, 2 workers", ["--workers", "2"])):
        runs[label] = run_sweep(models, args.out / label.replace(", ", "-").replace(" ", ""),
                                "--max-memory", "4G", *extra)
        print(f"{label}: {runs[label][0]:.1f} s")

    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 3}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         resources={"MEMORY": 4 * 2**30}, dashboard_address=None,
                         silence_logs=True) as cluster:
        label = "Dask LocalCluster, 2 workers"
        runs[label] = run_sweep(models, args.out / "dask", "--cluster", cluster.scheduler_address,
                                "--max-memory", "4G")
        print(f"{label}: {runs[label][0]:.1f} s")
        overhead = scheduler_overhead(cluster.scheduler_address)
    print(f"scheduler round trip per no-op task: {overhead * 1000:.1f} ms")

    per_entry = {row["name"]: row for row in runs["local, 1 worker"][1]["entries"]}
    print("\n| entry | architecture | verdict | seconds (1 worker) | peak memory |")
    print("|---|---|---|---|---|")
    for name, row in per_entry.items():
        peak = f"{row['peak_memory'] / 2**30:.2f} GiB" if row["peak_memory"] else ""
        print(f"| {name} | {row['architecture'] or ''} | {row['verdict']} | "
              f"{row['seconds']:.1f} | {peak} |")
    total = sum(row["seconds"] for row in per_entry.values())
    print(f"\nsum of entry times (1 worker): {total:.1f} s over {len(per_entry)} entries")
    print("\n| run | wall s | entries | pass | diverged | error |")
    print("|---|---|---|---|---|---|")
    for label, (wall, data) in runs.items():
        c = data["counts"]
        print(f"| {label} | {wall:.1f} | {data['total']} | {c['pass']} | {c['diverged']} | "
              f"{c['error']} |")
    if args.json:
        args.json.write_text(json.dumps({
            "kept": kept, "left_out": left_out, "scheduler_overhead_s": overhead,
            "runs": {k: {"wall_s": w, "index": d} for k, (w, d) in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
