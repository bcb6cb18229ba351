"""Rule: Resize / interpolate modes that torch and ONNX compute differently (DIVERGENCES #1-4).

1. Fires when a Resize node is among the first divergence's suspects.
2. Reads its attributes and the torch module's: nearest mode (rows or columns one pixel
   off at non-integer scales), the coordinate transformation mode against
   ``align_corners``, antialiasing, and the bicubic coefficient.
"""

from __future__ import annotations

from ..records import Diagnosis, Suggestion
from . import Rule
from ._helpers import suspects, where


def check(d: Diagnosis) -> Suggestion | None:
    nodes = suspects(d, "Resize")
    if not nodes:
        return None
    attrs = nodes[0].attrs
    torch_attrs = d.first_divergence.torch_attrs if d.first_divergence else {}
    mode = str(attrs.get("mode", "nearest"))
    coord = str(attrs.get("coordinate_transformation_mode", "half_pixel"))
    align_corners = torch_attrs.get("align_corners")
    if attrs.get("antialias") == 1:
        detail = ("The Resize antialiases (antialias=1); onnxruntime's antialiased filter "
                  "differs from torch's, by up to ~0.2 on images.")
        fix = "Resize without antialias, or pass size= / recompute_scale_factor=True when exporting."
    elif mode == "nearest":
        detail = (f"Nearest-neighbour Resize (nearest_mode={attrs.get('nearest_mode', 'round_prefer_floor')}, "
                  f"coordinate_transformation_mode={coord}). With a non-integer scale, torch and "
                  "onnxruntime round source coordinates differently, so whole rows or columns "
                  "come from the neighbouring pixel.")
        fix = ("Use an integer scale factor, mode='nearest-exact', or index explicitly "
               "(see onnxruntime#12098).")
    elif align_corners is not None and (coord == "align_corners") != bool(align_corners):
        detail = (f"torch interpolates with align_corners={align_corners} but the ONNX Resize "
                  f"uses coordinate_transformation_mode={coord}: a sub-pixel shift, worst at borders.")
        fix = ("Export with opset >= 11 so the mode is carried over "
               f"({'align_corners' if align_corners else 'half_pixel'}), see pytorch#22906.")
    elif mode == "cubic" and float(attrs.get("cubic_coeff_a", -0.75)) != -0.75:
        detail = (f"Bicubic Resize with cubic_coeff_a={attrs.get('cubic_coeff_a')}; torch uses -0.75.")
        fix = "Set cubic_coeff_a=-0.75 (and exclude_outside=0), see onnxruntime#28292."
    else:
        detail = (f"The first divergence involves a {mode} Resize "
                  f"(coordinate_transformation_mode={coord}). Resize attributes often differ "
                  "from torch's interpolate after conversion.")
        fix = ("Compare the Resize attributes with the interpolate call (mode, align_corners, "
               "scale or size) and export with opset >= 11.")
    return Suggestion("resize_mode", "Resize computes differently from torch's interpolate",
                      detail, fix, where(d))


RULE = Rule("resize_mode", "Resize computes differently from torch's interpolate", check)
