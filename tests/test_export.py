"""Self-explaining models (onnxcam.export): a plain onnxruntime session on the exported file
gives the Python API's heatmaps, the original logits and the explained classes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

import onnx_graphsurgeon as gs

from onnxcam import Explainer, OnnxcamError, OnnxcamWarning, large_models
from onnxcam.autodiff import Emitter
from onnxcam.cli import app
from onnxcam.export import (HEATMAP, TARGET, TARGET_CLASS, _post_process, export_explained,
                            exportable_methods, save_explained)
from onnxcam.methods import METHODS, combine_layers
from tests.conftest import shared_file
from tests.tiny_models import conv_classifier, nhwc_classifier

ROOT = Path(__file__).resolve().parents[1]
EXPORTABLE = [m for m in exportable_methods() if m not in ("rollout", "gradient-rollout")]  # transformers: test_transformers.py
#: Max |exported - Explainer| on maps in [0, 1]: both compute in float32 from the same A and G;
#: only the order of the sums (ReduceMean vs numpy's pairwise sums) and cv2's vs onnxruntime's
#: resize coordinates (~1e-7 relative) differ: measured <= 1.7e-6 on these models.
TOLERANCE = 1e-5


def _mobilenet() -> str:
    return str(shared_file("models/mobilenet/mobilenet_v1_0.25_128.onnx"))


#: key -> (model factory, layer): NCHW torch-like, NHWC tf2onnx-like input with its default
#: (NCHW) layer and with the NHWC activation itself, and a real MobileNet.
MODELS = {"nchw": (conv_classifier, None), "nhwc": (nhwc_classifier, None),
          "nhwc-layer": (nhwc_classifier, "act_nhwc"), "mobilenet": (_mobilenet, None)}


@lru_cache(maxsize=None)
def exported(model_key: str, method: str) -> onnx.ModelProto:
    factory, layer = MODELS[model_key]
    return export_explained(factory(), method, layer=layer)


@lru_cache(maxsize=None)
def explainer(model_key: str) -> Explainer:
    factory, layer = MODELS[model_key]
    reference = Explainer(factory(), layer=layer)
    reference.in_graph_maps = False  # numpy's maps: the reference, not the graph's own (onnxcam/ingraph.py)
    return reference


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: np.ndarray, target) -> dict[str, np.ndarray]:
    """Outputs by name for an image batch and ``target`` (an int for all, or one per image)."""
    sess = session(model)
    targets = np.broadcast_to(np.asarray(target, np.int64), (len(x),)).copy()
    feeds = {sess.get_inputs()[0].name: x, TARGET: targets}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def batch_is_dynamic(model: onnx.ModelProto) -> bool:
    return not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


def inputs_for(model_key: str, model: onnx.ModelProto, seed: int = 0) -> np.ndarray:
    """A batch of 3 where the exported batch is dynamic, else 1, in the model's layout."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    batch = 3 if batch_is_dynamic(model) else 1
    scale = 1.0 if model_key == "mobilenet" else 1.5  # mobilenet takes x/127.5 - 1, in [-1, 1]
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0, scale, (batch, *dims)), -scale, scale).astype(np.float32)


def original_logits(model_key: str, x: np.ndarray) -> np.ndarray:
    """The logits of the untouched model: its own output, or the Softmax's input exposed."""
    model = MODELS[model_key][0]()
    model = onnx.load(model) if isinstance(model, str) else model
    name = explainer(model_key).logits_name
    if name not in [o.name for o in model.graph.output]:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    outputs = [o.name for o in model.graph.output]
    sess = session(model)
    return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[outputs.index(name)]
                           for i in range(len(x))])


# -- the exported maps are the Python API's ----------------------------------------------------

@pytest.mark.parametrize("method", EXPORTABLE)
@pytest.mark.parametrize("model_key", list(MODELS))
def test_exported_model_gives_the_explainers_maps_logits_and_classes(model_key, method):
    model = exported(model_key, method)
    x = inputs_for(model_key, model)
    out = run(model, x, -1)
    reference = explainer(model_key).explain(x, method)
    assert out[HEATMAP].shape == reference.heatmaps.shape and out[HEATMAP].dtype == np.float32
    assert np.abs(out[HEATMAP] - reference.heatmaps).max() <= TOLERANCE
    np.testing.assert_array_equal(out[TARGET_CLASS], reference.logits.argmax(axis=1))
    logits = out[explainer(model_key).logits_name]
    np.testing.assert_allclose(logits, original_logits(model_key, x), rtol=1e-5, atol=1e-5)
    if method != "counterfactual":  # the top-1 class may have no counterfactual evidence
        assert (reference.heatmaps.reshape(len(x), -1).max(axis=1) > 0.5).all(), "a trivial map proves nothing"


@pytest.mark.parametrize("method", EXPORTABLE)
@pytest.mark.parametrize("model_key", list(MODELS))
def test_an_explicit_target_gives_that_class_map(model_key, method):
    model = exported(model_key, method)
    x = inputs_for(model_key, model, seed=1)
    classes = explainer(model_key).num_classes
    top1 = run(model, x, -1)[TARGET_CLASS]
    wanted = (top1 + 1 + np.arange(len(x))) % classes  # never the top-1, different per image
    out = run(model, x, wanted)
    reference = explainer(model_key).explain(x, method, targets=wanted)
    np.testing.assert_array_equal(out[TARGET_CLASS], wanted)
    assert np.abs(out[HEATMAP] - reference.heatmaps).max() <= TOLERANCE
    assert np.abs(out[HEATMAP] - run(model, x, -1)[HEATMAP]).max() > 0.01, "the target changed nothing"


@pytest.mark.parametrize("model_key", list(MODELS))
def test_a_black_image_gives_finite_maps_equal_to_the_explainers(model_key):
    for method in ("gradcam", "gradcam++", "xgradcam", "cam"):
        model = exported(model_key, method)
        x = np.zeros_like(inputs_for(model_key, model))
        out = run(model, x, -1)
        assert np.isfinite(out[HEATMAP]).all() and out[HEATMAP].min() >= 0 and out[HEATMAP].max() <= 1
        assert np.abs(out[HEATMAP] - explainer(model_key).explain(x, method).heatmaps).max() <= TOLERANCE


def test_targets_outside_the_classes_explain_the_top1():
    model = exported("nchw", "gradcam")
    x = inputs_for("nchw", model)
    classes = explainer("nchw").num_classes
    top1 = run(model, x, -1)
    for target in (classes, -7):
        out = run(model, x, target)
        np.testing.assert_array_equal(out[TARGET_CLASS], top1[TARGET_CLASS])
        np.testing.assert_array_equal(out[HEATMAP], top1[HEATMAP])


@pytest.mark.parametrize("model_key", ["nchw", "nhwc-layer"])
def test_the_batch_stays_dynamic_and_images_do_not_mix(model_key):
    model = exported(model_key, "gradcam++")
    assert batch_is_dynamic(model)
    x = inputs_for(model_key, model)
    together = run(model, x, [-1, 0, 1])
    for i in range(len(x)):
        alone = run(model, x[i:i + 1], [[-1, 0, 1][i]])
        np.testing.assert_allclose(alone[HEATMAP][0], together[HEATMAP][i], atol=1e-6)


# -- the post-processing is scale_maps' --------------------------------------------------------

def _post_processing_model(h: int, w: int, size: tuple[int, int]) -> onnx.ModelProto:
    graph = gs.Graph(opset=13)
    raw = gs.Variable("raw", np.float32, ["N", h, w])
    graph.inputs = [raw]
    b = Emitter(graph, 13)
    result = _post_process(b, raw, b.ints(size))
    result.dtype = np.float32
    graph.outputs = [result]
    model = gs.export_onnx(graph)
    model.ir_version = 7
    return model


@pytest.mark.parametrize("shape, size", [
    ((4, 4), (128, 128)), ((7, 7), (224, 224)), ((5, 3), (17, 40)),   # upscale, integer or not
    ((16, 16), (8, 8)), ((100, 100), (33, 33)), ((12, 12), (5, 7)),  # downscale (2x: cv2 uses INTER_AREA)
    ((6, 6), (6, 6)), ((9, 5), (4, 20)),                              # same size; one axis each way
])
def test_in_graph_scaling_and_resize_match_scale_maps_and_cv2(shape, size):
    rng = np.random.default_rng(3)
    maps = rng.normal(0, 2, (4, *shape)).astype(np.float32)
    maps[1] = 0.0                    # all zero: stays zero
    maps[2, 0, 0] = np.nan           # nan_to_num
    maps[3] = -np.abs(maps[3])       # all negative: zero after the ReLU
    sess = session(_post_processing_model(*shape, size))
    got = sess.run(None, {"raw": maps})[0]
    want = combine_layers([maps], size)
    assert got.shape == want.shape == (4, *size)
    assert np.abs(got - want).max() <= TOLERANCE
    assert not got[1].any() and not got[3].any()


# -- the file itself ---------------------------------------------------------------------------

def test_the_file_declares_its_interface_and_loads_in_plain_onnx():
    model = exported("nhwc-layer", "layercam")
    assert explainer("nhwc-layer").targets_layers[0].layout == "NHWC"
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    assert [i.name for i in model.graph.input] == ["input", TARGET]
    assert [o.name for o in model.graph.output] == ["logits", HEATMAP, TARGET_CLASS]
    heatmap = next(o for o in model.graph.output if o.name == HEATMAP).type.tensor_type
    assert heatmap.elem_type == TensorProto.FLOAT and [d.dim_value for d in heatmap.shape.dim[1:]] == [12, 12]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["onnxcam.method"] == "layercam" and meta["onnxcam.layer"] == "act_nhwc"
    assert "onnxcam.version" in meta and "onnxcam.rewrite" not in meta


def test_an_explicit_layer_is_the_one_explained():
    model = export_explained(conv_classifier(), "gradcam", layer="r1")
    x = inputs_for("nchw", model)
    reference = Explainer(conv_classifier(), layer="r1").explain(x, "gradcam")
    assert {p.key: p.value for p in model.metadata_props}["onnxcam.layer"] == "r1"
    assert np.abs(run(model, x, -1)[HEATMAP] - reference.heatmaps).max() <= TOLERANCE
    assert np.abs(reference.heatmaps - explainer("nchw").explain(x, "gradcam").heatmaps).max() > 0.01


def test_a_model_that_already_uses_an_output_name_is_refused():
    model = conv_classifier()
    model.graph.output[0].name = HEATMAP
    next(n for n in model.graph.node if n.op_type == "Softmax").output[0] = HEATMAP
    with pytest.raises(OnnxcamError, match=HEATMAP):
        export_explained(model, "gradcam")


@pytest.mark.parametrize("method", [m for m in METHODS if m not in exportable_methods()] + ["no-such-method"])
def test_methods_that_cannot_be_in_the_graph_are_refused_naming_those_that_can(method):
    with pytest.raises(OnnxcamError) as caught:
        export_explained(conv_classifier(), method)
    assert method in str(caught.value) and "gradcam, gradcam++" in str(caught.value)


def test_the_large_model_path_writes_external_data_that_onnxruntime_reads(tmp_path, monkeypatch):
    model = exported("nchw", "gradcam")
    x = inputs_for("nchw", model)
    monkeypatch.setattr(large_models, "INLINE_LIMIT", 0)
    path = tmp_path / "big.onnx"
    save_explained(model, path)
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run([HEATMAP], {"input": x, TARGET: np.full(len(x), -1, np.int64)})[0]
    np.testing.assert_array_equal(got, run(model, x, -1)[HEATMAP])


# -- the command line --------------------------------------------------------------------------

def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_writes_the_self_explaining_model(tmp_path):
    source, out = tmp_path / "tiny.onnx", tmp_path / "explained.onnx"
    onnx.save(conv_classifier(), source)
    code, text = cli("export", source, "-o", out, "-m", "hirescam", "-l", "features")
    assert code == 0, text
    assert "hirescam" in text and HEATMAP in text
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's owner-only mode
    x = inputs_for("nchw", exported("nchw", "hirescam"))
    got = run(onnx.load(out), x, -1)[HEATMAP]
    assert np.abs(got - explainer("nchw").explain(x, "hirescam").heatmaps).max() <= TOLERANCE


@pytest.mark.parametrize("args, message", [
    (["-m", "scorecam"], "scorecam"),
    (["-m", "eigencam"], "eigencam"),
    (["-l", "no_such_layer"], "no_such_layer"),
])
def test_cli_refuses_with_one_error_line_exit_2_and_no_file(tmp_path, args, message):
    source, out = tmp_path / "tiny.onnx", tmp_path / "explained.onnx"
    onnx.save(conv_classifier(), source)
    code, text = cli("export", source, "-o", out, *args)
    assert code == 2
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert list(tmp_path.iterdir()) == [source]


def test_cli_reports_an_unwritable_output_without_a_traceback(tmp_path):
    source = tmp_path / "tiny.onnx"
    onnx.save(conv_classifier(), source)
    (tmp_path / "a_file").write_text("not a folder")
    code, text = cli("export", source, "-o", tmp_path / "a_file" / "out.onnx")
    assert code == 2 and text.startswith("error:") and "Traceback" not in text


def test_cli_export_creates_the_output_folder(tmp_path):
    source = tmp_path / "tiny.onnx"
    onnx.save(conv_classifier(), source)
    code, text = cli("export", source, "-o", tmp_path / "new" / "deeper" / "out.onnx")
    assert code == 0, text
    assert "heatmap" in [o.name for o in onnx.load(str(tmp_path / "new" / "deeper" / "out.onnx")).graph.output]


def test_cli_export_never_overwrites_its_source(tmp_path, monkeypatch):
    source = tmp_path / "m.onnx"
    onnx.save(conv_classifier(), source)
    before = source.read_bytes()
    (tmp_path / "link.onnx").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    for out in (source, "m.onnx", "./sub/../m.onnx", tmp_path / "link.onnx"):
        code, text = cli("export", source, "-o", out)
        assert code == 2 and "is the source model itself" in text, (out, text)
    code, text = cli("export", "m.onnx", "-o", tmp_path)  # a folder
    assert code == 2 and "is a folder" in text
    assert source.read_bytes() == before


def test_export_says_when_the_batch_stays_fixed(tmp_path):
    """A fixed batch of 2 cannot be made dynamic (only literal 1s are rewritten): the export
    keeps it and says so; the exported model runs at that batch."""
    source = tmp_path / "b2.onnx"
    onnx.save(conv_classifier(batch=2), source)
    with pytest.warns(OnnxcamWarning, match="batches of exactly 2"):
        exported = export_explained(str(source))
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    heatmap = session.run(["heatmap"], {"input": x, "target": np.array([-1, 1])})[0]
    assert heatmap.shape == (2, 16, 16)
    code, text = cli("export", source, "-o", tmp_path / "out.onnx")
    assert code == 0 and "warning: " in text and "batches of exactly 2" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_explained(conv_classifier())  # a dynamic batch: no warning


# -- another language: onnxruntime-node ----------------------------------------------------------

def _node_with_onnxruntime() -> str:
    """The node binary when it can require onnxruntime-node (NODE_PATH honoured), else a skip."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    probe = subprocess.run([node, "-e", "require.resolve('onnxruntime-node')"], capture_output=True,
                           env=os.environ.copy())
    if probe.returncode != 0:
        if os.environ.get("CI"):  # .ci/run installs it: a missing package there is a broken CI
            pytest.fail("onnxruntime-node not found by node although CI installs it (NODE_PATH?)")
        pytest.skip("onnxruntime-node not found by node: npm install --ignore-scripts onnxruntime-node "
                    "and set NODE_PATH to that node_modules")
    return node


@pytest.mark.parametrize("model_key, target", [("nhwc-layer", -1), ("mobilenet", 3)])
def test_onnxruntime_node_computes_the_same_heatmap(tmp_path, model_key, target):
    node = _node_with_onnxruntime()
    model = exported(model_key, "gradcam")
    path, data = tmp_path / "explained.onnx", tmp_path / "x.f32"
    save_explained(model, path)
    x = inputs_for(model_key, model, seed=2)
    data.write_bytes(x.astype("<f4").tobytes())
    done = subprocess.run([node, str(ROOT / "tools" / "check_export_node.js"), str(path), str(data), str(target)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    expected = run(model, x, target)
    assert report["heatmap_shape"] == list(expected[HEATMAP].shape)
    assert report["target_class"] == expected[TARGET_CLASS].tolist()
    np.testing.assert_allclose(report["heatmap_sum"], expected[HEATMAP].astype(np.float64).sum(), rtol=1e-5)
    np.testing.assert_allclose([report["heatmap_min"], report["heatmap_max"]],
                               [expected[HEATMAP].min(), expected[HEATMAP].max()], atol=1e-6)
