"""Ray: a local cluster started by the test; outputs identical to the single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from onnxcam.runner import JOURNAL
from tests.tiny_models import conv_classifier

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'onnxcam[ray]')")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in (JOURNAL, "results.json")}


def _records(out: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    return {r["input"]: {k: v for k, v in r.items() if k != "seconds"} for r in records}


def test_ray_run_equals_the_local_run_and_resumes(cluster, tmp_path):
    from onnxcam.distributed import explain_dataset
    from onnxcam.explainer import Explainer
    from onnxcam.runner import Settings, Worker, explain_folder
    model = tmp_path / "tiny.onnx"
    onnx.save(conv_classifier(size=16), model)
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(11):
        (data / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(data / f"d{i % 3}" / f"{i}.png"), rng.integers(0, 255, (30 + i, 50, 3), dtype=np.uint8))
    (data / "d1" / "bad.jpg").write_bytes(b"not a jpeg")
    (data / "d0" / "readme.txt").write_text("not an image")

    explainer = Explainer(model, provider="cpu", batch_size=4, threads=1)
    settings = Settings("gradcam", None, {"topk": 2}, None, True)
    local = explain_folder(Worker(explainer, explainer.preprocess(), settings, tmp_path / "local"), [data],
                           tmp_path / "local", batch_size=4, progress=False)
    distributed = explain_dataset(data, model, tmp_path / "ray", provider="cpu", batch_size=4, workers=2,
                                  threads=1, npy=True, topk=2)
    for summary in (local, distributed):
        assert (summary.explained, len(summary.failed), summary.ignored) == (11, 1, 1)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")  # byte for byte
    assert _records(tmp_path / "ray") == _records(tmp_path / "local")
    assert len(_files(tmp_path / "ray")) == 11 * 2 * 2  # 2 targets x (overlay + npy)
    again = explain_dataset(data, model, tmp_path / "ray", provider="cpu", batch_size=4, workers=2, npy=True, topk=2)
    assert (again.explained, again.skipped, len(again.failed)) == (0, 11, 1)


def test_cli_ray_option_writes_the_same_layout(cluster, tmp_path):
    from typer.testing import CliRunner
    from onnxcam.cli import app
    model = tmp_path / "tiny.onnx"
    onnx.save(conv_classifier(size=16), model)
    for name in ("a/x.jpg", "b/x.jpg", "x-2.png"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "in" / name), np.full((20, 30, 3), 90, np.uint8))
    result = CliRunner().invoke(app, ["explain", str(model), str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                                      "--ray", "local", "--ray-workers", "2", "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert "explained 3 of 3 images" in result.output
    assert sorted(_files(tmp_path / "out")) == ["a/x.gradcam.png", "b/x.gradcam.png", "x-2.gradcam.png"]


def test_actors_read_the_model_file_or_write_the_shipped_bytes_to_their_own(cluster, tmp_path):
    """On the driver's machine an actor opens the driver's model file (no bytes shipped); on a
    node without it (here: a file changed since, so its stamp differs) it writes the bytes from
    the object store to a file of its own, removed with the worker. Either way the weights
    stay in the file (nothing like the model held in memory per actor) and the maps are the
    driver's."""
    import gc
    import os

    from onnxcam import large_models
    from onnxcam.distributed import _Blueprint, _model_for_actors, _ModelFile
    from onnxcam.errors import OnnxcamError
    from onnxcam.explainer import Explainer
    from onnxcam.runner import Settings

    model = tmp_path / "tiny.onnx"
    onnx.save(conv_classifier(size=16), model)
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    expected = Explainer(model, provider="cpu").explain(x)

    shipped = _model_for_actors(str(model))
    assert shipped.data is None and shipped.path == str(model.absolute())  # a one-node local cluster

    def worker(source: _ModelFile):
        return _Blueprint(source, ("features",), None, "cpu", None, 4, 1, Explainer(model).preprocess(),
                          Settings("gradcam", None, {}, None, False), str(tmp_path / "out")).worker()

    def weights_at(explainer: Explainer) -> set:
        return {str(large_models.in_file(t)[0]) for t in explainer.graph.model.graph.initializer
                if large_models.tensor_bytes(t) >= large_models.DETACH_MIN_BYTES}

    local = worker(shipped)
    assert weights_at(local.explainer) == {str(model.resolve())}
    np.testing.assert_array_equal(local.explainer.explain(x).heatmaps, expected.heatmaps)

    elsewhere = _ModelFile(shipped.path, (shipped.stamp[0], shipped.stamp[1] + 1), ray.put(model.read_bytes()))
    remote = worker(elsewhere)
    copy = Path(remote.explainer.source)
    assert copy != model and copy.read_bytes() == model.read_bytes() and copy.name == model.name
    assert weights_at(remote.explainer) == {str(copy.resolve())}
    np.testing.assert_array_equal(remote.explainer.explain(x).heatmaps, expected.heatmaps)
    del remote
    gc.collect()
    assert not copy.parent.exists()  # the actor's copy went with its worker

    with pytest.raises(OnnxcamError, match="not readable .* on this Ray node: put it on a file system"):
        _ModelFile(str(tmp_path / "elsewhere.onnx"), (1, 1)).here()
    assert not os.path.exists(tmp_path / "elsewhere.onnx")
