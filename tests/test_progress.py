"""Progress: stages, and steps within them (PyTorch calls, ONNX segments)."""

from __future__ import annotations

import io

from conftest import SHAPE, make_model
from layerdiff import diagnose
from layerdiff.progress import TerminalProgress, stepper


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_terminal_progress_redraws_one_line_with_a_bar():
    stream, clock = io.StringIO(), Clock()
    progress = TerminalProgress(stream, clock)
    progress("loading model")
    clock.now += 2
    progress("input 1: PyTorch")
    progress.step(5, 0, "calls")  # within REDRAW of the stage line: not drawn
    clock.now += 1
    progress.step(6, 0, "calls")
    clock.now += 1
    progress.step(3, 12, "segments")
    progress.step(12, 12, "segments")  # the last step is always drawn
    progress.close()
    lines = stream.getvalue().split("\r")[1:]
    assert lines[0].startswith("layerdiff: [    0 s] loading model")
    assert lines[1].startswith("layerdiff: [    2 s] input 1: PyTorch")
    assert lines[2].rstrip() == "layerdiff: [    3 s] input 1: PyTorch  6 calls"
    assert lines[3].rstrip() == f"layerdiff: [    4 s] input 1: PyTorch  {'#' * 6}{'-' * 18} 3/12 segments"
    assert lines[4].rstrip() == f"layerdiff: [    4 s] input 1: PyTorch  {'#' * 24} 12/12 segments"
    assert stream.getvalue().endswith("\n") and "5 calls" not in stream.getvalue()
    # A shorter line blanks what the longer one before it left on screen.
    assert len(lines[2]) >= len(lines[1])


def test_stepper_only_for_progress_that_takes_steps():
    assert stepper(print, "calls") is None
    seen = []

    class Steps:
        def __call__(self, stage): ...

        def step(self, done, total, unit):
            seen.append((done, total, unit))

    stepper(Steps(), "segments", 4)(2)
    assert seen == [(2, 4, "segments")]


def test_a_diagnosis_reports_its_stages_and_steps(exported):
    stages, steps = [], []

    class Recorder:
        def __call__(self, stage):
            stages.append(stage)

        def step(self, done, total, unit):
            steps.append((stages[-1], done, total, unit))

    d = diagnose(make_model("compact"), exported("compact", "dynamo"), input_shape=SHAPE,
                 progress=Recorder())
    assert "input 1 (random (seed 0)): PyTorch" in stages
    assert "input 1 (random (seed 0)): onnxruntime" in stages
    calls = [(done, total) for stage, done, total, _ in steps
             if stage == "input 1 (random (seed 0)): PyTorch"]
    # One step per module call, counting up to all of them; the total is not known yet.
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert calls[-1] == (len(d.calls), 0)
    segments = [s for s in steps if s[0].endswith("onnxruntime")]
    assert segments and segments[-1][1] == segments[-1][2] and segments[-1][3] == "segments"
