"""Rule: an exporter crashed or failed and layerdiff used the other one (DIVERGENCES #25,
informational).

1. Fires when the exporter asked for crashed, failed, timed out or wrote an unreadable
   file and layerdiff exported with the other one (``onnx.fallback``).
2. The file diagnosed is then Y's, not the one the user asked for: node names,
   decompositions and the opset can differ, and the user's own export with X fails the
   same way (a crash kills the process without a Python error).
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion
from . import Rule

RULE_ID = "export_crash"
TITLE = "An exporter crashed or failed; the other one was used"

def check(d: Diagnosis) -> Suggestion | None:
    found = d.onnx.fallback if d.onnx else None
    if found is None:
        return None
    failed, reason, used, log = found.failed, found.reason, d.onnx.exporter, found.log
    crashed = found.crashed
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
