"""``layerdiff sweep``: one report (or convert) per entry of a model collection.

Stages, one way: entries (sweep_source) -> jobs with fingerprints -> the jobs whose result is
not up to date -> run them (a pool of children here, or a Dask cluster: sweep_cluster) ->
each outcome classified, published to ``OUTDIR/<entry>/`` and folded into the index
(sweep_index), rewritten after every entry so that an interrupted sweep loses nothing.

Resuming: ``OUTDIR/<entry>/sweep.json`` holds the entry's fingerprint (the model's and the
ONNX file's contents, the options, the mode and the layerdiff version) and its index row. A
rerun reuses the row when the fingerprint is the same, unless the entry errored and
``--retry-failed`` is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from . import __version__, sweep_index
from .errors import UsageError, first_line
from .files import atomic_write_text
from .sweep_child import REPORT_HTML, REPORT_JSON, Job, Outcome, run_job
from .sweep_source import Entry

RECORD = "sweep.json"
EXIT_PASS, EXIT_DIVERGED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class Verdict(str, enum.Enum):
    PASS = "pass"
    DIVERGED = "diverged"
    ERROR = "error"
    PENDING = "pending"  # not run yet (an interrupted sweep's index)


class ErrorKind(str, enum.Enum):
    USAGE = "usage"  # exit 2: the one-line error a user can fix (bad file, refused...)
    REPORT = "report"  # exit 2 with a report: onnxruntime cannot load the ONNX file
    MEMORY = "memory"  # out of memory: refused up front, or killed by the kernel
    TIMEOUT = "timeout"  # stopped at --timeout
    CRASH = "crash"  # killed by a signal (a segfault), or an unexpected exit code
    INTERNAL = "internal"  # exit 3: a bug in layerdiff
    WORKER_LOST = "worker_lost"  # Dask: every worker that ran it died
    INTERRUPTED = "interrupted"


@dataclasses.dataclass(frozen=True)
class Settings:
    source: str
    outdir: Path
    mode: str  # "report" or "convert"
    flags: tuple[str, ...]  # passed to every entry
    max_memory: int
    timeout: float | None
    workers: int | None = None  # this machine's pool; None: by memory and cores
    cluster: str | None = None  # a Dask scheduler's address
    retry_failed: bool = False
    quiet: bool = False


def run(settings: Settings, entries: list[Entry]) -> int:
    """Run the sweep; returns its exit code (0 all pass, 1 any diverged, 2 any errored)."""
    outdir = settings.outdir
    jobs = [_job(entry, settings) for entry in entries]
    rows = {job.name: _previous_row(outdir, job) for job in jobs}
    todo = [job for job in jobs if _needs_run(rows[job.name], settings.retry_failed)]
    for job in jobs:
        if job not in todo:
            rows[job.name] = {**rows[job.name], "reused": True}
        else:
            rows[job.name] = _pending_row(job, rows[job.name])
    progress = _Progress(len(jobs), len(jobs) - len(todo), settings.quiet)
    # Connected (and the cluster checked) before anything is written: a bad address
    # leaves OUTDIR as it was.
    with _runner(settings, todo) as results:
        outdir.mkdir(parents=True, exist_ok=True)
        _write_index(settings, rows)
        progress.start(len(todo), _where(settings, len(todo)))
        try:
            for job, outcome in results(todo, progress.running):
                rows[job.name] = _publish(outdir, job, outcome)
                _write_index(settings, rows)
                progress.done(rows[job.name])
        except KeyboardInterrupt:
            _write_index(settings, rows)
            print(f"interrupted: {outdir / 'index.html'} has the entries done so far",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
    code = exit_code(rows.values())
    if not settings.quiet:
        print(_closing_line(rows.values(), outdir), file=sys.stderr)
    return code


def exit_code(rows: Iterable[dict[str, Any]]) -> int:
    verdicts = {row["verdict"] for row in rows}
    if Verdict.PENDING.value in verdicts:
        return EXIT_INTERRUPTED
    if Verdict.ERROR.value in verdicts:
        return EXIT_ERROR
    return EXIT_DIVERGED if Verdict.DIVERGED.value in verdicts else EXIT_PASS


def local_workers(max_memory: int) -> int:
    """As many children as the cores and the available memory allow, at least one."""
    from .store import available_memory

    return max(1, min(len(os.sched_getaffinity(0)), available_memory() // max_memory))


# ------------------------------------------------------------------------ jobs and records


def _job(entry: Entry, settings: Settings) -> Job:
    flags = (*settings.flags, *entry.flags)
    facts = {"layerdiff": __version__, "mode": settings.mode, "model": _model_digest(entry.model),
             "onnx": _file_digest(entry.onnx) if entry.onnx else None, "flags": list(flags),
             "max_memory": settings.max_memory}
    fingerprint = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    return Job(name=entry.name, mode=settings.mode, model=entry.model, onnx=entry.onnx,
               flags=flags, max_memory=settings.max_memory, timeout=settings.timeout,
               fingerprint=fingerprint)


def _model_digest(model: str) -> str:
    """The file's contents; an entry point's .py file (its imports are not followed), or a
    module's name."""
    if os.path.isfile(model):
        return _file_digest(model)
    file = model.rpartition(":")[0]
    return _file_digest(file) + ":" + model.rpartition(":")[2] if os.path.isfile(file) else model


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _previous_row(outdir: Path, job: Job) -> dict[str, Any] | None:
    """The entry's row from an earlier sweep when its fingerprint is this job's."""
    try:
        record = json.loads((outdir / job.name / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != job.fingerprint:
        return None
    row = record.get("row")
    return row if isinstance(row, dict) and row.get("verdict") in _FINISHED else None


_FINISHED = {Verdict.PASS.value, Verdict.DIVERGED.value, Verdict.ERROR.value}


def _needs_run(previous: dict[str, Any] | None, retry_failed: bool) -> bool:
    return previous is None or (retry_failed and previous["verdict"] == Verdict.ERROR.value)


def _pending_row(job: Job, previous: dict[str, Any] | None) -> dict[str, Any]:
    return {**_blank_row(job), "verdict": Verdict.PENDING.value,
            "previous_verdict": previous["verdict"] if previous else None}


def _blank_row(job: Job) -> dict[str, Any]:
    return {"name": job.name, "mode": job.mode, "model": job.model, "onnx": job.onnx,
            "verdict": None, "exit_code": None, "error": None, "architecture": None,
            "first_divergence": None, "top_suggestion": None, "max_output_error": None,
            "verification": None, "seconds": None, "peak_memory": None, "report": None,
            "json": None, "host": None, "finished": None, "reused": False,
            "fingerprint": job.fingerprint}


# ------------------------------------------------------------------------ outcomes


def _publish(outdir: Path, job: Job, outcome: Outcome) -> dict[str, Any]:
    """Classify the outcome and write its files and record into ``OUTDIR/<entry>/``: filled
    in a hidden folder beside it, then renamed into place, so the folder is always whole."""
    report = _report_json(outcome)
    row = _row(job, outcome, report)
    staging = Path(tempfile.mkdtemp(prefix=f".{job.name}.", dir=outdir))
    old = None
    try:
        for name, data in outcome.files.items():
            (staging / name).write_bytes(data)
        record = {"fingerprint": job.fingerprint, "row": row}
        (staging / RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        os.chmod(staging, 0o777 & ~_umask())
        target = outdir / job.name
        if target.exists():
            old = target.rename(outdir / f".{job.name}.old.{os.getpid()}.{time.time_ns()}")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return row


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _report_json(outcome: Outcome) -> dict[str, Any] | None:
    data = outcome.files.get(REPORT_JSON)
    try:
        report = json.loads(data) if data else None
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _row(job: Job, outcome: Outcome, report: dict[str, Any] | None) -> dict[str, Any]:
    verdict, error = classify(job, outcome, report)
    row = {**_blank_row(job), "verdict": verdict.value, "exit_code": outcome.exit_code,
           "error": error, "seconds": round(outcome.seconds, 2),
           "peak_memory": outcome.peak_memory, "host": outcome.host or None,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "report": f"{job.name}/{REPORT_HTML}" if REPORT_HTML in outcome.files else None,
           "json": f"{job.name}/{REPORT_JSON}" if report is not None else None}
    if report is not None:
        row.update(_report_facts(report))
    return row


def classify(job: Job, outcome: Outcome, report: dict[str, Any] | None
             ) -> tuple[Verdict, dict[str, str] | None]:
    """The entry's verdict, and for an error its kind, message and hint."""
    code = outcome.exit_code

    def error(kind: ErrorKind, message: str, hint: str = "") -> tuple[Verdict, dict[str, str]]:
        return Verdict.ERROR, {"kind": kind.value, "message": message, "hint": hint}

    if outcome.lost is not None:
        return error(ErrorKind.WORKER_LOST, outcome.lost,
                     "a worker died while running it each time it was tried "
                     "(distributed.scheduler.allowed-failures)")
    if outcome.timed_out:
        return error(ErrorKind.TIMEOUT, f"stopped after --timeout {job.timeout:g} s",
                     "raise --timeout, or use a smaller --input-shape")
    if code == 0:
        return Verdict.PASS, None
    if code == 1:
        return Verdict.DIVERGED, None
    said, hint = _stderr_error(outcome.stderr)
    if outcome.workdir:  # its files now lie in OUTDIR/<entry>/
        said, hint = (text.replace(outcome.workdir, job.name) for text in (said, hint))
    if code is not None and code < 0:
        name = _signal_name(-code)
        if -code == signal.SIGKILL:
            return error(ErrorKind.MEMORY, "killed by SIGKILL, most likely by the kernel's "
                         "out-of-memory killer", "lower --max-memory or --workers")
        return error(ErrorKind.CRASH, f"crashed: killed by {name}",
                     f"see {job.name}/stderr.txt; rerun the entry alone with --verbose")
    if code == 2 and report is not None and report.get("verdict") == Verdict.ERROR.value:
        return error(ErrorKind.REPORT, first_line(report.get("error") or said or "error"), hint)
    if code == 2:
        memory = "memory" in said.lower() or "--max-memory" in hint
        return error(ErrorKind.MEMORY if memory else ErrorKind.USAGE, said or "error", hint)
    if code == 3:
        return error(ErrorKind.INTERNAL, said or "internal error", hint)
    if code == EXIT_INTERRUPTED:
        return error(ErrorKind.INTERRUPTED, "interrupted")
    return error(ErrorKind.CRASH, f"exited with code {code}" + (f": {said}" if said else ""),
                 f"see {job.name}/stderr.txt")


def _stderr_error(stderr: str) -> tuple[str, str]:
    """The child's ``error: ...`` and ``hint: ...`` lines (the last of each)."""
    said = hint = ""
    for line in stderr.splitlines():
        if line.startswith("error: "):
            said = line[len("error: "):].strip()
        elif line.startswith("hint: "):
            hint = line[len("hint: "):].strip()
    if not said and stderr.strip():
        said = first_line(stderr.strip().splitlines()[-1])
    return said, hint


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _report_facts(report: dict[str, Any]) -> dict[str, Any]:
    model = report.get("model") or {}
    first = report.get("first_divergence")
    suggestions = report.get("suggestions") or []
    errors = [o.get("max_abs") for o in report.get("outputs") or []
              if isinstance(o.get("max_abs"), (int, float))]
    where = None
    if first:
        where = first.get("module") or first.get("onnx_node")
        if first.get("op_type"):
            where = f"{where} ({first['op_type']})"
    return {"architecture": model.get("architecture"), "first_divergence": where,
            "top_suggestion": suggestions[0].get("title") if suggestions else None,
            "max_output_error": max(errors) if errors else None,
            "verification": (report.get("conversion") or {}).get("verification")}


# ------------------------------------------------------------------------ running


@contextlib.contextmanager
def _runner(settings: Settings, jobs: list[Job]):
    """``results(jobs, running)``: each job with its outcome, as they finish."""
    if settings.cluster and jobs:
        from . import sweep_cluster

        with sweep_cluster.Cluster(settings.cluster, max(j.max_memory for j in jobs)) as cluster:
            yield cluster.results
        return
    workers = settings.workers or local_workers(settings.max_memory)
    yield functools.partial(_local_results, workers=workers)


def _local_results(jobs: list[Job], running, *, workers: int) -> Iterator[tuple[Job, Outcome]]:
    """A pool of ``workers`` children at a time (threads waiting on child processes)."""
    if not jobs:
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layerdiff-sweep")
    futures = {pool.submit(run_job, job): job for job in jobs}
    left = len(jobs)
    running(min(workers, left))
    try:
        for future in as_completed(futures):
            left -= 1
            running(min(workers, left))
            yield futures[future], future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _where(settings: Settings, count: int) -> str:
    if not count:
        return "nothing to run"
    if settings.cluster:
        return f"on the Dask cluster at {settings.cluster}"
    workers = settings.workers or local_workers(settings.max_memory)
    return (f"on this machine, {min(workers, max(count, 1))} at a time, "
            f"--max-memory {settings.max_memory / 2**30:.2f} GiB each")


def _write_index(settings: Settings, rows: dict[str, dict[str, Any]]) -> None:
    summary = {"source": str(settings.source), "mode": settings.mode,
               "flags": list(settings.flags), "max_memory": settings.max_memory,
               "timeout": settings.timeout, "where": settings.cluster or "local",
               "layerdiff": __version__}
    sweep_index.write(settings.outdir, summary, list(rows.values()), exit_code(rows.values()))


class _Progress:
    """``[3/20] running 2, failed 1: name ... verdict (12.3 s)`` on stderr."""

    def __init__(self, total: int, reused: int, quiet: bool) -> None:
        self.total, self.finished, self.failed, self.quiet = total, reused, 0, quiet
        self.in_flight = 0

    def start(self, count: int, where: str) -> None:
        if not self.quiet:
            reused = f", {self.finished} up to date" if self.finished else ""
            print(f"layerdiff sweep: {count} of {self.total} to run{reused}, {where}",
                  file=sys.stderr)

    def running(self, count: int) -> None:
        self.in_flight = count

    def done(self, row: dict[str, Any]) -> None:
        self.finished += 1
        self.failed += row["verdict"] == Verdict.ERROR.value
        if self.quiet:
            return
        what = row["verdict"]
        if row["error"]:
            what += f": {row['error']['message']}"
        elif row["first_divergence"]:
            what += f" at {row['first_divergence']}"
        print(f"[{self.finished}/{self.total}] running {self.in_flight}, failed {self.failed}: "
              f"{row['name']} ... {what} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)


def _closing_line(rows: Iterable[dict[str, Any]], outdir: Path) -> str:
    counts = sweep_index.counts(list(rows))
    parts = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    return f"sweep: {parts}; index: {outdir / 'index.html'}"
