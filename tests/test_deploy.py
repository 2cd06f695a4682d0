"""Shipping a self-explaining model (onnxcam.export, onnxcam.deploy): top-k in one file, the
metadata a consumer needs, ``export --check``, the browser page (onnxruntime-web in headless
Chromium), and Triton's model configuration."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnxcam import Explainer, OnnxcamError
from onnxcam.cli import app
from onnxcam.deploy import ExportedModel, triton_config
from onnxcam.export import HEATMAP, TARGET, TARGET_CLASS, export_explained, exportable_methods, save_explained
from onnxcam.methods import METHODS
from onnxcam.images import PRESETS, load_image, preprocess_from_metadata
from tests.conftest import shared_file
from tests.tiny_models import conv_classifier, nhwc_classifier

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo" / "shapes.onnx"
#: as tests/test_export.py: both sides compute in float32 from the same A and G
TOLERANCE = 1e-5
ARTIFACTS = Path(os.environ.get("ONNXCAM_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def batch(model: onnx.ModelProto, count: int, seed: int = 0, spread: float = 1.5) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0, spread, (count, *dims)), -spread, spread).astype(np.float32)


# -- top-k in one file ---------------------------------------------------------------------------

TOPK_MODELS = {"nchw": (conv_classifier, None), "nhwc": (nhwc_classifier, None),
               "nhwc-layer": (nhwc_classifier, "act_nhwc")}


#: the attention methods read every attention layer: exported one class per run
ONE_LAYER = [m for m in exportable_methods() if METHODS[m].kind != "attention"]


@pytest.mark.parametrize("method", ONE_LAYER)
@pytest.mark.parametrize("model_key", list(TOPK_MODELS))
def test_topk_export_equals_the_explainers_topk(model_key, method):
    factory, layer = TOPK_MODELS[model_key]
    model = export_explained(factory(), method, layer=layer, topk=3)
    assert TARGET not in [i.name for i in model.graph.input]
    x = batch(model, 2)
    out = run(model, {model.graph.input[0].name: x})
    reference = Explainer(factory(), layer=layer).explain(x, method, topk=3)
    assert out[HEATMAP].shape == reference.heatmaps.shape == (2, 3, *out[HEATMAP].shape[2:])
    assert out[TARGET_CLASS].shape == (2, 3)
    np.testing.assert_array_equal(out[TARGET_CLASS], reference.targets)
    np.testing.assert_array_equal(out[TARGET_CLASS], np.argsort(-reference.logits, axis=1, kind="stable")[:, :3])
    assert np.abs(out[HEATMAP] - reference.heatmaps).max() <= TOLERANCE
    if method != "counterfactual":
        assert (out[HEATMAP].reshape(6, -1).max(axis=1) > 0.5).all(), "a trivial map proves nothing"


def test_topk_export_of_a_real_mobilenet_keeps_one_copy_of_the_weights():
    path = str(shared_file("models/mobilenet/mobilenet_v1_0.25_128.onnx"))
    single, top5 = export_explained(path, "gradcam"), export_explained(path, "gradcam", topk=5)
    # the head runs on its own copy of the graph, but its weights are the backbone's tensors
    assert top5.ByteSize() < single.ByteSize() * 1.01
    x = np.concatenate([batch(top5, 1, seed=s, spread=1.0) for s in range(3)])  # batch 3 on a batch-1 export
    out = run(top5, {top5.graph.input[0].name: x})
    reference = Explainer(path).explain(x, "gradcam", topk=5)
    np.testing.assert_array_equal(out[TARGET_CLASS], reference.targets)
    assert np.abs(out[HEATMAP] - reference.heatmaps).max() <= TOLERANCE


def test_topk_out_of_range_or_with_an_attention_method_is_refused():
    with pytest.raises(OnnxcamError, match="topk must be at most the class count"):
        export_explained(conv_classifier(), "gradcam", topk=99)
    vit = ROOT / "tests" / "fixtures" / "transformers" / "vit_ts.onnx"
    with pytest.raises(OnnxcamError, match="export it one class per run"):
        export_explained(str(vit), "rollout", topk=2)


# -- metadata --------------------------------------------------------------------------------------

def test_metadata_names_method_layer_version_source_hash_labels_and_preprocessing(tmp_path):
    source = tmp_path / "tiny.onnx"
    onnx.save(conv_classifier(), source)
    labels = [f"class {i}" for i in range(5)]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    out = tmp_path / "tiny.explained.onnx"
    code, text = cli("export", source, "-o", out, "-m", "gradcam++", "--labels", tmp_path / "labels.txt",
                     "--preset", "inception")
    assert code == 0, text
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    from onnxcam import __version__
    assert meta["onnxcam.method"] == "gradcam++" and meta["onnxcam.version"] == __version__
    assert meta["onnxcam.layer"] == Explainer(str(source)).targets_layers[0].name
    assert meta["onnxcam.source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert json.loads(meta["onnxcam.labels"]) == labels
    declared = preprocess_from_metadata(meta)
    assert declared.mean == PRESETS["inception"].mean and declared.std == PRESETS["inception"].std
    assert declared.layout == "NCHW" and declared.size == Explainer(str(source)).input_size


def test_an_exported_demo_model_keeps_the_labels_and_preprocessing_it_declares():
    meta = {p.key: p.value for p in export_explained(str(DEMO)).metadata_props}
    assert json.loads(meta["onnxcam.labels"]) == ["circle", "square", "triangle", "cross"]
    assert preprocess_from_metadata(meta).size == (64, 64)


# -- export --check --------------------------------------------------------------------------------

def test_check_runs_the_file_writes_overlays_and_agrees_with_the_explainer(tmp_path):
    out = tmp_path / "shapes.explained.onnx"
    assert cli("export", DEMO, "-o", out, "--topk", "2")[0] == 0
    samples = sorted((ROOT / "models" / "demo" / "samples").glob("*_*.png"))[:2]  # two-shape images
    code, text = cli("export", "--check", out, *samples, "-o", tmp_path / "check")
    assert code == 0, text
    report = json.loads((tmp_path / "check" / "check.json").read_text())
    assert report["passed"] and len(report["images"]) == 2
    for record in report["images"]:
        assert record["classes_equal"] and record["max_difference"] <= TOLERANCE
        assert len(record["overlays"]) == 2
        for name in record["overlays"]:
            picture = cv2.imread(str(tmp_path / "check" / name))
            assert picture is not None and picture.shape[:2] == (128, 128)
    # the two shapes of each image are its two best classes
    expected = {s["image"]: s for s in json.loads((ROOT / "models" / "demo" / "samples" / "samples.json").read_text())}
    for sample, record in zip(samples, report["images"]):
        assert sorted(record["labels"]) == sorted(o["label"] for o in expected[sample.name]["objects"])


def test_check_fails_a_file_whose_heatmap_was_tampered_with(tmp_path):
    model = export_explained(str(DEMO))
    # the file's map is now transposed (the weighted channel sum, (N, 1, K) @ (N, K, h*w)
    # reshaped to (N, h, w), is read as (N, w, h)): a wrong map of the same (square) shape,
    # same classes
    producer = {out: node for node in model.graph.node for out in node.output}
    for index, node in enumerate(model.graph.node):
        source = producer.get(node.input[0]) if node.input else None
        if (node.op_type == "Reshape" and node.name.startswith("onnxcam_export") and source is not None
                and source.op_type == "MatMul" and producer[source.input[0]].op_type == "Unsqueeze"):
            summed = node.output[0]
            node.output[0] = summed + "_as_computed"
            model.graph.node.insert(index + 1, onnx.helper.make_node("Transpose", [summed + "_as_computed"],
                                                                     [summed], perm=[0, 2, 1]))
            break
    else:
        pytest.fail("no channel sum in the exported map to tamper with")
    path = tmp_path / "tampered.onnx"
    save_explained(model, path)
    image = ROOT / "models" / "demo" / "samples" / "cross_circle.png"
    code, text = cli("export", "--check", path, image, "-o", tmp_path / "check")
    assert code == 1 and "MISMATCH" in text and "FAILED" in text


def test_check_refuses_a_file_that_is_not_an_export(tmp_path):
    code, text = cli("export", "--check", DEMO, ROOT / "models" / "demo" / "samples" / "circle.png")
    assert code == 2 and "not a model written by `onnxcam export`" in text


# -- the browser -----------------------------------------------------------------------------------

def _required(what: str, found, how: str):
    """``found`` or a skip saying how to get it; under CI (.ci/run installs it) a failure."""
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing although .ci/run installs it")
    pytest.skip(f"{what} is not installed here: {how}")


def _onnxruntime_web() -> Path:
    folders = [Path(p) for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p]
    found = next((f for f in folders if (f / "onnxruntime-web" / "dist" / "ort.min.js").exists()), None)
    return _required("onnxruntime-web", found, "npm install onnxruntime-web and set NODE_PATH to its node_modules")


def _chromium() -> str:
    return _required("chromium", shutil.which("chromium"), "apt-get install chromium")


class _Server:
    """A static file server on 127.0.0.1 (a free port) for one test."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".wasm": "application/wasm"}

    def log_message(self, *args) -> None:
        pass


def _chromium_run(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             f"--user-data-dir={profile}", "--virtual-time-budget=30000"]
    return subprocess.run([_chromium(), *flags, *extra, url], capture_output=True, text=True, timeout=180)


def _element(dom: str, element_id: str) -> str:
    start = dom.index(f'id="{element_id}"')
    start = dom.index(">", start) + 1
    return dom[start:dom.index("</pre>", start)]


def test_web_page_runs_the_file_with_onnxruntime_web_like_python(tmp_path):
    node_modules = _onnxruntime_web()
    chromium_profile = tmp_path / "profile"
    out, site = tmp_path / "shapes.explained.onnx", tmp_path / "site"
    code, text = cli("export", DEMO, "-o", out, "--web", site)
    assert code == 0, text
    assert {"index.html", "onnxcam-web.js", "config.json", "model.onnx"} <= {p.name for p in site.iterdir()}
    (site / "node_modules").symlink_to(node_modules, target_is_directory=True)
    # the image at the model's size: the browser's canvas then holds exactly its pixels
    picture = cv2.imread(str(ROOT / "models" / "demo" / "samples" / "cross_circle.png"))
    cv2.imwrite(str(site / "sample.png"), cv2.resize(picture, (64, 64), interpolation=cv2.INTER_AREA))
    with _Server(site) as base:
        done = _chromium_run(f"{base}/index.html?image=sample.png", chromium_profile, "--dump-dom")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "web-export.png"
        _chromium_run(f"{base}/index.html?image=sample.png", tmp_path / "profile2",
                      f"--screenshot={shot}", "--window-size=640,480")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(_element(done.stdout, "result").replace("&quot;", '"'))
    assert "error" not in result, result
    page_input = np.frombuffer(base64.b64decode(_element(done.stdout, "input")), "<f4")
    exported = ExportedModel.load(out)
    x = page_input.reshape(1, 3, 64, 64)
    # the page's input is onnxcam's preprocessing of the same image
    python_input = preprocess_from_metadata(exported.metadata)([load_image(site / "sample.png")])
    assert np.abs(x - python_input).max() <= 1e-5
    expected = run(str(out), {exported.image_input: x, TARGET: np.array([-1], np.int64)})
    assert result["classes"] == expected[TARGET_CLASS].tolist()
    assert result["labels"][0] == exported.labels[expected[TARGET_CLASS][0]]
    assert result["heatmap_shape"] == list(expected[HEATMAP].shape)
    np.testing.assert_allclose(result["heatmap_sum"], expected[HEATMAP].astype(np.float64).sum(), rtol=1e-4)
    np.testing.assert_allclose([result["heatmap_min"], result["heatmap_max"]],
                               [expected[HEATMAP].min(), expected[HEATMAP].max()], atol=1e-5)
    screenshot = cv2.imread(str(shot))
    assert screenshot is not None and screenshot.std() > 10, "the page rendered blank"


# -- Triton ----------------------------------------------------------------------------------------

def _parse_triton(text: str):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="tritonclient[grpc] (a dev extra) is not installed")
    from google.protobuf import text_format
    return text_format.Parse(text, model_config_pb2.ModelConfig())


_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}


@pytest.mark.parametrize("topk", [None, 2])
def test_triton_config_parses_and_matches_the_models_io(tmp_path, topk):
    path = str(shared_file("models/mobilenet/mobilenet_v1_0.25_128.onnx"))
    out = tmp_path / "mobilenet.explained.onnx"
    args = ["export", path, "-o", out, "--triton", tmp_path / "repo"] + (["--topk", topk] if topk else [])
    code, text = cli(*args)
    assert code == 0, text
    config = _parse_triton((tmp_path / "repo" / "mobilenet" / "config.pbtxt").read_text())
    assert (tmp_path / "repo" / "mobilenet" / "1" / "model.onnx").read_bytes() == out.read_bytes()
    assert config.name == "mobilenet" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    from tritonclient.grpc import model_config_pb2
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [d.name for d in declared] == [a.name for a in actual]
        for d, a in zip(declared, actual):
            assert model_config_pb2.DataType.Name(d.data_type) == _TYPES[a.type]
            assert not isinstance(a.shape[0], int), "batch-dynamic IO: Triton batches on axis 0"
            inner = [s if isinstance(s, int) else -1 for s in a.shape[1:]]
            if inner:
                assert list(d.dims) == inner
            else:  # [N] tensors: one dim reshaped away
                assert list(d.dims) == [1] and d.HasField("reshape") and list(d.reshape.shape) == []
    # and what Triton would send (a batch of 3 of the declared dims) runs
    image = config.input[0]
    x = np.random.default_rng(0).uniform(-1, 1, (3, *image.dims)).astype(np.float32)
    feeds = {image.name: x}
    if len(config.input) > 1:
        feeds[config.input[1].name] = np.full((3,), -1, np.int64)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for declared in config.output:
        shape = outputs[declared.name].shape[1:]
        assert list(shape) == (list(declared.dims) if list(declared.reshape.shape) or len(shape) else [])


def test_triton_config_of_a_fixed_batch_export_has_no_batching():
    model = conv_classifier()
    exported = export_explained(model)
    for value in [*exported.graph.input, *exported.graph.output]:
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fixed.onnx"
        save_explained(exported, path)
        config = _parse_triton(triton_config(ExportedModel.load(path), "fixed"))
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [d.dim_value for d in exported.graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ["vit_ts", "deit_dynamo", "swin_ts"])
def test_topk_export_of_token_layer_transformers_equals_the_explainer(name):
    path = str(ROOT / "tests" / "fixtures" / "transformers" / f"{name}.onnx")
    model = export_explained(path, "gradcam", topk=3)
    x = batch(model, 2, spread=1.0) if not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value") \
        else batch(model, 1, spread=1.0)
    out = run(model, {model.graph.input[0].name: x})
    reference = Explainer(path).explain(x, "gradcam", topk=3)
    np.testing.assert_array_equal(out[TARGET_CLASS], reference.targets)
    assert np.abs(out[HEATMAP] - reference.heatmaps).max() <= TOLERANCE
