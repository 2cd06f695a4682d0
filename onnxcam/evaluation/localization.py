r"""Weakly supervised localization: a box (and a mask) from a map, and how well it fits.

* Grad-CAM paper (Selvaraju et al. 2017, sec. 4.1), after CAM (Zhou et al. 2016): binarize
  the map at 15 % of its maximum, take the bounding box of the largest connected segment;
  correct when its IoU with a ground-truth box is at least 0.5.
* MaxBoxAcc (Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right",
  CVPR 2020): the threshold is a hyperparameter that leaks supervision, so sweep it over
  ``[0, 1)`` in steps of 0.01 and report the best box accuracy,
  :math:`\max_\tau \frac1N \sum_i [\mathrm{IoU}(B_i(\tau), B_i^*) \ge \delta]`, with
  :math:`\delta = 0.5`; MaxBoxAccV2 averages :math:`\delta \in \{0.3, 0.5, 0.7\}` and takes the
  best box over *all* components, not only the largest.

Boxes are ``(x1, y1, x2, y2)`` in the map's pixel coordinates with exclusive right/bottom
edges: the box of pixels ``x0..x0+w-1`` is ``(x0, y0, x0 + w, y0 + h)``. Binarization is
``map > threshold * max(map)`` (OpenCV's ``THRESH_BINARY``, as Choe et al.'s code);
segments are 8-connected, the largest one has the most pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

Box = tuple[float, float, float, float]

#: Choe et al.'s threshold sweep (``cam_curve_interval = 0.01``).
SWEEP = np.round(np.arange(0.0, 1.0, 0.01), 2)


def binarize(heatmap: np.ndarray, threshold: float = 0.15) -> np.ndarray:
    """Boolean map of the pixels above ``threshold`` times the map's maximum (none for a map
    without a positive value)."""
    heatmap = np.asarray(heatmap, np.float32)
    top = float(heatmap.max()) if heatmap.size else 0.0
    if top <= 0:
        return np.zeros(heatmap.shape, bool)
    return heatmap > threshold * top


def _components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and OpenCV stats (x, y, w, h, area) of the 8-connected segments, background dropped."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    return labels, stats[1:count]


def box_from_map(heatmap: np.ndarray, threshold: float = 0.15) -> Box | None:
    """The weakly supervised box: around the largest segment of the map above ``threshold``
    times its maximum (ties: the first segment in row-major order); None for an all-zero map."""
    boxes = boxes_from_map(heatmap, threshold, largest_only=True)
    return boxes[0] if boxes else None


def boxes_from_map(heatmap: np.ndarray, threshold: float = 0.15, largest_only: bool = False) -> list[Box]:
    """Boxes of every segment (MaxBoxAccV2), or of the largest one only, largest first."""
    _, stats = _components(binarize(heatmap, threshold))
    if len(stats) == 0:
        return []
    order = np.argsort(-stats[:, cv2.CC_STAT_AREA], kind="stable")
    if largest_only:
        order = order[:1]
    return [(float(x), float(y), float(x + w), float(y + h)) for x, y, w, h, _ in stats[order]]


def pseudo_mask(heatmap: np.ndarray, threshold: float = 0.15, largest_only: bool = False) -> np.ndarray:
    """Binary pseudo-label (uint8 0/255) for the "CAM, threshold, use as cheap segmentation
    labels" workflow: the pixels above ``threshold`` times the max, or only its largest segment."""
    binary = binarize(heatmap, threshold)
    if largest_only and binary.any():
        labels, stats = _components(binary)
        binary = labels == 1 + int(np.argmax(stats[:, cv2.CC_STAT_AREA]))
    return np.where(binary, 255, 0).astype(np.uint8)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (continuous coordinates); 0 for empty boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def best_iou(predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]]) -> float:
    """The largest IoU between any predicted box and any ground-truth box (0 when either is empty)."""
    return max((iou(p, t) for p in predicted for t in truth), default=0.0)


def iou_curve(heatmap: np.ndarray, truth: Sequence[Sequence[float]], thresholds: np.ndarray = SWEEP,
              largest_only: bool = True) -> np.ndarray:
    """Best IoU with the ground truth at each binarization threshold: one image's row of the
    MaxBoxAcc sweep (largest segment only, or every segment for MaxBoxAccV2)."""
    return iou_curves(heatmap, truth, thresholds)[0 if largest_only else 1]


def iou_curves(heatmap: np.ndarray, truth: Sequence[Sequence[float]],
               thresholds: np.ndarray = SWEEP) -> tuple[np.ndarray, np.ndarray]:
    """Both sweeps of :func:`iou_curve` (largest segment, every segment) from one labelling
    per threshold."""
    largest, every = [], []
    for threshold in thresholds:
        boxes = boxes_from_map(heatmap, threshold)  # largest first
        largest.append(best_iou(boxes[:1], truth))
        every.append(best_iou(boxes, truth))
    return np.array(largest), np.array(every)


def max_box_acc(curves: np.ndarray, deltas: Sequence[float] = (0.5,)) -> float:
    """MaxBoxAcc from the images' IoU curves (N, T): the best over thresholds of the share of
    images with IoU >= delta, averaged over ``deltas`` ((0.3, 0.5, 0.7) with all-component
    curves gives MaxBoxAccV2)."""
    curves = np.asarray(curves, np.float64)
    return float(np.mean([(curves >= delta).mean(axis=0).max() for delta in deltas]))


def best_threshold(curves: np.ndarray, delta: float = 0.5, thresholds: np.ndarray = SWEEP) -> float:
    """The threshold at which MaxBoxAcc(delta) is reached (the smallest on ties)."""
    return float(thresholds[int(np.argmax((np.asarray(curves) >= delta).mean(axis=0)))])


def box_outputs(heatmap: np.ndarray, threshold: float, name: str) -> tuple[dict, dict[str, bytes]]:
    """``explain --boxes``: one map's weakly supervised box (for results.json: ``box_xyxy``,
    None for an all-zero map; ``threshold``; ``mask``) and its binary pseudo-mask PNG
    ``<name>.mask.png`` (255 inside, 0 outside), at the map's own size."""
    box = box_from_map(heatmap, threshold)
    ok, data = cv2.imencode(".png", pseudo_mask(heatmap, threshold))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    mask_name = f"{name}.mask.png"
    return ({"box_xyxy": list(box) if box else None, "threshold": threshold, "mask": mask_name},
            {mask_name: data.tobytes()})
