"""The method suite: every formula against an independent re-implementation written from the
paper's equation (explicit loops on small random A, G), CAM against Grad-CAM, Score-CAM against
a slow direct loop through the original model, Ablation-CAM against re-running the full model
with the channel zeroed, pixel-space methods against numpy backprop, and every method's maps
finite, in [0, 1], and all zero where they are degenerate."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import METHODS, Explainer, OnnxcamError
from onnxcam.head import linear_head
from onnxcam.methods import combine_layers, first_principal_component, scale_maps
from onnxcam.perturbation import (ablationcam_weights, bilinear_matrix, distinct_masks,
                                  highest_variance_channels, scorecam_weights, upsampled_masks)
from onnxcam.pixel import integrated_gradients, pixel_map
from tests.tiny_models import build_model, conv_classifier, nhwc_classifier

RNG = np.random.default_rng(1234)


def _random_AG(n=2, k=5, h=4, w=3):
    A = np.abs(RNG.normal(size=(n, k, h, w))) * (RNG.random((n, k, h, w)) > 0.3)
    G = RNG.normal(size=(n, k, h, w))
    return A, G


# -- formulas, written out as loops from the papers -------------------------------------------

def _loop_weighted(A, weight_of):
    n, k, h, w = A.shape
    out = np.zeros((n, h, w))
    for b in range(n):
        for c in range(k):
            out[b] += weight_of(b, c) * A[b, c]
    return out


def ref_gradcam(A, G):
    n, k, h, w = A.shape
    return _loop_weighted(A, lambda b, c: sum(G[b, c, i, j] for i in range(h) for j in range(w)) / (h * w))


def ref_gradcam_pp(A, G):
    n, k, h, w = A.shape

    def weight(b, c):
        total_a = A[b, c].sum()
        value = 0.0
        for i in range(h):
            for j in range(w):
                g = G[b, c, i, j]
                if g == 0:
                    continue
                alpha = g ** 2 / (2 * g ** 2 + total_a * g ** 3 + 1e-6)
                value += alpha * max(g, 0.0)
        return value
    return _loop_weighted(A, weight)


def ref_xgradcam(A, G):
    return _loop_weighted(A, lambda b, c: (G[b, c] * A[b, c]).sum() / (A[b, c].sum() + 1e-7))


def _loop_terms(A, G, term):
    n, k, h, w = A.shape
    out = np.zeros((n, h, w))
    for b in range(n):
        for c in range(k):
            for i in range(h):
                for j in range(w):
                    out[b, i, j] += term(A[b, c, i, j], G[b, c, i, j])
    return out


REFERENCES = {
    "gradcam": ref_gradcam,
    "counterfactual": lambda A, G: ref_gradcam(A, -G),
    "gradcam++": ref_gradcam_pp,
    "xgradcam": ref_xgradcam,
    "hirescam": lambda A, G: _loop_terms(A, G, lambda a, g: g * a),
    "gradcam-elementwise": lambda A, G: _loop_terms(A, G, lambda a, g: max(g * a, 0.0)),
    "layercam": lambda A, G: _loop_terms(A, G, lambda a, g: max(g, 0.0) * a),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_activation_formulas_match_loops_from_the_papers(name):
    A, G = _random_AG()
    np.testing.assert_allclose(METHODS[name].raw_map(A, G), REFERENCES[name](A, G), rtol=1e-10, atol=1e-12)


def test_gradcam_plus_plus_is_zero_where_the_gradient_is_zero():
    A, G = _random_AG()
    G[:, 1] = 0.0
    weights = METHODS["gradcam++"].channel_weights(A, G)
    assert np.all(weights[:, 1] == 0) and np.all(np.isfinite(weights))


def _svd_projection(X):
    """pytorch-grad-cam's get_2d_projection, with the full SVD it uses."""
    out = []
    for a in X:
        m = a.reshape(a.shape[0], -1).T
        m = m - m.mean(axis=0)
        _, _, vt = np.linalg.svd(m, full_matrices=True)
        out.append((m @ vt[0]).reshape(a.shape[1:]))
    return np.array(out)


@pytest.mark.parametrize("name, matrix", [("eigencam", lambda A, G: A), ("eigengradcam", lambda A, G: G * A)])
def test_eigen_methods_are_the_first_principal_component_with_a_fixed_sign(name, matrix):
    A, G = _random_AG(k=6, h=5, w=4)
    ours = METHODS[name].raw_map(A, G)
    reference = _svd_projection(matrix(A, G))
    for mine, theirs, X in zip(ours, reference, matrix(A, G)):
        sign = np.sign(np.dot(mine.ravel(), theirs.ravel()))
        np.testing.assert_allclose(mine, sign * theirs, rtol=1e-5, atol=1e-6)  # float32 maps
        # the sign rule: positively correlated with the mean over channels
        assert np.dot(mine.ravel(), X.mean(axis=0).ravel() - X.mean()) >= 0


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise", "layercam"])
def test_eigen_smooth_projects_the_weighted_activations(name):
    A, G = _random_AG(k=6, h=5, w=4)
    if METHODS[name].weights is not None:
        weights = METHODS[name].channel_weights(A, G)
        contributions = weights[:, :, None, None] * A
    else:
        contributions = {"hirescam": G * A, "gradcam-elementwise": np.maximum(G * A, 0),
                         "layercam": np.maximum(G, 0) * A}[name]
    smoothed = METHODS[name].raw_map(A, G, eigen_smooth=True)
    reference = _svd_projection(contributions)
    for mine, theirs in zip(smoothed, reference):
        np.testing.assert_allclose(np.abs(mine), np.abs(theirs), rtol=1e-6, atol=1e-8)


def test_eigen_methods_ignore_eigen_smooth_as_pytorch_grad_cam():
    A, G = _random_AG()
    np.testing.assert_array_equal(METHODS["eigencam"].raw_map(A, G, eigen_smooth=True),
                                  METHODS["eigencam"].raw_map(A, G))


def test_first_principal_component_of_constant_activations_is_zero():
    assert not np.any(first_principal_component(np.ones((1, 3, 4, 4))))


# -- scaling ----------------------------------------------------------------------------------

def test_scale_maps_matches_the_pytorch_grad_cam_formula_and_keeps_zero_maps_zero():
    import cv2
    maps = RNG.normal(size=(4, 5, 6)).astype(np.float32)
    maps[1] = 0.0
    maps[2] = 3.0
    maps[3, 0, 0] = np.nan
    scaled = scale_maps(maps, (10, 12))
    for raw, out in zip(maps, scaled):
        cam = np.maximum(np.nan_to_num(raw), 0)
        cam = cam - cam.min()
        cam = cam / (cam.max() + 1e-7)
        np.testing.assert_allclose(out, np.clip(cv2.resize(cam, (12, 10)), 0, 1), atol=1e-6)
    assert not np.any(scaled[1]) and not np.any(scaled[2])
    assert np.isfinite(scaled).all() and scaled.min() >= 0 and scaled.max() <= 1


def test_combine_layers_is_scale_relu_mean_scale():
    maps = [RNG.normal(size=(2, 4, 4)), RNG.normal(size=(2, 8, 8))]
    expected = scale_maps(np.mean([scale_maps(m, (16, 16)) for m in maps], axis=0))
    np.testing.assert_allclose(combine_layers(maps, (16, 16)), expected, atol=1e-7)


# -- CAM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, layer", [(conv_classifier, "features"), (nhwc_classifier, "act_nhwc")])
def test_cam_equals_gradcam_up_to_scale_on_gap_linear_heads(build, layer):
    explainer = Explainer(build(), layer=layer, provider="cpu")
    shape = (3, 3, 16, 16) if build is conv_classifier else (3, 12, 12, 3)
    x = RNG.normal(size=shape).astype(np.float32)
    cam, grad = explainer.explain(x, "cam", targets=1), explainer.explain(x, "gradcam", targets=1)
    h, w = explainer.targets_layers[0].shape[1:]
    # Grad-CAM weights are mean_ij dy/dA = W[c] / (h w): CAM's weights divided by hw
    np.testing.assert_allclose(cam.weights[layer], grad.weights[layer] * h * w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cam.heatmaps, grad.heatmaps, atol=1e-5)


def test_cam_weights_are_read_from_the_fc_initializer():
    model = conv_classifier(classes=5)
    fc = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc_w"))
    explainer = Explainer(model, provider="cpu")
    np.testing.assert_allclose(linear_head(explainer.graph, "features", explainer.logits_name), fc, rtol=1e-6)


def test_cam_on_mobilenet_equals_gradcam(mobilenet_small):
    explainer = Explainer(mobilenet_small, provider="cpu")
    x = RNG.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    cam, grad = explainer.explain(x, "cam"), explainer.explain(x, "gradcam")
    assert cam.targets[0] == grad.targets[0]
    name = cam.layers[0]
    scale = np.linalg.lstsq(grad.weights[name].reshape(-1, 1), cam.weights[name].reshape(-1), rcond=None)[0][0]
    np.testing.assert_allclose(cam.weights[name], scale * grad.weights[name],
                               atol=1e-4 * np.abs(cam.weights[name]).max())
    np.testing.assert_allclose(cam.heatmaps, grad.heatmaps, atol=1e-4)


@pytest.mark.parametrize("tail, op", [("Sigmoid", "Sigmoid 'odd_tail'"), ("Relu", "Relu 'odd_tail'")])
def test_cam_names_the_op_that_breaks_the_head(tail, op):
    explainer = Explainer(conv_classifier(tail_op=tail), layer="features", provider="cpu")
    with pytest.raises(OnnxcamError, match=op):
        explainer.explain(RNG.normal(size=(1, 3, 16, 16)).astype(np.float32), "cam")


def test_cam_on_an_earlier_layer_names_the_convolution_in_the_way():
    explainer = Explainer(conv_classifier(), layer="r1", provider="cpu")
    with pytest.raises(OnnxcamError, match="Conv 'conv2'"):
        explainer.explain(RNG.normal(size=(1, 3, 16, 16)).astype(np.float32), "cam")


# -- Score-CAM --------------------------------------------------------------------------------

def _bilinear_align_corners(image, size):
    """From the definition (torch UpsamplingBilinear2d): output pixel (i, j) interpolates the
    four input pixels around (i (h-1)/(H-1), j (w-1)/(W-1))."""
    h, w = image.shape
    y = np.arange(size[0]) * (h - 1) / max(size[0] - 1, 1)
    x = np.arange(size[1]) * (w - 1) / max(size[1] - 1, 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    dy, dx = (y - y0)[:, None], (x - x0)[None, :]
    return ((1 - dy) * (1 - dx) * image[np.ix_(y0, x0)] + (1 - dy) * dx * image[np.ix_(y0, x1)]
            + dy * (1 - dx) * image[np.ix_(y1, x0)] + dy * dx * image[np.ix_(y1, x1)])


def test_bilinear_upsampling_with_aligned_corners():
    image = RNG.normal(size=(3, 4))
    up = bilinear_matrix(7, 3) @ image @ bilinear_matrix(9, 4).T
    np.testing.assert_allclose(up, _bilinear_align_corners(image, (7, 9)), atol=1e-12)
    assert up[0, 0] == pytest.approx(image[0, 0]) and up[-1, -1] == pytest.approx(image[-1, -1])


def _slow_scorecam_weights(image, activations, target, logits_of):
    """One masked input at a time, as the paper describes (float64 masks)."""
    scores = []
    for channel in activations:
        up = _bilinear_align_corners(channel.astype(np.float64), image.shape[1:])
        mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
        scores.append(logits_of((image * mask[None]).astype(np.float32)[None])[0, target])
    scores = np.array(scores, np.float64)
    return np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()


def test_scorecam_weights_match_a_slow_loop_through_the_original_model(mobilenet_small):
    explainer = Explainer(mobilenet_small, provider="cpu", batch_size=32)
    session = ort.InferenceSession(str(mobilenet_small), providers=["CPUExecutionProvider"])
    x = RNG.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    result = explainer.explain(x, "scorecam", targets=7)
    name = result.layers[0]
    activations = result.activations[name][0]
    slow = _slow_scorecam_weights(x[0], activations, 7,
                                  lambda batch: session.run(["logits"], {"input": batch})[0])
    np.testing.assert_allclose(result.weights[name][0], slow, rtol=1e-4, atol=1e-7)
    expected_map = combine_layers([(slow[:, None, None] * activations).sum(0)[None]], (128, 128))
    np.testing.assert_allclose(result.heatmaps, expected_map, atol=1e-4)


def test_scorecam_runs_each_distinct_mask_once_with_the_same_weights():
    """Constant channels (all zero, saturated at 6) have the all-zero mask by definition and
    a duplicated channel has its twin's mask: 7 channels, 4 distinct masks, 4 model inputs;
    the weights are those of scoring every channel's own mask."""
    A = RNG.normal(size=(1, 7, 3, 4))
    A[0, 1] = 0.0
    A[0, 3] = 6.0
    A[0, 5] = A[0, 2]
    A[0, 6] = 0.0
    unique, which = distinct_masks(A[0])
    assert len(unique) == 4 and which[1] == which[3] == which[6] and which[2] == which[5]
    assert not np.any(upsampled_masks(unique[[which[3]]], (6, 8)))
    x = RNG.normal(size=(1, 2, 6, 8)).astype(np.float32)
    W = RNG.normal(size=(3, 2 * 48))
    seen = []

    def linear(batch):
        seen.append(len(batch))
        return batch.reshape(len(batch), -1).astype(np.float64) @ W.T
    seeds = np.eye(3)[None, [0, 2]]
    weights = scorecam_weights(x, A, seeds, linear, batch_size=3)[0]
    assert sum(seen) == 4
    scores = []
    for channel in A[0]:
        up = _bilinear_align_corners(channel, (6, 8))
        constant = channel.min() == channel.max()  # then up - min is 0: the mask is zero
        mask = np.zeros_like(up) if constant else (up - up.min()) / (up.max() - up.min() + 1e-8)
        scores.append((x[0] * mask[None]).reshape(-1) @ W[[0, 2]].T)
    scores = np.array(scores).T
    expected = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(weights, expected / expected.sum(1, keepdims=True), rtol=1e-5)


def test_scorecam_max_channels_keeps_the_highest_variance_channels():
    A = RNG.normal(size=(1, 6, 3, 3))
    A[0, 2] *= 10
    A[0, 4] *= 5
    kept = highest_variance_channels(A[0], 2)
    assert kept.tolist() == [2, 4]
    x = RNG.normal(size=(1, 2, 6, 6)).astype(np.float32)
    W = RNG.normal(size=(3, 2 * 36))

    def linear(batch):
        return batch.reshape(len(batch), -1) @ W.T
    seeds = np.eye(3)[None, [1]]
    weights = scorecam_weights(x, A, seeds, linear, batch_size=4, max_channels=2)[0, 0]
    assert np.count_nonzero(weights) == 2 and weights.sum() == pytest.approx(1.0)
    masks = upsampled_masks(A[0][[2, 4]], (6, 6))
    scores = np.array([linear(x * m[None, None])[0, 1] for m in masks])
    np.testing.assert_allclose(weights[[2, 4]], np.exp(scores) / np.exp(scores).sum(), rtol=1e-5)


# -- Ablation-CAM -----------------------------------------------------------------------------

def _with_channel_override(model: onnx.ModelProto, layer: str, channels: int) -> onnx.ModelProto:
    """The full model with ``layer`` replaced by ``layer * keep + fill`` (inputs [1, K, 1, 1]):
    ablating a channel re-runs the whole network, independently of onnxcam's head."""
    override = onnx.ModelProto()
    override.CopyFrom(model)
    graph = override.graph
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == layer:
                node.input[i] = "ablated"
    graph.node.extend([helper.make_node("Mul", [layer, "keep"], ["kept"]),
                       helper.make_node("Add", ["kept", "fill"], ["ablated"])])
    for name in ("keep", "fill"):
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, channels, 1, 1]))
    sorted_nodes = _toposort(list(graph.node), {i.name for i in graph.input} | {t.name for t in graph.initializer})
    del graph.node[:]
    graph.node.extend(sorted_nodes)
    return override


def _toposort(nodes, available):
    ordered, available = [], set(available)
    while nodes:
        ready = [n for n in nodes if all(i in available or not i for i in n.input)]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        nodes = [n for n in nodes if n not in ready]
    return ordered


def _ablation_by_rerunning(model, layer, x, target, activations):
    channels = activations.shape[1]
    session = ort.InferenceSession(_with_channel_override(model, layer, channels).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    logits_name = "logits"
    low = activations[0].min()
    value = 0.0 if low == 0 else low - 1e7
    keep = np.ones((1, channels, 1, 1), np.float32)
    fill = np.zeros((1, channels, 1, 1), np.float32)
    feeds = {session.get_inputs()[0].name: x}
    y = session.run([logits_name], {**feeds, "keep": keep, "fill": fill})[0][0, target]
    weights = []
    for k in range(channels):
        keep_k, fill_k = keep.copy(), fill.copy()
        keep_k[0, k], fill_k[0, k] = 0.0, value
        y_k = session.run([logits_name], {**feeds, "keep": keep_k, "fill": fill_k})[0][0, target]
        weights.append((y - y_k) / y)
    return np.array(weights)


def test_ablationcam_matches_rerunning_the_full_model_with_the_channel_zeroed(mobilenet_small):
    model = onnx.load(str(mobilenet_small))
    explainer = Explainer(model, provider="cpu")
    x = RNG.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    result = explainer.explain(x, "ablationcam", targets=3)
    name = result.layers[0]
    expected = _ablation_by_rerunning(model, name, x, 3, result.activations[name])
    scale = np.abs(expected).max()
    np.testing.assert_allclose(result.weights[name][0], expected, atol=2e-3 * scale)


def residual_classifier(classes: int = 4, size: int = 10, seed: int = 3) -> onnx.ModelProto:
    """input -> Conv -> Relu 'a' -> Conv -> Relu 'b' -> Add(b, a) 'sum' -> GAP -> Flatten ->
    Gemm -> logits: 'b' is bypassed by the residual, so the head cut at 'b' also reads 'a'."""
    rng = np.random.default_rng(seed)
    init = {"w1": rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32),
            "w2": rng.normal(0, 0.4, (6, 6, 3, 3)).astype(np.float32),
            "b2": rng.normal(0, 0.1, 6).astype(np.float32),
            "fc": rng.normal(0, 0.5, (classes, 6)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
             helper.make_node("Conv", ["a", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["b"], name="relu2"),
             helper.make_node("Add", ["b", "a"], ["sum"], name="residual"),
             helper.make_node("GlobalAveragePool", ["sum"], ["pooled"], name="gap"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1, name="fc")]
    model = build_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        init, name="residual")
    return model


def test_ablationcam_on_a_layer_bypassed_by_a_residual_feeds_the_frontier():
    model = residual_classifier()
    explainer = Explainer(model, layer="b", provider="cpu")
    assert explainer.frontier("b") == ("a",)
    x = RNG.normal(size=(2, 3, 10, 10)).astype(np.float32)
    result = explainer.explain(x, "ablationcam", targets=[1, 2])
    for n, target in enumerate([1, 2]):
        expected = _ablation_by_rerunning(model, "b", x[n:n + 1], target, result.activations["b"][n:n + 1])
        np.testing.assert_allclose(result.weights["b"][n], expected, rtol=1e-4, atol=1e-5)


def test_ablation_weights_formula_on_a_linear_head():
    """y = v . mean(A): ablating channel k (min 0 -> zeroed) removes v_k mean(A_k)."""
    A = np.abs(RNG.normal(size=(1, 4, 3, 3)))
    A[0, 0, 0, 0] = 0.0
    v = RNG.normal(size=4)

    def head(batch, image):
        return (batch.mean(axis=(2, 3)) @ v)[:, None]
    weights = ablationcam_weights(A, np.ones((1, 1, 1)), head, batch_size=3)[0, 0]
    y = A[0].mean(axis=(1, 2)) @ v
    np.testing.assert_allclose(weights, v * A[0].mean(axis=(1, 2)) / y, rtol=1e-6)


# -- pixel space ------------------------------------------------------------------------------

def pointwise_classifier(seed: int = 4, rectifier: str = "relu") -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """input [N,3,6,6] -> 1x1 Conv -> rectifier 'features' -> 1x1 Conv -> rectifier -> GAP ->
    Flatten -> Gemm: small enough to backpropagate by hand in numpy. ``rectifier`` "relu", or
    "relu6": Clip(0, 6) with its bounds from Constant nodes, as torch exports ReLU6."""
    rng = np.random.default_rng(seed)
    params = {"w1": rng.normal(0, 3, (4, 3, 1, 1)).astype(np.float32),
              "w2": rng.normal(0, 2, (5, 4, 1, 1)).astype(np.float32),
              "fc": rng.normal(0, 1, (3, 5)).astype(np.float32)}

    def rectify(source, target):
        if rectifier == "relu":
            return [helper.make_node("Relu", [source], [target])]
        bounds = [helper.make_node("Constant", [], [f"{target}_{name}"],
                                   value=numpy_helper.from_array(np.array(value, np.float32)))
                  for name, value in (("lo", 0.0), ("hi", 6.0))]
        return bounds + [helper.make_node("Clip", [source, f"{target}_lo", f"{target}_hi"], [target])]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"]), *rectify("c1", "features"),
             helper.make_node("Conv", ["features", "w2"], ["c2"]), *rectify("c2", "r2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    model = build_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        params, name="pointwise")
    return model, {k: v[:, :, 0, 0].astype(np.float64) if v.ndim == 4 else v.astype(np.float64)
                   for k, v in params.items()}


def _numpy_backprop(x, p, target, guided, top=np.inf):
    """d logit / d x by hand; ``guided`` applies Springenberg et al.'s rule at both
    rectifiers (``top`` 6 for ReLU6: no gradient where it saturates)."""
    c1 = np.einsum("oc,nchw->nohw", p["w1"], x)
    r1 = np.clip(c1, 0, top)
    c2 = np.einsum("oc,nchw->nohw", p["w2"], r1)
    hw = x.shape[2] * x.shape[3]
    g = np.broadcast_to(p["fc"][target][None, :, None, None] / hw, c2.shape)
    g = g * ((c2 > 0) & (c2 < top)) * ((g > 0) if guided else 1)
    g = np.einsum("oc,nohw->nchw", p["w2"], g)
    g = g * ((c1 > 0) & (c1 < top)) * ((g > 0) if guided else 1)
    return np.einsum("oc,nohw->nchw", p["w1"], g)


@pytest.mark.parametrize("rectifier", ["relu", "relu6"])
@pytest.mark.parametrize("method, guided", [("saliency", False), ("guided-backprop", True)])
def test_input_gradient_maps_match_numpy_backprop(method, guided, rectifier):
    model, params = pointwise_classifier(rectifier=rectifier)
    explainer = Explainer(model, provider="cpu")
    x = RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)
    result = explainer.explain(x, method, targets=[2, 0])
    top = 6.0 if rectifier == "relu6" else np.inf
    for n, target in enumerate([2, 0]):
        grad = _numpy_backprop(x[n:n + 1].astype(np.float64), params, target, guided, top)
        if guided:  # the rule must bite: guided differs from the plain gradient here
            plain = _numpy_backprop(x[n:n + 1].astype(np.float64), params, target, False, top)
            assert np.abs(grad - plain).max() > 1e-3
        expected = scale_maps(np.abs(grad).max(axis=1))
        np.testing.assert_allclose(result.heatmaps[n], expected[0], atol=1e-5)


def test_guided_gradcam_is_guided_backprop_times_the_gradcam_map():
    model, params = pointwise_classifier()
    explainer = Explainer(model, layer="features", provider="cpu")
    x = RNG.normal(size=(1, 3, 6, 6)).astype(np.float32)
    cam = explainer.explain(x, "gradcam", targets=1)
    result = explainer.explain(x, "guided-gradcam", targets=1)
    guided = _numpy_backprop(x.astype(np.float64), params, 1, guided=True)
    expected = scale_maps(np.abs(guided * cam.heatmaps[:, None]).max(axis=1))
    np.testing.assert_allclose(result.heatmaps, expected, atol=1e-5)


def test_guided_backprop_guides_relu6_clips_too(mobilenet_small):
    explainer = Explainer(mobilenet_small, provider="cpu")
    x = RNG.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    plain = explainer.explain(x, "saliency", targets=5).heatmaps
    guided = explainer.explain(x, "guided-backprop", targets=5).heatmaps
    assert np.abs(plain - guided).max() > 0.1  # MobileNet has only Clip(0, 6) rectifiers


def _strip_rectifiers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its rectifiers made Identity: linear, so its input gradient is constant."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for node in stripped.graph.node:
        if node.op_type in ("Relu", "Clip"):
            node.op_type = "Identity"
            del node.input[1:]
    return stripped


def test_smoothgrad_equals_saliency_where_the_gradient_is_constant():
    explainer = Explainer(_strip_rectifiers(conv_classifier()), layer="features", provider="cpu")
    x = RNG.normal(size=(1, 3, 16, 16)).astype(np.float32)
    saliency = explainer.explain(x, "saliency", targets=2).heatmaps
    smooth = explainer.explain(x, "smoothgrad", targets=2, samples=5, noise=0.3).heatmaps
    np.testing.assert_allclose(smooth, saliency, atol=1e-4)


def test_smoothgrad_without_noise_is_saliency_and_noise_changes_it(mobilenet_small):
    explainer = Explainer(mobilenet_small, provider="cpu")
    x = RNG.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    saliency = explainer.explain(x, "saliency", targets=4).heatmaps
    np.testing.assert_allclose(explainer.explain(x, "smoothgrad", targets=4, samples=2, noise=0.0).heatmaps,
                               saliency, atol=1e-5)
    noisy = explainer.explain(x, "smoothgrad", targets=4, samples=4, noise=0.2)
    assert np.abs(noisy.heatmaps - saliency).max() > 0.05
    again = explainer.explain(x, "smoothgrad", targets=4, samples=4, noise=0.2)
    np.testing.assert_array_equal(noisy.heatmaps, again.heatmaps)  # seeded noise


def test_integrated_gradients_completeness_on_a_smooth_function():
    """sum IG = f(x) - f(x') (Sundararajan et al., prop. 1) for f = sum(c sin x)."""
    c = RNG.normal(size=(1, 3, 4, 4))
    x = RNG.normal(size=(1, 3, 4, 4)).astype(np.float32)

    def gradient(points, seeds):
        return (np.cos(points) * c).astype(np.float32)
    attributions = integrated_gradients(x, np.ones((1, 1, 1)), gradient, steps=400, baseline=0.0)
    expected = float((c * np.sin(x)).sum() - 0.0)
    assert attributions.sum() == pytest.approx(expected, rel=1e-2, abs=1e-3)


def test_integrated_gradients_on_a_model_satisfy_completeness():
    model = _strip_rectifiers(conv_classifier())
    explainer = Explainer(model, layer="features", provider="cpu")
    x = RNG.normal(size=(1, 3, 16, 16)).astype(np.float32)
    baseline = np.full_like(x, -0.5)
    rewritten, session = explainer.prepared(input_gradient=True)
    seeds = np.eye(5, dtype=np.float32)[[3]]

    def gradient(points, rows):
        name = rewritten.gradients[rewritten.input]
        return session.run({rewritten.input: points, "onnxcam_seed": rows}, [name])[name]
    attributions = integrated_gradients(x, seeds[None], gradient, steps=8, baseline=baseline)
    logits = explainer.forward(np.concatenate([x, baseline]))[explainer.logits_name]
    assert attributions.sum() == pytest.approx(logits[0, 3] - logits[1, 3], rel=1e-3)
    heatmap = explainer.explain(x, "integrated-gradients", targets=3, steps=8, baseline=baseline).heatmaps
    np.testing.assert_allclose(heatmap, scale_maps(pixel_map(attributions[:, 0])), atol=1e-5)


# -- options ----------------------------------------------------------------------------------

def test_aug_smooth_is_the_mean_over_flips_and_brightness_with_the_targets_fixed(mobilenet_small):
    explainer = Explainer(mobilenet_small, provider="cpu")
    x = RNG.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    top = int(explainer.explain(x).targets[0])
    smoothed = explainer.explain(x, "gradcam", aug_smooth=True)
    maps = []
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            image = (x[..., ::-1] if flip else x) * np.float32(factor)
            heat = explainer.explain(np.ascontiguousarray(image), "gradcam", targets=top).heatmaps
            maps.append(heat[..., ::-1] if flip else heat)
    np.testing.assert_allclose(smoothed.heatmaps, np.mean(maps, axis=0), atol=1e-6)
    assert smoothed.targets[0] == top


def test_eigen_smooth_through_the_explainer(mobilenet_small):
    explainer = Explainer(mobilenet_small, provider="cpu")
    x = RNG.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    result = explainer.explain(x, "gradcam", eigen_smooth=True)
    name = result.layers[0]
    weighted = result.weights[name][:, :, None, None] * result.activations[name]
    expected = scale_maps(scale_maps(first_principal_component(weighted), (128, 128)))
    np.testing.assert_allclose(result.heatmaps, expected, atol=1e-6)


def test_eigen_smooth_is_refused_for_pixel_methods():
    explainer = Explainer(conv_classifier(), provider="cpu")
    with pytest.raises(OnnxcamError, match="eigen_smooth"):
        explainer.explain(np.zeros((1, 3, 16, 16), np.float32), "saliency", eigen_smooth=True)


def test_several_layers_at_once_combine_as_pytorch_grad_cam(mobilenet_small):
    names = [l.name for l in Explainer(mobilenet_small).layers()[-4::3]]
    both = Explainer(mobilenet_small, layer=names, provider="cpu")
    x = RNG.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    for method in ("gradcam", "layercam"):
        combined = both.explain(x, method, targets=2)
        singles = [Explainer(mobilenet_small, layer=n, provider="cpu").explain(x, method, targets=2)
                   for n in names]
        raw = [METHODS[method].raw_map(s.activations[n], s.gradients[n]) for s, n in zip(singles, names)]
        np.testing.assert_allclose(combined.heatmaps, combine_layers(raw, (128, 128)), atol=1e-5)


# -- channel importance -----------------------------------------------------------------------

def test_channel_importance_ranks_channels_by_weight(mobilenet_small):
    explainer = Explainer(mobilenet_small, provider="cpu")
    x = RNG.uniform(-1, 1, (2, 3, 128, 128)).astype(np.float32)
    report = explainer.channels(x, "gradcam", targets=[1, 2], k=4)
    result = explainer.explain(x, "gradcam", targets=[1, 2])
    weights = result.weights[report.layer]
    for n in range(2):
        order = np.argsort(-weights[n], kind="stable")
        assert report.most[n].tolist() == order[:4].tolist()
        assert report.least[n].tolist() == order[::-1][:4].tolist()
        np.testing.assert_allclose(report.most_weights[n], weights[n][order[:4]])
        for slot, channel in enumerate(report.most[n]):
            expected = scale_maps(result.activations[report.layer][n, channel][None], (128, 128))[0]
            np.testing.assert_allclose(report.most_maps[n, slot], expected, atol=1e-6)
    assert report.most_maps.shape == (2, 4, 128, 128)
    assert report.most_weights.min() >= report.least_weights.max()


def test_channel_importance_needs_a_channel_weighting_method():
    explainer = Explainer(conv_classifier(), provider="cpu")
    with pytest.raises(OnnxcamError, match="does not weight channels"):
        explainer.channels(np.zeros((1, 3, 16, 16), np.float32), "hirescam")


# -- every method: finite, in [0, 1]; zero where degenerate ----------------------------------

FAST = {"max_channels": 24, "samples": 3, "steps": 4}


@pytest.fixture(scope="module")
def small_explainer(mobilenet_small):
    return Explainer(mobilenet_small, provider="cpu")


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].kind != "attention"])  # transformers: test_transformers.py
def test_every_method_gives_finite_maps_in_unit_range_on_mobilenet(small_explainer, method):
    x = RNG.uniform(-1, 1, (2, 3, 128, 128)).astype(np.float32)
    black = np.full((1, 3, 128, 128), -1.0, np.float32)  # an all-black photo, preprocessed x/127.5 - 1
    for batch in (x, black):
        heatmaps = small_explainer.explain(batch, method, **FAST).heatmaps
        assert heatmaps.shape == (len(batch), 128, 128)
        assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0


def _bias_free(model: onnx.ModelProto) -> onnx.ModelProto:
    """conv_classifier without biases: an all-zero input gives all-zero activations."""
    free = onnx.ModelProto()
    free.CopyFrom(model)
    for node in free.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            del node.input[2:]
    return free


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].kind != "attention"])  # transformers: test_transformers.py
def test_degenerate_maps_of_an_all_black_image_are_zero_not_nan(method):
    explainer = Explainer(_bias_free(conv_classifier()), layer="features", provider="cpu")
    heatmaps = explainer.explain(np.zeros((1, 3, 16, 16), np.float32), method, targets=1, **FAST).heatmaps
    assert np.isfinite(heatmaps).all()
    assert not np.any(heatmaps), f"{method} stretched a degenerate map"
