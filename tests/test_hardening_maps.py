"""All-zero activations or gradients: every method gives an all-zero map (never NaN) and an
OnnxcamWarning; the CLI shows it as one ``warning:`` line."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcam import Explainer
from onnxcam.errors import OnnxcamWarning
from onnxcam.methods import METHODS
from tests.tiny_models import conv_classifier

X = np.random.default_rng(5).random((2, 3, 16, 16)).astype(np.float32)


def _with(model: onnx.ModelProto, name: str, change) -> onnx.ModelProto:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()), name))
    return model


def dead_features() -> onnx.ModelProto:
    """The ReLU6 layer 'features' is 0 everywhere (a bias far below zero): A = 0 and G = 0."""
    return _with(conv_classifier(), "b2", lambda b: np.full_like(b, -100.0))


def ignored_class() -> onnx.ModelProto:
    """Class 2's logit does not read the features (its row of the head is zero): G = 0, A > 0."""
    def zero_row(w):
        w[2] = 0
        return w
    return _with(conv_classifier(), "fc_w", zero_row)


def _explain(model, method):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Explainer(model, cache=False).explain(X, method, targets=2, steps=4, samples=3)
    return result.heatmaps, [w for w in caught if issubclass(w.category, OnnxcamWarning)]


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.kind != "attention"])  # CNN methods; attention needs a transformer
def test_zero_activations_give_zero_maps_and_a_warning(method):
    maps, caught = _explain(dead_features(), method)
    assert np.isfinite(maps).all()
    assert not maps.any(), f"{method}: {maps.max()}"
    assert len(caught) == len(X)
    assert f"the {method} map of image 0 is all zero" in str(caught[0].message)
    if METHODS[method].kind != "pixel":
        assert "the activation at features is zero" in str(caught[0].message)


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.kind in ("gradient", "pixel")]
                         + ["cam", "ablationcam"])
def test_a_zero_gradient_gives_zero_maps_and_a_warning(method):
    """Every method that weighs by the target's gradient (or its head weights, or its score
    drops) gives nothing for a class that ignores the layer. (Score-CAM and Eigen-CAM do not:
    a constant score softmaxes to equal weights, and Eigen-CAM reads A only.)"""
    maps, caught = _explain(ignored_class(), method)
    assert np.isfinite(maps).all() and not maps.any(), f"{method}: {maps.max()}"
    assert len(caught) == len(X)
    if METHODS[method].kind == "gradient":
        assert "the gradient of the target's score at features is zero" in str(caught[0].message)


def test_maps_stay_nonzero_and_silent_normally():
    with warnings.catch_warnings():
        warnings.simplefilter("error", OnnxcamWarning)
        maps = Explainer(conv_classifier(), cache=False).explain(X, "gradcam", targets=1).heatmaps
    assert maps.max(axis=(1, 2)).min() > 0.99


def test_the_cli_prints_the_warning_as_one_line(tmp_path):
    model = tmp_path / "dead.onnx"
    onnx.save(dead_features(), model)
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), (X[0].transpose(1, 2, 0) * 255).astype(np.uint8))
    # a fresh process: pytest would capture the warning itself
    done = subprocess.run([sys.executable, "-m", "onnxcam.cli", "explain", str(model), str(image), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "warnings.warn" not in done.stderr
    warning_lines = [l for l in done.stderr.splitlines() if l.startswith("warning: ")]
    assert warning_lines == ["warning: the gradcam map of image 0 is all zero: the activation at features is "
                             "zero; try another layer, target or method"]


def test_negative_evidence_is_named_as_such():
    """Class 2's head row is negative: every Grad-CAM weight is < 0 and the features are >= 0
    (ReLU6), so the map is zero although nothing is: the warning says so."""
    model = _with(conv_classifier(), "fc_w", lambda w: np.where(np.arange(len(w))[:, None] == 2, -np.abs(w), w))
    maps, caught = _explain(model, "gradcam")
    assert not maps.any() and len(caught) == len(X)
    assert "nothing at features speaks for the target" in str(caught[0].message)


def test_aug_smooth_warns_about_the_mean_map_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Explainer(dead_features(), cache=False).explain(X, "gradcam", aug_smooth=True)
    assert len([w for w in caught if issubclass(w.category, OnnxcamWarning)]) == len(X)  # not 6 x
