"""Several targets per image in one pass: equal to separate calls for every method, the
backbone run once, targets as classes, top-k or seed vectors (any linear functional of the
logits), and heads cut at layers a residual bypasses or that cannot be cut at all."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcam import METHODS, Explainer, LayerError, OnnxcamError, TargetError
from onnxcam.surgery import head_frontier
from tests.test_methods import residual_classifier
from tests.tiny_models import conv_classifier

RNG = np.random.default_rng(99)
FAST = {"max_channels": 16, "samples": 2, "steps": 3}


@pytest.fixture(scope="module")
def explainer(mobilenet_small):
    return Explainer(mobilenet_small, provider="cpu")


@pytest.fixture(scope="module")
def images():
    return RNG.uniform(-1, 1, (2, 3, 128, 128)).astype(np.float32)


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].kind != "attention"])  # transformers: test_transformers.py
def test_several_targets_equal_separate_calls(explainer, images, method):
    grid = [[3, 7, 9], [1, 2, 3]]
    together = explainer.explain(images, method, targets=grid, **FAST)
    assert together.heatmaps.shape == (2, 3, 128, 128)
    assert together.targets.tolist() == grid
    for t in range(3):
        alone = explainer.explain(images, method, targets=[grid[0][t], grid[1][t]], **FAST)
        np.testing.assert_allclose(together.heatmaps[:, t], alone.heatmaps, atol=2e-5)
        for name, weights in alone.weights.items():
            np.testing.assert_allclose(together.weights[name][:, t], weights, rtol=1e-4,
                                       atol=1e-6 * max(1.0, np.abs(weights).max()))


def test_one_pass_runs_the_backbone_once(explainer, images, monkeypatch):
    calls = []
    original = explainer.run_model

    def counting(rewritten, session, feeds, wanted, batch_size=None):
        calls.append((rewritten.input, len(next(iter(feeds.values())))))
        return original(rewritten, session, feeds, wanted, batch_size)
    monkeypatch.setattr(explainer, "run_model", counting)
    explainer.explain(images, "gradcam", targets=[list(range(10))])
    image_runs = [c for c in calls if c[0] == "input"]
    assert image_runs == [("input", 2)], calls  # the forward model, once, on the 2 images
    layer = explainer.targets_layers[0].name
    assert [c for c in calls if c[0] == layer] == [(layer, 20)]  # the head, once per target


def test_topk_explains_the_best_classes_in_order(explainer, images):
    result = explainer.explain(images, "gradcam", topk=4)
    order = np.argsort(-result.logits, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(result.targets, order)
    explicit = explainer.explain(images, "gradcam", targets=order)
    np.testing.assert_allclose(result.heatmaps, explicit.heatmaps, atol=1e-6)
    assert result.per_target.shape == (2, 4, 128, 128)


def test_topk_one_matches_the_default_top1(explainer, images):
    default = explainer.explain(images, "layercam")
    top = explainer.explain(images, "layercam", topk=1)
    np.testing.assert_array_equal(top.targets[:, 0], default.targets)
    np.testing.assert_allclose(top.heatmaps[:, 0], default.heatmaps, atol=1e-6)


def test_a_target_row_for_all_images_broadcasts(explainer, images):
    result = explainer.explain(images, "gradcam", targets=[[5, 6]])
    assert result.targets.tolist() == [[5, 6], [5, 6]]


def test_a_one_hot_seed_vector_is_its_class(explainer, images):
    seed = np.zeros(1001, np.float32)
    seed[42] = 1.0
    by_seed = explainer.explain(images, "gradcam", targets=seed)
    by_class = explainer.explain(images, "gradcam", targets=42)
    np.testing.assert_allclose(by_seed.heatmaps, by_class.heatmaps, atol=1e-6)
    assert by_seed.targets.tolist() == [-1, -1]


def test_a_seed_vector_explains_the_linear_functional(explainer, images):
    """d(a y_i - b y_j)/dA = a dy_i/dA - b dy_j/dA, and CAM weights are linear in the seed."""
    seed = np.zeros(1001, np.float32)
    seed[[10, 20]] = [0.7, -1.3]
    mixed = explainer.explain(images, "gradcam", targets=seed)
    parts = explainer.explain(images, "gradcam", targets=[[10, 20]])
    name = mixed.layers[0]
    expected = 0.7 * parts.gradients[name][:, 0] - 1.3 * parts.gradients[name][:, 1]
    np.testing.assert_allclose(mixed.gradients[name], expected, atol=1e-6 * np.abs(expected).max())
    cam_mixed = explainer.explain(images, "cam", targets=seed).weights[name]
    cam_parts = explainer.explain(images, "cam", targets=[[10, 20]]).weights[name]
    np.testing.assert_allclose(cam_mixed, 0.7 * cam_parts[:, 0] - 1.3 * cam_parts[:, 1], rtol=1e-4, atol=1e-6)


def test_several_seed_vectors_per_image(explainer, images):
    seeds = RNG.normal(size=(2, 3, 1001)).astype(np.float32)
    together = explainer.explain(images, "gradcam", targets=seeds)
    assert together.heatmaps.shape == (2, 3, 128, 128) and (together.targets == -1).all()
    for t in range(3):
        alone = explainer.explain(images, "gradcam", targets=np.ascontiguousarray(seeds[:, t]))
        np.testing.assert_allclose(together.heatmaps[:, t], alone.heatmaps, atol=2e-5)


@pytest.mark.parametrize("targets, topk, message", [
    ([[3, 1001]], None, "out of range"),
    (3, 2, "either targets or topk"),
    (None, 0, "topk must be"),
    (np.zeros(1001, np.float32), None, "not all zero"),
    (np.ones(10, np.float32), None, "one weight per logit"),
    ([[1, 2], [3, 4], [5, 6]], None, "3 targets for a batch of 2"),
])
def test_bad_targets_are_one_line_errors(explainer, images, targets, topk, message):
    with pytest.raises(TargetError, match=message):
        explainer.explain(images, "gradcam", targets=targets, topk=topk)


# -- heads ------------------------------------------------------------------------------------

def test_the_frontier_is_empty_for_a_cut_and_the_bypass_for_a_residual():
    model = residual_classifier()
    assert head_frontier(model, "sum", "logits") == ()
    assert head_frontier(model, "b", "logits") == ("a",)
    assert head_frontier(conv_classifier(), "features", "logits") == ()


def test_several_targets_through_a_head_with_a_frontier_equal_separate_calls():
    explainer = Explainer(residual_classifier(), layer="b", provider="cpu")
    x = RNG.normal(size=(2, 3, 10, 10)).astype(np.float32)
    together = explainer.explain(x, "gradcam", targets=[[0, 1, 3]])
    for t, target in enumerate([0, 1, 3]):
        alone = explainer.explain(x, "gradcam", targets=target)
        np.testing.assert_allclose(together.gradients["b"][:, t], alone.gradients["b"], atol=1e-6)
        np.testing.assert_allclose(together.heatmaps[:, t], alone.heatmaps, atol=1e-6)


def shape_reading_classifier() -> onnx.ModelProto:
    """conv_classifier whose Flatten is a Reshape to Concat(Shape(input)[:1], [-1]): the layers
    after 'features' read an integer tensor computed from the image, so no head can be cut."""
    model = conv_classifier()
    graph = model.graph
    flatten = next(n for n in graph.node if n.op_type == "Flatten")
    index = list(graph.node).index(flatten)
    graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "zero"),
                              numpy_helper.from_array(np.array([1], np.int64), "one"),
                              numpy_helper.from_array(np.array([-1], np.int64), "minus_one")])
    nodes = [helper.make_node("Shape", ["input"], ["in_shape"]),
             helper.make_node("Slice", ["in_shape", "zero", "one"], ["batch"]),
             helper.make_node("Concat", ["batch", "minus_one"], ["flat_shape"], axis=0),
             helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="reshape")]
    graph.node.remove(flatten)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    onnx.checker.check_model(model)
    return model


def test_a_layer_that_cannot_be_cut_falls_back_to_the_full_model():
    explainer = Explainer(shape_reading_classifier(), provider="cpu")
    with pytest.raises(LayerError, match="non-float tensor"):
        explainer.frontier("features")
    x = RNG.normal(size=(2, 3, 16, 16)).astype(np.float32)
    together = explainer.explain(x, "gradcam", targets=[[0, 2, 4]])
    for t, target in enumerate([0, 2, 4]):
        alone = explainer.explain(x, "gradcam", targets=target)
        np.testing.assert_allclose(together.heatmaps[:, t], alone.heatmaps, atol=1e-6)
    with pytest.raises(OnnxcamError, match="ablationcam needs the layers after 'features'"):
        explainer.explain(x, "ablationcam")
    assert explainer.explain(x, "scorecam").heatmaps.shape == (2, 16, 16)  # needs no head
