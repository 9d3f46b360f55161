"""Export: weights + architecture -> Paddle Inference, Paddle Serving (and optionally ONNX) model
directory with a manifest. See ``builder`` for the layout and ``cli`` for ``rexnet-export``."""
from .builder import ExportError, export_model

__all__ = ["ExportError", "export_model"]
