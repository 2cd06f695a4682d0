"""Stage 5: show maps. Overlays follow pytorch-grad-cam's ``show_cam_on_image`` so pictures
look as users know them: ``heat = JET(uint8(255 * map))``, ``out = 0.5 * heat + 0.5 * image``,
then divided by its maximum."""

from __future__ import annotations

import cv2
import numpy as np


def resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [0, 1] map resized bilinearly to ``size`` = (H, W), staying in [0, 1]."""
    if heatmap.shape == tuple(size):
        return heatmap.astype(np.float32)
    resized = cv2.resize(heatmap.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


def overlay(image_rgb: np.ndarray, heatmap: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """RGB uint8 overlay of ``heatmap`` (any size, [0, 1]) on ``image_rgb`` ([0, 255])."""
    height, width = image_rgb.shape[:2]
    heat = cv2.applyColorMap(np.uint8(255 * resize_map(heatmap, (height, width))), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    blended = (1 - weight) * image_rgb.astype(np.float32) / 255.0 + weight * heat
    blended = blended / max(float(blended.max()), 1e-7)
    return np.uint8(np.round(255 * blended))


def encode_png(image_rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (encoded in memory so files can be written atomically)."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()
