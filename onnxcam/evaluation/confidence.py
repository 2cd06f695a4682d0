r"""Average Drop and Increase in Confidence (Chattopadhay et al., "Grad-CAM++", WACV 2018,
sec. 5.1): the score on the image masked by its map, :math:`O = f_c(x \odot L)`, against the
score on the image, :math:`Y = f_c(x)`:

.. math:: \mathrm{AverageDrop} = \frac{100}{N}\sum_i \frac{\max(0, Y_i - O_i)}{Y_i},\qquad
          \mathrm{IncreaseInConfidence} = \frac{100}{N}\sum_i [O_i > Y_i]

As pytorch-grad-cam's ``CamMultImageConfidenceChange``, ``x`` is the *preprocessed* input
(so a masked-out pixel becomes the normalization's zero, the data set's mean colour for
ImageNet presets) and :math:`L` the map at the input size. One extra forward pass per map.
"""

from __future__ import annotations

import numpy as np

from .scoring import ScoreModel


def confidence_change(model: ScoreModel, x: np.ndarray, heatmaps: np.ndarray, classes: np.ndarray,
                      original: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the relative drop ``max(0, Y - O) / Y`` (Average Drop's term, a fraction)
    and whether the confidence increased (``O > Y``). ``x`` (N, C, H, W), ``heatmaps``
    (N, H, W) at the input size; ``original`` the scores Y when already known."""
    if original is None:
        original = model(x, classes)
    masked = model(x * heatmaps[:, None].astype(np.float32), classes)
    safe = np.where(original > 0, original, np.nan)
    drop = np.maximum(0.0, original - masked) / safe
    return drop, masked > original
