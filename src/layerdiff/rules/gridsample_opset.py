"""Rule: GridSample needs opset 16 (DIVERGENCES #5).

1. Fires when an export note says an exporter failed on grid_sample (torch's
   ``aten::grid_sampler``): the legacy exporter refuses it below opset 16 and layerdiff
   fell back to the other exporter (the dynamo exporter, which writes opset 18), so the
   file diagnosed is not the one asked for.
2. Not reachable from a Diagnosis: a file that uses the standard GridSample with an
   opset below 16 does not load in onnxruntime ("No Op registered for GridSample with
   domain_version of 14"), and the pipeline returns an error diagnosis without running
   the rules; a contrib com.microsoft GridSample at opset 14 runs and matches torch.
"""

from __future__ import annotations

import re

from ..records import Diagnosis, Suggestion
from . import Rule
from ._helpers import where

RULE_ID = "gridsample_opset"
TITLE = "GridSample needs opset 16 or later"
OPSET = 16

_NOTE = re.compile(r"grid_?sampler?|gridsample", re.IGNORECASE)
_ASKED = re.compile(r"opset(?: version)? (\d+) (?:was asked for|is not supported)")


def check(d: Diagnosis) -> Suggestion | None:
    notes = d.onnx.notes if d.onnx else ()
    note = next((n for n in notes if _NOTE.search(n)), None)
    if note is None:
        return None
    asked = next((int(m.group(1)) for m in map(_ASKED.search, notes) if m), None)
    asked_text = f"opset {asked}" if asked is not None else f"an opset below {OPSET}"
    detail = (f"Exporting failed on grid_sample: {note}. torch's grid_sample becomes the ONNX "
              f"GridSample op, which exists from opset {OPSET}; at {asked_text} the exporter "
              f"refuses it. The file diagnosed here was written by the {d.onnx.exporter} "
              f"exporter at opset {d.onnx.opset}, not the one asked for.")
    return Suggestion(
        RULE_ID, TITLE, detail,
        f"Export with opset >= {OPSET} (torch.onnx.export(..., opset_version={OPSET}) or later; "
        "the dynamo exporter writes opset 18) and deploy on a runtime that supports it.",
        where(d))


RULE = Rule(RULE_ID, TITLE, check)
