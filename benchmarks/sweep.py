"""Time `layerdiff sweep` over spandrel's architectures: 1 and 2 local workers, a local Dask
cluster, the per-entry times and the scheduler's overhead per task.

    python benchmarks/sweep.py [--out DIR] [--only ARCH ...] [--json FILE]

Models: benchmarks/spandrel_zoo.py, every spandrel architecture it builds small (40 of 42,
random seeded weights; its EXCLUDED says why the others are not), saved as .pth files with a
manifest giving each its input size. The kept and left-out architectures are printed and
written to the JSON.

Each entry is `layerdiff report MODEL --check-sizes none --reference none` (layerdiff exports
the model itself: the dynamo exporter, falling back to legacy), the same in every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # spandrel_zoo
FLAGS = ["--check-sizes", "none", "--reference", "none"]


def build_models(folder: Path, only: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Every architecture of spandrel_zoo (40 of spandrel's 42, small) saved as a .pth in
    ``folder``, and a manifest giving each its input size; the zoo's exclusions with why."""
    import spandrel_zoo as zoo

    kept = [a for a in zoo.ARCHITECTURES if only is None or a in only]
    entries = []
    for arch in kept:
        spec = zoo.ARCHITECTURES[arch]
        torch.save(zoo.make(arch).state_dict(), folder / f"{arch.lower()}.pth")
        entries.append({"model": f"{arch.lower()}.pth",
                        "input_shape": f"1,{spec.in_channels},{spec.size},{spec.size}"})
    (folder / "manifest.json").write_text(json.dumps(entries, indent=1))
    return kept, dict(zoo.EXCLUDED)


def run_sweep(models: Path, out: Path, *extra: str) -> tuple[float, dict]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "layerdiff.cli", "sweep",
                             str(models / "manifest.json"), "-o",
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
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="+", metavar="ARCH",
                        help="these architectures only (spandrel's names: Compact ESRGAN ...)")
    args = parser.parse_args()
    models = args.out / "models"
    models.mkdir(parents=True, exist_ok=True)
    kept, left_out = build_models(models, args.only)
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
