"""The sweep's index: ``OUTDIR/index.json`` and ``OUTDIR/index.html`` (one self-contained page,
a table sortable by any column). Written atomically after every finished entry. Only
formatting here: the rows come from :mod:`layerdiff.sweep`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import atomic_write_text

SCHEMA = "layerdiff-sweep/1"
TEMPLATE = "sweep_index.html.j2"
VERDICTS = ("pass", "diverged", "error", "pending")


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {v: sum(row["verdict"] == v for row in rows) for v in VERDICTS}


def to_json_dict(summary: dict[str, Any], rows: list[dict[str, Any]], code: int) -> dict[str, Any]:
    return {"schema": SCHEMA, **summary, "total": len(rows), "counts": counts(rows),
            "exit_code": code, "entries": rows}


def write(outdir: Path, summary: dict[str, Any], rows: list[dict[str, Any]], code: int) -> None:
    data = to_json_dict(summary, rows, code)
    atomic_write_text(outdir / "index.json", json.dumps(data, indent=2))
    atomic_write_text(outdir / "index.html", render_html(data))


def render_html(data: dict[str, Any]) -> str:
    from .render import _env  # the report's Jinja environment: same filters, same folder

    return _env().get_template(TEMPLATE).render(data=data, rows=[_cells(r) for r in data["entries"]])


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    """What each column shows, and the key it sorts by."""
    error = row.get("error") or {}
    return {
        "row": row,
        "severity": VERDICTS.index(row["verdict"]) if row["verdict"] in VERDICTS else len(VERDICTS),
        "problem": error.get("message") or row.get("first_divergence") or "",
        "error_kind": error.get("kind") or "",
        "hint": error.get("hint") or "",
        "max_error_text": _number(row.get("max_output_error")),
        "seconds_text": "" if row.get("seconds") is None else f"{row['seconds']:.1f}",
        "memory_text": _memory(row.get("peak_memory")),
    }


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def _memory(value: int | None) -> str:
    from .store import human_bytes

    return "" if value is None else human_bytes(value)
