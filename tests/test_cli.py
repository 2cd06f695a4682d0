"""The command line: outputs on success, one-line errors and no files on failure."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxcam.cli import app
from tests.conftest import shared_file
from tests.test_surgery import _op_without_rule
from tests.tiny_models import conv_classifier, mlp_classifier, nhwc_classifier

runner = CliRunner()


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(conv_classifier(size=16), path)
    return path


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    return path


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_explain_writes_overlay_npy_and_results(tiny, photo, tmp_path):
    out = tmp_path / "out"
    code, output = run("explain", tiny, photo, "-o", out, "--npy", "--provider", "cpu")
    assert code == 0, output
    overlay = cv2.imread(str(out / "photo.gradcam.png"))
    assert overlay.shape == (40, 60, 3)  # at the original image size
    heatmap = np.load(out / "photo.gradcam.npy")
    assert heatmap.shape == (40, 60) and heatmap.dtype == np.float32
    assert 0 <= heatmap.min() and heatmap.max() <= 1
    records = json.loads((out / "results.json").read_text())
    assert records[0]["file"] == str(photo) and records[0]["method"] == "gradcam"
    assert records[0]["layer"] == "features" and records[0]["provider"] == "cpu"
    assert 0 < records[0]["probability"] <= 1 and records[0]["seconds"] > 0


def test_target_by_label_and_index(tiny, photo, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("ant\nbee\ncat\ndog\nelk\n")
    code, output = run("explain", tiny, photo, "-o", tmp_path / "a", "--labels", labels, "-t", "cat")
    assert code == 0, output
    record = json.loads((tmp_path / "a" / "results.json").read_text())[0]
    assert (record["target"], record["label"]) == (2, "cat")
    code, output = run("explain", tiny, photo, "-o", tmp_path / "b", "-t", "7")
    assert code != 0 and "out of range" in output and not (tmp_path / "b").exists()
    code, output = run("explain", tiny, photo, "-o", tmp_path / "c", "--labels", labels, "-t", "zebra")
    assert code != 0 and "zebra" in output


def test_layers_lists_candidates_with_default(tiny):
    code, output = run("layers", tiny)
    assert code == 0
    lines = [l for l in output.splitlines() if l.startswith("*")]
    assert len(lines) == 1 and "features" in lines[0] and "12,8,8" in lines[0]
    code, output = run("layers", tiny, "--json")
    assert json.loads(output)["logits"] == "logits"


def test_nhwc_model_explained_at_an_nhwc_layer(tmp_path, photo):
    path = tmp_path / "nhwc.onnx"
    onnx.save(nhwc_classifier(), path)
    code, output = run("explain", path, photo, "-o", tmp_path / "o", "-l", "act_nhwc", "--npy")
    assert code == 0, output
    assert np.load(tmp_path / "o" / "photo.gradcam.npy").shape == (40, 60)


def _error_case(tmp_path, kind, tiny, photo):
    if kind == "missing model":
        return [tmp_path / "absent.onnx", photo], "no such file"
    if kind == "not onnx":
        bad = tmp_path / "fake.onnx"
        bad.write_text("hello, I am text")
        return [bad, photo], "not an ONNX model"
    if kind == "no spatial activation":
        mlp = tmp_path / "mlp.onnx"
        onnx.save(mlp_classifier(), mlp)
        return [mlp, photo], "no spatial activation"
    if kind == "missing image":
        return [tiny, photo, tmp_path / "nope.png"], "no such image"
    if kind == "unsupported op":
        odd = tmp_path / "odd.onnx"
        onnx.save(conv_classifier(tail_op=_op_without_rule()), odd)
        return [odd, photo, "-l", "features"], "odd_tail"
    if kind == "unknown layer":
        return [tiny, photo, "-l", "nope"], "no tensor or node named 'nope'"
    if kind == "unknown method":
        return [tiny, photo, "-m", "magic"], "unknown method 'magic'"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing model", "not onnx", "no spatial activation",
                                  "missing image", "unsupported op", "unknown layer", "unknown method"])
def test_bad_input_is_one_line_error_and_no_output(tmp_path, tiny, photo, kind):
    args, message = _error_case(tmp_path, kind, tiny, photo)
    out = tmp_path / "out"
    code, output = run("explain", *args, "-o", out)
    assert code == 2
    lines = [l for l in output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], output
    assert "Traceback" not in output
    assert not out.exists()


def test_unsupported_op_error_suggests_a_working_layer(tmp_path, photo):
    odd = tmp_path / "odd.onnx"
    onnx.save(conv_classifier(tail_op=_op_without_rule()), odd)
    code, output = run("explain", odd, photo, "-o", tmp_path / "out", "-l", "features")
    assert code == 2 and "odd_tail" in output and "-l tail" in output
    # and the suggestion works
    code, output = run("explain", odd, photo, "-o", tmp_path / "out", "-l", "tail")
    assert code == 0, output


def test_console_script_runs_mobilenet(tmp_path):
    """The installed entry point, on the real MobileNet: exit 0 and a named prediction."""
    model = shared_file("models/mobilenet/mobilenet_v1_0.25_128.onnx")
    labels = shared_file("models/mobilenet/imagenet_labels.txt")
    image = shared_file("data/photos/parrot.jpg")
    done = subprocess.run([sys.executable, "-m", "onnxcam.cli", "explain", str(model), str(image),
                           "--preset", "inception", "--labels", str(labels), "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "macaw" in done.stdout


def test_dynamic_size_model_needs_and_takes_size(tmp_path, photo):
    path = tmp_path / "dyn.onnx"
    model = conv_classifier()
    for axis in (2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = "S"
    onnx.save(model, path)
    code, output = run("explain", path, photo, "-o", tmp_path / "no")
    assert code == 2 and "--size" in output
    code, output = run("explain", path, photo, "-o", tmp_path / "yes", "--size", 24, 20, "--npy")
    assert code == 0, output
    assert np.load(tmp_path / "yes" / "photo.gradcam.npy").shape == (40, 60)
    code, output = run("layers", path, "--size", 24, 20)
    assert code == 0 and "12,12,10" in output


def test_several_targets_topk_and_seed_vectors(tiny, photo, tmp_path):
    code, output = run("explain", tiny, photo, "-o", tmp_path / "t", "-t", "1,3", "--npy")
    assert code == 0, output
    record = json.loads((tmp_path / "t" / "results.json").read_text())[0]
    assert [t["target"] for t in record["targets"]] == [1, 3]
    one, three = np.load(tmp_path / "t" / "photo.gradcam.1.npy"), np.load(tmp_path / "t" / "photo.gradcam.3.npy")
    assert not np.allclose(one, three)
    code, output = run("explain", tiny, photo, "-o", tmp_path / "k", "--topk", 3)
    assert code == 0, output
    record = json.loads((tmp_path / "k" / "results.json").read_text())[0]
    probabilities = [t["probability"] for t in record["targets"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    # a seed vector equal to one-hot(3) explains class 3
    np.save(tmp_path / "seed.npy", np.eye(5, dtype=np.float32)[3])
    code, output = run("explain", tiny, photo, "-o", tmp_path / "s", "--seed-vector", tmp_path / "seed.npy", "--npy")
    assert code == 0, output
    np.testing.assert_allclose(np.load(tmp_path / "s" / "photo.gradcam.npy"), three, atol=1e-6)
    code, output = run("explain", tiny, photo, "-o", tmp_path / "x", "-t", "1", "--topk", 2)
    assert code == 2 and "only one of" in output


def test_channels_grid_and_record(tiny, photo, tmp_path):
    code, output = run("explain", tiny, photo, "-o", tmp_path / "c", "--channels", 2)
    assert code == 0, output
    record = json.loads((tmp_path / "c" / "results.json").read_text())[0]
    channels = record["channels"]
    assert len(channels["most"]) == 2 and len(channels["least"]) == 2
    assert min(channels["most_weights"]) >= max(channels["least_weights"])
    grid = cv2.imread(str(tmp_path / "c" / channels["grid"]))
    assert grid.shape == (256, 256, 3)


@pytest.mark.parametrize("method", ["gradcam++", "scorecam", "ablationcam", "saliency", "eigencam", "cam"])
def test_every_method_family_runs_from_the_cli(tiny, photo, tmp_path, method):
    code, output = run("explain", tiny, photo, "-o", tmp_path / "m", "-m", method, "--npy")
    assert code == 0, output
    heatmap = np.load(tmp_path / "m" / f"photo.{method}.npy")
    assert np.isfinite(heatmap).all() and 0 <= heatmap.min() and heatmap.max() <= 1
