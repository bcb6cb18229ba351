"""Rule: an exporter crashed or failed and layerdiff used the other one (DIVERGENCES #25,
informational).

1. Fires when an export note (``onnx.notes``) says "the X exporter crashed / failed /
   timed out / wrote an unreadable file; exported with the Y exporter instead".
2. The file diagnosed is then Y's, not the one the user asked for: node names,
   decompositions and the opset can differ, and the user's own export with X fails the
   same way (a crash kills the process without a Python error).
"""

from __future__ import annotations

import re

from ..records import Diagnosis, Suggestion
from . import Rule

RULE_ID = "export_crash"
TITLE = "An exporter crashed or failed; the other one was used"

_FALLBACK = re.compile(r"^the (\w+) exporter (.+?); exported with the (\w+) exporter instead"
                       r"(?: \(its output is in ([^)]+)\))?")


def check(d: Diagnosis) -> Suggestion | None:
    notes = d.onnx.notes if d.onnx else ()
    found = next((m for m in map(_FALLBACK.match, notes) if m), None)
    if found is None:
        return None
    failed, reason, used, log = found.groups()
    crashed = reason.startswith("crashed") or reason.startswith("timed out")
    detail = (f"The {failed} exporter {reason}; layerdiff exported with the {used} exporter "
              f"instead, so this diagnosis is of the {used} exporter's file (opset "
              f"{d.onnx.opset}). A {failed} export can name, decompose and version the graph "
              "differently: a verdict here does not vouch for it.")
    if crashed:
        detail += (f" A crash ends the process without a Python error: a script that runs "
                   f"the {failed} export in-process dies with it (layerdiff ran each export "
                   "in a child process).")
    if log:
        detail += f" The {failed} exporter's output is in {log}."
    fix = (f"Deploy the {used} export (torch.onnx.export(..., dynamo={used == 'dynamo'})), "
           f"or diagnose the {failed} exporter's file with --onnx once it exports. "
           + ("Run exports in a separate process and report the crash to PyTorch with the "
              "log." if crashed else f"Read the {failed} exporter's error (often an unsupported "
                                     "op or opset) and change the opset or the model."))
    return Suggestion(RULE_ID, TITLE, detail, fix, ())


RULE = Rule(RULE_ID, TITLE, check)
