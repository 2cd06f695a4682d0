"""onnxcam.evaluation against the numbers other tools compute on the same maps, images and
masks (tests/fixtures/evaluation, written by tools/check_evaluation.py): pytorch-grad-cam's
ROAD and confidence change, Quantus' PointingGame and RelevanceMassAccuracy, MaxBoxAcc as
Choe et al.'s wsolevaluation computes it, scipy's Spearman and scikit-image's SSIM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxcam.evaluation import localization as loc
from onnxcam.evaluation.pointing import energy_pointing, pointing_game
from onnxcam.evaluation.road import road
from onnxcam.evaluation.scoring import ScoreModel
from onnxcam.evaluation.stats import spearman, ssim
from onnxcam.explainer import Explainer

FIXTURES = Path(__file__).parent / "fixtures" / "evaluation"


@pytest.fixture(scope="module")
def fixture():
    reference = json.loads((FIXTURES / "reference.json").read_text())
    inputs = dict(np.load(FIXTURES / "inputs.npz"))
    inputs["maps"] = inputs["maps"].astype(np.float32)
    inputs["blobs"] = inputs["blobs"].astype(np.float32)
    return reference, inputs


@pytest.fixture(scope="module")
def model():
    return ScoreModel(Explainer(FIXTURES / "tiny.onnx", provider="cpu", cache=False), "logit")


def test_road_equals_pytorch_grad_cam(fixture, model):
    reference, inputs = fixture
    for n, (image, heatmap, target) in enumerate(zip(inputs["x"], inputs["maps"], inputs["classes"])):
        ours = road(model, image, heatmap, int(target), percentiles=reference["road_percentiles"], noise=0.0)
        # iterative vs exact solve: measured differences 3e-5 here
        assert ours["morf"] == pytest.approx(reference["road_morf"][n], abs=2e-4)
        assert ours["lerf"] == pytest.approx(reference["road_lerf"][n], abs=2e-4)
        assert ours["combined"] == pytest.approx(reference["road_combined"][n], abs=2e-4)
    assert np.ptp(reference["road_combined"]) > 0.1  # the values differ enough for this to mean something


def test_confidence_change_equals_pytorch_grad_cam(fixture, model):
    reference, inputs = fixture
    x, maps, classes = inputs["x"], inputs["maps"], inputs["classes"]
    change = model(x * maps[:, None], classes) - model(x, classes)  # what confidence_change compares
    np.testing.assert_allclose(change, reference["confidence_change"], atol=1e-4)


def test_pointing_and_mass_equal_quantus(fixture):
    reference, inputs = fixture
    hits = [pointing_game(m, [], s, tolerance=0) for m, s in zip(inputs["maps"], inputs["masks"])]
    assert hits == reference["quantus_pointing_game"] and any(hits) and not all(hits)
    mass = [energy_pointing(m, [], s) for m, s in zip(inputs["maps"], inputs["masks"])]
    np.testing.assert_allclose(mass, reference["quantus_relevance_mass_accuracy"], rtol=1e-5)


def test_max_box_acc_equals_the_contour_based_reference(fixture):
    """Choe et al. box the largest *contour* of a uint8 map, onnxcam the largest 8-connected
    segment of the float map: on these maps both give the same MaxBoxAcc and V2."""
    reference, inputs = fixture
    truth = reference["box_truth"]
    largest = np.stack([loc.iou_curve(m, [t]) for m, t in zip(inputs["blobs"], truth)])
    every = np.stack([loc.iou_curve(m, [t], largest_only=False) for m, t in zip(inputs["blobs"], truth)])
    assert loc.max_box_acc(largest) == pytest.approx(reference["maxboxacc_choe"])
    assert loc.max_box_acc(every, (0.3, 0.5, 0.7)) == pytest.approx(reference["maxboxacc_v2_choe"])


def test_spearman_and_ssim_equal_scipy_and_scikit_image(fixture):
    reference, inputs = fixture
    maps = inputs["maps"]
    tied = np.roll(np.round(maps * 8) / 8, 1, axis=0)
    np.testing.assert_allclose([spearman(a, b) for a, b in zip(maps, tied)], reference["scipy_spearman"], atol=1e-9)
    blobs = inputs["blobs"]
    np.testing.assert_allclose([ssim(a, b) for a, b in zip(blobs, np.roll(blobs, 1, axis=0))],
                               reference["skimage_ssim"], atol=2e-3)
