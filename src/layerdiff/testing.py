"""Assertions for test suites: ``assert_matches(model, onnx_path)`` fails a test with the
first divergence and the fix layerdiff suggests, instead of a bare "outputs differ"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .records import Diagnosis, Verdict


def assert_matches(model: Any, onnx_path: str | Path, **options: Any) -> Diagnosis:
    """Diagnose ``onnx_path`` against ``model`` (``diagnose()``'s model forms and
    options) and return the Diagnosis when it passes; otherwise raise AssertionError
    whose message names the first divergence (module, ONNX node, max error, kind) and
    the top suggestion's title and fix."""
    from .pipeline import diagnose

    diagnosis = diagnose(model, onnx_path, **options)
    if diagnosis.verdict == Verdict.PASS:
        return diagnosis
    raise AssertionError(failure_message(diagnosis))


def failure_message(d: Diagnosis) -> str:
    """What a failed assertion says: the verdict and first divergence, then the fix."""
    lines = [f"{d.onnx.path if d.onnx else 'the ONNX file'} does not match the model "
             f"({d.verdict})"]
    first = d.first_divergence
    if first is not None:
        error = "" if first.max_abs is None else f", max error {first.max_abs:.3g}"
        lines.append(f"first divergence: {first.module or '(outside the modules)'} -> ONNX node "
                     f"{first.onnx_node or '?'} ({first.op_type}){error}, {first.kind.value}")
        if first.message:
            lines.append(first.message)
    else:
        lines.append(d.error or d.summary)
    if d.suggestions:
        top = d.suggestions[0]
        lines.append(f"suggestion: {top.title}")
        lines.append(f"fix: {top.fix}")
    return "\n".join(lines)
