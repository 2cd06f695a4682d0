"""Stage 5 (measure): how well a map agrees with where the object is.

Only the pointing game so far (Zhang et al., "Top-down neural attention by excitation
backprop", ECCV 2016): a hit when the map's maximum falls inside the object's box, grown by a
tolerance (15 px in the original protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(x, y) of the map's maximum (the first one in row-major order on ties)."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(x), int(y)


def pointing_hit(heatmap: np.ndarray, box_xyxy: Sequence[float], tolerance: float = 15.0) -> bool:
    """True when the peak of ``heatmap`` lies in ``box_xyxy`` grown by ``tolerance`` pixels.

    The box is in the heatmap's own pixel coordinates. An all-zero map never hits."""
    if not np.any(heatmap > 0):
        return False
    x, y = peak(heatmap)
    x1, y1, x2, y2 = box_xyxy
    return x1 - tolerance <= x <= x2 + tolerance and y1 - tolerance <= y <= y2 + tolerance
