"""Grad-CAM on a real ImageNet MobileNet and real photos: the map lands on the object."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from onnxcam.explainer import Explainer
from onnxcam.images import load_image
from onnxcam.visualize import resize_map
from tests.conftest import shared_file


@pytest.fixture(scope="module")
def explainer(mobilenet_v2):
    return Explainer(mobilenet_v2, provider="cpu")


def test_samoyed_is_predicted_and_gradcam_energy_lies_in_its_mask(explainer, imagenet_labels):
    image = load_image(shared_file("data/annotated/dog_segmentation.bmp"))
    mask = cv2.imread(str(shared_file("data/annotated/masks/dog_segmentation_mask.bmp")), cv2.IMREAD_UNCHANGED)
    dog = mask != 1  # Oxford-IIIT Pet trimap: 0 pet, 1 background, 2 border of the pet
    result = explainer.explain(explainer.preprocess("inception")([image]))
    assert imagenet_labels[int(result.targets[0])].startswith("Samoyed")
    heatmap = resize_map(result.heatmaps[0], mask.shape)
    inside = float(heatmap[dog].sum() / heatmap.sum())
    assert inside > 0.75, f"only {inside:.2f} of the map's energy lies on the dog"
    # and it is no accident of a flat map: the dog's mean heat beats the background's clearly
    assert heatmap[dog].mean() > 2 * heatmap[~dog].mean()


@pytest.mark.parametrize("photo, label", [("cat.bmp", "Egyptian cat"), ("parrot.jpg", "macaw")])
def test_documented_predictions(explainer, imagenet_labels, photo, label):
    image = load_image(shared_file(f"data/photos/{photo}"))
    result = explainer.explain(explainer.preprocess("inception")([image]))
    assert imagenet_labels[int(result.targets[0])] == label
    assert result.heatmaps.shape == (1, 224, 224)
    assert 0.0 <= result.heatmaps.min() and result.heatmaps.max() <= 1.0 and result.heatmaps.max() > 0.9


def test_gradcam_is_class_discriminative_on_a_real_photo(explainer):
    """Explaining another class moves the map: maps for top-1 and a far class differ."""
    image = load_image(shared_file("data/photos/pets.jpg"))
    x = explainer.preprocess("inception")([image])
    top = explainer.explain(x)
    second = int(np.argsort(top.logits[0])[-2])
    other = explainer.explain(x, targets=second)
    correlation = np.corrcoef(top.heatmaps[0].ravel(), other.heatmaps[0].ravel())[0, 1]
    assert correlation < 0.95
