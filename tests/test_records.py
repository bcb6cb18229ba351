"""Tests for layerdiff.records: closed sets are Enums that read as their plain values."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum

import jinja2
import pytest

from layerdiff import render
from layerdiff.records import (
    CaseKind, CaseResult, CaseVerdict, DivergenceKind, LayerStatus, RandomOp, Side, Verdict,
)

from test_render import make_diverged, make_rich, make_runtime_error


def test_member_reads_as_its_value():
    status = LayerStatus.NOT_RUN
    assert status == "not_run" and str(status) == f"{status}" == format(status) == "not_run"
    assert json.dumps({"status": status}) == '{"status": "not_run"}'
    assert jinja2.Environment(autoescape=True).from_string("{{ s }}").render(s=status) == "not_run"
    assert {"not_run": 1}[status] == 1


def test_plain_string_becomes_member_and_unknown_is_refused():
    case = CaseResult("random (seed 0)", (1, 3, 8, 8), "pass", "size")
    assert case.verdict is CaseVerdict.PASS and case.kind is CaseKind.SIZE
    # A Verdict of the Diagnosis is a CaseVerdict of the same value.
    assert dataclasses.replace(case, verdict=Verdict.DIVERGED).verdict is CaseVerdict.DIVERGED
    assert RandomOp("onnx", "/RandomNormalLike", "RandomNormalLike").side is Side.ONNX
    with pytest.raises(ValueError):
        CaseResult("random (seed 0)", (1, 3, 8, 8), "passed", "random")
    with pytest.raises(ValueError):
        dataclasses.replace(make_diverged().layers[0], status="failed")


@pytest.mark.parametrize("make", [make_diverged, make_runtime_error, make_rich])
def test_json_holds_plain_strings(make):
    """No Enum member reaches the JSON data: every closed-set value is a plain str."""
    d = make()
    j = render.to_json_dict(d)

    def walk(v):
        assert not isinstance(v, Enum), v
        if isinstance(v, dict):
            for k, x in v.items():
                assert type(k) is str
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(j)
    assert type(j["verdict"]) is str and j["verdict"] == "diverged"
    assert all(type(r["status"]) is str and type(r["method"]) is str for r in j["layers"])
    assert type(j["first_divergence"]["kind"]) is str
    assert j["first_divergence"]["kind"] in {k.value for k in DivergenceKind}
    assert type(j["model"]["kind"]) is str and type(j["onnx"]["exporter"]) is str
    assert j["first_divergence"]["layer"] == d.first_divergence.layer
    assert "layer_index" not in j["first_divergence"]


def test_coverage_counts_fused_by_field_not_wording():
    from layerdiff.records import Alignment, Unmatched

    alignment = Alignment(pairs=(), aliases=(), has_scopes=True, unmatched_onnx=(),
                          unmatched_torch=(Unmatched("act", "merged with conv", fused_into="/Conv"),
                                           Unmatched("crop", "fused into nothing: a reworded reason")))
    coverage = alignment.coverage()
    assert coverage["fused"] == 0.5 and coverage["unmatched"] == 0.5


def test_nonfinite_difference_is_a_field():
    import numpy as np

    from layerdiff.compare import compare

    ref = np.zeros(8, dtype=np.float32)
    cand = ref.copy()
    cand[3] = np.nan
    assert compare(ref, cand, rtol=1e-3, atol=1e-5).nonfinite_differs
    assert not compare(ref, ref, rtol=1e-3, atol=1e-5).nonfinite_differs
    ref[3] = np.nan  # in the same place on both sides: not a difference
    assert not compare(ref, cand, rtol=1e-3, atol=1e-5).nonfinite_differs
