r"""Faithfulness as the Grad-CAM paper measures it (Selvaraju et al. 2017, sec. 5.3): the rank
correlation between a map and an occlusion-sensitivity map (Zeiler & Fergus, ECCV 2014).

Occlusion: a ``patch`` x ``patch`` window slides with ``stride`` over the preprocessed input,
is set to the baseline (``zeros`` by default, as captum's ``Occlusion``), and the window's
sensitivity is the score drop :math:`f_c(x) - f_c(x_{\setminus w})`. All windows of an image
run as batches through one session (``ceil((H - patch) / stride + 1)^2`` forward passes).

The correlation is Spearman's :math:`\rho` over the windows, between each window's
sensitivity and the map's mean inside the same window: both then describe the same regions.
"""

from __future__ import annotations

import numpy as np

from .curves import baseline_image
from .scoring import ScoreModel
from .stats import spearman


def window_starts(size: int, patch: int, stride: int) -> np.ndarray:
    """Window origins along one axis, the last one flush with the border."""
    patch = min(patch, size)
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return np.array(starts)


def occlusion_sensitivity(model: ScoreModel, image: np.ndarray, target: int, patch: int = 32,
                          stride: int = 16, baseline: str = "zeros", batch_size: int = 64,
                          original: float | None = None) -> np.ndarray:
    """(rows, cols) score drops of one image (C, H, W) for each window position."""
    channels, height, width = image.shape
    ys, xs = window_starts(height, patch, stride), window_starts(width, patch, stride)
    ph, pw = min(patch, height), min(patch, width)
    substrate = baseline_image(image, baseline)
    if original is None:
        original = float(model(image[None], target)[0])
    positions = [(y, x) for y in ys for x in xs]
    drops = []
    for first in range(0, len(positions), batch_size):
        chunk = positions[first:first + batch_size]
        batch = np.repeat(image[None], len(chunk), axis=0)
        for row, (y, x) in enumerate(chunk):
            batch[row, :, y:y + ph, x:x + pw] = substrate[:, y:y + ph, x:x + pw]
        drops.append(original - model(batch, target))
    return np.concatenate(drops).reshape(len(ys), len(xs))


def window_means(heatmap: np.ndarray, patch: int = 32, stride: int = 16) -> np.ndarray:
    """The map's mean inside each occlusion window (same grid as :func:`occlusion_sensitivity`)."""
    height, width = heatmap.shape
    ys, xs = window_starts(height, patch, stride), window_starts(width, patch, stride)
    ph, pw = min(patch, height), min(patch, width)
    integral = np.pad(np.cumsum(np.cumsum(heatmap.astype(np.float64), 0), 1), ((1, 0), (1, 0)))
    y0, x0 = ys[:, None], xs[None, :]
    sums = integral[y0 + ph, x0 + pw] - integral[y0, x0 + pw] - integral[y0 + ph, x0] + integral[y0, x0]
    return sums / (ph * pw)


def occlusion_correlation(heatmap: np.ndarray, sensitivity: np.ndarray, patch: int = 32, stride: int = 16) -> float:
    """Spearman's rho between the map's window means and the occlusion sensitivities."""
    return spearman(window_means(heatmap, patch, stride), sensitivity)
