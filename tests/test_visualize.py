"""Overlays: uint8/LUT maths against pytorch-grad-cam's float formula (show_cam_on_image)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from onnxcam.visualize import bounded, encode_png, overlay


def show_cam_on_image(image_rgb: np.ndarray, mask: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """pytorch-grad-cam's formula (utils/image.py), in float: heat = JET(uint8(255 m)),
    (1 - w) img + w heat, divided by its max."""
    heat = cv2.applyColorMap(np.uint8(255 * mask), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    cam = (1 - weight) * image_rgb.astype(np.float32) / 255 + weight * heat
    return np.uint8(255 * cam / np.max(cam) + 0.5)


@pytest.mark.parametrize("brightness", [255, 60, 4])
def test_overlay_matches_the_float_formula(brightness):
    rng = np.random.default_rng(brightness)
    picture = rng.integers(0, brightness, (90, 120, 3)).astype(np.uint8)
    small = rng.random((7, 7)).astype(np.float32)
    small /= small.max()
    mask = cv2.resize(small, (120, 90), interpolation=cv2.INTER_LINEAR).clip(0, 1)
    expected = show_cam_on_image(picture, mask).astype(int)
    got = overlay(picture, small)
    assert got.dtype == np.uint8 and got.shape == picture.shape
    difference = np.abs(got.astype(int) - expected)
    # two roundings (the uint8 blend, then the LUT's x 255/max): at most 1 level, 2 on dark images
    assert difference.max() <= (1 if brightness > 100 else 2) and difference.mean() < 0.8
    np.testing.assert_array_equal(overlay(picture.astype(np.float32), small), got)  # float input, same


def test_overlay_size_bounds_what_is_drawn():
    picture = np.full((300, 800, 3), 128, np.uint8)
    heatmap = np.linspace(0, 1, 49, dtype=np.float32).reshape(7, 7)
    assert overlay(picture, heatmap, max_side=200).shape == (75, 200, 3)
    assert overlay(picture, heatmap, max_side=1000).shape == (300, 800, 3)
    assert bounded(picture, None) is picture
    png = cv2.imdecode(np.frombuffer(encode_png(overlay(picture, heatmap)), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(png[..., ::-1], overlay(picture, heatmap))  # RGB in, RGB back
