"""layerdiff: find the first layer where an ONNX export disagrees with its PyTorch model."""

__version__ = "0.1.0"

from .errors import LayerdiffError  # noqa: E402
from .pipeline import diagnose  # noqa: E402
from .records import Diagnosis, FirstDivergence, LayerResult, Suggestion  # noqa: E402

__all__ = ["diagnose", "Diagnosis", "FirstDivergence", "LayerResult", "Suggestion",
           "LayerdiffError", "__version__"]
