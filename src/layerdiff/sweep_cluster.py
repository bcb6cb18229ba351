"""``layerdiff sweep --cluster ADDRESS``: the entries as tasks on a Dask distributed cluster.

Each task runs :func:`layerdiff.sweep_child.run_job` on a worker (the same child process as
on this machine) and returns its outcome, files included, to this client, which publishes
them: a worker that dies loses only the task it was running. Each task declares the memory
its diagnosis may use as the worker resource ``MEMORY`` (bytes), so the scheduler places it
only on a worker that declared at least that much (``dask worker ADDRESS --resources
MEMORY=16e9``) and runs no more at once on a worker than its memory holds. A task whose
worker dies is rescheduled on another by the scheduler, up to its
``distributed.scheduler.allowed-failures`` (3 by default); then the entry is an error
(``worker_lost``).

Model and ONNX paths go to the workers as they are: they must be readable there (a shared
file system, at the same path). Dask is imported only here, when ``--cluster`` is given.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Callable, Iterator

from .errors import UsageError, first_line
from .sweep_child import Job, Outcome, run_job

INSTALL_HINT = "pip install 'layerdiff[cluster]' (Dask distributed), or leave out --cluster"
RESOURCE = "MEMORY"
CONNECT_TIMEOUT_S = 20


def connect(address: str):
    """A Dask client of the scheduler at ``address``; a UsageError when Dask is missing or
    the scheduler cannot be reached."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--cluster needs Dask distributed, which is not installed",
                         hint=INSTALL_HINT) from None
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as error:
        raise UsageError(f"cannot reach the Dask scheduler at {address}: {first_line(error)}",
                         hint="start one with 'dask scheduler' and workers with 'dask worker "
                              "ADDRESS --resources MEMORY=<bytes>', or leave out --cluster"
                         ) from None


def check_memory(client, need: int, address: str) -> None:
    """Refuse up front what the scheduler would wait for forever: no worker that declares
    its memory, or none with enough for one entry."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    declared = [w.get("resources", {}).get(RESOURCE) for w in workers.values()]
    declared = [m for m in declared if m is not None]
    if not workers:
        raise UsageError(f"the Dask scheduler at {address} has no workers",
                         hint=f"start workers with 'dask worker {address} --resources "
                              f"{RESOURCE}=<bytes>'")
    if not declared:
        raise UsageError(f"no worker of the Dask cluster at {address} declares its memory",
                         hint=f"start workers with 'dask worker {address} --resources "
                              f"{RESOURCE}=<bytes>' (each entry needs --max-memory, {need} bytes)")
    if max(declared) < need:
        raise UsageError(f"no worker of the Dask cluster at {address} has --max-memory "
                         f"({need} bytes) for one entry: the largest declares {int(max(declared))}",
                         hint="lower --max-memory, or start workers with more MEMORY")


class Cluster:
    """A connection to the scheduler, checked for memory; ``results`` runs the jobs."""

    def __init__(self, address: str, need: int) -> None:
        self.address = address
        self.client = connect(address)
        try:
            check_memory(self.client, need, address)
        except BaseException:
            self.client.close()
            raise

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def results(self, jobs: list[Job], running: Callable[[int], None]
                ) -> Iterator[tuple[Job, Outcome]]:
        """Submit the jobs, no more at a time than the workers' memory holds; yield each
        with its outcome as it finishes.

        The scheduler counts a lost worker against every task assigned to it, also those
        only waiting there for memory; so tasks are handed over as room frees up, not all
        at once, and a worker's death counts against the tasks it was running.
        """
        from distributed import as_completed

        run_id = uuid.uuid4().hex[:8]
        waiting = collections.deque(jobs)
        in_flight: dict = {}
        finished = as_completed()

        def hand_over() -> None:
            room = self.slots(max(job.max_memory for job in jobs))
            while waiting and len(in_flight) < room:
                job = waiting.popleft()
                future = self.client.submit(run_job, job, pure=False,
                                            key=f"layerdiff-sweep-{run_id}-{job.name}",
                                            resources={RESOURCE: job.max_memory})
                in_flight[future] = job
                finished.add(future)

        hand_over()
        running(len(in_flight))
        try:
            for future in finished:
                job = in_flight.pop(future)
                outcome = _outcome(future)
                hand_over()
                running(len(in_flight))
                yield job, outcome
        finally:
            for future in in_flight:  # interrupted: the rest is not wanted any more
                future.cancel()

    def slots(self, need: int) -> int:
        """How many entries the workers' declared memory holds at once (at least 1)."""
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {}).values()
        return max(1, sum(int(w.get("resources", {}).get(RESOURCE, 0) // need) for w in workers))


def _outcome(future) -> Outcome:
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker as error:
        return Outcome(exit_code=None, lost=f"its worker died each time it was tried: "
                                            f"{first_line(error)}")
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - a lost connection, a worker-side failure
        return Outcome(exit_code=None, lost=f"the cluster failed to run it: "
                                            f"{type(error).__name__}: {first_line(error)}")
    finally:
        future.release()
