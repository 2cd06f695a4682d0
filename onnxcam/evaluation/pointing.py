"""Pointing games: does the map point at the object?

* Pointing game (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016):
  a hit when the map's maximum lies in a ground-truth box (or mask) grown by a tolerance,
  15 px in the original protocol; accuracy = hits / (hits + misses).
* Energy-based pointing game (Wang et al., "Score-CAM", CVPRW 2020, sec. 5.2): the share of
  the map's mass inside the boxes, :math:`\\sum_{(i,j) \\in B} L_{ij} / \\sum_{ij} L_{ij}`
  (Quantus: ``RelevanceMassAccuracy``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = Sequence[float]  # (x1, y1, x2, y2) in pixels of the map, x2/y2 exclusive edges


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(x, y) of the map's maximum (the first one in row-major order on ties)."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(x), int(y)


def pointing_hit(heatmap: np.ndarray, box_xyxy: Box, tolerance: float = 15.0) -> bool:
    """True when the peak of ``heatmap`` lies in ``box_xyxy`` grown by ``tolerance`` pixels.

    The box is in the heatmap's own pixel coordinates. An all-zero map never hits."""
    if not np.any(heatmap > 0):
        return False
    x, y = peak(heatmap)
    x1, y1, x2, y2 = box_xyxy
    return x1 - tolerance <= x <= x2 + tolerance and y1 - tolerance <= y <= y2 + tolerance


def region_mask(shape: tuple[int, int], boxes: Sequence[Box] = (), mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean (H, W): the pixels whose centres lie in any box, or in ``mask``; both when both."""
    height, width = shape
    region = np.zeros(shape, bool) if mask is None else np.asarray(mask, bool).copy()
    ys = np.arange(height) + 0.5
    xs = np.arange(width) + 0.5
    for x1, y1, x2, y2 in boxes:
        region |= ((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None, :]
    return region


def pointing_game(heatmap: np.ndarray, boxes: Sequence[Box] = (), mask: np.ndarray | None = None,
                  tolerance: float = 15.0) -> bool:
    """A hit when the peak lies within ``tolerance`` pixels of any box or of the mask's pixels
    (the original protocol's tolerance applied to both kinds of ground truth)."""
    if not np.any(heatmap > 0):
        return False
    if any(pointing_hit(heatmap, box, tolerance) for box in boxes):
        return True
    if mask is None or not np.any(mask):
        return False
    x, y = peak(heatmap)
    ys, xs = np.nonzero(mask)
    return bool(np.min((xs - x) ** 2 + (ys - y) ** 2) <= tolerance ** 2)


def energy_pointing(heatmap: np.ndarray, boxes: Sequence[Box] = (), mask: np.ndarray | None = None) -> float:
    """Share of the map's mass inside the boxes (and/or the mask); NaN for an all-zero map."""
    total = float(np.sum(heatmap, dtype=np.float64))
    if total <= 0:
        return float("nan")
    inside = region_mask(heatmap.shape, boxes, mask)
    return float(np.sum(heatmap[inside], dtype=np.float64) / total)
