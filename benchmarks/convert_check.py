"""Issue 12's measurement: layerdiff convert against the naive conversion, every spandrel
architecture of benchmarks/spandrel_zoo.py (small, random weights), fp32 and fp16.

    python benchmarks/convert_check.py [ID ...] [--dtype fp32 fp16] [--timeout 300]
                                       [--json benchmarks/convert_check.json]

For each architecture and dtype, in a child process (killed after --timeout seconds, so one
hang or crash does not stop the run), with the model saved as a ``.pth`` state dict and
loaded back through spandrel as a user's downloaded checkpoint would be:

naive: what chaiNNer / neosr / traiNNer-redux do. The module spandrel builds
    (``descriptor.model``) is exported once with the legacy exporter,
    ``torch.onnx.export(model, x, f, opset_version=17, dynamic_axes={input: {0, 2, 3},
    output: {0, 2, 3}})``; fp16 as chaiNNer does it: ``model.half()`` exported the same way
    (float16 inputs and outputs). Its own check is one random input at the smallest valid
    size >= 16 px: ``np.allclose(torch_out, ort_out, rtol=1e-2, atol=1e-3)`` against the
    fp32 PyTorch model (neosr's tolerances). The naive file is then judged by
    ``layerdiff.diagnose(pth, naive_file, input_shape=zoo size)`` with default settings
    (``fp16=True`` for the fp16 file): the random input at the zoo size, the bundled photo,
    another size (the file's axes are free), every output. Per-case verdicts come from
    ``Diagnosis.cases``.
convert: ``layerdiff.convert(pth, out, dtype=dtype, input_shape=zoo size)``: written
    (verified) or not, the attempts and the repairs used, seconds.

The time of the naive export alone (the legacy export, fp32 or half) is the "export alone"
the conversion is measured against. Results go to the JSON file; a markdown table and the
summary counts are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

NAIVE_RTOL, NAIVE_ATOL = 1e-2, 1e-3
NAIVE_AT_LEAST = 16  # chaiNNer checks a 16x16 input, neosr 20x20


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


# --- child: one architecture, one dtype ------------------------------------------------------

def _naive(descriptor, dtype: str, size: int, folder: Path) -> dict:
    import copy

    import numpy as np
    import onnxruntime as ort
    import torch

    out: dict = {"size": size}
    module = descriptor.model
    torch.manual_seed(1)
    x = torch.rand(1, descriptor.input_channels, size, size)
    with torch.no_grad():
        expected = module(x)
    if isinstance(expected, (tuple, list)):
        expected = expected[0]
    expected = expected.float().numpy()
    path = folder / f"naive_{dtype}.onnx"
    export_model, export_x = module, x
    if dtype == "fp16":
        export_model, export_x = copy.deepcopy(module).half(), x.half()
    t = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(export_model, (export_x,), str(path), opset_version=17,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                            "output": {0: "batch", 2: "height", 3: "width"}},
                              dynamo=False)
    except Exception as e:  # noqa: BLE001
        out["export_error"] = _error(e)
        return out
    finally:
        out["export_s"] = round(time.perf_counter() - t, 3)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: export_x.numpy()})[0]
        got = np.asarray(got, dtype=np.float32)
        out["own_max_error"] = float(np.max(np.abs(got - expected))) \
            if got.shape == expected.shape else None
        out["own_check"] = "pass" if got.shape == expected.shape and np.allclose(
            expected, got, rtol=NAIVE_RTOL, atol=NAIVE_ATOL) else "fail"
    except Exception as e:  # noqa: BLE001
        out["own_check"] = "error"
        out["own_error"] = _error(e)
    out["path"] = str(path)
    return out


def _judge(pth: Path, onnx_path: str, dtype: str, shape, folder: Path) -> dict:
    import layerdiff

    try:
        d = layerdiff.diagnose(str(pth), onnx_path, input_shape=shape, fp16=dtype == "fp16",
                               output_dir=str(folder / f"judge_{dtype}"))
    except Exception as e:  # noqa: BLE001
        return {"error": _error(e)}
    return {"verdict": str(d.verdict.value if hasattr(d.verdict, "value") else d.verdict),
            "first_divergence": str(d.first_divergence.module if d.first_divergence
                                    and hasattr(d.first_divergence, "module") else
                                    (d.first_divergence or "")),
            "cases": [{"kind": str(c.kind), "verdict": str(c.verdict), "shape": list(c.shape),
                       "label": c.label, "max_output_error": c.max_output_error}
                      for c in d.cases]}


def _convert(pth: Path, dtype: str, shape, folder: Path) -> dict:
    import layerdiff

    out_path = folder / f"converted_{dtype}.onnx"
    t = time.perf_counter()
    try:
        c = layerdiff.convert(str(pth), out_path, dtype=dtype, input_shape=shape,
                              output_dir=str(folder / f"convert_{dtype}"))
    except Exception as e:  # noqa: BLE001
        return {"error": _error(e), "seconds": round(time.perf_counter() - t, 3)}
    seconds = round(time.perf_counter() - t, 3)
    attempts = [a.as_json() for a in c.attempts]
    written = next((a for a in reversed(attempts) if a["verdict"] == "pass"), None)
    return {"verified": c.path is not None, "verdict": str(getattr(c.verdict, "value",
                                                                  c.verdict)),
            "seconds": seconds, "attempts": attempts,
            "repairs": [a["repair"] for a in attempts if a["repair"]],
            "written_repair": (written or {}).get("repair"),
            "written_exporter": (written or {}).get("exporter"),
            "written_method": (written or {}).get("method"),
            "reason": c.reason}


def child(arch_id: str, dtype: str, result_path: Path) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    import spandrel
    import torch

    import spandrel_zoo as zoo

    spec = zoo.ARCHITECTURES[arch_id]
    row: dict = {"id": arch_id, "dtype": dtype, "size": spec.size}
    with tempfile.TemporaryDirectory(prefix=f"cc_{arch_id}_") as tmp:
        folder = Path(tmp)
        pth = folder / f"{arch_id}.pth"
        model = zoo.make(arch_id)
        row["params"] = sum(p.numel() for p in model.parameters())
        torch.save(model.state_dict(), pth)
        del model
        descriptor = spandrel.ModelLoader().load_from_file(pth)
        descriptor.eval()
        shape = (1, descriptor.input_channels, spec.size, spec.size)
        naive_size = zoo.smallest_size(descriptor.size_requirements, NAIVE_AT_LEAST)
        row["stage"] = "naive export and check"  # where a crash (no Python error) happened
        result_path.write_text(json.dumps(row))
        try:
            row["naive"] = _naive(descriptor, dtype, naive_size, folder)
        except Exception as e:  # noqa: BLE001
            row["naive"] = {"error": _error(e), "size": naive_size}
        if row["naive"].get("path"):
            row["stage"] = "naive file judged by layerdiff.diagnose"
            result_path.write_text(json.dumps(row))
            row["naive"]["judged"] = _judge(pth, row["naive"]["path"], dtype, shape, folder)
        row["stage"] = "layerdiff.convert"
        result_path.write_text(json.dumps(row))  # a partial row survives a later timeout
        row["convert"] = _convert(pth, dtype, shape, folder)
        row["naive"].pop("path", None)
        row.pop("stage")
    result_path.write_text(json.dumps(row))


# --- parent: every architecture, a child each ------------------------------------------------

def run_one(arch_id: str, dtype: str, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    t = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", arch_id, dtype, str(result_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the child and the exporters it started
        log, _ = proc.communicate()
        status = "timeout"
    wall = round(time.perf_counter() - t, 1)
    try:
        row = json.loads(result_path.read_text() or "{}")
    except (OSError, ValueError):
        row = {}
    result_path.unlink(missing_ok=True)
    row.update({"id": arch_id, "dtype": dtype, "wall_s": wall})
    if status != 0:
        tail = (log or b"").decode(errors="replace").strip().splitlines()
        row["child"] = "timeout" if status == "timeout" else f"exit {status}"
        row["child_log"] = tail[-5:]
    return row


def _naive_cell(r: dict) -> str:
    n = r.get("naive")
    if n is None:
        return _crash(r) or "-"
    if "error" in n:
        return f"error ({n['error'].split(':')[0]})"
    if "export_error" in n:
        return f"export fails ({n['export_error'].split(':')[0]})"
    own = n.get("own_check", "?")
    if own == "error":
        own = f"error ({n.get('own_error', '').split(':')[0]})"
    return own


def _crash(r: dict) -> str:
    """The child's end when it died without a Python error, and in which stage."""
    if "child" not in r:
        return ""
    return r["child"] + (f" in {r['stage']}" if r.get("stage") else "")


def _judged_cell(r: dict) -> str:
    j = (r.get("naive") or {}).get("judged")
    if not j:
        if r.get("stage", "").startswith("naive file"):
            return _crash(r)
        return "-"
    if "error" in j:
        return f"error ({j['error'].split(':')[0]})"
    wrong = sorted({c["kind"] for c in j["cases"] if c["verdict"] == "diverged"})
    if j["verdict"] == "pass":
        return "right"
    return "wrong: " + (", ".join(wrong) if wrong else j["verdict"])


def _convert_cell(r: dict) -> str:
    c = r.get("convert")
    if c is None:
        return _crash(r) if r.get("stage") == "layerdiff.convert" else "-"
    if "error" in c:
        return f"error ({c['error'].split(':')[0]})"
    if not c["verified"]:
        return f"not verified ({c['verdict']})"
    how = c.get("written_exporter") or ""
    if c.get("written_method"):
        how += f" {c['written_method']}"
    if c.get("written_repair"):
        how += f", repair {c['written_repair']}"
    return f"verified ({how})"


def _time_cell(r: dict) -> str:
    c, n = r.get("convert") or {}, r.get("naive") or {}
    if "seconds" not in c:
        return "-"
    e = n.get("export_s")
    ratio = f" ({c['seconds'] / e:.0f}x)" if e and "export_error" not in n else ""
    return f"{c['seconds']:.0f} s / {e:.1f} s{ratio}" if e else f"{c['seconds']:.0f} s / -"


def table(rows: list[dict]) -> str:
    lines = ["| architecture | dtype | naive: own check | naive file, judged by layerdiff "
             "| layerdiff convert | convert / export alone |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['dtype']} | {_naive_cell(r)} | {_judged_cell(r)} | "
                     f"{_convert_cell(r)} | {_time_cell(r)} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    import statistics

    out = []
    for dtype in ("fp32", "fp16"):
        rs = [r for r in rows if r["dtype"] == dtype]
        if not rs:
            continue
        conv = [r.get("convert") or {} for r in rs]
        verified = [r["id"] for r, c in zip(rs, conv) if c.get("verified")]
        repaired = [f"{r['id']} ({c['written_repair']})" for r, c in zip(rs, conv)
                    if c.get("verified") and c.get("written_repair")]
        tried = [f"{r['id']} ({', '.join(c['repairs'])})" for r, c in zip(rs, conv)
                 if c.get("repairs") and not c.get("verified")]
        failed = [f"{r['id']} ({_convert_cell(r) if 'convert' in r or r.get('stage') == 'layerdiff.convert' else (_crash(r) + ', convert not run')})"
                  for r, c in zip(rs, conv) if not c.get("verified")]
        own_pass = [r for r in rs if (r.get("naive") or {}).get("own_check") == "pass"]
        judged = [(r, (r["naive"].get("judged") or {})) for r in own_pass]
        caught = [(r, j) for r, j in judged if j.get("verdict") not in (None, "pass")
                  and "error" not in j]

        def kinds(j):
            return {c["kind"] for c in j.get("cases", []) if c["verdict"] == "diverged"}

        by_kind = {k: [r["id"] for r, j in caught if k in kinds(j)]
                   for k in ("size", "photo", "random")}
        ratios = [c["seconds"] / r["naive"]["export_s"] for r, c in zip(rs, conv)
                  if "seconds" in c and (r.get("naive") or {}).get("export_s")
                  and "export_error" not in r["naive"]]
        out.append(f"**{dtype}** ({len(rs)} architectures): {len(verified)} converted to a "
                   f"verified file.")
        if repaired:
            out.append(f"- verified after a repair: {len(repaired)}: {', '.join(repaired)}")
        if tried:
            out.append(f"- repairs tried without a verified file: {', '.join(tried)}")
        if failed:
            out.append(f"- not verified: {', '.join(failed)}")
        out.append(f"- naive approach passes its own check: {len(own_pass)}; of these the "
                   f"file is wrong by layerdiff's diagnosis: {len(caught)}"
                   + (f": {', '.join(r['id'] for r, _ in caught)}" if caught else ""))
        for kind, label in (("size", "at another size"), ("photo", "on the photo"),
                            ("random", f"on a random input at the zoo size")):
            if by_kind[kind]:
                out.append(f"  - wrong {label}: {len(by_kind[kind])}: "
                           f"{', '.join(by_kind[kind])}")
        if ratios:
            out.append(f"- conversion time / naive export time: median "
                       f"{statistics.median(ratios):.0f}x (min {min(ratios):.0f}x, max "
                       f"{max(ratios):.0f}x)")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ids", nargs="*")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "fp16"])
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", default=str(HERE / "convert_check.json"))
    parser.add_argument("--child", nargs=3, metavar=("ID", "DTYPE", "RESULT"))
    parser.add_argument("--render", action="store_true",
                        help="print the table and summary of --json without running")
    args = parser.parse_args(argv)
    if args.child:
        try:
            child(args.child[0], args.child[1], Path(args.child[2]))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            return 1
        return 0
    if args.render:
        rows = json.loads(Path(args.json).read_text())["rows"]
        print(table(rows) + "\n\n" + summary(rows))
        return 0
    import spandrel_zoo as zoo

    ids = args.ids or list(zoo.ARCHITECTURES)
    rows: list[dict] = []
    if Path(args.json).exists() and args.ids:  # add to / replace in an earlier run
        rows = [r for r in json.loads(Path(args.json).read_text())["rows"]
                if not (r["id"] in ids and r["dtype"] in args.dtype)]
    started = time.time()
    for dtype in args.dtype:
        for arch_id in ids:
            row = run_one(arch_id, dtype, args.timeout)
            rows.append(row)
            print(f"{arch_id} {dtype}: naive {_naive_cell(row)}, judged {_judged_cell(row)}; "
                  f"convert {_convert_cell(row)}; {row['wall_s']} s", flush=True)
            Path(args.json).write_text(json.dumps(
                {"excluded": zoo.EXCLUDED, "timeout_s": args.timeout,
                 "seconds": round(time.time() - started), "rows": rows}, indent=1))
    print()
    print(table(rows))
    print()
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
