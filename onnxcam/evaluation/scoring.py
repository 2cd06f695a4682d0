"""Class scores of perturbed inputs, batched through one onnxruntime session.

Every faithfulness metric feeds the model many perturbed copies of an image and reads one
class's score from each. :class:`ScoreModel` does that through the explainer's forward
session in batches of ``batch_size``, works in NCHW whatever the model's layout, and counts
the forward passes so each metric's cost can be reported.
"""

from __future__ import annotations

import numpy as np

from ..explainer import Explainer

SCORES = ("probability", "logit")


class ScoreModel:
    """``model(x, classes)`` -> (B,) scores of ``classes`` (B,) for a batch ``x`` (B, C, H, W) of
    preprocessed inputs: the softmax probability (default, as RISE and the Grad-CAM++ paper's
    confidence) or the raw logit."""

    def __init__(self, explainer: Explainer, score: str = "probability", batch_size: int | None = None):
        if score not in SCORES:
            from ..errors import OnnxcamError
            raise OnnxcamError(f"unknown score '{score}': choose one of {', '.join(SCORES)}")
        self.explainer = explainer
        self.score = score
        self.batch_size = batch_size or explainer.batch_size
        self.passes = 0

    def to_model(self, x: np.ndarray) -> np.ndarray:
        """NCHW -> the model's input layout."""
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1) if self.explainer.input_layout == "NHWC" else x,
                                    dtype=np.float32)

    def to_nchw(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.explainer.input_layout == "NHWC" else x,
                                    dtype=np.float32)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(B, classes) logits of an NCHW batch, run ``batch_size`` at a time."""
        rows = [self.explainer.forward(self.to_model(x[start:start + self.batch_size]))[self.explainer.logits_name]
                for start in range(0, len(x), self.batch_size)]
        self.passes += len(x)
        return np.concatenate(rows).astype(np.float64)

    def __call__(self, x: np.ndarray, classes: np.ndarray | int) -> np.ndarray:
        logits = self.logits(x)
        classes = np.broadcast_to(np.asarray(classes, np.int64), (len(x),))
        if self.score == "logit":
            return logits[np.arange(len(x)), classes]
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        return probabilities[np.arange(len(x)), classes]
