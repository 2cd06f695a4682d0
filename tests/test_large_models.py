"""Models stored with external data, and the path for models over protobuf's 2 GiB limit.

A real > 2 GiB model is too big for CI; `python tools/check_large_model.py` runs one by hand.
Here the same code path runs on small models by lowering ``large_models.INLINE_LIMIT``, and
every result is compared with the plain in-memory path (an independent computation of the
same thing)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcam import large_models
from onnxcam.cli import app
from onnxcam.errors import ModelError, OnnxcamWarning
from onnxcam.explainer import Explainer
from onnxcam.model import load_model, with_shapes
from onnxcam.cache import cached_rewrite
from onnxcam.surgery import RewriteRequest
from tests.tiny_models import conv_classifier

typer_testing = pytest.importorskip("typer.testing")


def _save_with_external_data(model: onnx.ModelProto, path) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model moves the data out of the proto it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".weights", size_threshold=0)


@pytest.fixture
def big_path(monkeypatch):
    """Every model counts as 'large' (its initializers of 1 KiB or more are detached)."""
    monkeypatch.setattr(large_models, "INLINE_LIMIT", 0)


def _images(seed: int = 0, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


def test_model_with_external_data_explains_like_the_inline_model(tmp_path):
    model = conv_classifier()
    path = tmp_path / "external.onnx"
    _save_with_external_data(model, path)
    assert (tmp_path / "external.onnx.weights").stat().st_size > path.stat().st_size  # weights really outside

    x = _images()
    inline = Explainer(model).explain(x, "gradcam")
    external = Explainer(path).explain(x, "gradcam")
    np.testing.assert_array_equal(external.targets, inline.targets)
    np.testing.assert_allclose(external.heatmaps, inline.heatmaps, atol=1e-6)


def test_missing_external_data_file_is_a_clear_error(tmp_path):
    path = tmp_path / "external.onnx"
    _save_with_external_data(conv_classifier(), path)
    (tmp_path / "external.onnx.weights").unlink()
    with pytest.raises(ModelError, match="external.onnx"):
        load_model(path)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    """A model naming '../somewhere' for its weights would read files it has no business
    reading; it is refused with the tensor named."""
    (tmp_path / "inner").mkdir()
    path = tmp_path / "inner" / "external.onnx"
    _save_with_external_data(conv_classifier(), path)
    (tmp_path / "inner" / "external.onnx.weights").rename(tmp_path / "outside.weights")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.weights"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)


def test_truncated_external_data_is_named(tmp_path):
    path = tmp_path / "external.onnx"
    _save_with_external_data(conv_classifier(), path)
    weights = tmp_path / "external.onnx.weights"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(ModelError, match="external.onnx.weights' is shorter"):
        load_model(path)


def test_cli_explains_a_model_with_external_data(tmp_path):
    import cv2

    path = tmp_path / "external.onnx"
    _save_with_external_data(conv_classifier(), path)
    image = tmp_path / "noise.png"
    cv2.imwrite(str(image), np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    result = typer_testing.CliRunner().invoke(app, ["explain", str(path), str(image), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "noise.gradcam.png").exists()


def test_skeleton_holds_no_weight_data_and_attach_restores_it(big_path, monkeypatch):
    monkeypatch.setattr(large_models, "DETACH_MIN_BYTES", 0)
    model = conv_classifier()
    skeleton, weights = large_models.detach(model)
    assert set(weights) == {t.name for t in model.graph.initializer}
    assert all(not t.raw_data and t.data_location == onnx.TensorProto.EXTERNAL for t in skeleton.graph.initializer)
    restored = large_models.attach(skeleton, weights)
    assert restored.SerializeToString() == model.SerializeToString()


def test_shape_inference_and_version_conversion_on_the_skeleton_match_the_plain_path(big_path, monkeypatch):
    model = conv_classifier()
    big_shapes = with_shapes(model)
    big_converted = large_models.convert_version(model, 17)
    monkeypatch.setattr(large_models, "INLINE_LIMIT", 2**31)
    assert big_shapes.SerializeToString() == with_shapes(model).SerializeToString()
    plain = onnx.version_converter.convert_version(model, 17)
    assert big_converted.SerializeToString() == plain.SerializeToString()


def test_fingerprint_follows_the_weights(big_path):
    model = conv_classifier()
    same = conv_classifier()
    other = conv_classifier(seed=1)  # same graph, other weights
    assert large_models.fingerprint(model).hexdigest() == large_models.fingerprint(same).hexdigest()
    assert large_models.fingerprint(model).hexdigest() != large_models.fingerprint(other).hexdigest()


def test_large_rewrites_are_cached_as_external_data_and_reloaded(big_path, tmp_path):
    model = conv_classifier()
    request = RewriteRequest(("features",), "logits")
    rewritten, hit = cached_rewrite(model, request, directory=tmp_path)
    assert not hit
    entries = sorted(p.name for p in tmp_path.iterdir() if ".onnx" in p.name)
    assert len(entries) == 2 and entries[1] == entries[0] + ".data", entries
    assert (tmp_path / entries[0]).with_suffix(".json").is_file()  # the manifest, with both digests
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))

    # Stock onnxruntime loads the cache entry from its path, external data and all, and gives
    # what the in-memory rewrite gives.
    x = _images()
    feeds = {"input": x, "onnxcam_seed": np.zeros((2, 5), np.float32)}
    from_disk = ort.InferenceSession(str(tmp_path / entries[0]), providers=["CPUExecutionProvider"])
    in_memory = ort.InferenceSession(rewritten.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in zip(from_disk.run(None, feeds), in_memory.run(None, feeds)):
        np.testing.assert_array_equal(a, b)

    reloaded, hit = cached_rewrite(model, request, directory=tmp_path)
    assert hit and reloaded.gradients == rewritten.gradients


def test_truncated_external_data_in_the_cache_is_rebuilt(big_path, tmp_path):
    model = conv_classifier()
    request = RewriteRequest(("features",), "logits")
    cached_rewrite(model, request, directory=tmp_path)
    data = next(p for p in tmp_path.iterdir() if p.name.endswith(".data"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.warns(OnnxcamWarning, match=f"{data} has 100 bytes.*rebuilding it"):
        _, hit = cached_rewrite(model, request, directory=tmp_path)
    assert not hit
    assert data.stat().st_size > 100  # rewritten whole


def test_explanations_on_the_large_model_path_equal_the_plain_path(big_path, monkeypatch):
    x = _images(n=3)
    big = {method: Explainer(conv_classifier(), cache=False).explain(x, method)
           for method in ("gradcam", "scorecam", "ablationcam", "saliency")}
    monkeypatch.setattr(large_models, "INLINE_LIMIT", 2**31)
    for method, explanation in big.items():
        plain = Explainer(conv_classifier(), cache=False).explain(x, method)
        np.testing.assert_allclose(explanation.heatmaps, plain.heatmaps, atol=1e-6, err_msg=method)


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result must still be readable
    like any file the user creates (0666 less the umask), not 0600."""
    from onnxcam.files import atomic_write_bytes

    mask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "out.bin", b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644


# -- a large model read from a file keeps its weights there ------------------------------------

@pytest.fixture
def in_file(big_path, tmp_path):
    """conv_classifier saved with external data (read it with :func:`_read`)."""
    path = tmp_path / "model" / "big.onnx"
    path.parent.mkdir()
    _save_with_external_data(conv_classifier(), path)
    return path


def _read(read, monkeypatch):
    """``read()`` on the large-model path with every initializer of the file left there (the
    Clip bounds too); the small constants the rewrite adds are detached as usual when saved
    (onnxruntime's shape inference reads their values)."""
    with monkeypatch.context() as patch:
        patch.setattr(large_models, "DETACH_MIN_BYTES", 0)
        return read()


def _weights_in_memory(model: onnx.ModelProto) -> list[str]:
    """The source model's initializers that ``model`` holds in memory (none left in the file)."""
    source = {t.name for t in conv_classifier().graph.initializer}
    held = [t for t in model.graph.initializer if t.name in source]
    assert held, "no initializer of the source model"
    return [t.name for t in held if large_models.in_file(t) is None]


def test_a_large_model_read_from_a_file_holds_no_copy_of_its_weights(in_file, monkeypatch):
    """The loaded model, its shape-annotated copy and every rewrite of it refer to the weights
    in the model's file instead of holding them: one copy less each (2.15 GiB model: 5x its
    weights at the peak before, ~1.2-2x after)."""
    explainer = _read(lambda: Explainer(in_file, cache=False), monkeypatch)
    assert _weights_in_memory(explainer.graph.model) == []
    for request in (RewriteRequest(("features",), "logits"),  # batch made dynamic, checked by a session
                    RewriteRequest((), "logits", gradient=False),
                    RewriteRequest((), "logits", gradient=False, head="features")):
        rewritten, _ = explainer.session(request)
        assert _weights_in_memory(rewritten.model) == [], request


def test_explanations_from_weights_in_a_file_equal_the_plain_path(in_file, monkeypatch):
    """Every reader of weight values works from the file: CAM reads the classifier's weights,
    guided backprop the Clip's lower bound (through onnx-graphsurgeon), ablation-CAM cuts a
    head; and the maps equal those of the in-memory model."""
    x = _images(n=3)
    methods = ("gradcam", "cam", "guided-backprop", "ablationcam", "scorecam")
    big = {method: _read(lambda: Explainer(in_file, cache=False), monkeypatch).explain(x, method)
           for method in methods}
    monkeypatch.setattr(large_models, "INLINE_LIMIT", 2**31)
    for method, explanation in big.items():
        plain = Explainer(conv_classifier(), cache=False).explain(x, method)
        np.testing.assert_allclose(explanation.heatmaps, plain.heatmaps, atol=1e-6, err_msg=method)


def test_weights_in_a_file_are_hashed_and_cached_as_if_in_memory(in_file, tmp_path, monkeypatch):
    """The fingerprint streams the file (in chunks of CHUNK bytes) to the digest of the same
    bytes read into memory, so a model has one cache key however it is held; a cold explain's
    session reads the entry just stored (no temporary copy of the weights written for it)."""
    monkeypatch.setattr(large_models, "CHUNK", 100)
    from_file = load_model(in_file)  # w2 (3456 bytes) stays in the file, as it is detached in memory
    assert [t.name for t in from_file.graph.initializer if large_models.in_file(t)] == ["w2"]
    with monkeypatch.context() as patch:
        patch.setattr(large_models, "INLINE_LIMIT", 2**31)
        in_memory = load_model(in_file)
    assert large_models.fingerprint(from_file).hexdigest() == large_models.fingerprint(in_memory).hexdigest()

    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path / "cache"))
    x = _images()
    cold = _read(lambda: Explainer(in_file), monkeypatch)
    first = cold.explain(x, "gradcam")
    stored = [cold.session(request)[0].path for request in cold._sessions]
    assert stored and all(path and path.startswith(str(tmp_path / "cache")) for path in stored), stored
    warm = _read(lambda: Explainer(in_file), monkeypatch).explain(x, "gradcam")
    np.testing.assert_array_equal(warm.heatmaps, first.heatmaps)


def test_array_reads_a_weight_from_its_file(in_file, monkeypatch):
    model = _read(lambda: load_model(in_file), monkeypatch)
    for tensor in model.graph.initializer:
        assert large_models.in_file(tensor) is not None
        np.testing.assert_array_equal(large_models.array(tensor), onnx.numpy_helper.to_array(
            next(t for t in conv_classifier().graph.initializer if t.name == tensor.name)))


def test_a_basepath_in_the_file_is_not_followed(in_file, tmp_path):
    """The folder a weight is read from is the model's: a ``basepath`` the file names itself
    (another folder, holding other weights under the same name) is dropped at load."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _save_with_external_data(conv_classifier(seed=1), elsewhere / "big.onnx")
    model = onnx.load(str(in_file), load_external_data=False)
    for tensor in model.graph.initializer:
        entry = tensor.external_data.add()
        entry.key, entry.value = large_models.BASEPATH, str(elsewhere)
    in_file.write_bytes(model.SerializeToString())
    loaded = load_model(in_file)
    own = {t.name: onnx.numpy_helper.to_array(t) for t in conv_classifier().graph.initializer}
    for tensor in loaded.graph.initializer:  # w2 still in the file, the others read in
        np.testing.assert_array_equal(large_models.array(tensor), own[tensor.name], err_msg=tensor.name)
    assert large_models.in_file(next(t for t in loaded.graph.initializer if t.name == "w2"))[0].parent == in_file.parent


# -- inline models: the weights left in the model file itself ---------------------------------

def _held_weights(model: onnx.ModelProto) -> list[str]:
    """Initializers of at least DETACH_MIN_BYTES that ``model`` holds in memory."""
    return [t.name for t in model.graph.initializer
            if large_models.in_file(t) is None and large_models.tensor_bytes(t) >= large_models.DETACH_MIN_BYTES]


def test_an_explainer_holds_no_copy_of_an_inline_models_weights(mobilenet_small, tmp_path, monkeypatch):
    """With the rewrite cache, an inline model's big weights stay in its file, cold and warm:
    the Explainer's model, its rewrites and the cache entry's session refer to them there
    (resnet50 / vgg16: ~1.5x a plain session's peak RSS before, see README). The maps equal
    those of the model held in memory without the cache, to the bit."""
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path / "cache"))
    x = np.random.default_rng(5).uniform(-1, 1, (2, 3, 128, 128)).astype(np.float32)
    source = onnx.load(str(mobilenet_small))
    big = [t.name for t in source.graph.initializer if len(t.raw_data) >= large_models.DETACH_MIN_BYTES]
    assert len(big) > 10
    reference = {method: Explainer(source, cache=False).explain(x, method) for method in ("gradcam", "cam")}
    for run in ("cold", "warm"):
        explainer = Explainer(mobilenet_small)
        assert _held_weights(explainer.graph.model) == [], run
        assert {large_models.in_file(t)[0] for t in explainer.graph.model.graph.initializer
                if t.name in big} == {mobilenet_small.resolve()}, run
        for method, expected in reference.items():
            got = explainer.explain(x, method)
            np.testing.assert_array_equal(got.heatmaps, expected.heatmaps, err_msg=f"{run} {method}")
            np.testing.assert_array_equal(got.logits, expected.logits, err_msg=f"{run} {method}")
        for rewritten, _ in explainer._sessions.values():
            assert rewritten.path is not None, run  # onnxruntime reads the entry's files
            assert set(_held_weights(rewritten.model)) & set(big) == set(), run  # (its own constants aside)
    # the export (a model handed on) stands alone: its weights read in from the file
    from onnxcam.export import export_explained
    exported = export_explained(mobilenet_small, "gradcam")
    assert not any(large_models.in_file(t) for t in exported.graph.initializer)
    ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])


def test_parsing_leaves_the_weights_where_the_file_holds_them(mobilenet_small):
    """The parse without weights is the full parse with each big raw_data replaced by its
    place in the file: same bytes read back, same fingerprint (same cache keys), small
    tensors still inline."""
    full = onnx.load(str(mobilenet_small))
    model, spans = large_models.parse_leaving_weights(mobilenet_small)
    large_models.leave_in_file(model, spans, mobilenet_small)
    assert len(model.graph.initializer) == len(full.graph.initializer) and spans
    for left, whole in zip(model.graph.initializer, full.graph.initializer):
        assert (large_models.in_file(left) is not None) == (len(whole.raw_data) >= large_models.DETACH_MIN_BYTES)
        np.testing.assert_array_equal(large_models.array(left), onnx.numpy_helper.to_array(whole), err_msg=whole.name)
    assert large_models.fingerprint(model).hexdigest() == large_models.fingerprint(full).hexdigest()
    without = onnx.ModelProto()
    without.CopyFrom(full)
    for tensor in without.graph.initializer:
        if len(tensor.raw_data) >= large_models.DETACH_MIN_BYTES:
            tensor.ClearField("raw_data")
    reparsed = large_models.parse_leaving_weights(mobilenet_small)[0]
    assert reparsed.SerializeToString() == without.SerializeToString()


@pytest.mark.parametrize("content", [b"", b"\x0b\x00", b"not a model at all"])
def test_a_file_that_does_not_parse_without_weights_gets_the_usual_error(tmp_path, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    assert large_models.parse_leaving_weights(path) is None
    with pytest.raises(ModelError) as plain:
        load_model(path)
    with pytest.raises(ModelError) as leaving:
        load_model(path, weights_in_file=True)
    assert str(leaving.value) == str(plain.value)
