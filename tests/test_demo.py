"""The bundled demo: offline, self-contained, and class-discriminative on two-object images."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from onnxcam.cli import app
from onnxcam.demo import demo_dir
from onnxcam.explainer import Explainer
from onnxcam.images import load_image
from onnxcam.metrics import peak, pointing_hit
from onnxcam.visualize import resize_map


def _samples() -> list[dict]:
    return json.loads((demo_dir() / "samples" / "samples.json").read_text())


def test_bundled_model_is_small_and_self_describing():
    model = demo_dir() / "shapes.onnx"
    assert model.stat().st_size < 1_000_000
    explainer = Explainer(model, provider="cpu")
    assert explainer.labels() and explainer.preprocess().size == explainer.input_size
    assert any(len(s["objects"]) == 2 for s in _samples())


def test_demo_command_writes_index_and_overlays(tmp_path):
    result = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "demo"), "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    index = (tmp_path / "demo" / "index.html").read_text()
    images = re.findall(r'src="([^"]+)"', index)
    expected_maps = sum(max(1, len(s["objects"])) for s in _samples())
    assert len([i for i in images if i.endswith(".gradcam.png")]) == expected_maps
    for name in images:
        assert (tmp_path / "demo" / name).stat().st_size > 0
    assert "pointing game" in result.output.lower()


def _box_energy(heatmap: np.ndarray, box) -> float:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return float(heatmap[y1:y2, x1:x2].sum())


def _distance(point: tuple[int, int], box) -> float:
    x, y = point
    x1, y1, x2, y2 = box
    return float(np.hypot(max(x1 - x, 0, x - x2), max(y1 - y, 0, y - y2)))


def _two_object_maps(method: str):
    """(image name, explained object, other object, map at the image's size) for each class of
    each two-object sample, both classes explained in one call."""
    explainer = Explainer(demo_dir() / "shapes.onnx", provider="cpu")
    labels = explainer.labels()
    for sample in _samples():
        if len(sample["objects"]) != 2:
            continue
        picture = load_image(demo_dir() / "samples" / sample["image"])
        classes = [labels.index(o["label"]) for o in sample["objects"]]
        result = explainer.explain(explainer.preprocess()([picture]), method=method, targets=[classes])
        for slot, obj in enumerate(sample["objects"]):
            heatmap = resize_map(result.per_target[0, slot], picture.shape[:2])
            yield sample["image"], obj, sample["objects"][1 - slot], heatmap


def _separation(method: str) -> list[float]:
    """Share of each map's energy on the explained object's box, of that on both boxes."""
    shares = []
    for _, obj, other, heatmap in _two_object_maps(method):
        own, rival = _box_energy(heatmap, obj["box_xyxy"]), _box_energy(heatmap, other["box_xyxy"])
        shares.append(own / max(own + rival, 1e-9))
    return shares


def test_gradcam_separates_the_two_classes_better_than_the_vanilla_gradient():
    gradcam, saliency = _separation("gradcam"), _separation("saliency")
    print(f"own-object energy share: gradcam {np.mean(gradcam):.2f} (min {min(gradcam):.2f}), "
          f"saliency {np.mean(saliency):.2f} (min {min(saliency):.2f})")
    assert min(gradcam) > 0.5, "a class's Grad-CAM puts more energy on the other object"
    assert np.mean(gradcam) > np.mean(saliency)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_each_class_map_peaks_on_its_own_object(method):
    """On every two-object image, each class's map peaks nearer its own object than the other
    one, and (pointing game, 15 px) inside its own box for most of them."""
    hits = []
    for image, obj, other, heatmap in _two_object_maps(method):
        top = peak(heatmap)
        assert _distance(top, obj["box_xyxy"]) < _distance(top, other["box_xyxy"]), (image, obj["label"])
        hits.append(pointing_hit(heatmap, obj["box_xyxy"]))
    assert np.mean(hits) >= 0.75, hits
