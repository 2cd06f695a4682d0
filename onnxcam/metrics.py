"""Stage 5 (measure): kept for compatibility; the metrics live in :mod:`onnxcam.evaluation`
(the pointing game in :mod:`onnxcam.evaluation.pointing`)."""

from .evaluation.pointing import peak, pointing_hit

__all__ = ["peak", "pointing_hit"]
