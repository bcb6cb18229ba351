"""What a sweep runs: the entries of a folder of model files or of a manifest.

A folder gives one entry per model file at its top level (``.pth``, ``.pt``, ``.ckpt``,
``.bin``, ``.safetensors``), with ``<stem>.onnx`` beside it as its ``--onnx`` when there is
one. A manifest (JSON, CSV, YAML) lists entries with the keys ``model`` (required), ``onnx``,
``input_shape``, ``flags`` and ``name``; its relative paths are relative to the manifest.

Everything is checked before anything runs: a missing file, an unknown key, a name used
twice or one that is not a plain folder name is a UsageError naming the entry.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shlex
from pathlib import Path
from typing import Any

from .errors import UsageError

MODEL_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
MANIFEST_SUFFIXES = (".json", ".csv", ".yaml", ".yml")
KEYS = ("name", "model", "onnx", "input_shape", "flags")
RESERVED = {"index.html", "index.json"}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SOURCE_HINT = ("give a folder of model files (.pth, .pt, .ckpt, .bin, .safetensors) or a "
               "manifest (.json, .csv, .yaml) with a 'model' per entry")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # its folder under OUTDIR
    model: str  # an absolute path, or an entry point with an absolute .py file
    onnx: str | None
    flags: tuple[str, ...]  # this entry's own options, added after the sweep's


def read_source(source: str | Path, *, convert: bool) -> list[Entry]:
    """The entries SOURCE names, in order. ``convert``: ONNX files beside models are not
    used (convert makes its own), and a manifest entry naming one is an error."""
    path = Path(source)
    if not path.exists():
        raise UsageError(f"SOURCE {path} not found", hint=SOURCE_HINT)
    if path.is_dir():
        entries = _folder_entries(path, convert)
    elif path.suffix.lower() in MANIFEST_SUFFIXES:
        entries = _manifest_entries(path, convert)
    else:
        raise UsageError(f"SOURCE {path} is neither a folder nor a manifest "
                         f"({', '.join(MANIFEST_SUFFIXES)})", hint=SOURCE_HINT)
    if not entries:
        raise UsageError(f"SOURCE {path} lists no models", hint=SOURCE_HINT)
    return entries


def _folder_entries(folder: Path, convert: bool) -> list[Entry]:
    models = sorted(p for p in folder.iterdir()
                    if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)
    stems = [p.stem for p in models]
    entries = []
    for model in models:
        beside = model.with_suffix(".onnx")
        onnx = str(beside.resolve()) if beside.is_file() and not convert else None
        # a.pth and a.safetensors side by side: each keeps its suffix in its name
        wanted = model.stem if stems.count(model.stem) == 1 else model.name
        entries.append(Entry(_unique(_safe(wanted), entries), str(model.resolve()), onnx, ()))
    return entries


def _manifest_entries(manifest: Path, convert: bool) -> list[Entry]:
    rows = _manifest_rows(manifest)
    base = manifest.resolve().parent
    entries: list[Entry] = []
    for number, row in enumerate(rows, 1):
        where = f"{manifest.name}, entry {number}"
        if not isinstance(row, dict):
            raise UsageError(f"{where} is not an object with a 'model'", hint=SOURCE_HINT)
        unknown = sorted(set(row) - set(KEYS))
        if unknown:
            raise UsageError(f"{where} has unknown keys: {', '.join(map(str, unknown))}",
                             hint=f"the keys are {', '.join(KEYS)}")
        if not row.get("model"):
            raise UsageError(f"{where} has no 'model'", hint=SOURCE_HINT)
        model = _model_path(str(row["model"]), base, where)
        onnx = _file(str(row["onnx"]), base, where, "onnx") if row.get("onnx") else None
        if onnx and convert:
            raise UsageError(f"{where} names an ONNX file, and --convert makes its own",
                             hint="leave out 'onnx' for --convert, or sweep without --convert")
        flags = (*_shape_flags(row.get("input_shape"), where), *_flags(row.get("flags"), where))
        given = row.get("name")
        if given:
            name = str(given)
            if not _SAFE_NAME.fullmatch(name) or name in RESERVED:
                raise UsageError(f"{where}: name '{name}' is not a plain folder name",
                                 hint="use letters, digits, '.', '_' and '-' (up to 100), "
                                      "not starting with '.'")
            if any(e.name == name for e in entries):
                raise UsageError(f"{where}: name '{name}' is used twice",
                                 hint="give each entry its own name")
        else:
            name = _unique(_safe(_stem(model)), entries)
        entries.append(Entry(name, model, onnx, flags))
    taken = [e.name for e in entries]
    if len(set(taken)) != len(taken):  # a derived name met a later given one
        raise UsageError(f"{manifest.name}: an entry's name is used twice",
                         hint="give each entry a 'name'")
    return entries


def _manifest_rows(manifest: Path) -> list[Any]:
    suffix = manifest.suffix.lower()
    try:
        text = manifest.read_text(encoding="utf-8")
        if suffix == ".csv":
            return [{k: v for k, v in row.items() if v not in (None, "")}
                    for row in csv.DictReader(text.splitlines())]
        if suffix == ".json":
            data = json.loads(text)
        else:
            data = _yaml(manifest, text)
    except (UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"cannot read the manifest {manifest}: {error}",
                         hint=SOURCE_HINT) from None
    if isinstance(data, dict) and "entries" in data:
        data = data["entries"]
    if not isinstance(data, list):
        raise UsageError(f"the manifest {manifest} is not a list of entries",
                         hint="a list of objects, or an object with 'entries': [...]")
    return data


def _yaml(manifest: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise UsageError(f"{manifest.name} is YAML, and PyYAML is not installed",
                         hint="pip install pyyaml, or write the manifest as JSON or CSV") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(str(error).splitlines()[0]) from None


def _model_path(text: str, base: Path, where: str) -> str:
    """A model file, or an entry point: ``file.py:NAME`` (the file made absolute) or
    ``package.module:NAME`` (left as it is)."""
    if ":" in text and not (base / text).exists():
        file, _, name = text.rpartition(":")
        if file.endswith(".py"):
            return f"{_file(file, base, where, 'model')}:{name}"
        if "/" not in file and "\\" not in file:
            return text
    return _file(text, base, where, "model")


def _file(text: str, base: Path, where: str, key: str) -> str:
    path = (base / Path(text).expanduser()).resolve()
    if not path.is_file():
        raise UsageError(f"{where}: {key} {path} not found",
                         hint="paths in a manifest are relative to the manifest's folder")
    return str(path)


def _shape_flags(value: Any, where: str) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        value = [",".join(map(str, value))]
    shapes = value if isinstance(value, list) else [value]
    if not all(isinstance(s, str) for s in shapes):
        raise UsageError(f"{where}: input_shape {value!r} is not a shape",
                         hint="'1,3,64,64', [1, 3, 64, 64], or a list of 'NAME:D0,D1,...'")
    return tuple(flag for shape in shapes for flag in ("--input-shape", shape))


def _flags(value: Any, where: str) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return tuple(map(str, value))
    raise UsageError(f"{where}: flags {value!r} is not a list of options",
                     hint="'--seed 3 --samples 2' or [\"--seed\", \"3\"]")


def _stem(model: str) -> str:
    if ":" in Path(model).name:  # an entry point: named after NAME, as report's outputs are
        return model.rpartition(":")[2].replace(".", "_") or "model"
    return Path(model).stem


def _safe(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip("._-")[:100] or "model"
    return name if name not in RESERVED else f"{name}_"


def _unique(name: str, entries: list[Entry]) -> str:
    taken = {e.name for e in entries}
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate
