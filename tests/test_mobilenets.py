"""Every method on the three shared MobileNets (v1 0.25/128, v1 0.5/160, v2 1.0/224), on a
real photo (the Oxford-IIIT Pet Samoyed, whose mask we have) and on an all-black image.

What every map must be: float32, the model's input size, finite, in [0, 1], explaining the
top-1 class by default (checked against a plain onnxruntime run of the original model). On
the photo the map must not be flat and must put more of its energy on the dog than the dog's
share of the image (counterfactual excepted: it points away from the class by design).

The black image is *not* a zero-activation case on these models: after ``x/127.5 - 1`` it is
-1 everywhere, the convolutions have biases, and zero padding makes border positions differ
from interior ones, so the explained layer's activations are neither zero nor spatially
constant (asserted below) and most maps are legitimately non-trivial. What the definitions
do pin down, and what is asserted, on the black image (and where it holds, the photo too):

* Integrated Gradients from the image itself as baseline: ``(x - x') = 0``, the map is zero.
* SmoothGrad: sigma is a fraction of the image's value range, 0 for a constant image, so every
  noisy copy is the image and SmoothGrad equals saliency.
* Ablation-CAM: a channel that is zero everywhere is "ablated" to 0 (``min(A) = 0`` after
  ReLU6), which changes nothing, so its weight is exactly 0 (64-75 % of the channels on black).
* Score-CAM: a spatially constant channel's mask is all zero, so all such channels score the
  same masked input and get the same weight; a few weights are checked against direct runs.
* The heads are global average pooling then a linear layer, so ``dy/dA_k = W_ck / hw`` is
  spatially constant: Grad-CAM, HiResCAM, XGrad-CAM and CAM give the same map, and
  counterfactual Grad-CAM is ``scale(relu(-raw Grad-CAM))``. On the black image the top-1
  class's raw Grad-CAM map is positive at every position (observed on all three models), so
  there is nothing whose removal would raise the class: the counterfactual map is exactly
  zero, not noise stretched to [0, 1].
* Channel importance maps of channels that are constant are exactly zero.

The command line runs once per model, on the parrot photo, which all three call a macaw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnxcam import METHODS, Explainer
from onnxcam.cli import app
from onnxcam.images import load_image
from onnxcam.methods import scale_maps
from onnxcam.visualize import resize_map
from tests.conftest import shared_file
from tests.test_methods import _bilinear_align_corners

#: the layer each model is explained at by default: the ReLU6 of the last pointwise
#: convolution, right before the global average pool (for v2 named in ../shared/README.md),
#: and its (channels, h, w): 1024 x width multiplier channels (1280 for v2), input / 32.
MODELS = {
    "mobilenet_v1_0.25_128": ("MobilenetV1/MobilenetV1/Conv2d_13_pointwise/Relu6", (256, 4, 4)),
    "mobilenet_v1_0.5_160": ("MobilenetV1/MobilenetV1/Conv2d_13_pointwise/Relu6", (512, 5, 5)),
    "mobilenet_v2_1.0_224": ("MobilenetV2/Conv_1/Relu6", (1280, 7, 7)),
}
IMAGES = ("photo", "black")
#: methods whose map is sum_k w_k A_k with w computed from the spatially constant gradient
GAP_EQUIVALENT = ("hirescam", "xgradcam", "cam")


@dataclass
class Case:
    """One model: its explainer, the two preprocessed images, reference logits from plain
    onnxruntime, the dog mask, and the explanations computed so far (each method runs once)."""

    name: str
    explainer: Explainer
    images: dict[str, np.ndarray]
    reference_logits: dict[str, np.ndarray]
    dog: np.ndarray
    results: dict[tuple[str, str], object] = field(default_factory=dict)

    def explain(self, image: str, method: str):
        if (image, method) not in self.results:
            self.results[image, method] = self.explainer.explain(self.images[image], method)
        return self.results[image, method]

    @property
    def layer(self) -> str:
        return self.explainer.targets_layers[0].name


def _load_case(name: str) -> Case:
    path = shared_file(f"models/mobilenet/{name}.onnx")
    explainer = Explainer(path, provider="cpu")
    preprocess = explainer.preprocess("inception")
    photo = load_image(shared_file("data/annotated/dog_segmentation_256.bmp"))
    images = {"photo": preprocess([photo]), "black": preprocess([np.zeros_like(photo)])}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = {k: session.run(["logits"], {"input": v})[0] for k, v in images.items()}
    mask = cv2.imread(str(shared_file("data/annotated/masks/dog_segmentation_mask_256.bmp")),
                      cv2.IMREAD_UNCHANGED)
    return Case(name, explainer, images, logits, mask != 1)  # trimap: 0 pet, 1 background, 2 border


@pytest.fixture(scope="module", params=list(MODELS))
def case(request) -> Case:
    """Module-scoped, so pytest runs all tests of one model before loading the next one."""
    return _load_case(request.param)


# -- the default layer and the inputs ----------------------------------------------------------

def test_default_layer_is_the_last_pointwise_relu6(case):
    name, shape = MODELS[case.name]
    layers = case.explainer.layers()
    defaults = [layer for layer in layers if layer.default]
    assert [d.name for d in defaults] == [name] and defaults[0].shape == shape
    assert defaults[0].op == "Clip" and layers[-1].name == name  # the last spatial one, a ReLU6
    assert case.explain("photo", "gradcam").layers == (name,)


def test_black_image_is_minus_one_and_not_a_zero_activation_case(case):
    assert np.all(case.images["black"] == -1.0)
    A = case.explain("black", "gradcam").activations[case.layer][0]
    spread = A.reshape(len(A), -1).max(axis=1) - A.reshape(len(A), -1).min(axis=1)
    assert A.max() > 0 and spread.max() > 0, "biases and padding should make activations vary"


# -- every method: the contract ----------------------------------------------------------------

@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].kind != "attention"])  # transformers: test_transformers.py
def test_every_method_maps_both_images_within_the_contract(case, method):
    height, width = case.explainer.input_size
    for image in IMAGES:
        result = case.explain(image, method)
        heatmaps = result.heatmaps
        assert heatmaps.shape == (1, height, width) and heatmaps.dtype == np.float32
        assert np.isfinite(heatmaps).all(), f"{method} on the {image} image"
        assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
        # the default target is the top-1 class of the original model
        reference = case.reference_logits[image]
        np.testing.assert_allclose(result.logits, reference, rtol=1e-4, atol=1e-4)
        assert result.targets.tolist() == [int(np.argmax(reference))]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "counterfactual" and METHODS[m].kind != "attention"])
def test_photo_maps_are_not_flat_and_favour_the_dog(case, method):
    heatmap = case.explain("photo", method).heatmaps[0]
    assert heatmap.max() > 0.9 and heatmap.std() > 0.02, f"{method} gave a flat map"
    on_image = resize_map(heatmap, case.dog.shape)
    inside = float(on_image[case.dog].sum() / on_image.sum())
    assert inside > case.dog.mean(), f"{method}: {inside:.2f} of the energy on a dog covering {case.dog.mean():.2f}"


# -- what the definitions give -----------------------------------------------------------------

def test_smoothgrad_of_a_constant_image_is_saliency(case):
    """sigma = noise * (max - min) = 0: every noisy copy is the image itself."""
    np.testing.assert_allclose(case.explain("black", "smoothgrad").heatmaps,
                               case.explain("black", "saliency").heatmaps, atol=1e-6)
    assert not np.allclose(case.explain("photo", "smoothgrad").heatmaps,
                           case.explain("photo", "saliency").heatmaps, atol=1e-2)


@pytest.mark.parametrize("image", IMAGES)
def test_integrated_gradients_from_the_image_itself_is_zero(case, image):
    x = case.images[image]
    assert not np.any(case.explainer.explain(x, "integrated-gradients", baseline=x, steps=4).heatmaps)
    assert case.explain(image, "integrated-gradients").heatmaps.max() > 0.9  # the default baseline: 0


@pytest.mark.parametrize("image", IMAGES)
def test_ablationcam_gives_all_zero_channels_weight_zero(case, image):
    result = case.explain(image, "ablationcam")
    A = result.activations[case.layer][0]
    weights = result.weights[case.layer][0]
    zero = A.reshape(len(A), -1).max(axis=1) == 0
    assert A.min() == 0  # post-ReLU6: ablating sets a channel to 0
    assert zero.any() and np.all(weights[zero] == 0)
    assert np.count_nonzero(weights[~zero]) > 0.5 * np.count_nonzero(~zero)


@pytest.mark.parametrize("image", IMAGES)
def test_scorecam_scores_every_channel_and_matches_direct_runs(case, image):
    result = case.explain(image, "scorecam")
    A = result.activations[case.layer][0]
    weights = result.weights[case.layer][0].astype(np.float64)
    assert np.all(weights > 0) and weights.sum() == pytest.approx(1.0, abs=1e-5)  # full channel count
    flat = A.reshape(len(A), -1)
    constant = np.flatnonzero(flat.min(axis=1) == flat.max(axis=1))
    assert len(constant) > 0 and np.all(weights[constant] == weights[constant[0]])
    # log-weight differences are score differences: check a few channels by direct runs
    varying = np.flatnonzero(flat.min(axis=1) != flat.max(axis=1))
    chosen = [int(constant[0]), int(np.argmax(weights)), int(varying[0]), int(varying[-1])]
    session = ort.InferenceSession(str(shared_file(f"models/mobilenet/{case.name}.onnx")),
                                   providers=["CPUExecutionProvider"])
    x = case.images[image][0]
    target = int(result.targets[0])
    scores = []
    for channel in chosen:
        up = _bilinear_align_corners(A[channel].astype(np.float64), x.shape[1:])
        mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
        masked = (x * mask[None]).astype(np.float32)[None]
        scores.append(float(session.run(["logits"], {"input": masked})[0][0, target]))
    np.testing.assert_allclose(np.log(weights[chosen]) - np.log(weights[chosen[0]]),
                               np.array(scores) - scores[0], atol=2e-3)


@pytest.mark.parametrize("image", IMAGES)
def test_gap_linear_head_identities_and_the_zero_counterfactual(case, image):
    gradcam = case.explain(image, "gradcam")
    A, G = gradcam.activations[case.layer], gradcam.gradients[case.layer]
    assert np.abs(G - G.mean(axis=(2, 3), keepdims=True)).max() <= 1e-6 * np.abs(G).max()
    for method in GAP_EQUIVALENT:
        np.testing.assert_allclose(case.explain(image, method).heatmaps, gradcam.heatmaps, atol=2e-6)
    raw = (G.mean(axis=(2, 3))[:, :, None, None] * A).sum(axis=1)
    counterfactual = case.explain(image, "counterfactual").heatmaps
    np.testing.assert_allclose(counterfactual, scale_maps(-raw, counterfactual.shape[1:]), atol=2e-5)
    if image == "black":
        assert raw.min() > 0  # the class the model sees in a black image is supported everywhere
        assert not np.any(counterfactual), "a zero counterfactual map was stretched"


@pytest.mark.parametrize("image", IMAGES)
def test_channel_importance(case, image):
    x = case.images[image]
    report = case.explainer.channels(x, "gradcam", k=5)
    weights = case.explain(image, "gradcam").weights[case.layer][0]
    A = case.explain(image, "gradcam").activations[case.layer][0]
    order = np.argsort(-weights, kind="stable")
    assert report.most[0].tolist() == order[:5].tolist()
    assert report.least[0].tolist() == order[::-1][:5].tolist()
    assert report.most_maps.shape == (1, 5) + case.explainer.input_size
    for maps, chosen in ((report.most_maps[0], report.most[0]), (report.least_maps[0], report.least[0])):
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
        for channel_map, channel in zip(maps, chosen):
            constant = A[channel].min() == A[channel].max()
            assert (not np.any(channel_map)) if constant else channel_map.max() > 0.9


# -- the command line, once per model ----------------------------------------------------------

def test_cli_explains_the_parrot_as_a_macaw(case, tmp_path):
    photo = shared_file("data/photos/parrot.jpg")
    labels = shared_file("models/mobilenet/imagenet_labels.txt")
    result = CliRunner().invoke(app, [
        "explain", str(shared_file(f"models/mobilenet/{case.name}.onnx")), str(photo), "--preset", "inception",
        "--labels", str(labels), "--provider", "cpu", "--npy", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "results.json").read_text())[0]
    assert record["label"] == "macaw" and record["layer"] == MODELS[case.name][0]
    picture = load_image(photo)
    api = case.explainer.explain(case.explainer.preprocess("inception")([picture]))
    assert record["target"] == int(api.targets[0]) and record["probability"] == pytest.approx(
        float(api.probabilities[0, api.targets[0]]), rel=1e-5)
    heatmap = np.load(tmp_path / "parrot.gradcam.npy")
    np.testing.assert_allclose(heatmap, resize_map(api.heatmaps[0], picture.shape[:2]), atol=1e-5)
