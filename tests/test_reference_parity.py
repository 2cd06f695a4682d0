"""Parity with what users compare onnxcam with: torch autograd, pytorch-grad-cam and Captum.

The fixtures under ``tests/fixtures/reference/<arch>/`` are torchvision models with fixed
random weights, exported to ONNX, and ``reference.npz``: two images, one target class per
image, the target layer's ONNX tensor name (found by value, see the tool), torch's activation
and gradients, and the maps pytorch-grad-cam and Captum compute on the same weights. They are
made by ``tools/make_reference_fixtures.py``; torch is not needed here.

What is compared, per image:

* the activation A and ``dA = d logit[t] / dA`` (onnxcam's own autodiff against torch
  autograd) to float32 precision: ``max |err| <= 1e-4 max |ref| + 1e-6``; the same for the
  input gradient, plain and guided;
* every map method that the fixture and :data:`onnxcam.METHODS` both have (collected at import
  time, so a method added to either side later is tested without editing this file):
  Pearson correlation >= 0.99 and max abs difference <= 0.02 on [0, 1] maps;
* Grad-CAM on two layers (pytorch-grad-cam's mean-over-layers aggregation) and with its
  test-time augmentation; CAM, where the head is global pooling -> linear, against Grad-CAM
  (there they differ by the factor 1/hw, which the scaling removes).

Two references depend on a convention, and the tool stores both answers:

* Eigen-CAM / Eigen-Grad-CAM: the sign of a singular vector is arbitrary, and
  pytorch-grad-cam's depends on the BLAS build (its issues #315, #364), while onnxcam fixes it
  (positive correlation with the mean activation). Each image's map must equal the map of
  one of the two signs, ``<key>`` or ``<key>:negated``, to the same tolerances.
* Pixel-space maps: Captum returns attributions (N, 3, H, W); onnxcam's maps are
  ``max_c |a_c|`` min-max scaled (``onnxcam/pixel.py``), so the references are reduced the
  same way here. Guided backprop's reference guides ReLU6 as well as ReLU, as onnxcam does
  (Captum as is only rewrites ``nn.ReLU``; the tool's docstring has the numbers).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from onnxcam import METHODS, Explainer

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
ARCHS = sorted(p.name for p in FIXTURES.glob("*") if (p / "reference.npz").is_file())

MIN_CORRELATION = 0.99
MAX_ABS_DIFF = 0.02
GRADIENT_RTOL, GRADIENT_ATOL = 1e-4, 1e-6
SIGN_AMBIGUOUS = ("eigencam", "eigengradcam")
#: pixel-space methods whose reference is a raw (N, C, H, W) attribution; saliency is stored
#: already reduced (Captum's ``abs=True``, max over channels), which is the same rule.
PIXEL = ("saliency", "integrated-gradients", "guided-backprop")


def _keys(arch: str) -> list[str]:
    with np.load(FIXTURES / arch / "reference.npz") as data:
        return list(data.files)


@functools.cache
def reference(arch: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / arch / "reference.npz") as data:
        return {key: data[key] for key in data.files}


@functools.cache
def explainer(arch: str, layers: tuple[str, ...] | None) -> Explainer:
    """One explainer per model and layer choice (None: onnxcam's default layer)."""
    return Explainer(FIXTURES / arch / "model.onnx", layer=None if layers is None else list(layers),
                     provider="cpu")


def _layer_explainer(arch: str) -> Explainer:
    return explainer(arch, (str(reference(arch)["layer"]),))


def _method_cases() -> list:
    """(arch, key, options) for every reference map onnxcam has a method for; a key
    ``method:option`` is that method with ``option=True`` (e.g. ``gradcam:aug_smooth``)."""
    cases = []
    for arch in ARCHS:
        for key in _keys(arch):
            method, _, option = key.partition(":")
            if method in METHODS and option in ("", "aug_smooth"):
                cases.append(pytest.param(arch, key, method, option, id=f"{arch}-{key}"))
    return cases


# -- comparisons ----------------------------------------------------------------------------
def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """``max |actual - expected| <= 1e-4 max |expected| + 1e-6`` (float32 through ~50 layers)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    error = float(np.abs(actual.astype(np.float64) - expected).max())
    bound = GRADIENT_RTOL * float(np.abs(expected).max()) + GRADIENT_ATOL
    assert error <= bound, f"{what}: max abs error {error:.3g} > {bound:.3g}"


def map_agreement(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(Pearson correlation, max abs difference) of two maps; two constant maps that are
    equal correlate perfectly (an all-zero map must stay all zero on both sides)."""
    diff = float(np.abs(actual.astype(np.float64) - expected).max())
    if np.ptp(actual) == 0 or np.ptp(expected) == 0:
        return (1.0 if diff <= MAX_ABS_DIFF and np.ptp(actual) == np.ptp(expected) else 0.0), diff
    return float(np.corrcoef(actual.ravel(), expected.ravel())[0, 1]), diff


def assert_maps_agree(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    for n, (a, e) in enumerate(zip(actual, expected)):
        corr, diff = map_agreement(a, e)
        assert corr >= MIN_CORRELATION and diff <= MAX_ABS_DIFF, (
            f"{what}, image {n}: correlation {corr:.4f} (>= {MIN_CORRELATION}), "
            f"max abs diff {diff:.4f} (<= {MAX_ABS_DIFF})")


def scale(maps: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's per-image scaling: ReLU, ``(m - min) / (max + 1e-7)``."""
    maps = np.maximum(maps.astype(np.float32), 0)
    low = maps.min(axis=(1, 2), keepdims=True)
    return (maps - low) / ((maps - low).max(axis=(1, 2), keepdims=True) + 1e-7)


def reference_maps(ref: dict[str, np.ndarray], key: str, method: str, actual: np.ndarray) -> np.ndarray:
    """The reference maps for ``key``; for a sign-ambiguous method, per image the sign whose
    map correlates better with onnxcam's (both signs are valid pytorch-grad-cam outputs)."""
    if method in PIXEL:
        raw = ref[key]
        return scale(np.abs(raw).max(axis=1) if raw.ndim == 4 else raw)
    if method in SIGN_AMBIGUOUS:
        signs = [ref[key], ref[f"{key}:negated"]]
        return np.stack([max((s[n] for s in signs), key=lambda m: map_agreement(actual[n], m)[0])
                         for n in range(len(actual))])
    return ref[key]


# -- the tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_default_layer_is_the_last_spatial_activation(arch):
    """The fixture's layer is the output of the module right before global pooling, found by
    value; onnxcam's default must be that tensor."""
    layers = explainer(arch, None).layers()
    default = next(layer.name for layer in layers if layer.default)
    assert default == str(reference(arch)["layer"]), f"{arch}: onnxcam's default layer is {default}"


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_and_layer_gradient_match_torch(arch):
    ref = reference(arch)
    name = str(ref["layer"])
    result = _layer_explainer(arch).explain(ref["input"], "gradcam", ref["targets"])
    assert_close(result.logits, ref["logits"], f"{arch} logits")
    assert_close(result.activations[name], ref["activation"], f"{arch} activation {name}")
    assert_close(result.gradients[name], ref["gradient"], f"{arch} d logit / d {name}")


@pytest.mark.parametrize("relu,key", [("plain", "input_gradient"), ("guided", "guided-backprop")])
@pytest.mark.parametrize("arch", ARCHS)
def test_input_gradient_matches_torch(arch, relu, key):
    """The gradient through the whole network (every op's VJP rule), plain and guided; the
    layer does not matter here, so onnxcam's default is used."""
    ref = reference(arch)
    cam = explainer(arch, None)
    rewritten, _ = cam.prepared(input_gradient=True, relu=relu)
    seeds = np.eye(ref["logits"].shape[1], dtype=np.float32)[ref["targets"]]
    outputs, _ = cam.run(ref["input"], seeds, input_gradient=True, relu=relu)
    assert_close(outputs[rewritten.gradients[rewritten.input]], ref[key], f"{arch} {relu} d logit / d input")


@pytest.mark.parametrize("arch,key,method,option", _method_cases())
def test_map_matches_reference(arch, key, method, option):
    ref = reference(arch)
    options = {option: True} if option else {}
    if method == "integrated-gradients":
        options["steps"] = int(ref["integrated-gradients:steps"])
    actual = _layer_explainer(arch).explain(ref["input"], method, ref["targets"], **options).heatmaps
    assert_maps_agree(actual, reference_maps(ref, key, method, actual), f"{arch} {key}")


@pytest.mark.parametrize("arch", ARCHS)
def test_two_layer_gradcam_matches_pytorch_grad_cam(arch):
    """pytorch-grad-cam's aggregation: each layer's map scaled at the input size, ReLU, mean,
    scaled again; the two layers have different resolutions (7x7 and 4x4)."""
    ref = reference(arch)
    layers = tuple(str(n) for n in ref["gradcam-multilayer:layers"])
    actual = explainer(arch, layers).explain(ref["input"], "gradcam", ref["targets"]).heatmaps
    assert_maps_agree(actual, ref["gradcam-multilayer"], f"{arch} gradcam on {layers}")


def test_fixtures_are_present():
    """The parametrized tests above silently vanish without fixtures: make that loud."""
    assert len(ARCHS) >= 3, f"expected >= 3 fixture directories in {FIXTURES}, found {ARCHS}"
