"""onnxcam.evaluation metrics on cases whose answer is known in closed form (the comparisons
with other tools are in test_evaluation_reference.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxcam.errors import OnnxcamError
from onnxcam.evaluation import localization as loc
from onnxcam.evaluation import road as road_module
from onnxcam.evaluation.confidence import confidence_change
from onnxcam.evaluation.curves import auc, baseline_image, perturbation_curve
from onnxcam.evaluation.faithfulness import occlusion_correlation, occlusion_sensitivity, window_means
from onnxcam.evaluation.pointing import energy_pointing, pointing_game, pointing_hit, region_mask
from onnxcam.evaluation.road import linear_impute, road, road_keep_mask
from onnxcam.evaluation.sanity import cascading_randomization, cut_points, randomized, weight_layers
from onnxcam.evaluation.scoring import ScoreModel
from onnxcam.evaluation.stats import bootstrap_ci, rankdata, spearman, ssim
from onnxcam.explainer import Explainer
from onnxcam.images import load_image
from tests.tiny_models import build_model, conv_classifier

SIZE = 16


def box_map(shape=(40, 60), box=(10, 5, 30, 25), value=1.0) -> np.ndarray:
    heatmap = np.zeros(shape, np.float32)
    x1, y1, x2, y2 = box
    heatmap[y1:y2, x1:x2] = value
    return heatmap


# -- localization ------------------------------------------------------------------------------
def test_a_map_that_is_a_box_gives_that_box_and_iou_1():
    heatmap = box_map()
    assert loc.box_from_map(heatmap) == (10.0, 5.0, 30.0, 25.0)
    assert loc.iou(loc.box_from_map(heatmap), (10, 5, 30, 25)) == 1.0
    assert loc.pseudo_mask(heatmap).sum() == 255 * 20 * 20


def test_largest_segment_wins_and_threshold_is_a_fraction_of_the_max():
    heatmap = box_map(box=(0, 0, 10, 10), value=1.0) + box_map(box=(30, 10, 55, 35), value=0.5)
    assert loc.box_from_map(heatmap, 0.15) == (30.0, 10.0, 55.0, 35.0)  # 625 px beats 100 px
    assert loc.box_from_map(heatmap, 0.6) == (0.0, 0.0, 10.0, 10.0)  # 0.5 <= 0.6 * max drops it
    assert len(loc.boxes_from_map(heatmap, 0.15)) == 2
    only_largest = loc.pseudo_mask(heatmap, 0.15, largest_only=True)
    assert only_largest[:10, :10].max() == 0 and only_largest[10:35, 30:55].min() == 255
    assert loc.box_from_map(np.zeros((5, 5))) is None


def test_iou_by_hand():
    assert loc.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert loc.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert loc.best_iou([(0, 0, 10, 10)], [(20, 20, 30, 30), (0, 0, 10, 20)]) == pytest.approx(0.5)


def test_max_box_acc_sweeps_the_threshold():
    """A map that is 1 on the object and 0.4 on a ring around it: up to 0.4 the box is the
    ring's (IoU < 0.5; binarization is ``>``, and float32 0.4 exceeds 0.4), above it the
    object's (IoU 1). A fixed 0.15 misses,
    MaxBoxAcc finds the threshold."""
    heatmap = box_map((60, 60), (5, 5, 55, 55), 0.4)
    heatmap[25:35, 25:35] = 1.0
    truth = [(25, 25, 35, 35)]
    curve = loc.iou_curve(heatmap, truth)
    assert curve[loc.SWEEP <= 0.4].max() == pytest.approx(100 / 2500)
    assert np.all(curve[loc.SWEEP > 0.4] == 1.0)
    assert loc.max_box_acc(curve[None]) == 1.0
    assert loc.best_threshold(curve[None]) == 0.41
    assert loc.max_box_acc(np.array([[0.2, 0.6], [0.6, 0.2]])) == 0.5  # best single threshold over images
    assert loc.max_box_acc(np.array([[0.4, 0.6]]), deltas=(0.3, 0.5, 0.7)) == pytest.approx(2 / 3)


# -- pointing ----------------------------------------------------------------------------------
def test_pointing_game_with_tolerance_and_masks():
    heatmap = np.zeros((50, 50), np.float32)
    heatmap[20, 40] = 1.0  # peak at x=40, y=20
    assert pointing_hit(heatmap, (0, 0, 30, 30), tolerance=15.0)
    assert not pointing_hit(heatmap, (0, 0, 30, 30), tolerance=5.0)
    mask = np.zeros((50, 50), bool)
    mask[20, 30] = True  # 10 px left of the peak
    assert pointing_game(heatmap, [], mask, tolerance=10) and not pointing_game(heatmap, [], mask, tolerance=9)
    assert not pointing_game(np.zeros((5, 5)), [(0, 0, 5, 5)])


def test_energy_pointing_is_the_mass_share_inside():
    heatmap = np.ones((10, 10), np.float32)
    heatmap[:5, :5] = 3.0  # 25 px of 3 inside, 75 px of 1 outside
    assert energy_pointing(heatmap, [(0, 0, 5, 5)]) == pytest.approx(75 / 150)
    assert region_mask((10, 10), [(0, 0, 5, 5)]).sum() == 25
    assert np.isnan(energy_pointing(np.zeros((4, 4)), [(0, 0, 2, 2)]))


# -- statistics --------------------------------------------------------------------------------
def test_spearman_and_ranks():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert spearman(a, -a ** 3) == pytest.approx(-1.0)
    assert list(rankdata([10, 20, 20, 5])) == [2.0, 3.5, 3.5, 1.0]
    assert np.isnan(spearman(a, np.ones(200)))


def test_ssim_of_identical_and_inverted_maps():
    a = np.random.default_rng(1).random((40, 50))
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 1 - a) < 0


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(2)
    values = rng.normal(5.0, 2.0, size=400)
    mean, low, high = bootstrap_ci(values, resamples=4000)
    half = 1.96 * values.std() / np.sqrt(len(values))
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(mean - half, abs=0.05) and high == pytest.approx(mean + half, abs=0.05)
    assert bootstrap_ci([1.0, 1.0, float("nan"), None]) == (1.0, 1.0, 1.0)
    assert np.isnan(bootstrap_ci([])[0])


# -- perturbation metrics on a model whose score is known in closed form -------------------------
def region_model(region: np.ndarray, classes: int = 1):
    """logit_c = (c + 1) * mean over pixels of region * (sum of the 3 channels): linear in the
    input, so every perturbation's score is known by hand."""
    height, width = region.shape
    nodes = [
        helper.make_node("Conv", ["input", "ones"], ["summed"], name="sum_channels"),
        helper.make_node("Mul", ["summed", "region"], ["weighted"], name="weigh"),
        helper.make_node("Relu", ["weighted"], ["features"], name="relu"),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "scale"], ["logits"], name="fc"),
    ]
    return build_model(
        nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        {"ones": np.ones((1, 3, 1, 1), np.float32), "region": region[None, None].astype(np.float32),
         "scale": np.arange(1, classes + 1, dtype=np.float32)[None]})


@pytest.fixture(scope="module")
def whole_image_model():
    return ScoreModel(Explainer(region_model(np.ones((SIZE, SIZE))), provider="cpu", cache=False), "logit")


def test_a_constant_map_deletes_linearly(whole_image_model):
    """Every pixel is worth the same: with a zeros baseline the logit falls linearly from 3
    to 0 whatever the order, deletion AUC = insertion AUC = 3/2."""
    image = np.ones((3, SIZE, SIZE), np.float32)
    fractions, scores = perturbation_curve(whole_image_model, image, np.full((SIZE, SIZE), 0.5), 0,
                                           "deletion", step=SIZE, baseline="zeros")
    assert len(fractions) == SIZE + 1
    np.testing.assert_allclose(scores, 3 * (1 - fractions), atol=1e-5)
    assert auc(fractions, scores) == pytest.approx(1.5, abs=1e-5)
    fractions, scores = perturbation_curve(whole_image_model, image, np.zeros((SIZE, SIZE)), 0,
                                           "insertion", step=10, baseline="zeros")
    np.testing.assert_allclose(scores, 3 * fractions, atol=1e-5)  # 26 points, the last step partial
    assert auc(fractions, scores) == pytest.approx(1.5, abs=1e-5)


def test_deletion_removes_the_most_important_pixels_first():
    """Only a 4x8 region counts (area a = 1/8): the right map kills the score by t = a
    (AUC = 3a/2 of the full-image scale), the reversed map only at the end."""
    region = np.zeros((SIZE, SIZE))
    region[4:8, 4:12] = 1.0
    model = ScoreModel(Explainer(region_model(region), provider="cpu", cache=False), "logit")
    image = np.ones((3, SIZE, SIZE), np.float32)
    full = 3 * region.mean()  # the logit on the untouched image
    good = auc(*perturbation_curve(model, image, region, 0, "deletion", step=8))
    bad = auc(*perturbation_curve(model, image, 1 - region, 0, "deletion", step=8))
    area = region.mean()
    assert good == pytest.approx(full * area / 2, abs=1e-5)
    assert bad == pytest.approx(full * (1 - area) + full * area / 2, abs=1e-5)


def test_baselines():
    image = np.random.default_rng(3).normal(size=(3, 20, 20)).astype(np.float32)
    assert not baseline_image(image, "zeros").any()
    np.testing.assert_allclose(baseline_image(image, "mean")[:, 5, 7], image.mean(axis=(1, 2)), rtol=1e-5)
    blurred = baseline_image(image, "blur")
    assert blurred.shape == image.shape and blurred.std() < 0.5 * image.std()


def test_average_drop_and_increase_by_hand(whole_image_model):
    """Masking by a map m scales the logit by mean(m): drop = 1 - mean(m) with the logit score."""
    image = np.ones((2, 3, SIZE, SIZE), np.float32)
    maps = np.stack([np.full((SIZE, SIZE), 0.25, np.float32), np.ones((SIZE, SIZE), np.float32)])
    drop, increase = confidence_change(whole_image_model, image, maps, np.array([0, 0]))
    np.testing.assert_allclose(drop, [0.75, 0.0], atol=1e-6)
    assert not increase.any()
    drop, increase = confidence_change(whole_image_model, -image, maps, np.array([0, 0]),
                                       original=np.array([1.0, 1.0]))
    assert increase.tolist() == [False, False] and drop.tolist() == [1.0, 1.0]


def test_occlusion_sensitivity_finds_the_region_and_correlates_with_it():
    region = np.zeros((SIZE, SIZE))
    region[0:4, 8:16] = 1.0
    model = ScoreModel(Explainer(region_model(region), provider="cpu", cache=False), "logit")
    image = np.ones((3, SIZE, SIZE), np.float32)
    sensitivity = occlusion_sensitivity(model, image, 0, patch=4, stride=4)
    expected = window_means(region, 4, 4) * 3 * 16 / SIZE ** 2  # a window's share of the logit
    np.testing.assert_allclose(sensitivity, expected, atol=1e-6)
    assert occlusion_correlation(region, sensitivity, 4, 4) == pytest.approx(1.0)
    # window means against a brute-force loop, with a last window flush with the border
    heatmap = np.random.default_rng(4).random((10, 13))
    means = window_means(heatmap, 4, 3)
    starts_y, starts_x = [0, 3, 6], [0, 3, 6, 9]
    brute = np.array([[heatmap[y:y + 4, x:x + 4].mean() for x in starts_x] for y in starts_y])
    np.testing.assert_allclose(means, brute)


def test_linear_imputation_reproduces_a_plane_and_keeps_kept_pixels():
    """The 8-neighbour weighted mean is exact on linear images: a removed interior block of a
    plane is filled with the plane."""
    ys, xs = np.mgrid[0:30, 0:40]
    plane = np.stack([0.1 * xs + 0.2 * ys, -0.05 * xs + 1.0, 0.3 * ys]).astype(np.float32)
    keep = np.ones((30, 40), bool)
    keep[5:25, 8:30] = False
    filled = linear_impute(plane, keep, noise=0.0, tolerance=1e-9)
    np.testing.assert_allclose(filled, plane, atol=1e-4)
    noisy = linear_impute(plane, keep, noise=0.01, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(noisy[:, keep], plane[:, keep])
    assert 0.005 < np.std(noisy[:, ~keep] - plane[:, ~keep]) < 0.02


def test_sparse_lu_and_conjugate_gradients_impute_a_real_image_alike():
    """scipy's exact solve (the fast path) and the numpy CG path (scipy absent) solve the same
    system: CG run to 1e-10 agrees with it to 1e-5, noise included (same generator draws)."""
    pytest.importorskip("scipy.sparse.linalg", reason="scipy is optional: without it there is no sparse LU path")
    picture = load_image(Path(__file__).resolve().parents[1] / "models/demo/samples/circle_square.png")
    image = picture.transpose(2, 0, 1).astype(np.float32) / 255.0
    heatmap = cv2.GaussianBlur(np.random.default_rng(7).random(picture.shape[:2]), (0, 0), 8)
    for percentile, most in ((10, True), (50, False), (90, True)):
        keep = road_keep_mask(heatmap, percentile, most)
        exact = linear_impute(image, keep, rng=np.random.default_rng(1), solver="scipy")
        iterative = linear_impute(image, keep, rng=np.random.default_rng(1), solver="cg", tolerance=1e-10)
        np.testing.assert_allclose(exact, iterative, atol=1e-5)
        np.testing.assert_array_equal(exact[:, keep], image[:, keep])
    nothing_kept = np.zeros(picture.shape[:2], bool)  # no data: 0 from both, not a singular-matrix error
    for solver in ("scipy", "cg"):
        np.testing.assert_array_equal(linear_impute(image, nothing_kept, noise=0.0, solver=solver), 0.0)


def test_imputation_solver_errors_and_the_numpy_fallback(monkeypatch):
    image = np.ones((3, 20, 20), np.float32)
    keep = np.ones((20, 20), bool)
    keep[5:15, 5:15] = False
    with pytest.raises(OnnxcamError, match="unknown ROAD imputation solver 'lu'"):
        linear_impute(image, keep, solver="lu")
    monkeypatch.setattr(road_module, "scipy_available", lambda: False)
    with pytest.raises(OnnxcamError, match="needs scipy"):
        linear_impute(image, keep, solver="scipy")
    np.testing.assert_allclose(linear_impute(image, keep, noise=0.0), 1.0, atol=1e-4)  # auto: CG


def test_road_on_the_linear_model(whole_image_model):
    """On a constant image the imputation restores the constant: every ROAD change is 0."""
    image = np.ones((3, SIZE, SIZE), np.float32)
    heatmap = np.random.default_rng(6).random((SIZE, SIZE))
    scores = road(whole_image_model, image, heatmap, 0, percentiles=(20, 80), noise=0.0)
    assert scores == pytest.approx({"morf": 0.0, "lerf": 0.0, "combined": 0.0}, abs=1e-4)


# -- sanity check ------------------------------------------------------------------------------
def test_weight_layers_are_listed_from_the_logits_down_and_randomized_by_name():
    model = conv_classifier()
    layers = weight_layers(model)
    assert [name for name, _ in layers] == ["fc", "conv2", "conv1"]
    assert layers[0][1] == ["fc_w", "fc_b"]
    changed = randomized(model, ["fc_w"], seed=0)
    before = {i.name: i for i in model.graph.initializer}
    after = {i.name: i for i in changed.graph.initializer}
    assert after["fc_w"].raw_data != before["fc_w"].raw_data
    assert all(after[k] == before[k] for k in before if k != "fc_w")
    assert cut_points(53, 8) == [1, 8, 16, 23, 31, 38, 46, 53] and cut_points(3, 8) == [1, 2, 3]


def test_cascading_randomization_changes_gradcam_maps():
    model = conv_classifier(size=SIZE)
    explainer = Explainer(model, provider="cpu", cache=False)
    x = np.random.default_rng(7).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)
    original = explainer.explain(x, "gradcam")
    result = cascading_randomization(model, x, original.targets, {"gradcam": original.heatmaps}, steps=3)
    steps = result["gradcam"]["steps"]
    assert [s["randomized"] for s in steps] == [1, 2, 3]
    assert steps[0]["down_to"] == "fc" and steps[-1]["down_to"] == "conv1"
    assert result["gradcam"]["mean_spearman"][-1] < 0.9
    assert result["gradcam"]["changed_at"] is not None
    # an unchanged model gives identical maps: randomizing nothing means similarity 1
    same = explainer.explain(x, "gradcam", targets=original.targets).heatmaps
    assert spearman(same[0], original.heatmaps[0]) == pytest.approx(1.0)
