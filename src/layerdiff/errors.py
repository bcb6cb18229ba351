"""User-facing errors: each carries a one-line cause and a hint, and maps to exit code 2."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error message, uncoloured and cut to ``limit``:
    library errors run to paragraphs, a layerdiff error is one line."""
    text = _ANSI.sub("", str(error))
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not line and isinstance(error, BaseException):
        line = type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class LayerdiffError(Exception):
    """A problem the user can fix (bad file, unknown architecture, export failure...).

    The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits with code 2,
    without a traceback unless ``--verbose``.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ModelLoadError(LayerdiffError):
    """The model file could not be read or its architecture was not recognised."""


class UntrustedPickleError(ModelLoadError):
    """The file is a pickled Python object and loading it would execute code."""


class ExportError(LayerdiffError):
    """Every exporter failed to produce an ONNX file."""


class OnnxLoadError(LayerdiffError):
    """The ONNX file is missing, corrupt, or cannot be run by onnxruntime."""


class UsageError(LayerdiffError):
    """Arguments that do not fit together (bad shape string, missing input, ...)."""
