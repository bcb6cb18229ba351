"""Rule: PixelShuffle exported with the wrong DepthToSpace layout (DIVERGENCES #22).

1. Fires when a DepthToSpace node among the first divergence's suspects has mode DCR.
2. torch's PixelShuffle orders channels as CRD; DCR puts the right values in the wrong
   places, a checkerboard pattern.
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion
from . import Rule
from ._helpers import suspects, where


def check(d: Diagnosis) -> Suggestion | None:
    nodes = [n for n in suspects(d, "DepthToSpace") if str(n.attrs.get("mode", "DCR")) == "DCR"]
    if not nodes:
        return None
    return Suggestion(
        rule="pixel_shuffle_layout",
        title="PixelShuffle exported as DepthToSpace in DCR order",
        detail=(f"DepthToSpace node '{nodes[0].name}' uses mode=DCR, but torch's PixelShuffle "
                "is CRD: the output holds the right values at the wrong positions, which "
                "shows as a checkerboard."),
        fix="Set the DepthToSpace mode to CRD (or export with torch.onnx.export, which does).",
        layers=where(d),
    )


RULE = Rule("pixel_shuffle_layout", "PixelShuffle exported as DepthToSpace in DCR order", check)
