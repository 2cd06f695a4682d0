"""Requests onnxcam must refuse, or results it must report, instead of computing garbage:
numeric options, normalization, non-finite numbers, outputs that are not class scores, fixed
batches, grayscale models, the API's inputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcam import Explainer, ModelError, OnnxcamError, OnnxcamWarning, Preprocess
from onnxcam.images import load_image
from onnxcam.validate import json_bytes
from tests.test_cli import photo, run, tiny  # noqa: F401 - fixtures
from tests.tiny_models import conv_classifier


def one_error_line(code: int, output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


# -- the command line's numbers ------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--batch-size", 0), ("--batch-size", -1), ("--topk", 0), ("--channels", 0), ("--max-channels", 0),
    ("--samples", 0), ("--steps", 0), ("--noise", -0.1), ("--noise", "nan"), ("--baseline", "inf"),
    ("--scale", "nan"),
])
def test_numeric_options_out_of_range_are_one_error_line(tmp_path, tiny, photo, option, value):
    code, output = run("explain", tiny, photo, "-o", tmp_path / "out", option, value)
    assert option in one_error_line(code, output)
    assert not (tmp_path / "out").exists()


def test_size_must_be_positive(tmp_path, photo):
    model = conv_classifier()
    for axis in (2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = "S"
    onnx.save(model, tmp_path / "dyn.onnx")
    for command in (["explain", tmp_path / "dyn.onnx", photo, "-o", tmp_path / "out"], ["layers", tmp_path / "dyn.onnx"]):
        assert "--size" in one_error_line(*run(*command, "--size", 0, 8))


@pytest.mark.parametrize("option, value, message", [
    ("--std", "0", "std (CLI: --std) must be finite and non-zero"),
    ("--std", "0.2,0,0.2", "std (CLI: --std) must be finite and non-zero"),
    ("--scale", "0", "scale (CLI: --scale) must be finite and non-zero"),
    ("--mean", "nan", "mean (CLI: --mean) must be finite"),
    ("--std", "inf", "std (CLI: --std) must be finite"),
])
def test_normalization_that_divides_by_zero_is_refused(tmp_path, tiny, photo, option, value, message):
    code, output = run("explain", tiny, photo, "-o", tmp_path / "out", option, value)
    assert message in one_error_line(code, output)
    assert not (tmp_path / "out").exists()
    with pytest.raises(OnnxcamError, match="must be finite"):
        Preprocess(std=(0.2, 0.0, 0.2))


# -- non-finite numbers ----------------------------------------------------------------------------

def nan_for_dark_images() -> onnx.ModelProto:
    """conv_classifier with ``logits = gemm + log(min over the image)``: -inf logits for an image
    with a 0 pixel (preset raw), finite ones otherwise; the explained layer's path to the
    logits is unchanged."""
    model = conv_classifier()
    graph = model.graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    gemm.output[0] = "gemm"
    extra = [helper.make_node("ReduceMin", ["input"], ["min_hw"], axes=[2, 3], keepdims=0),
             helper.make_node("ReduceMin", ["min_hw"], ["min_all"], axes=[1], keepdims=1),
             helper.make_node("Log", ["min_all"], ["log_min"]),
             helper.make_node("Add", ["gemm", "log_min"], ["logits"], name="add_log")]
    index = list(graph.node).index(gemm) + 1
    for offset, node in enumerate(extra):
        graph.node.insert(index + offset, node)
    onnx.checker.check_model(model)
    return model


def test_non_finite_logits_are_reported_per_image_and_json_stays_valid(tmp_path):
    onnx.save(nan_for_dark_images(), tmp_path / "nan.onnx")
    dark, photo = tmp_path / "dark.png", tmp_path / "bright.png"
    cv2.imwrite(str(dark), np.zeros((30, 30, 3), np.uint8))
    cv2.imwrite(str(photo), np.random.default_rng(0).integers(10, 255, (40, 60, 3), dtype=np.uint8))
    out = tmp_path / "out"
    code, output = run("explain", tmp_path / "nan.onnx", dark, photo, "-o", out, "--preset", "raw", "--npy")
    assert code == 1, output  # the image is reported as failed, the other one is explained
    assert "NaN or Inf" in output and "batch of 1" not in output  # the runner's blank-image check is quiet
    text = (out / "results.json").read_text()
    records = json.loads(text, parse_constant=lambda name: pytest.fail(f"results.json holds {name}"))
    records = sorted(records, key=lambda r: r["file"] != str(dark))  # dark first
    assert records[0]["error"] and records[0]["targets"][0]["overlay"] is None
    assert records[0]["probability"] is None
    assert "error" not in records[1] and 0 < records[1]["probability"] <= 1
    assert not (out / "dark.gradcam.png").exists() and not (out / "dark.gradcam.npy").exists()
    assert (out / "bright.gradcam.png").exists()
    # the API: the result says which images, and a warning names them
    explainer = Explainer(tmp_path / "nan.onnx")
    x = explainer.preprocess("raw")([load_image(dark), load_image(photo)])
    with pytest.warns(OnnxcamWarning, match=r"image\(s\) 0 of this batch of 2:"):
        result = explainer.explain(x)
    assert result.finite.tolist() == [False, True]
    with pytest.warns(OnnxcamWarning, match=r"image\(s\) 0 of this batch of 2:"):
        again = explainer.explain(x)  # the maps session now checks in the graph: the same warning
    np.testing.assert_array_equal(again.targets, np.argmax(again.logits, axis=1))  # numpy's, not the graph's
    np.testing.assert_array_equal(again.heatmaps, result.heatmaps)


def test_results_json_never_holds_nan():
    data = json.loads(json_bytes({"p": float("nan"), "w": [np.float32(np.inf), 1.5], "n": np.int64(3)}))
    assert data == {"p": None, "w": [None, 1.5], "n": 3}


def test_api_refuses_non_finite_and_empty_inputs(tiny):
    explainer = Explainer(tiny)
    x = np.zeros((2, 3, 16, 16), np.float32)
    x[1, 0, 3, 3] = np.nan
    with pytest.raises(OnnxcamError, match=r"NaN or Inf \(image 1\)"):
        explainer.explain(x)
    with pytest.raises(OnnxcamError, match="empty batch"):
        explainer.explain(np.zeros((0, 3, 16, 16), np.float32))
    with pytest.raises(OnnxcamError, match="empty batch"):
        explainer.preprocess()([])


# -- what the model must offer ---------------------------------------------------------------------

def test_a_feature_map_output_is_not_class_scores(tmp_path, tiny, photo):
    # a 4-D output may be a segmentation map (onnxcam.dense): named without a region, refused
    with pytest.raises(OnnxcamError, match=r"output 'features' has shape \[N, 12, 8, 8\]: not a class-score "
                                           r"vector \[N, C\]; to explain it as a segmentation output give a region"):
        Explainer(tiny, output="features").explain(np.zeros((1, 3, 16, 16), np.float32))
    line = one_error_line(*run("explain", tiny, photo, "-o", tmp_path / "out", "--output", "features"))
    assert "not a class-score vector" in line and not (tmp_path / "out").exists()


def test_a_single_score_is_explained_as_is(tmp_path):
    """A regression head or a binary logit [N, 1]: one score, explained (not refused)."""
    result = Explainer(conv_classifier(classes=1)).explain(np.ones((2, 3, 16, 16), np.float32))
    assert result.targets.tolist() == [0, 0] and result.heatmaps.shape == (2, 16, 16)


def test_unknown_provider_is_refused_at_construction(tiny):
    with pytest.raises(OnnxcamError, match="unknown provider 'tpu': use auto, cpu or cuda"):
        Explainer(tiny, provider="tpu")
    assert Explainer(tiny, provider="CPU").provider_requested == "cpu"


# -- batches fixed by the export -------------------------------------------------------------------

@pytest.mark.parametrize("method, kwargs", [("gradcam", {}), ("gradcam", {"topk": 2}), ("scorecam", {}),
                                            ("ablationcam", {}), ("saliency", {})])
def test_a_fixed_batch_of_two_takes_one_or_three_images(method, kwargs):
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    fixed, dynamic = Explainer(conv_classifier(batch=2)), Explainer(conv_classifier())
    for count in (1, 3):
        got = fixed.explain(x[:count], method, **kwargs)
        want = dynamic.explain(x[:count], method, **kwargs)
        assert got.heatmaps.shape == want.heatmaps.shape and len(got.logits) == count
        np.testing.assert_array_equal(got.targets, want.targets)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.heatmaps, want.heatmaps, atol=1e-5)


def test_a_fixed_batch_model_from_the_cli(tmp_path, photo):
    onnx.save(conv_classifier(batch=2), tmp_path / "b2.onnx")
    code, output = run("explain", tmp_path / "b2.onnx", photo, "-o", tmp_path / "one")
    assert code == 0, output
    copies = [tmp_path / f"photo{i}.png" for i in range(3)]  # one path given thrice is one image
    for copy in copies:
        copy.write_bytes(Path(photo).read_bytes())
    code, output = run("explain", tmp_path / "b2.onnx", *copies, "-o", tmp_path / "three")
    assert code == 0, output
    assert len(json.loads((tmp_path / "three" / "results.json").read_text())) == 3


# -- channels ------------------------------------------------------------------------------------

def test_grayscale_models_get_luma(tmp_path, photo):
    model = conv_classifier(channels=1)
    explainer = Explainer(model)
    image = load_image(photo)
    x = explainer.preprocess("raw")([image])
    assert x.shape == (1, 1, 16, 16)
    gray = cv2.cvtColor(cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    np.testing.assert_allclose(x[0, 0], gray / 255.0, atol=1e-5)
    custom = explainer.preprocess(mean=[0.5], std=[0.25])([image])
    np.testing.assert_allclose(custom[0, 0], (gray / 255.0 - 0.5) / 0.25, atol=1e-4)
    onnx.save(model, tmp_path / "gray.onnx")
    code, output = run("explain", tmp_path / "gray.onnx", photo, "-o", tmp_path / "out", "--npy")
    assert code == 0, output
    assert np.load(tmp_path / "out" / "photo.gradcam.npy").shape == (40, 60)


def test_topk_channels_are_reported_for_every_target(tmp_path, tiny, photo):
    code, output = run("explain", tiny, photo, "-o", tmp_path / "c", "--topk", 2, "--channels", 3)
    assert code == 0, output
    record = json.loads((tmp_path / "c" / "results.json").read_text())[0]
    channels = record["channels"]
    assert [c["target"] for c in channels] == [t["target"] for t in record["targets"]]
    assert len({c["grid"] for c in channels}) == 2 and all((tmp_path / "c" / c["grid"]).exists() for c in channels)
    assert channels[0]["most_weights"] != channels[1]["most_weights"]
    single = json.loads((tmp_path / "c" / "results.json").read_text())[0]
    code, output = run("explain", tiny, photo, "-o", tmp_path / "s", "--channels", 3)
    single = json.loads((tmp_path / "s" / "results.json").read_text())[0]
    assert single["channels"]["target"] == single["target"]


# -- the Python API's inputs -------------------------------------------------------------------------

def test_preprocess_takes_one_image_paths_or_a_list(tiny, photo, tmp_path):
    preprocess = Explainer(tiny).preprocess()
    image = load_image(photo)
    batch = preprocess([image])
    for given in (image, photo, str(photo), [photo], [str(photo)], image[None]):
        np.testing.assert_array_equal(preprocess(given), batch)
    np.testing.assert_array_equal(preprocess([photo, image]), np.concatenate([batch, batch]))
    with pytest.raises(OnnxcamError, match="image must be an"):
        preprocess(np.zeros((4, 4, 5)))


def test_api_errors_name_the_api_parameter(tmp_path):
    model = conv_classifier()
    for axis in (2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = "S"
    for call in (lambda: Preprocess()([np.zeros((4, 4, 3), np.float32)]), lambda: Explainer(model)):
        with pytest.raises(OnnxcamError) as caught:
            call()
        assert "input_size=(H, W)" in str(caught.value) and "(CLI: --size H W)" in str(caught.value)
    with pytest.raises(OnnxcamError, match=r"input_size \(CLI: --size\) must be positive"):
        Explainer(model, input_size=(0, 4))
