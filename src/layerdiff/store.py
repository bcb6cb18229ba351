"""Tensors kept within a memory budget: in RAM while they fit, on disk beyond.

A full-size model's activations do not fit in memory (ESRGAN at 256x256: about 12 GB of
module outputs). A ``Spill`` keeps a copy of each array in RAM while its budget allows;
past it, arrays are written straight from the caller's buffer to a private temporary
folder as .npy files (no copy in memory at all) and mapped back on demand, a fresh
read-only memory map each time, freed when the caller drops it. Several ``TensorStore``
views (one per input case) share one Spill, so one budget covers all of them.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import LayerdiffError


class Spill:
    """Arrays by key, at most ``budget`` bytes of them in RAM; the rest in ``folder``."""

    def __init__(self, budget: int, folder: str | Path | None = None) -> None:
        self.budget = max(int(budget), 0)
        self._parent = folder
        self._folder: Path | None = None
        self._ram: dict[Hashable, np.ndarray] = {}
        self._disk: dict[Hashable, tuple[Path, tuple, np.dtype]] = {}
        self.ram_bytes = 0
        self.disk_bytes = 0
        self.written_bytes = 0  # all that ever went to disk

    def put(self, key: Hashable, value: np.ndarray, *, own: bool = False) -> None:
        """Keep ``value``'s current contents (the caller may change or free it after).
        With ``own``, the caller hands the array over: kept as it is, not copied, when it
        fits (a model's full-size output is not held twice)."""
        self.drop(key)
        if self.ram_bytes + value.nbytes <= self.budget:
            keep = own and value.flags.c_contiguous and value.flags.writeable
            self._ram[key] = value if keep else np.array(value, order="C")
            self.ram_bytes += value.nbytes
        else:
            self._write(key, value)

    def get(self, key: Hashable) -> np.ndarray | None:
        value = self._ram.get(key)
        if value is not None:
            return value
        entry = self._disk.get(key)
        if entry is None:
            return None
        path, _, _ = entry
        # Mapped, not read: pages come in as they are used, and compare() drops those it
        # is done with, so a tensor read back for a comparison is never whole in memory.
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def shape_of(self, key: Hashable) -> tuple | None:
        value = self._ram.get(key)
        if value is not None:
            return value.shape
        entry = self._disk.get(key)
        return None if entry is None else entry[1]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._ram or key in self._disk

    def drop(self, key: Hashable) -> None:
        value = self._ram.pop(key, None)
        if value is not None:
            self.ram_bytes -= value.nbytes
        entry = self._disk.pop(key, None)
        if entry is not None:
            path, shape, dtype = entry
            self.disk_bytes -= int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._ram.clear()
        self._disk.clear()
        self.ram_bytes = self.disk_bytes = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, key: Hashable, value: np.ndarray) -> None:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="layerdiff-spill-", dir=self._parent))
        path = self._folder / f"{len(self._disk)}-{os.getpid()}-{id(value)}.npy"
        try:
            np.save(path, value, allow_pickle=False)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise LayerdiffError(
                f"cannot write activations to {self._folder}: {exc.strerror or exc}",
                hint="free disk space there, point TMPDIR at a larger disk, or raise --max-memory",
            ) from exc
        self._disk[key] = (path, value.shape, value.dtype)
        self.disk_bytes += value.nbytes
        self.written_bytes += value.nbytes


class TensorStore(Mapping):
    """A read-mostly mapping of one namespace of a Spill (e.g. one input's activations)."""

    def __init__(self, spill: Spill, namespace: Hashable) -> None:
        self.spill, self.namespace = spill, namespace
        self._keys: list[Hashable] = []

    def __setitem__(self, key: Hashable, value: np.ndarray) -> None:
        if (self.namespace, key) not in self.spill:
            self._keys.append(key)
        self.spill.put((self.namespace, key), value)

    def __getitem__(self, key: Hashable) -> np.ndarray:
        value = self.spill.get((self.namespace, key))
        if value is None:
            raise KeyError(key)
        return value

    def shape_of(self, key: Hashable) -> tuple | None:
        return self.spill.shape_of((self.namespace, key))

    def keep(self, key: Hashable, value: np.ndarray) -> None:
        """Store an array the caller hands over (not copied while it fits in RAM)."""
        if (self.namespace, key) not in self.spill:
            self._keys.append(key)
        self.spill.put((self.namespace, key), value, own=True)

    def __contains__(self, key: object) -> bool:
        return (self.namespace, key) in self.spill

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def clear(self) -> None:
        """Forget every array of this namespace (RAM freed, files deleted)."""
        for key in self._keys:
            self.spill.drop((self.namespace, key))
        self._keys.clear()


class StoredList(Sequence):
    """A list of arrays kept in a TensorStore (a model's outputs): each read on demand."""

    def __init__(self, store: TensorStore, name: str, values: Iterable[np.ndarray]) -> None:
        self._store, self._keys = store, []
        for value in values:  # handed over: kept as they are while they fit in RAM
            key = (name, len(self._keys))
            store.keep(key, value)
            self._keys.append(key)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._store[k] for k in self._keys[index]]
        return self._store[self._keys[index]]

    def __len__(self) -> int:
        return len(self._keys)


def human_bytes(n: int | None) -> str:
    """3.48 GiB, 512 MiB, 12 KiB."""
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.0f} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    """'6G', '512M', '6GiB', '2.5g' or a plain byte count -> bytes."""
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    factor = units.get(cleaned[-1:], 1)
    number = cleaned[:-1] if cleaned[-1:] in units else cleaned
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: '{text}' (use e.g. 6G or 512M)") from None
    if not math.isfinite(value) or int(value * factor) < 1:
        raise ValueError(f"not a size: '{text}' (must be a positive, finite size)")
    return int(value * factor)


DEFAULT_MAX_MEMORY = 4 * 2**30


def available_memory() -> int:
    """Memory the system can give without swapping (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_max_memory() -> int:
    """4 GiB, or what the process holds now plus half of the available memory when less."""
    return int(min(DEFAULT_MAX_MEMORY, current_rss() + available_memory() // 2))


def current_rss() -> int:
    """This process's resident memory now, in bytes."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes. Linux's VmHWM belongs to this
    address space; ru_maxrss (the fallback elsewhere) also carries the high-water mark of
    the process that started this one, across exec."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
