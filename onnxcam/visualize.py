"""Stage 5: show maps. Overlays follow pytorch-grad-cam's ``show_cam_on_image`` so pictures
look as users know them: ``heat = JET(uint8(255 * map))``, ``out = 0.5 * heat + 0.5 * image``,
then divided by its maximum.

The blend is computed on uint8 with OpenCV's saturating kernels and a 256-entry lookup table
for the final ``/ max`` (it equals the float formula to within one grey level plus the
rounding of the blend, see ``tests/test_visualize.py``): at full photo resolution the float
version cost more than the model (issue 13). ``max_side`` bounds the resolution of what is
drawn, so nothing is computed at a size that is not written.
"""

from __future__ import annotations

import cv2
import numpy as np


def resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [0, 1] map resized bilinearly to ``size`` = (H, W), staying in [0, 1]."""
    if heatmap.shape == tuple(size):
        return heatmap.astype(np.float32)
    resized = cv2.resize(heatmap.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


def bounded(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """``image`` shrunk (pixel area averaging) so its longer side is at most ``max_side``."""
    height, width = image.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return image
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image in [0, 255] (float or integer) as uint8, rounded and saturated."""
    if image.dtype == np.uint8:
        return image
    return cv2.convertScaleAbs(np.asarray(image, np.float32))


def overlay(image_rgb: np.ndarray, heatmap: np.ndarray, weight: float = 0.5,
            max_side: int | None = None) -> np.ndarray:
    """RGB uint8 overlay of ``heatmap`` (any size, [0, 1]) on ``image_rgb`` ([0, 255], uint8
    or float), at the image's size or shrunk to ``max_side``.

    ``heat = JET(uint8(255 m))`` (truncated, as pytorch-grad-cam), ``b = round((1 - w) image
    + w heat)`` in uint8, ``out = round(255 b / max(b))`` through a lookup table."""
    image = to_uint8(bounded(image_rgb, max_side))
    height, width = image.shape[:2]
    levels = np.multiply(resize_map(heatmap, (height, width)), 255.0, dtype=np.float32).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(image, 1.0 - weight, heat, weight, 0.0)
    peak = int(blended.max())
    if peak in (0, 255):
        return blended
    table = np.round(np.arange(256, dtype=np.float32) * (255.0 / peak)).clip(0, 255).astype(np.uint8)
    return cv2.LUT(blended, table)


#: zlib level 1, "up" row filter, Huffman coding only: on overlays ~0.8x the CPU of OpenCV's
#: default (level 1, "sub", RLE) for the same size; PNG encoding is the largest cost of
#: writing an overlay (issue 13).
#: (The filter flag is newer than OpenCV 4.8: without it, level 1 and Huffman only.)
PNG_PARAMS = ((cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY)
              + ((cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP) if hasattr(cv2, "IMWRITE_PNG_FILTER") else ()))


def encode_png(image_rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (encoded in memory so files can be written atomically)."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(to_uint8(image_rgb), cv2.COLOR_RGB2BGR), PNG_PARAMS)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()
