"""One sweep entry, run as a child process: the same code on this machine and on a Dask worker.

A diagnosis can crash its process (an exporter segfault), run out of memory or hang. So each
entry runs ``python -m layerdiff.cli report|convert ...`` in a child, writing into a private
temporary folder, and comes back as an :class:`Outcome`: the exit code (or the signal, or
the timeout), the child's own peak memory, its wall time and the files it wrote, as bytes.
Whoever called (the sweep on this machine, or the Dask client through a worker) publishes
them; the worker's folder is removed either way, so a lost worker loses nothing published.

The child is started by a bare launcher (``python -S``, about 10 MB, as in
``benchmarks/peak.py``): Linux carries ``ru_maxrss`` across exec, so a child started straight
from a large process (a Dask worker) would inherit its high-water mark. The launcher dies with
whoever started it and takes the child with it (``PR_SET_PDEATHSIG``), and kills the child's
whole process group at the timeout, the exporter's own child included.

This module imports no torch: a Dask worker unpickles it for every task.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPORT_HTML, REPORT_JSON, STDERR_LOG = "report.html", "report.json", "stderr.txt"
STDERR_KEEP = 64 * 1024  # the end of the child's stderr kept in the entry's folder

# Runs in the launcher: argv = starter pid, timeout (0: none), stderr file, command...
_LAUNCHER = r"""
import ctypes, json, os, signal, subprocess, sys, time

def die_with_parent():
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass

die_with_parent()
if os.getppid() != int(sys.argv[1]):  # the starter died before prctl took effect
    sys.exit(137)
timeout = float(sys.argv[2])
deadline = time.monotonic() + timeout if timeout > 0 else None
with open(sys.argv[3], "wb") as err:
    child = subprocess.Popen(sys.argv[4:], stdout=subprocess.DEVNULL, stderr=err,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=die_with_parent)

def stop(*_):
    os.killpg(child.pid, signal.SIGKILL)
    os.wait4(child.pid, 0)
    sys.exit(130)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
timed_out = False
while True:
    pid, status, usage = os.wait4(child.pid, os.WNOHANG)
    if pid:
        break
    if deadline is not None and time.monotonic() > deadline:
        os.killpg(child.pid, signal.SIGKILL)
        _, status, usage = os.wait4(child.pid, 0)
        timed_out = True
        break
    time.sleep(0.05)
try:
    os.killpg(child.pid, signal.SIGKILL)  # whatever the child left running
except OSError:
    pass
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
                  "timed_out": timed_out}))
"""


@dataclasses.dataclass(frozen=True)
class Job:
    """What one entry runs: plain values only, so that it pickles to a Dask worker."""

    name: str
    mode: str  # "report" or "convert"
    model: str  # absolute path, or an entry point (file.py:NAME with an absolute file)
    onnx: str | None
    flags: tuple[str, ...]  # report's / convert's own options, the sweep's common ones first
    max_memory: int  # bytes: passed to the child as --max-memory, and what Dask places by
    timeout: float | None  # seconds; None: no limit
    fingerprint: str

    def command(self, folder: Path) -> list[str]:
        """The child's layerdiff arguments, with every output inside ``folder``."""
        outputs = ["--json", str(folder / REPORT_JSON), "-q", "--max-memory", str(self.max_memory)]
        if self.mode == "convert":
            return ["convert", self.model, "-o", str(folder / f"{self.name}.onnx"),
                    "--report", str(folder / REPORT_HTML), *self.flags, *outputs]
        onnx = ["--onnx", self.onnx] if self.onnx else []
        return ["report", self.model, *onnx, "-o", str(folder / REPORT_HTML), *self.flags, *outputs]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a child ended. ``exit_code`` is negative for a signal (-11: SIGSEGV), None when
    the child never ended on its own terms (``lost``: its Dask worker died every time)."""

    exit_code: int | None
    timed_out: bool = False
    seconds: float = 0.0
    peak_memory: int | None = None
    stderr: str = ""
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    host: str = ""
    lost: str | None = None
    workdir: str = ""  # the child's private folder (gone): paths in its messages name it


def run_job(job: Job) -> Outcome:
    """Run ``job`` in a child process in a private temporary folder; return what it did and
    the files it wrote. Never raises for anything the child does."""
    folder = Path(tempfile.mkdtemp(prefix=f"layerdiff-sweep-{job.name}-"))
    try:
        start = time.perf_counter()
        launcher = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, str(os.getpid()), str(job.timeout or 0),
             str(folder / STDERR_LOG), sys.executable, "-m", "layerdiff.cli",
             *job.command(folder)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        seconds = time.perf_counter() - start
        if launcher.returncode != 0:  # the launcher itself was stopped (Ctrl-C, SIGTERM)
            raise KeyboardInterrupt if launcher.returncode in (130, -2) else RuntimeError(
                f"the sweep's launcher failed: {launcher.stderr.strip()[-300:]}")
        ended = json.loads(launcher.stdout)
        log = (folder / STDERR_LOG).read_bytes()[-STDERR_KEEP:]
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
                 if p.is_file() and p.name != STDERR_LOG and not p.name.startswith(".")}
        if log.strip():
            files[STDERR_LOG] = log
        return Outcome(exit_code=ended["code"], timed_out=ended["timed_out"], seconds=seconds,
                       peak_memory=ended["maxrss_kib"] * 1024,
                       stderr=log.decode("utf-8", "replace"), files=files,
                       host=socket.gethostname(), workdir=str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
