"""layerdiff: find the first layer where an ONNX export disagrees with its PyTorch model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import LayerdiffError  # noqa: E402

__all__ = ["diagnose", "convert", "Conversion", "Options", "Diagnosis", "FirstDivergence",
           "LayerResult", "Suggestion", "InputSpec", "InputKind", "Verdict", "LayerStatus", "DivergenceKind",
           "LayerdiffError", "__version__"]

# (The module is converting.py, not convert.py: importing a submodule sets the package
# attribute of its name, which would hide the function convert.)
# The rest needs torch, which takes seconds to import: loaded on first use (PEP 562), so
# that `layerdiff --help` and argument errors answer at once.
_LAZY = {"diagnose": "pipeline", "convert": "converting", "Conversion": "converting",
         "Options": "options", "Diagnosis": "records",
         "FirstDivergence": "records", "LayerResult": "records", "Suggestion": "records",
         "InputSpec": "records", "InputKind": "records", "Verdict": "records",
         "LayerStatus": "records", "DivergenceKind": "records"}

if TYPE_CHECKING:
    from .converting import Conversion, convert
    from .options import Options
    from .pipeline import diagnose
    from .records import (Diagnosis, DivergenceKind, FirstDivergence, InputKind, InputSpec,
                          LayerResult, LayerStatus, Suggestion, Verdict)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'layerdiff' has no attribute '{name}'")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
