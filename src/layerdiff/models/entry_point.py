"""Python entry points: MODEL given as ``path/to/file.py:NAME`` or ``package.module:NAME``
(the torch.hub / uvicorn convention), NAME naming an ``nn.Module`` instance, an
``nn.Module`` class built with no arguments, or a function returning a module.

Importing the user's code runs it; naming it on the command line is the user's choice to
run it. A string names an entry point only when it is not an existing path, so a file
with a colon in its name (or a Windows drive) stays a file. torch is imported where it is
used: the command line reads entry points (for output names) before torch is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError
from .common import one_line

if TYPE_CHECKING:
    from ..records import LoadedModel

_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
VERBOSE_HINT = "run with --verbose for the traceback"
_counter = itertools.count()


@dataclass(frozen=True)
class EntryPoint:
    """Where the module comes from: a .py file or an importable module, and NAME in it."""

    name: str  # "build", "zoo.build"
    file: Path | None = None  # the .py file, or None for an importable module
    module: str | None = None  # "package.module" when not a file

    @property
    def stem(self) -> str:
        """What output files are named after: NAME, lowercased, dots to underscores."""
        return self.name.lower().replace(".", "_")

    def __str__(self) -> str:
        return f"{self.file if self.file is not None else self.module}:{self.name}"


def parse(source: object) -> EntryPoint | None:
    """The entry point ``source`` names, or None when it is a model file's path."""
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if not text or ":" not in text or os.path.exists(text):
        return None
    where, _, name = text.rpartition(":")
    if not _NAME.fullmatch(name):
        return None
    if where.endswith(".py"):
        return EntryPoint(name=name, file=Path(where))
    if _NAME.fullmatch(where):
        return EntryPoint(name=name, module=where)
    return None


def load(entry: EntryPoint) -> LoadedModel:
    """Import the entry point's code, build its module, and put it in eval mode."""
    import torch

    from . import from_module

    code = _import_file(entry.file) if entry.file is not None else _import_module(entry.module)
    module = _build(entry, _attribute(entry, code), torch.nn.Module)
    notes: list[str] = []
    if any(layer.training for layer in module.modules()):
        module.eval()
        notes.append(f"{entry.name} gave a module in training mode; layerdiff put it in eval "
                     "mode, as it is deployed")
    from ..records import ModelKind

    loaded = from_module(module)
    return replace(loaded, path=entry.file, kind=ModelKind.ENTRY_POINT, stem=entry.stem,
                   notes=tuple(notes) + loaded.notes)


# --------------------------------------------------------------------------- importing


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ModelLoadError(f"entry point file not found: {path}",
                             hint="check the path before ':NAME' and the current directory")
    # A unique name: two files called model.py must not replace each other, nor a
    # module of the user's. It stays in sys.modules, where torch looks classes up.
    name = f"_layerdiff_entry_point_{next(_counter)}_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {path} as Python code",
                             hint="give a .py file before ':NAME'")
    code = importlib.util.module_from_spec(spec)
    sys.modules[name] = code
    # Its folder first on sys.path, so that it imports its neighbours as when run there.
    with _on_path(str(path.resolve().parent)):
        try:
            spec.loader.exec_module(code)
        except BaseException as error:
            sys.modules.pop(name, None)
            raise _import_failed(path.name, error) from error
    return code


def _import_module(name: str) -> ModuleType:
    # The current folder first on sys.path, as `python -m` and uvicorn do: the console
    # script alone does not put it there.
    with _on_path(os.getcwd()):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if missing and (name == missing or name.startswith(missing + ".")):
                raise ModelLoadError(
                    f"no Python module named '{name}' (entry point {name}:...)",
                    hint="check the name, and that its package is importable from here "
                    "(the current folder, PYTHONPATH or an installed package)",
                ) from None
            raise _import_failed(f"module {name}", error) from error
        except BaseException as error:
            raise _import_failed(f"module {name}", error) from error


class _on_path:
    """``folder`` first on sys.path while importing; removed afterwards."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __enter__(self) -> None:
        sys.path.insert(0, self.folder)

    def __exit__(self, *exc: object) -> None:
        try:
            sys.path.remove(self.folder)  # the first occurrence: ours
        except ValueError:  # the imported code removed it itself
            pass


def _import_failed(what: str, error: BaseException) -> ModelLoadError:
    if isinstance(error, KeyboardInterrupt):
        raise error
    if isinstance(error, ModuleNotFoundError) and error.name:
        return ModelLoadError(
            f"{what} imports '{error.name}', which is not installed",
            hint=f"install '{error.name.split('.')[0]}' in layerdiff's environment, or run "
            "layerdiff where it is importable (PYTHONPATH)")
    if isinstance(error, SystemExit):
        return ModelLoadError(f"importing {what} called sys.exit({error.code})",
                              hint="guard the script's main code with "
                              "if __name__ == '__main__':")
    return ModelLoadError(f"importing {what} raised {one_line(error)}", hint=VERBOSE_HINT)


# --------------------------------------------------------------------------- building


def _attribute(entry: EntryPoint, code: ModuleType) -> Any:
    value: Any = code
    for part in entry.name.split("."):
        if not hasattr(value, part):
            where = entry.file.name if entry.file is not None else f"module {entry.module}"
            candidates = _candidates(code)
            raise ModelLoadError(
                f"{where} has no '{entry.name}'",
                hint=("names there that may give a module: " + ", ".join(candidates))
                if candidates else "define a module, a module class or a function that "
                "returns one there, and name it after ':'")
        value = getattr(value, part)
    return value


def _candidates(code: ModuleType, limit: int = 6) -> list[str]:
    """Names in ``code`` that give an nn.Module: instances, classes, and its own functions."""
    import torch

    found = []
    for name, value in vars(code).items():
        if name.startswith("_"):
            continue
        if isinstance(value, torch.nn.Module) or (
                inspect.isclass(value) and issubclass(value, torch.nn.Module)
                and value.__module__ == code.__name__) or (
                inspect.isfunction(value) and value.__module__ == code.__name__):
            found.append(name)
    return found[:limit]


def _build(entry: EntryPoint, value: Any, module_type: type) -> Any:
    if isinstance(value, module_type):
        return value
    if not callable(value):
        raise ModelLoadError(
            f"{entry.name} in {_where(entry)} is a {type(value).__name__}, not a torch.nn.Module "
            "or something that builds one",
            hint="name an nn.Module, an nn.Module class, or a function that returns a module")
    is_class = inspect.isclass(value)
    if is_class and not issubclass(value, module_type):
        raise ModelLoadError(
            f"{entry.name} in {_where(entry)} is the class {value.__name__}, not an "
            "nn.Module class",
            hint="name an nn.Module, an nn.Module class, or a function that returns a module")
    try:
        module = value()
    except KeyboardInterrupt:
        raise
    except BaseException as error:
        call = f"{value.__name__}()" if is_class else f"{entry.name}()"
        raise ModelLoadError(
            f"{call} in {_where(entry)} raised {one_line(error)}",
            hint=("the class is built with no arguments: name a function that builds it "
                  "instead; " if is_class and isinstance(error, TypeError) else "")
            + VERBOSE_HINT,
        ) from error
    if not isinstance(module, module_type):
        raise ModelLoadError(
            f"{entry.name}() in {_where(entry)} returned a {type(module).__name__}, "
            "not a torch.nn.Module",
            hint="return the model itself (an nn.Module)")
    return module


def _where(entry: EntryPoint) -> str:
    return entry.file.name if entry.file is not None else f"module {entry.module}"
