"""Files layerdiff writes: checked before any work starts, published atomically.

Two promises. No output ever replaces an input: every output path is checked against
every input (same path, symlink or hard link) and against the others before the
diagnosis starts, and must be writable then, so a run of minutes cannot end in a lost
checkpoint or a failed write. And no output is ever half written: each is filled in a
temporary file beside it and renamed over the target (atomic on one file system), so
the target keeps its old content until the new one is complete, also on Ctrl-C.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

from .errors import UsageError


def atomic_write(path: str | os.PathLike[str], fill: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` by calling ``fill`` on a temporary file beside it, then renaming.

    Creates parent folders. On any failure (or Ctrl-C) the temporary file is removed
    and ``path`` is left as it was. The file gets ordinary permissions (mkstemp's are
    private), so a report can be shared.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


Inputs = Iterable[tuple[str, "str | os.PathLike[str] | None"]]  # (what the user calls it, path)


def check_inputs(inputs: Inputs) -> None:
    """Refuse inputs that exist but are not regular files: a device such as /dev/zero
    or a FIFO would be read forever. Missing files are left to their loaders, which say
    what each should be."""
    for label, value in inputs:
        if value is None:
            continue
        path = Path(value)
        if path.exists() and not path.is_dir() and not path.is_file():
            raise UsageError(f"{label} {path} is not a regular file (a device or a pipe)",
                             hint="give the path of a file")


def check_outputs(outputs: Mapping[str, str | os.PathLike[str] | None], inputs: Inputs) -> None:
    """Refuse, before any work, outputs that would replace an input or each other, or
    that cannot be written. Keys are what the user calls each path ("-o", "--json",
    "the model"); ``None`` values are skipped."""
    given_inputs = [(label, Path(p)) for label, p in inputs if p is not None]
    seen: dict[Path, str] = {}
    for label, value in outputs.items():
        if value is None:
            continue
        path = Path(value)
        for input_label, input_path in given_inputs:
            if _same_file(path, input_path):
                raise UsageError(
                    f"{label} {path} is {input_label}: writing it would destroy that file",
                    hint=f"give {label} another path")
        key = _identity(path)
        if key in seen:
            raise UsageError(f"{label} and {seen[key]} are the same file ({path})",
                             hint=f"give {label} another path")
        seen[key] = label
        _check_writable(label, path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and symlinks included
    except OSError:  # one of them does not exist yet
        return _identity(a) == _identity(b)


def _identity(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _check_writable(label: str, path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"{label} {path} is a folder", hint=f"give {label} a file path")
    # The nearest existing ancestor must be a folder we can create files in (the rest of
    # the path is created): tried for real, since permission bits do not tell for root,
    # a read-only file system or a full quota.
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{label} {path} lies under {ancestor}, which is a file, not a folder",
                         hint=f"give {label} a path in a folder")
    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as exc:
        raise UsageError(f"{label} {path}: cannot write in {ancestor} ({exc.strerror})",
                         hint=f"give {label} a path in a folder you can write to") from None


# --------------------------------------------------------------------------- what a run writes

REPRODUCER_SUFFIX = ".first_divergence"


def reproducer_paths(report: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``<report stem>.first_divergence.onnx`` and ``.npz`` next to ``report``."""
    report = Path(report)
    stem = report.with_suffix("").name + REPRODUCER_SUFFIX
    return report.with_name(stem + ".onnx"), report.with_name(stem + ".npz")


def export_path(output_dir: str | os.PathLike[str], stem: str) -> Path:
    """Where a diagnosis writes the ONNX file it exports itself."""
    return Path(output_dir) / f"{stem}.onnx"


def fp16_path(export: Path) -> Path:
    """Where a diagnosis writes the float16 file it makes from ``export``."""
    return export.with_name(export.stem + "_fp16.onnx")


def fp32_path(export: Path) -> Path:
    """Where a diagnosis of a float16 file exports the float32 model a fix is built from."""
    return export.with_name(export.stem + "_fp32.onnx")


def planned_outputs(stem: str, *, onnx: object, output_dir: str | os.PathLike[str],
                    fp16: bool, fix_fp16: object, report: object) -> dict[str, Path | None]:
    """Every file a diagnosis may write, by what the user calls it (for check_outputs)."""
    export = export_path(output_dir, stem)
    reproducer = reproducer_paths(report) if report is not None else (None, None)
    return {
        "the exported ONNX file": export if onnx is None else None,
        "the float32 ONNX file": fp32_path(export) if onnx is not None and fix_fp16 is not None
        else None,
        # Written only when --onnx is float32: checked when that is known (pipeline._as_fp16).
        "the float16 ONNX file": fp16_path(export) if onnx is None and fp16 else None,
        "--fix-fp16": Path(fix_fp16) if fix_fp16 is not None else None,
        "the reproducer's .onnx": reproducer[0],
        "the reproducer's .npz": reproducer[1],
    }


def given_inputs(model: object, onnx: object, inputs: Iterable[object], *,
                 weights: object = None) -> list:
    """A run's input files, as check_inputs and check_outputs take them. ``model`` is
    the file the model is read from (an entry point's .py file: models.model_file)."""
    return [("the model", model), ("the --onnx file", onnx), ("the --weights file", weights),
            *(("an --input file", path) for path in inputs)]
