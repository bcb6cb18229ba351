"""layerdiff sweep: real children, real models, a real Dask cluster, a real browser.

Each sweep runs the real command line in a subprocess; every entry is a real `layerdiff
report` child on tiny spandrel models (16x16, no extra size, no float64 referee).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, export, faults, make_model, with_fault
from layerdiff.cli import main

FAST = ["--check-sizes", "none", "--reference", "none", "--input-shape", "1,3,16,16"]
SHAPE = (1, 3, 16, 16)


def sweep(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerdiff.cli", "sweep", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def index(outdir: Path) -> dict[str, dict]:
    data = json.loads((outdir / "index.json").read_text())
    assert data["schema"] == "layerdiff-sweep/1" and data["total"] == len(data["entries"])
    return {row["name"]: row for row in data["entries"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """compact (clean ONNX beside it), faulty (DepthToSpace DCR ONNX beside it), esrgan."""
    folder = tmp_path_factory.mktemp("models")
    compact = make_model("compact")
    torch.save(compact.state_dict(), folder / "compact.pth")
    clean = export(compact, torch.rand(SHAPE), folder / "compact.onnx", "legacy")
    shutil.copy(folder / "compact.pth", folder / "faulty.pth")
    bad, _ = with_fault(clean, faults.pixel_shuffle_dcr, folder)
    bad.rename(folder / "faulty.onnx")
    esrgan = make_model("esrgan")
    torch.save(esrgan.state_dict(), folder / "esrgan.pth")
    export(esrgan, torch.rand(SHAPE), folder / "esrgan.onnx", "legacy")
    return folder


@pytest.fixture(scope="module")
def first_sweep(models, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("sweep") / "out"
    result = sweep(models, "-o", outdir, "--workers", "2", *FAST)
    return outdir, result


def test_folder_sweep_writes_a_report_per_entry_and_exits_1_on_a_divergence(first_sweep):
    outdir, result = first_sweep
    assert result.returncode == 1, result.stderr
    rows = index(outdir)
    assert {n: r["verdict"] for n, r in rows.items()} == {
        "compact": "pass", "esrgan": "pass", "faulty": "diverged"}
    faulty = rows["faulty"]
    assert faulty["first_divergence"] == "upsampler (DepthToSpace)"
    assert "DepthToSpace" in faulty["top_suggestion"] and faulty["max_output_error"] > 0.01
    assert faulty["architecture"] == "RealESRGAN Compact"
    for name, row in rows.items():
        assert (outdir / row["report"]).read_text().lstrip().lower().startswith("<!doctype html")
        assert json.loads((outdir / row["json"]).read_text())["verdict"] == row["verdict"]
        assert row["onnx"].endswith(f"{name}.onnx") and row["error"] is None
        # the child's own peak (a bare launcher starts it), not this test's
        assert 100 * 2**20 < row["peak_memory"] < 4 * 2**30 and row["seconds"] > 0
    assert "[3/3]" in result.stderr and "faulty ... diverged at upsampler" in result.stderr
    assert not [p for p in outdir.iterdir() if p.name.startswith(".")]  # no staging left


def test_rerun_skips_what_is_up_to_date_and_retry_failed_reruns_errors(first_sweep, models,
                                                                        tmp_path):
    outdir = tmp_path / "out"
    shutil.copytree(first_sweep[0], outdir)  # mtimes kept: copy2
    source = tmp_path / "models"
    shutil.copytree(models, source)
    (source / "broken.pth").write_bytes(b"not a checkpoint" * 8)
    # the folder moved: same contents, so the fingerprints still hold
    stamps = {p: p.stat().st_mtime_ns for p in outdir.glob("*/sweep.json")}
    result = sweep(source, "-o", outdir, "--workers", "2", *FAST)
    assert result.returncode == 2, result.stderr
    assert "1 of 4 to run, 3 up to date" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # not rerun, not rewritten
    rows = index(outdir)
    assert [n for n, r in rows.items() if r["reused"]] == ["compact", "esrgan", "faulty"]
    broken = rows["broken"]
    assert broken["verdict"] == "error" and broken["exit_code"] == 2
    assert broken["error"]["kind"] == "usage" and "broken.pth" in broken["error"]["message"]
    assert broken["report"] is None

    again = sweep(source, "-o", outdir, *FAST)  # errors are kept without --retry-failed
    assert again.returncode == 2 and "0 of 4 to run" in again.stderr
    assert index(outdir)["broken"]["finished"] == broken["finished"]

    retried = sweep(source, "-o", outdir, "--retry-failed", *FAST)
    assert retried.returncode == 2 and "1 of 4 to run" in retried.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert index(outdir)["broken"]["fingerprint"] == broken["fingerprint"]
    assert index(outdir)["broken"]["finished"] >= broken["finished"]
    assert json.loads((outdir / "index.json").read_text())["exit_code"] == 2


NETS = '''
import os, signal, sys, time
from pathlib import Path

def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)

def sleeper():
    time.sleep(300)

def _compact():
    from spandrel.architectures.Compact import Compact
    return Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)

def once():
    """Sleeps on its first run (a worker is killed under it), builds a model after."""
    marker = Path(__file__).with_name("once.pids")
    first = not marker.exists()
    with marker.open("a") as f:
        f.write(f"{os.getpid()}\\n")
    if first:
        time.sleep(300)
    return _compact()

def always():
    with Path(__file__).with_name("always.pids").open("a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(300)
'''


def test_crash_timeout_and_manifest_entries_are_isolated(models, tmp_path):
    (tmp_path / "nets.py").write_text(textwrap.dedent(NETS))
    manifest = tmp_path / "sweep.json"
    manifest.write_text(json.dumps([
        {"model": "nets.py:segfault", "name": "crash"},
        {"model": "nets.py:sleeper", "name": "hang"},
        {"model": str(models / "compact.pth"), "onnx": str(models / "compact.onnx"),
         "input_shape": [1, 3, 16, 16], "flags": "--check-sizes none --reference none",
         "name": "good"},
    ]))
    outdir = tmp_path / "out"
    result = sweep(manifest, "-o", outdir, "--workers", "3", "--timeout", "25")
    assert result.returncode == 2, result.stderr
    rows = index(outdir)
    assert rows["good"]["verdict"] == "pass"
    crash, hang = rows["crash"], rows["hang"]
    assert crash["verdict"] == "error" and crash["exit_code"] == -signal.SIGSEGV
    assert crash["error"]["kind"] == "crash" and "SIGSEGV" in crash["error"]["message"]
    assert hang["error"]["kind"] == "timeout" and "--timeout 25 s" in hang["error"]["message"]
    assert 25 <= hang["seconds"] < 60
    assert (outdir / "crash" / "sweep.json").is_file()


@pytest.mark.parametrize("case,expect", [
    ("missing source", "not found"),
    ("empty folder", "lists no models"),
    ("unknown key", "unknown keys: modle"),
    ("missing model", "not found"),
    ("name twice", "used twice"),
    ("unsafe name", "not a plain folder name"),
    ("bad csv flags", "--seed"),
    ("sweep's own flag", "--json is set by the sweep"),
    ("outdir is source", "SOURCE's folder"),
    ("bad yaml", "cannot read the manifest"),
])
def test_bad_source_is_one_line_exit_2_and_nothing_written(case, expect, models, tmp_path,
                                                           capsys):
    manifest = tmp_path / "m.json"
    model = str(models / "compact.pth")
    out = tmp_path / "out"
    source, content, flags = {  # SOURCE, what is written into it, options
        "missing source": (tmp_path / "nope", None, []),
        "empty folder": (tmp_path, None, []),
        "unknown key": (manifest, [{"modle": model}], []),
        "missing model": (manifest, [{"model": "nope.pth"}], []),
        "name twice": (manifest, [{"model": model, "name": "a"}, {"model": model, "name": "a"}],
                       []),
        "unsafe name": (manifest, [{"model": model, "name": "../up"}], []),
        "bad csv flags": (tmp_path / "m.csv", f"model,flags\n{model},--seed x\n", []),
        "sweep's own flag": (models, None, ["--json", tmp_path / "x.json"]),
        "outdir is source": (models, None, []),
        "bad yaml": (tmp_path / "m.yaml", "- model: [unclosed\n", []),
    }[case]
    if content is not None:
        source.write_text(content if isinstance(content, str) else json.dumps(content))
    if case == "outdir is source":
        out = models
    code = main(["sweep", str(source), "-o", str(out), *map(str, flags)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[0].startswith("error: ") and expect in lines[0]
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert not out.exists() or out == models
    assert not (models / "index.json").exists()


# ------------------------------------------------------------------------ Dask


def _kill_worker_running(pids_file: Path, attempt: int, deadline: float) -> int:
    """Wait for the entry's ``attempt``-th child to write its pid, SIGKILL the Dask worker
    process above it (child <- launcher <- worker); return the child's pid."""
    import psutil

    while time.monotonic() < deadline:
        pids = pids_file.read_text().split() if pids_file.exists() else []
        if len(pids) >= attempt:
            child = psutil.Process(int(pids[attempt - 1]))
            worker = child.parent().parent()
            assert worker.pid != os.getpid() and "python" in worker.name()
            worker.send_signal(signal.SIGKILL)
            return child.pid
        time.sleep(0.2)
    raise AssertionError(f"attempt {attempt} of {pids_file.stem} never started")


def _gone(pid: int, within: float = 10) -> bool:
    import psutil

    end = time.monotonic() + within
    while time.monotonic() < end:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.2)
    return False


def test_dask_cluster_retries_a_lost_worker_and_records_one_lost_for_good(tmp_path):
    dask = pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    (tmp_path / "nets.py").write_text(textwrap.dedent(NETS))
    once, always = tmp_path / "once.csv", tmp_path / "always.csv"
    once.write_text("name,model,input_shape,flags\n"
                    "once,nets.py:once,\"1,3,16,16\",--check-sizes none --reference none\n")
    always.write_text("model\nnets.py:always\n")

    def start(manifest: Path, outdir: Path, address: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "layerdiff.cli", "sweep", str(manifest), "-o", str(outdir),
             "--cluster", address, "--max-memory", "1G"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     resources={"MEMORY": 2**30}, dashboard_address=None,
                                     silence_logs=True) as cluster:
        address = cluster.scheduler_address
        # an entry needs more memory than any worker declares: refused before anything runs
        refused = sweep(once, "-o", tmp_path / "refused", "--cluster", address,
                        "--max-memory", "2G")
        assert refused.returncode == 2 and "no worker" in refused.stderr, refused.stderr
        assert not (tmp_path / "refused").exists()

        deadline = time.monotonic() + 150
        run = start(once, tmp_path / "once", address)
        try:  # its worker dies under it once: it is run again on another, and passes
            killed = [_kill_worker_running(tmp_path / "once.pids", 1, deadline)]
            once_result = run.communicate(timeout=150)
        finally:
            run.kill()
        run = start(always, tmp_path / "always", address)
        try:  # its worker dies under it every time: an error after allowed-failures + 1 tries
            killed += [_kill_worker_running(tmp_path / "always.pids", n, deadline) for n in (1, 2)]
            always_result = run.communicate(timeout=150)
        finally:
            run.kill()
    assert all(_gone(pid) for pid in killed)  # the diagnoses died with their workers

    row = index(tmp_path / "once")["once"]
    assert row["verdict"] == "pass", (row, once_result[1])
    assert len((tmp_path / "once.pids").read_text().split()) == 2
    assert (tmp_path / "once" / "once" / "report.html").is_file()

    row = index(tmp_path / "always")["always"]
    assert row["verdict"] == "error" and row["error"]["kind"] == "worker_lost", always_result
    assert len((tmp_path / "always.pids").read_text().split()) == 2
    data = json.loads((tmp_path / "always" / "index.json").read_text())
    assert data["where"] == address and data["exit_code"] == 2


# ------------------------------------------------------------------------ browser


def test_index_page_sorts_in_a_real_browser(first_sweep):
    from test_browser import CHROMIUM, CHROMIUM_ARGS

    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"chromium not found at {CHROMIUM}: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    outdir, _ = first_sweep
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors, requests = [], []
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((outdir / "index.html").as_uri())

            def names() -> list[str]:
                return page.eval_on_selector_all("#sweep-table tbody tr",
                                                 "rows => rows.map(r => r.id.slice(6))")

            assert names() == ["compact", "esrgan", "faulty"]
            verdict = page.locator("#sweep-table th", has_text="verdict")
            verdict.click()
            assert names()[-1] == "faulty" and verdict.get_attribute("aria-sort") == "ascending"
            verdict.click()
            assert names()[0] == "faulty" and verdict.get_attribute("aria-sort") == "descending"
            page.locator("#sweep-table th", has_text="max output error").click()
            assert names()[-1] == "faulty"  # the largest error last, ascending
            page.locator("#entry-faulty a", has_text="report").click()
            page.wait_for_load_state()
            assert page.url.endswith("faulty/report.html") and "DIVERGED" in page.content()
            assert not errors
            assert all(u.startswith("file://") for u in requests)
        finally:
            browser.close()
