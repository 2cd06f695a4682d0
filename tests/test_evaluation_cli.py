"""``onnxcam evaluate`` end to end on the bundled demo model (objects with known boxes), the
HTML report rendered in headless Chromium, and ``onnxcam explain --boxes``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxcam.cli import app
from tests.tiny_models import conv_classifier

runner = CliRunner()
DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
FAST = ["--steps", "16", "--road-percentiles", "30,70", "--sanity-steps", "2", "--resamples", "200",
        "--occlusion", "16", "8"]


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The demo's 8 samples (4 with two shapes), each explained for its best-scoring object's
    class through a label mapping, by Grad-CAM and the vanilla gradient."""
    out = tmp_path_factory.mktemp("evaluation")
    mapping = out / "map.json"
    labels = (DEMO / "labels.txt").read_text().split()
    mapping.write_text(json.dumps({label: label for label in labels}))
    code, output = run("evaluate", DEMO / "shapes.onnx", DEMO / "samples", "--annotations",
                       DEMO / "samples" / "samples.json", "-m", "gradcam", "-m", "saliency",
                       "--label-map", mapping, "--provider", "cpu", "-o", out / "report", *FAST)
    assert code == 0, output
    return out / "report", json.loads((out / "report" / "results.json").read_text())


def test_results_hold_every_metric_per_image_and_method(evaluated):
    report, results = evaluated
    assert results["methods"] == ["gradcam", "saliency"]
    assert len(results["images"]) == 8
    for record in results["images"]:
        assert record["label"] in record["objects"]  # the explained class is one of the image's objects
        assert len(record["boxes"]) == 1  # two-shape images: only the explained object's box
        for entry in record["methods"].values():
            assert {"iou", "loc_acc", "pointing", "energy_pointing", "average_drop", "increase",
                    "deletion_auc", "insertion_auc", "road_combined", "occlusion_rho"} <= set(entry["metrics"])
            assert len(entry["curves"]["deletion"]) == 17
    summary = results["summary"]["gradcam"]
    for name in ("pointing", "maxboxacc", "maxboxacc_v2", "deletion_auc", "insertion_auc", "occlusion_rho"):
        assert summary[name]["low"] <= summary[name]["mean"] <= summary[name]["high"], name
    # known truth: Grad-CAM points at the explained shape on every sample (tests/test_demo.py)
    assert summary["pointing"]["mean"] == 1.0
    assert summary["insertion_auc"]["mean"] > summary["deletion_auc"]["mean"]
    assert results["sanity"]["gradcam"]["changed_at"] is not None
    table = (report / "summary.md").read_text().splitlines()  # header, rule, one row per method
    assert len(table) == 4 and table[2].startswith("| gradcam | ") and table[3].startswith("| saliency | ")
    cost = results["cost_per_image_and_method"]
    assert cost["deletion"]["passes"] == 2 * 17 and cost["road"]["passes"] == 4
    assert cost["faithfulness"]["passes"] == 49 / 2  # 7x7 windows per image, shared by both methods


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed here (.ci/run installs Debian's 'chromium' with apt-get "
                    "where it can; this machine could not)")
    return found


def _chromium_run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--no-first-run", f"--user-data-dir={profile}",
                           *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    browser = _chromium()
    report, results = evaluated
    page = (report / "index.html").as_uri()
    html = (report / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch from a network
    dom = _chromium_run(browser, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", page).stdout
    expected = 8 * (1 + 2)  # per image: the photo and one overlay per method
    assert f'data-loaded="{expected}"' in dom and f'data-total="{expected}"' in dom, dom[:500]
    assert 'data-rows="2"' in dom  # the summary table has one row per method
    assert dom.count("<polyline") == 4  # deletion and insertion curves per method
    shot = tmp_path / "shot.png"
    _chromium_run(browser, tmp_path / "profile", "--window-size=1200,1600", f"--screenshot={shot}", page)
    image = cv2.imread(str(shot))
    assert image is not None, "chromium wrote no screenshot"
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 1000  # not blank


def test_explain_boxes_writes_box_and_pseudo_mask(tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(conv_classifier(size=16), model)
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    code, output = run("explain", model, photo, "--boxes", "--threshold", "0.3", "--npy", "-o", tmp_path / "out")
    assert code == 0, output
    record = json.loads((tmp_path / "out" / "results.json").read_text())[0]["targets"][0]
    mask = cv2.imread(str(tmp_path / "out" / record["mask"]), cv2.IMREAD_UNCHANGED)
    heatmap = np.load(tmp_path / "out" / "photo.gradcam.npy")
    assert mask.shape == (40, 60) and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, heatmap > 0.3 * heatmap.max())
    x1, y1, x2, y2 = record["box_xyxy"]
    assert record["threshold"] == 0.3 and 0 <= x1 < x2 <= 60 and 0 <= y1 < y2 <= 40
    assert mask[int(y1):int(y2), int(x1):int(x2)].max() == 255
    code, output = run("explain", model, photo, "--boxes", "--threshold", "1.5", "-o", tmp_path / "bad")
    assert code == 2 and output.startswith("error: --threshold") and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("problem, message", [
    ("missing", "no such annotations file"),
    ("unannotated", "no annotation for this image"),
    ("family", "unknown metric family"),
])
def test_evaluate_errors_are_one_line_and_write_nothing(tmp_path, problem, message):
    annotations = DEMO / "samples" / "samples.json"
    images = [DEMO / "samples" / "circle.png"]
    extra = []
    if problem == "missing":
        annotations = tmp_path / "nope.json"
    elif problem == "unannotated":
        stray = tmp_path / "stray.png"
        cv2.imwrite(str(stray), np.zeros((8, 8, 3), np.uint8))
        images = [stray]
    else:
        extra = ["--metrics", "pointing,vibes"]
    code, output = run("evaluate", DEMO / "shapes.onnx", *images, "--annotations", annotations,
                       "-o", tmp_path / "out", *extra)
    assert code == 2 and output.startswith("error:") and message in output, output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_python_api_on_an_nhwc_model(tmp_path):
    """The perturbation metrics work in NCHW and feed the model its own layout: on an NHWC
    export each deletion curve starts at the explained class's probability."""
    from onnxcam.evaluation import EvaluationConfig, evaluate, load_annotations
    from onnxcam.explainer import Explainer
    from tests.tiny_models import nhwc_classifier

    rng = np.random.default_rng(1)
    entries = []
    for n in range(3):
        cv2.imwrite(str(tmp_path / f"im{n}.png"), rng.integers(0, 255, (24, 30, 3), dtype=np.uint8))
        entries.append({"image": f"im{n}.png", "objects": [{"label": "thing", "box_xyxy": [2, 3, 20, 18]}]})
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    explainer = Explainer(nhwc_classifier(), provider="cpu", cache=False)
    config = EvaluationConfig(families=("localization", "pointing", "confidence", "deletion", "road", "faithfulness"),
                              steps=8, road_percentiles=(50,), occlusion_patch=4, occlusion_stride=4, resamples=100)
    result = evaluate(explainer, load_annotations(tmp_path / "ann.json"), ["gradcam"],
                      explainer.preprocess("raw"), config).results
    for record in result["images"]:
        curves = record["methods"]["gradcam"]["curves"]
        assert curves["deletion"][0] == pytest.approx(record["probability"], rel=1e-5)
        assert record["methods"]["gradcam"]["metrics"]["road_combined"] is not None
    assert result["cost_per_image_and_method"]["faithfulness"]["passes"] == 9  # 3x3 windows on 12x12
