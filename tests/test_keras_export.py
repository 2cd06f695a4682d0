"""A real Keras model exported by tf2onnx, checked against TensorFlow's own gradients.

The fixture (``tests/fixtures/keras``, made by ``tools/make_keras_fixture.py`` in a separate
TensorFlow environment; see its docstring) is a channels-last CNN: NHWC input entering through
a Transpose, Conv with ``padding='same'`` at strides 1 and 2 (asymmetric pads), BatchNorm left
as Mul/Add, ReLU, ReLU6 and hard-swish as Clip, swish as Sigmoid * x, a depthwise Conv, a
residual Add, a SAME max pool with asymmetric pads, global average pooling, Dense logits and a
separate Softmax output. ``reference.npz`` holds, from ``tf.GradientTape``, the logits, the
activation ``A`` of three Keras layers and ``dA = d logit[t] / dA``, and ``dx = d logit[t] / dx``,
all NHWC; ``provenance.json`` names the ONNX tensor holding each layer's output (found by value)
and the layout it is stored in. No TensorFlow is imported here.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnxcam.cli import app
from onnxcam.explainer import Explainer
from onnxcam.model import ModelGraph, load_model
from onnxcam.surgery import GRAD_PREFIX, SEED, RewriteRequest, rewrite

FIXTURE = Path(__file__).parent / "fixtures" / "keras"
MODEL = FIXTURE / "keras_cnn.onnx"
#: float32 on both sides, different kernels and summation orders: relative max error bound.
RTOL = 1e-3


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "reference.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def provenance() -> dict:
    return json.loads((FIXTURE / "provenance.json").read_text())


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |actual - expected| / max |expected|`` (shapes must agree)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def nchw(array: np.ndarray) -> np.ndarray:
    """TensorFlow's NHWC arrays in onnxcam's NCHW (Explanation.activations/gradients)."""
    return array.transpose(0, 3, 1, 2)


def one_hot(classes: np.ndarray, count: int) -> np.ndarray:
    return np.eye(count, dtype=np.float32)[classes]


def minmax(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's ``scale_cam_image``: per map ReLU, ``(m - min) / (max + 1e-7)``,
    bilinear resize with OpenCV, written out here so the check does not reuse onnxcam's."""
    out = []
    for m in np.maximum(maps, 0):
        m = m - m.min()
        m = m / (m.max() + 1e-7)
        out.append(cv2.resize(m.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR))
    return np.clip(np.stack(out), 0, 1)


def tf_gradcam(activation: np.ndarray, grad: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    r"""Grad-CAM (Selvaraju et al. 2017, eq. 1-2) from TensorFlow's NHWC ``A`` and ``dA``:
    :math:`w_k = \frac{1}{hw}\sum_{ij} dA_{ijk}`, :math:`L = \mathrm{relu}(\sum_k w_k A_k)`,
    scaled and resized, then scaled again as pytorch-grad-cam's ``aggregate_multi_layers``
    does even for a single layer (the resize moves the maximum off 1)."""
    weights = grad.mean(axis=(1, 2))
    return minmax(minmax(np.einsum("nhwk,nk->nhw", activation, weights), size), size)


def test_fixture_is_a_tf2onnx_nhwc_export():
    """The premise of the other tests: an NHWC input, a Transpose into the NCHW body, and the
    asymmetric pads that stride-2 SAME padding produces."""
    graph = ModelGraph(load_model(MODEL), str(MODEL))
    nodes = graph.model.graph.node
    assert graph.model.producer_name == "tf2onnx"
    first = graph.consumers[graph.input.name]
    assert [n.op_type for n in first] == ["Transpose"]
    pads = {tuple(a.ints) for n in nodes if n.op_type in ("Conv", "MaxPool") for a in n.attribute if a.name == "pads"}
    assert (0, 0, 1, 1) in pads  # top/left 0, bottom/right 1: TensorFlow's SAME at stride 2
    assert any(a.name == "group" and a.i > 1 for n in nodes for a in n.attribute)  # depthwise
    assert graph.static_batch() is None  # batch left dynamic by the export


def test_input_layout_and_default_layer(provenance):
    graph = ModelGraph(load_model(MODEL), str(MODEL))
    assert graph.input_layout() == "NHWC"
    assert graph.static_input_hw() == (32, 32)
    assert graph.logits() == "logits"  # the Softmax output 'probs' is looked through
    layers = {layer.name: layer for layer in graph.layers()}
    for keras_name, info in provenance["layers"].items():
        h, w, c = info["shape_nhwc"]
        layer = layers[info["onnx_name"]]  # every probed Keras layer is a candidate
        assert layer.shape == (c, h, w) and layer.layout == info["stored_layout"], keras_name
    last = provenance["layers"][provenance["last_spatial_layer"]]
    defaults = [layer for layer in layers.values() if layer.default]
    assert [d.name for d in defaults] == [last["onnx_name"]]
    h, w, c = last["shape_nhwc"]
    assert defaults[0].shape == (c, h, w)


@pytest.mark.parametrize("keras_layer", ["stem_relu", "residual", "head_hswish"])
def test_gradcam_gradients_match_tensorflow(keras_layer, reference, provenance):
    """Activations and d logit[t] / dA at each probed layer equal TensorFlow's; the earlier
    layers put the gradient through the asymmetric-pad Conv and MaxPool, the depthwise Conv,
    swish, ReLU6, hard-swish and both paths of the residual."""
    name = provenance["layers"][keras_layer]["onnx_name"]
    explainer = Explainer(MODEL, layer=name, provider="cpu")
    result = explainer.explain(reference["x"], "gradcam", reference["targets"])
    assert result.layers == (name,)
    np.testing.assert_array_equal(result.targets, reference["targets"])
    assert relative_error(result.logits, reference["logits"]) <= RTOL
    assert relative_error(result.activations[name], nchw(reference[f"activation:{keras_layer}"])) <= RTOL
    assert relative_error(result.gradients[name], nchw(reference[f"grad:{keras_layer}"])) <= RTOL


def test_gradcam_heatmap_matches_tensorflow(reference, provenance):
    """The default layer's Grad-CAM equals the map computed from TensorFlow's A and dA."""
    last = provenance["last_spatial_layer"]
    result = Explainer(MODEL, provider="cpu").explain(reference["x"], "gradcam", reference["targets"])
    expected = tf_gradcam(reference[f"activation:{last}"], reference[f"grad:{last}"], (32, 32))
    assert result.heatmaps.shape == (2, 32, 32)
    np.testing.assert_allclose(result.heatmaps, expected, atol=1e-4)


def test_default_target_is_tensorflows_top1(reference):
    result = Explainer(MODEL, provider="cpu").explain(reference["x"], "gradcam")
    np.testing.assert_array_equal(result.targets, reference["logits"].argmax(1))
    assert not np.array_equal(result.targets, reference["targets"])  # the fixed targets differ


def test_input_gradient_matches_tensorflow(reference, provenance):
    """``onnxcam_grad/<input>`` of the rewritten model, run with onnxruntime directly, is
    TensorFlow's d logit[t] / dx, NHWC like the input."""
    model = load_model(MODEL)
    graph = ModelGraph(model, str(MODEL))
    last = provenance["layers"][provenance["last_spatial_layer"]]["onnx_name"]
    rewritten = rewrite(model, RewriteRequest((last,), graph.logits(), input_gradient=True), str(MODEL))
    assert rewritten.gradients[graph.input.name] == GRAD_PREFIX + graph.input.name
    session = ort.InferenceSession(rewritten.model.SerializeToString(), providers=["CPUExecutionProvider"])
    seeds = one_hot(reference["targets"], reference["logits"].shape[1])
    grad_input, logits = session.run([GRAD_PREFIX + graph.input.name, "logits"],
                                     {graph.input.name: reference["x"], SEED: seeds})
    assert relative_error(logits, reference["logits"]) <= RTOL
    assert relative_error(grad_input, reference["grad_input"]) <= RTOL


def test_saliency_reads_the_channel_axis_of_an_nhwc_input(reference):
    """Saliency (max over colour channels of |dx|) must take the channels from axis 3 here."""
    result = Explainer(MODEL, provider="cpu").explain(reference["x"], "saliency", reference["targets"])
    expected = minmax(np.abs(reference["grad_input"]).max(axis=3), (32, 32))
    np.testing.assert_allclose(result.heatmaps, expected, atol=1e-4)


def test_cli_explains_the_keras_model(reference, provenance, tmp_path):
    """``onnxcam explain`` on a PNG: the model's declared preprocessing (x / 127.5 - 1) and
    labels are used, the class and probability are TensorFlow's, the map is the Grad-CAM of
    TensorFlow's A and dA for that image."""
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["explain", str(MODEL), str(FIXTURE / "image.png"), "-o", str(out),
                                 "--npy", "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())[0]
    target = int(reference["image_target"][0])
    logits = reference["image_logits"][0].astype(np.float64)
    probability = np.exp(logits[target] - logits.max()) / np.exp(logits - logits.max()).sum()
    assert record["target"] == target and record["label"] == provenance["labels"][target]
    assert record["probability"] == pytest.approx(probability, abs=1e-5)
    last = provenance["last_spatial_layer"]
    assert record["layer"] == provenance["layers"][last]["onnx_name"]
    expected = tf_gradcam(reference[f"image_activation:{last}"], reference[f"image_grad:{last}"], (32, 32))
    np.testing.assert_allclose(np.load(out / "image.gradcam.npy"), expected[0], atol=1e-4)
    assert cv2.imread(str(out / "image.gradcam.png")).shape == (32, 32, 3)

    listing = runner.invoke(app, ["layers", str(MODEL), "--json"])
    assert listing.exit_code == 0, listing.output
    described = json.loads(listing.output)
    assert described["input_layout"] == "NHWC" and described["logits"] == "logits"
