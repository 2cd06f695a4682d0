r"""Deletion and insertion (Petsiuk et al., "RISE", BMVC 2018, sec. 4.1).

Pixels are ranked by the map, most important first. *Deletion* replaces them, ``step`` at a
time, by a baseline and records the class score after each step; a good map makes the score
fall fast (low area under the curve). *Insertion* starts from the baseline and puts the
pixels back; the score should rise fast (high area). With fractions :math:`t_k` of pixels
changed and scores :math:`s_k`, :math:`\mathrm{AUC} = \sum_k (t_{k+1} - t_k)(s_k + s_{k+1})/2`
(RISE's ``auc``, trapezoids over :math:`t \in [0, 1]`).

Baselines (in the preprocessed input's space): ``zeros`` (RISE's deletion substrate),
``blur`` (a Gaussian blur, kernel 11, sigma 5: RISE's insertion substrate), ``mean`` (each
channel's mean over the image). All steps of an image go through the session as batches.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import OnnxcamError
from .scoring import ScoreModel

BASELINES = ("zeros", "blur", "mean")


def baseline_image(image: np.ndarray, kind: str) -> np.ndarray:
    """The substrate for one preprocessed image (C, H, W)."""
    if kind == "zeros":
        return np.zeros_like(image)
    if kind == "mean":
        return np.broadcast_to(image.mean(axis=(1, 2), keepdims=True), image.shape).astype(image.dtype)
    if kind == "blur":
        return np.stack([cv2.GaussianBlur(channel, (11, 11), 5, borderType=cv2.BORDER_REFLECT)
                         for channel in image.astype(np.float32)])
    raise OnnxcamError(f"unknown baseline '{kind}': choose one of {', '.join(BASELINES)}")


def auc(fractions: np.ndarray, scores: np.ndarray) -> float:
    """Trapezoidal area under ``scores`` over ``fractions`` (0 to 1)."""
    fractions = np.asarray(fractions, np.float64)
    scores = np.asarray(scores, np.float64)
    return float(np.sum(np.diff(fractions) * (scores[1:] + scores[:-1]) / 2.0))


def perturbation_curve(model: ScoreModel, image: np.ndarray, heatmap: np.ndarray, target: int,
                       mode: str = "deletion", step: int = 224, baseline: str = "zeros",
                       batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(fractions, scores) of one image (C, H, W) and its map (H, W) at the input size:
    ``ceil(HW / step) + 1`` points, from the untouched start to every pixel changed.

    Ties in the map are broken by pixel order (row-major), so a constant map removes pixels
    row by row."""
    if mode not in ("deletion", "insertion"):
        raise OnnxcamError(f"unknown curve '{mode}': deletion or insertion")
    channels, height, width = image.shape
    total = height * width
    order = np.argsort(-heatmap.astype(np.float64).ravel(), kind="stable")
    counts = np.unique(np.r_[np.arange(0, total, max(1, int(step))), total])
    substrate = baseline_image(image, baseline).reshape(channels, -1)
    start, finish = (image.reshape(channels, -1), substrate) if mode == "deletion" else \
        (substrate, image.reshape(channels, -1))
    # rank of each pixel in the order: pixel p is changed once `count > rank[p]`
    rank = np.empty(total, np.int64)
    rank[order] = np.arange(total)
    scores = []
    for first in range(0, len(counts), batch_size):
        chunk = counts[first:first + batch_size]
        changed = rank[None, :] < chunk[:, None]  # (B, HW)
        batch = np.where(changed[:, None, :], finish[None], start[None])
        scores.append(model(batch.reshape(len(chunk), channels, height, width), target))
    return counts / total, np.concatenate(scores)
