"""Small readers shared by the rules: which ops sit where in a diagnosis."""

from __future__ import annotations

from ..records import Diagnosis, OnnxNodeInfo


def suspects(d: Diagnosis, *op_types: str) -> list[OnnxNodeInfo]:
    """Nodes of these op types among the first divergence's suspects (its ONNX region)."""
    first = d.first_divergence
    if first is None:
        return []
    found = [n for n in first.region if n.op_type in op_types]
    if not found and first.op_type in op_types:
        found = [OnnxNodeInfo(first.onnx_node, first.op_type, {})]
    return found


def where(d: Diagnosis) -> tuple[str, ...]:
    first = d.first_divergence
    return (first.module or first.onnx_node,) if first else ()
