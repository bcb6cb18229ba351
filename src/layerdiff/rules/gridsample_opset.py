"""Rule: GridSample needs opset 16 (DIVERGENCES #5).

1. Fires when the exporter asked for failed on grid_sample (``onnx.fallback``: its
   error names torch's ``aten::grid_sampler``): the legacy exporter refuses it below opset 16 and layerdiff
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
_ASKED = re.compile(r"opset(?: version)? (\d+) is not supported")


def check(d: Diagnosis) -> Suggestion | None:
    fallback = d.onnx.fallback if d.onnx else None
    if fallback is None or not _NOTE.search(fallback.reason):  # the exporter's own words
        return None
    note = f"the {fallback.failed} exporter {fallback.reason}"
    found = _ASKED.search(fallback.reason)
    asked = d.onnx.asked_opset if d.onnx.asked_opset is not None else (
        int(found.group(1)) if found else None)
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
