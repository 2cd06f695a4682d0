"""Dense outputs (onnxcam/dense.py): segmentation regions and detection heads.

Checked against independent references:

* hand-built models whose layers after the explained activation are linear (a 1x1 Conv, then
  a bilinear Resize or a Reshape), so ``d score / d A`` has a closed form: the 1x1 kernel's row
  for the class times the adjoint of the upsampling applied to the region mask (the
  upsampling as a matrix built with OpenCV, its forward checked against the model's);
* ``tests/fixtures/segmentation/``: torchvision's LR-ASPP (width-reduced MobileNetV3 backbone,
  random weights) with torch autograd's gradient and pytorch-grad-cam's maps for
  ``SemanticSegmentationTarget`` (``tools/make_segmentation_fixture.py``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from onnxcam import Explainer
from onnxcam.cli import app
from onnxcam.dense import DetectionTarget, SegmentationTarget, output_of, region_mask
from onnxcam.errors import OnnxcamError, TargetError
from onnxcam.model import ModelGraph
from onnxcam.surgery import SEED, RewriteRequest, rewrite

from .tiny_models import build_model, conv_classifier

FIXTURE = Path(__file__).parent / "fixtures" / "segmentation"
CLASSES, H, W = 3, 16, 20


# -- hand-built models ---------------------------------------------------------------------------

def _weights(seed: int, classes_out: int):
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32),
            "b1": rng.normal(0, 0.1, 8).astype(np.float32),
            "w2": rng.normal(0, 0.5, (classes_out, 8, 1, 1)).astype(np.float32),
            "b2": rng.normal(0, 0.1, classes_out).astype(np.float32)}


def segmenter():
    """input [N,3,16,20] -> Conv3x3 s2 -> Relu ['features' 8x10] -> Conv1x1 ['scores' K=3]
    -> Resize x2 (linear, half_pixel) -> 'out' [N,3,16,20]."""
    init = _weights(3, CLASSES)
    init["scales"] = np.array([1, 1, 2, 2], np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["features"], name="relu"),
        helper.make_node("Conv", ["features", "w2", "b2"], ["scores"], name="classifier"),
        helper.make_node("Resize", ["scores", "", "scales"], ["out"], name="upsample", mode="linear",
                         coordinate_transformation_mode="half_pixel"),
    ]
    model = build_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, H, W])],
                        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", CLASSES, H, W])], init)
    return model, init


def detector(anchors_first: bool = False, classes: int = 3):
    """input [N,3,16,16] -> Conv3x3 s2 -> Relu ['neck' 8x8x8] -> Conv1x1 [N, 4+K, 8, 8] ->
    Reshape 'det' [N, 4+K, 64] (YOLO-style, anchors y*8+x), or [N, 64, 4+K] transposed."""
    values = 4 + classes
    init = _weights(5, values)
    init["shape"] = np.array([0, values, 64], np.int64)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["neck"], name="relu"),
        helper.make_node("Conv", ["neck", "w2", "b2"], ["head"], name="head"),
        helper.make_node("Reshape", ["head", "shape"], ["raw" if anchors_first else "det"], name="flatten"),
    ]
    shape = ["N", values, 64]
    if anchors_first:
        nodes.append(helper.make_node("Transpose", ["raw"], ["det"], perm=[0, 2, 1], name="anchors_first"))
        shape = ["N", 64, values]
    model = build_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                        [helper.make_tensor_value_info("det", TensorProto.FLOAT, shape)], init)
    return model, init


def upsampling_matrix(height: int, width: int) -> np.ndarray:
    """OpenCV's bilinear x2 upsampling of an (h, w) map as a (2h*2w, h*w) matrix."""
    columns = []
    for k in range(height * width):
        basis = np.zeros(height * width, np.float32)
        basis[k] = 1
        up = cv2.resize(basis.reshape(height, width), (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR)
        columns.append(up.reshape(-1))
    return np.stack(columns, axis=1).astype(np.float64)


def images(count: int, shape=(3, H, W), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count,) + shape).astype(np.float32)


@functools.cache
def seg_explainer() -> Explainer:
    return Explainer(segmenter()[0], provider="cpu")


# -- output kinds, default layers, the rewrite ------------------------------------------------------

def test_output_kinds():
    assert output_of(ModelGraph(conv_classifier()), "logits") is None
    seg = output_of(ModelGraph(segmenter()[0]), "out")
    assert (seg.kind, seg.shape, seg.classes, seg.spatial) == ("segmentation", (3, H, W), 3, (H, W))
    det = output_of(ModelGraph(detector()[0]), "det")
    assert (det.kind, det.shape) == ("detection", (7, 64))


def test_default_layer_is_the_last_hidden_activation_at_the_coarsest_resolution():
    """Without module scopes: not the class-score map 'scores' (8x10, K channels) nor the
    upsampled output, but the activation that feeds the per-pixel classifier."""
    explainer = seg_explainer()
    names = [l.name for l in explainer.layers()]
    assert {"features", "scores", "out"} <= set(names)
    assert [l.name for l in explainer.layers() if l.default] == ["features"]
    assert explainer.targets_layers[0].name == "features"
    assert Explainer(detector()[0], provider="cpu").targets_layers[0].name == "neck"


def test_classifier_rewrite_keeps_its_top1_default_and_dense_seed_has_the_output_shape():
    classifier = rewrite(conv_classifier(), RewriteRequest(("features",), "logits"))
    assert "ArgMax" in {n.op_type for n in classifier.model.graph.node}
    dense = rewrite(segmenter()[0], RewriteRequest(("features",), "out"))
    seed = next(i for i in dense.model.graph.input if i.name == SEED)
    dims = [d.dim_value or d.dim_param for d in seed.type.tensor_type.shape.dim]
    assert dims[1:] == [CLASSES, H, W]
    assert "ArgMax" not in {n.op_type for n in dense.model.graph.node}


# -- segmentation: gradients against the closed form ---------------------------------------------

def test_region_gradient_equals_the_closed_form():
    """score = sum_ij out[c] M = sum_ij up(W[c] . F + b)[ij] M[ij], so
    d score / d F[k] = W[c, k] * up^T(M)."""
    model, init = segmenter()
    explainer = seg_explainer()
    x = images(2)
    up = upsampling_matrix(H // 2, W // 2)
    result = explainer.explain(x, "gradcam", targets=[SegmentationTarget(1, (3, 2, 15, 11)),
                                                      SegmentationTarget(2, "all")])
    features = result.activations["features"]
    scores = np.einsum("kc,nchw->nkhw", init["w2"][:, :, 0, 0], features) + init["b2"][None, :, None, None]
    assert np.allclose((up @ scores.reshape(2, CLASSES, -1, 1)).reshape(result.logits.shape),
                       result.logits, atol=1e-5)  # the upsampling matrix is the model's Resize
    masks = [region_mask((3, 2, 15, 11), (H, W)), np.ones((H, W), np.float32)]
    for n, (category, mask) in enumerate(zip((1, 2), masks)):
        back = (up.T @ mask.reshape(-1)).reshape(H // 2, W // 2)
        expected = init["w2"][category, :, 0, 0][:, None, None] * back[None]
        got = result.gradients["features"][n]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert list(result.targets) == [1, 2]


def test_nhwc_segmentation_output():
    """An NHWC output [N, H, W, K] (tf2onnx-style): the classes are on the last axis."""
    model, _ = segmenter()
    model.graph.node.append(helper.make_node("Transpose", ["out"], ["out_nhwc"], perm=[0, 2, 3, 1], name="nhwc"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("out_nhwc", TensorProto.FLOAT, ["N", H, W, CLASSES]))
    explainer = Explainer(model, provider="cpu")
    assert (explainer.dense.class_axis, explainer.dense.classes, explainer.dense.spatial) == (2, CLASSES, (H, W))
    x = images(2, seed=9)
    target = SegmentationTarget(2, (1, 3, 12, 9))
    nhwc, nchw = explainer.explain(x, targets=target), seg_explainer().explain(x, targets=target)
    assert np.array_equal(np.moveaxis(nhwc.seeds, -1, 2), nchw.seeds)
    assert np.allclose(nhwc.gradients["features"], nchw.gradients["features"], atol=1e-6)


def test_argmax_region_and_default_target():
    """argmax: the pixels where the class wins; no target: the class winning most pixels."""
    explainer = seg_explainer()
    x = images(2, seed=1)
    logits = explainer.forward(x)["out"]
    winners = logits.argmax(axis=1)
    dominant = [int(np.bincount(w.reshape(-1), minlength=CLASSES).argmax()) for w in winners]
    result = explainer.explain(x)
    assert list(result.targets) == dominant
    for n in range(2):
        seed = result.seeds[n, 0]
        assert np.array_equal(seed[dominant[n]], (winners[n] == dominant[n]).astype(np.float32))
        assert np.count_nonzero(np.delete(seed, dominant[n], axis=0)) == 0
    # an int target is that class over its argmax region, the same seed as the explicit form
    explicit = explainer.explain(x, targets=[SegmentationTarget(dominant[0], "argmax"),
                                             SegmentationTarget(dominant[1], "argmax")])
    assert np.array_equal(explicit.heatmaps, result.heatmaps)


def test_mask_region_and_raw_seed_agree():
    explainer = seg_explainer()
    x = images(1, seed=2)
    mask = np.zeros((H // 2, W // 2), np.float32)  # half size: nearest-neighbour resized
    mask[1:4, 2:6] = 1
    by_mask = explainer.explain(x, targets=SegmentationTarget(0, mask))
    seed = np.zeros((CLASSES, H, W), np.float32)
    seed[0, 2:8, 4:12] = 1
    by_seed = explainer.explain(x, targets=seed)
    assert np.array_equal(by_mask.seeds, by_seed.seeds)
    assert np.allclose(by_mask.heatmaps, by_seed.heatmaps)
    assert list(by_seed.targets) == [-1]


def test_several_region_targets_equal_separate_calls():
    explainer = seg_explainer()
    x = images(2, seed=3)
    wanted = [SegmentationTarget(0, "all"), SegmentationTarget(2, (0, 0, 10, 8))]
    together = explainer.explain(x, "gradcam++", targets=[wanted])
    assert together.heatmaps.shape == (2, 2, H, W)
    for t, target in enumerate(wanted):
        alone = explainer.explain(x, "gradcam++", targets=target)
        assert np.allclose(together.heatmaps[:, t], alone.heatmaps, atol=1e-6)


@pytest.mark.parametrize("method", ["scorecam", "eigencam", "saliency", "layercam"])
def test_other_method_kinds_run_on_regions(method):
    explainer = seg_explainer()
    x = images(2, seed=4)
    result = explainer.explain(x, method, targets=SegmentationTarget(1, "all"))
    assert result.heatmaps.shape == (2, H, W)
    assert np.isfinite(result.heatmaps).all() and result.heatmaps.max() > 0


def test_scorecam_scores_are_the_region_score():
    """Score-CAM's score for a region target is sum(out[c] * M) of each masked input."""
    from onnxcam.perturbation import target_scores
    outputs = images(3, (CLASSES, 4, 5))
    seeds = np.zeros((2, CLASSES, 4, 5), np.float32)
    seeds[0, 1, :2] = 1
    seeds[1, 2] = 0.5
    expected = np.array([[o[1, :2].sum(), 0.5 * o[2].sum()] for o in outputs])
    assert np.allclose(target_scores(outputs, seeds), expected, atol=1e-5)


@pytest.mark.parametrize("targets, options, message", [
    (SegmentationTarget(5), {}, "out of range"),
    (SegmentationTarget(0, (30, 30, 40, 40)), {}, "region of image 0 is empty"),
    (SegmentationTarget(0, "middle"), {}, "unknown region"),
    (DetectionTarget(1, 0), {}, "use a SegmentationTarget"),
    (SegmentationTarget(0), {"topk": 2}, "give no class or region with it"),
    (None, {"topk": 4}, "topk must be between 1 and 3"),
    (np.ones((CLASSES, H, W), np.float32), {"topk": 2}, "either seeds or topk"),
    (SegmentationTarget(0, "all"), {"aug_smooth": True}, "not for dense outputs"),
    (np.ones((CLASSES, 4, 4), np.float32), {}, "has its shape"),
])
def test_bad_segmentation_targets(targets, options, message):
    with pytest.raises(OnnxcamError, match=message):
        seg_explainer().explain(images(1), targets=targets, **options)


def test_class_that_wins_nowhere_is_refused():
    """On a blank image every pixel has the same scores: one class wins everywhere."""
    explainer = seg_explainer()
    x = np.zeros((1, 3, H, W), np.float32)
    winners = explainer.forward(x)["out"].argmax(axis=1)
    absent = next(c for c in range(CLASSES) if not (winners == c).any())
    with pytest.raises(TargetError, match=f"class {absent} wins no pixel of image 0"):
        explainer.explain(x, targets=absent)


def test_a_named_dense_output_needs_a_dense_target():
    """--output naming a feature map [N, C, H, W] is refused unless a region says it is meant
    as a segmentation map; the model's own dense output takes classes and the default."""
    model = conv_classifier()
    model.graph.output.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, None))
    features = Explainer(model, output="features", layer="features", provider="cpu")
    x = images(1, (3, 16, 16))
    with pytest.raises(TargetError, match="'features' has shape \\[N, 12, 8, 8\\]: not a class-score vector"):
        features.explain(x)
    with pytest.raises(TargetError, match="give a region"):
        features.explain(x, targets=3)
    assert features.explain(x, targets=SegmentationTarget(3, "all")).heatmaps.shape == (1, 16, 16)
    with_aux = segmenter()[0]  # torchvision's dict output exported as 'out' and 'aux'
    with_aux.graph.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, None))
    assert Explainer(with_aux, provider="cpu").logits_name == "out"
    aux = Explainer(with_aux, output="scores", provider="cpu")
    assert aux.dense.shape == (CLASSES, H // 2, W // 2)
    assert aux.explain(images(1), targets=SegmentationTarget(0, "argmax")).heatmaps.shape == (1, H, W)
    named = Explainer(segmenter()[0], output="out", provider="cpu")
    with pytest.raises(TargetError, match="not a class-score vector"):
        named.explain(images(1))
    assert np.array_equal(named.explain(images(1), targets=SegmentationTarget(1, "all")).heatmaps,
                          seg_explainer().explain(images(1), targets=SegmentationTarget(1, "all")).heatmaps)


def test_self_explaining_export_refuses_dense_outputs(tmp_path):
    from onnxcam.export import export_explained
    with pytest.raises(OnnxcamError, match="segmentation output"):
        export_explained(segmenter()[0], "gradcam")


# -- detection heads --------------------------------------------------------------------------------

@pytest.mark.parametrize("anchors_first", [False, True])
def test_detection_gradient_is_one_anchor_and_class(anchors_first):
    """score = det[4 + c, a] = W[4 + c] . neck[:, a // 8, a % 8] + b: the gradient is the
    kernel row at that anchor's cell, zero elsewhere."""
    model, init = detector(anchors_first)
    explainer = Explainer(model, provider="cpu")
    x = images(2, (3, 16, 16), seed=6)
    result = explainer.explain(x, "gradcam", targets=[DetectionTarget(anchor=19, category=2),
                                                      DetectionTarget(anchor=40, category=0)])
    for n, (anchor, category) in enumerate(((19, 2), (40, 0))):
        expected = np.zeros((8, 8, 8), np.float32)
        expected[:, anchor // 8, anchor % 8] = init["w2"][4 + category, :, 0, 0]
        assert np.allclose(result.gradients["neck"][n], expected, atol=1e-6)
    assert list(result.targets) == [2, 0]


def test_detection_defaults_pick_the_best_scores():
    model, _ = detector()
    explainer = Explainer(model, provider="cpu")
    x = images(2, (3, 16, 16), seed=7)
    det = explainer.forward(x)["det"]
    classes = det[:, 4:]  # (N, K, A)
    result = explainer.explain(x)
    best = [np.unravel_index(np.argmax(c), c.shape) for c in classes]
    assert list(result.targets) == [int(b[0]) for b in best]
    for n, (category, anchor) in enumerate(best):
        assert result.seeds[n, 0, 4 + category, anchor] == 1 and result.seeds[n, 0].sum() == 1
    by_class = explainer.explain(x, targets=1)  # the best anchor for class 1
    assert [int(np.argmax(s[0, 5])) for s in by_class.seeds] == [int(np.argmax(c[1])) for c in classes]
    by_anchor = explainer.explain(x, targets=DetectionTarget(anchor=10))  # its best class
    assert list(by_anchor.targets) == [int(np.argmax(c[:, 10])) for c in classes]


def test_eigencam_on_a_detector_is_class_agnostic():
    model, _ = detector()
    explainer = Explainer(model, provider="cpu")
    x = images(2, (3, 16, 16), seed=8)
    one = explainer.explain(x, "eigencam", targets=DetectionTarget(3, 0))
    other = explainer.explain(x, "eigencam")
    assert np.array_equal(one.heatmaps, other.heatmaps) and one.heatmaps.max() > 0


def yolo_like():
    """Two scales, YOLOv5-style anchors-first output with objectness: input [N,3,32,32] ->
    Conv s2 + Relu 'p3' [8,16,16] -> Conv s2 + Relu 'p4' [8,8,8]; a 1x1 head per scale
    (4 box + 1 objectness + 2 classes = 7), flattened, concatenated (256 + 64 anchors),
    Sigmoid on objectness and classes, transposed to 'det' [N, 320, 7]."""
    rng = np.random.default_rng(11)
    init = {name: rng.normal(0, 0.4, shape).astype(np.float32) for name, shape in (
        ("w3", (8, 3, 3, 3)), ("w4", (8, 8, 3, 3)), ("h3", (7, 8, 1, 1)), ("h4", (7, 8, 1, 1)))}
    init.update({"s3": np.array([0, 7, 256], np.int64), "s4": np.array([0, 7, 64], np.int64),
                 "zero": np.array([0], np.int64), "four": np.array([4], np.int64),
                 "seven": np.array([7], np.int64), "one": np.array([1], np.int64)})
    nodes = [
        helper.make_node("Conv", ["input", "w3"], ["c3"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c3"], ["p3"]),
        helper.make_node("Conv", ["p3", "w4"], ["c4"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c4"], ["p4"]),
        helper.make_node("Conv", ["p3", "h3"], ["o3"]), helper.make_node("Reshape", ["o3", "s3"], ["f3"]),
        helper.make_node("Conv", ["p4", "h4"], ["o4"]), helper.make_node("Reshape", ["o4", "s4"], ["f4"]),
        helper.make_node("Concat", ["f3", "f4"], ["raw"], axis=2),
        helper.make_node("Slice", ["raw", "zero", "four", "one"], ["boxes"]),
        helper.make_node("Slice", ["raw", "four", "seven", "one"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["joined"], axis=1),
        helper.make_node("Transpose", ["joined"], ["det"], perm=[0, 2, 1]),
    ]
    model = build_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                        [helper.make_tensor_value_info("det", TensorProto.FLOAT, ["N", 320, 7])], init)
    return model, init


def test_multi_scale_detector_with_objectness():
    """The default layer is the coarsest neck output 'p4'; an anchor of that scale (256 + k)
    with ``boxes=5`` seeds det[a, 5 + c] = sigmoid(z): at 'p4' the gradient is
    sigmoid'(z) * kernel row at cell k and zero elsewhere; an anchor of the finer scale does
    not reach 'p4' at all (its head reads 'p3')."""
    model, init = yolo_like()
    explainer = Explainer(model, provider="cpu")
    assert explainer.targets_layers[0].name == "p4"
    x = images(2, (3, 32, 32), seed=12)
    det = explainer.forward(x)["det"]
    result = explainer.explain(x, targets=[[DetectionTarget(256 + 21, 1, boxes=5), DetectionTarget(40, 0, boxes=5)]])
    gradients = result.gradients["p4"]  # (N, T, 8, 8, 8)
    for n in range(2):
        score = det[n, 256 + 21, 6]
        expected = np.zeros((8, 8, 8), np.float32)
        expected[:, 21 // 8, 21 % 8] = score * (1 - score) * init["h4"][6, :, 0, 0]
        assert np.allclose(gradients[n, 0], expected, atol=1e-6)
        assert not gradients[n, 1].any()
    eigen = explainer.explain(x, "eigencam")
    assert eigen.heatmaps.shape == (2, 32, 32) and eigen.heatmaps.max() > 0
    best = explainer.explain(x, targets=DetectionTarget(boxes=5))
    assert list(best.targets) == [int(np.unravel_index(np.argmax(d[:, 5:]), d[:, 5:].shape)[1]) for d in det]


def test_bad_detection_targets():
    explainer = Explainer(detector()[0], provider="cpu")
    x = images(1, (3, 16, 16))
    with pytest.raises(TargetError, match="anchor 64 is out of range"):
        explainer.explain(x, targets=DetectionTarget(64, 0))
    with pytest.raises(TargetError, match="class 3 is out of range"):
        explainer.explain(x, targets=DetectionTarget(0, 3))
    with pytest.raises(TargetError, match="no class scores after 7 box values"):
        explainer.explain(x, targets=DetectionTarget(0, 0, boxes=7))


# -- the command line -------------------------------------------------------------------------------

runner = CliRunner()


def _write_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return path


def test_cli_region_box_in_image_pixels(tmp_path):
    """A box in image pixels is scaled to the output: a 32x40 image, box (6,4)-(30,22), is the
    box (3,2)-(15,11) of the 16x20 output."""
    import onnx
    model_path = tmp_path / "seg.onnx"
    onnx.save(segmenter()[0], model_path)
    image = _write_image(tmp_path / "a.png", 2 * H, 2 * W)
    out = tmp_path / "out"
    result = runner.invoke(app, ["explain", str(model_path), str(image), "-t", "1", "--region", "6,4,30,22",
                                 "--preset", "raw", "--npy", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())[0]
    assert record["target"] == 1 and record["probability"] is None
    assert record["targets"][0]["region_pixels"] == 12 * 9
    explainer = Explainer(model_path, provider="cpu")
    x = explainer.preprocess("raw")([cv2.imread(str(image))[..., ::-1]])
    api = explainer.explain(x, targets=SegmentationTarget(1, (3, 2, 15, 11)))
    assert np.isclose(record["targets"][0]["score"], float((api.logits[0, 1] * api.seeds[0, 0, 1]).sum()),
                      rtol=1e-4)
    saved = np.load(out / "a.gradcam.npy")
    assert saved.shape == (2 * H, 2 * W)
    assert np.allclose(saved, cv2.resize(api.heatmaps[0], (2 * W, 2 * H), interpolation=cv2.INTER_LINEAR),
                       atol=1e-5)


def test_cli_mask_file_and_errors(tmp_path):
    import onnx
    seg_path, cls_path = tmp_path / "seg.onnx", tmp_path / "cls.onnx"
    onnx.save(segmenter()[0], seg_path)
    onnx.save(conv_classifier(), cls_path)
    image = _write_image(tmp_path / "a.png", H, W)
    mask = np.zeros((H, W), np.uint8)
    mask[4:9, 5:12] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    ok = runner.invoke(app, ["explain", str(seg_path), str(image), "-t", "2", "--region",
                             str(tmp_path / "mask.png"), "-o", str(tmp_path / "o1")])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "o1" / "results.json").read_text())[0]["targets"][0]["region_pixels"] == 35
    listed = runner.invoke(app, ["layers", str(seg_path)])
    assert "segmentation output [3, 16, 20]" in listed.output
    listed_json = json.loads(runner.invoke(app, ["layers", str(seg_path), "--json"]).output)
    assert (listed_json["output_kind"], listed_json["output_shape"]) == ("segmentation", [3, 16, 20])
    assert [line.split()[1] for line in listed.output.splitlines() if line.startswith("*")] == ["features"]
    default = runner.invoke(app, ["explain", str(seg_path), str(image), "-o", str(tmp_path / "o3")])
    assert default.exit_code == 0 and " px score=" in default.output, default.output
    for args, message in (
            ([str(cls_path), str(image), "--region", "all"], "holds class scores"),
            ([str(seg_path), str(image), "--anchor", "3"], "--anchor applies to detection heads"),
            ([str(seg_path), str(image), "--region", "nowhere.png"], "not argmax, all, a box"),
            ([str(seg_path), str(image), "--output", "out", "-t", "1"], "not a class-score vector")):
        failed = runner.invoke(app, ["explain", *args, "-o", str(tmp_path / "o2")])
        assert failed.exit_code == 2 and message in failed.output, failed.output
        assert not (tmp_path / "o2").exists()


def test_cli_detection_anchor(tmp_path):
    import onnx
    model_path = tmp_path / "det.onnx"
    onnx.save(detector()[0], model_path)
    image = _write_image(tmp_path / "a.png", 16, 16)
    result = runner.invoke(app, ["explain", str(model_path), str(image), "--anchor", "12", "-t", "1",
                                 "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    target = json.loads((tmp_path / "out" / "results.json").read_text())[0]["targets"][0]
    assert (target["target"], target["anchor"], len(target["box"])) == (1, 12, 4)
    assert "anchor 12" in result.output


# -- parity with torch and pytorch-grad-cam on torchvision's LR-ASPP ---------------------------------

@functools.cache
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "reference.npz") as data:
        return {key: data[key] for key in data.files}


def _fixture_targets(ref: dict[str, np.ndarray]) -> list[SegmentationTarget]:
    classes = [int(c) for c in ref["classes"]]
    return [SegmentationTarget(classes[0], "argmax"), SegmentationTarget(classes[1], tuple(int(v) for v in ref["box"]))]


@functools.cache
def fixture_explainer() -> Explainer:
    return Explainer(FIXTURE / "model.onnx", provider="cpu")


def test_fixture_default_layer_is_the_backbone_output():
    """The default is the backbone's last activation (LR-ASPP's "high" feature), which the
    tool located by value: the tensor pytorch-grad-cam's tutorial would explain."""
    assert fixture_explainer().targets_layers[0].name == str(reference()["layer"])


def test_fixture_regions_and_gradient_match_torch():
    ref = reference()
    result = fixture_explainer().explain(ref["input"], "gradcam", targets=_fixture_targets(ref))
    assert np.array_equal(result.seeds[:, 0, :, :, :].sum(axis=1), ref["masks"])  # the same regions
    layer = str(ref["layer"])
    for name, ours, theirs in (("logits", result.logits, ref["logits"]),
                               ("activation", result.activations[layer], ref["activation"]),
                               ("gradient", result.gradients[layer], ref["gradient"])):
        scale = float(np.abs(theirs).max())
        assert np.abs(ours - theirs).max() <= 1e-4 * scale + 1e-6, name


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "scorecam"])
def test_fixture_maps_match_pytorch_grad_cam(method):
    ref = reference()
    result = fixture_explainer().explain(ref["input"], method, targets=_fixture_targets(ref))
    for n in range(len(ref["input"])):
        ours, theirs = result.heatmaps[n].reshape(-1), ref[method][n].reshape(-1)
        assert np.abs(ours - theirs).max() <= 0.02, (method, n)
        if theirs.max() > 0:  # Score-CAM on image 0: the softmax of region sums is one-hot on
            # a channel that is zero after ReLU, so both maps are all zero (checked above)
            assert np.corrcoef(ours, theirs)[0, 1] >= 0.99, (method, n)


# -- top-k targets of a dense output ------------------------------------------------------------

def test_segmentation_topk_explains_the_classes_that_win_most_pixels():
    """topk=2: per image the two classes with the most argmax pixels (counted here with numpy),
    each over its own pixels: the same maps as those targets given by hand."""
    explainer, x = seg_explainer(), images(3, seed=4)
    winners = explainer.forward(x)["out"].argmax(axis=1)
    expected = [np.argsort(-np.bincount(w.reshape(-1), minlength=CLASSES), kind="stable")[:2] for w in winners]
    result = explainer.explain(x, topk=2)
    assert result.heatmaps.shape == (3, 2, H, W)
    assert np.array_equal(result.targets, np.array(expected))
    by_hand = explainer.explain(x, targets=[[SegmentationTarget(int(c), "argmax") for c in row] for row in expected])
    np.testing.assert_allclose(result.heatmaps, by_hand.heatmaps, atol=1e-6)


def test_segmentation_topk_beyond_the_classes_that_win_is_refused():
    explainer = seg_explainer()
    x = np.zeros((1, 3, H, W), np.float32)  # one class wins every pixel of a blank image
    with pytest.raises(TargetError, match="topk 2: only 1 class win pixels of image 0"):
        explainer.explain(x, topk=2)


@pytest.mark.parametrize("anchors_first", [False, True])
def test_detection_topk_explains_the_best_anchors(anchors_first):
    """Anchors ranked by their best class score (or the named class's), each explained for its
    best class: the maps of those DetectionTargets given by hand."""
    explainer = Explainer(detector(anchors_first)[0], provider="cpu")
    x = images(2, (3, 16, 16), seed=7)
    output = explainer.forward(x)["det"]
    scores = (output.transpose(0, 2, 1) if anchors_first else output)[:, 4:]  # (N, K, A)
    result = explainer.explain(x, topk=3)
    for n in range(2):
        anchors = np.argsort(-scores[n].max(axis=0), kind="stable")[:3]
        classes = scores[n][:, anchors].argmax(axis=0)
        assert np.array_equal(result.targets[n], classes)
        by_hand = explainer.explain(x[n:n + 1], targets=[[DetectionTarget(int(a), int(c)) for a, c in
                                                          zip(anchors, classes)]])
        np.testing.assert_allclose(result.heatmaps[n], by_hand.heatmaps[0], atol=1e-6)
    for_class = explainer.explain(x, targets=DetectionTarget(category=2), topk=2)
    assert (for_class.targets == 2).all()
    with pytest.raises(TargetError, match="give no anchor with it"):
        explainer.explain(x, targets=DetectionTarget(anchor=3), topk=2)


def test_cli_topk_on_dense_outputs(tmp_path):
    import onnx
    seg_path, det_path = tmp_path / "seg.onnx", tmp_path / "det.onnx"
    onnx.save(segmenter()[0], seg_path)
    onnx.save(detector()[0], det_path)
    image = _write_image(tmp_path / "a.png", H, W)
    seg = runner.invoke(app, ["explain", str(seg_path), str(image), "--topk", "2", "-o", str(tmp_path / "s")])
    assert seg.exit_code == 0, seg.output
    targets = json.loads((tmp_path / "s" / "results.json").read_text())[0]["targets"]
    assert len(targets) == 2 and targets[0]["region_pixels"] >= targets[1]["region_pixels"] > 0
    det = runner.invoke(app, ["explain", str(det_path), str(_write_image(tmp_path / "b.png", 16, 16)), "--topk", "2",
                              "--box-values", "5", "-o", str(tmp_path / "d")])
    assert det.exit_code == 0, det.output
    records = json.loads((tmp_path / "d" / "results.json").read_text())[0]["targets"]
    assert len(records) == 2 and records[0]["anchor"] != records[1]["anchor"]
