"""The rewrite cache trusts nothing it has not checked: corrupt or planted entries are rebuilt
with a warning, folders others can write are not used, concurrent writers do not tear
entries, the size is bounded, and a killed writer leaves nothing for good."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxcam import cache, files
from onnxcam.cache import cache_key, cached_rewrite
from onnxcam.cli import app
from onnxcam.errors import OnnxcamError, OnnxcamWarning
from onnxcam.explainer import Explainer
from onnxcam.model import load_model
from onnxcam.runtime import Session
from onnxcam.surgery import SEED, RewriteRequest, rewrite
from tests.tiny_models import conv_classifier

ROOT = Path(__file__).resolve().parents[1]
REQUEST = RewriteRequest(("features",), "logits")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(path))
    monkeypatch.delenv("ONNXCAM_CACHE_MAX_BYTES", raising=False)
    return path


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = Session(model, "cpu")
    return session.run({"input": x, SEED: np.zeros((len(x), 5), np.float32)})["logits"]


def _no_warning_hit(model, request, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error", OnnxcamWarning)
        return cached_rewrite(model, request, directory=folder)


def test_zeroed_bytes_inside_an_entry_are_detected_and_rebuilt(mobilenet_small, folder):
    """The issue's case: 64 KiB zeroed inside a cached entry changed the prediction silently."""
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 128, 128)).astype(np.float32)
    reference = Explainer(mobilenet_small, provider="cpu", cache=False).explain(x)
    Explainer(mobilenet_small, provider="cpu").explain(x)  # fills the cache
    # the file that holds the weights (the entry's external data: its source's weights are
    # left in their file, onnxcam.large_models.parse_leaving_weights)
    entry = max(folder.glob("*.onnx*"), key=lambda path: path.stat().st_size)
    raw = bytearray(entry.read_bytes())
    assert len(raw) > 2 * 65536
    middle = len(raw) // 2
    raw[middle:middle + 65536] = bytes(65536)
    entry.write_bytes(bytes(raw))
    explainer = Explainer(mobilenet_small, provider="cpu")
    with pytest.warns(OnnxcamWarning, match=f"{entry}.*SHA-256.*rebuilding"):
        again = explainer.explain(x)
    np.testing.assert_array_equal(again.targets, reference.targets)
    np.testing.assert_allclose(again.logits, reference.logits, rtol=1e-5, atol=1e-5)
    (request,) = explainer._sessions  # the request the Explainer rewrote for (in-graph maps included)
    _, hit = _no_warning_hit(load_model(mobilenet_small), request, folder)
    assert hit  # the rebuilt entry verifies


@pytest.mark.parametrize("plant", ["model only", "model and its manifest", "manifest edited"])
def test_a_model_planted_under_the_key_is_detected(tmp_path, plant):
    mine, other = conv_classifier(seed=7), conv_classifier(seed=8)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    expected = _outputs(rewrite(mine, REQUEST).model, x)
    folder, elsewhere = tmp_path / "c", tmp_path / "o"
    cached_rewrite(mine, REQUEST, directory=folder)
    cached_rewrite(other, REQUEST, directory=elsewhere)
    key, theirs = cache_key(mine, REQUEST), cache_key(other, REQUEST)
    shutil.copy(elsewhere / f"{theirs}.onnx", folder / f"{key}.onnx")
    if plant == "model and its manifest":
        shutil.copy(elsewhere / f"{theirs}.json", folder / f"{key}.json")
    elif plant == "manifest edited":  # the planted model's digest, under my key
        manifest = json.loads((elsewhere / f"{theirs}.json").read_text())
        manifest["key"] = key
        manifest["files"] = {f"{key}.onnx": manifest["files"][f"{theirs}.onnx"]}
        (folder / f"{key}.json").write_text(json.dumps(manifest))
    assert not np.allclose(_outputs(onnx.load(str(folder / f"{key}.onnx")), x), expected)
    with pytest.warns(OnnxcamWarning, match=f"{folder}.*rebuilding"):
        rewritten, hit = cached_rewrite(mine, REQUEST, directory=folder)
    assert not hit
    np.testing.assert_allclose(_outputs(rewritten.model, x), expected, rtol=1e-6)
    reread, hit = _no_warning_hit(mine, REQUEST, folder)
    assert hit and np.allclose(_outputs(reread.model, x), expected, rtol=1e-6)


def test_an_entry_without_manifest_is_not_trusted(tmp_path):
    model = conv_classifier(seed=7)
    cached_rewrite(model, REQUEST, directory=tmp_path)
    (tmp_path / f"{cache_key(model, REQUEST)}.json").unlink()
    with pytest.warns(OnnxcamWarning, match="has no manifest"):
        _, hit = cached_rewrite(model, REQUEST, directory=tmp_path)
    assert not hit


@pytest.mark.parametrize("manifest", [b"", b"[]", b"{}", b'"x"', b"[" * 200000, b'{"files": {"a": 5}}',
                                      b"\xff\xfe", b"{" * 10 + b"}" * 10])
def test_a_garbage_manifest_is_rebuilt(tmp_path, manifest):
    model = conv_classifier(seed=7)
    cached_rewrite(model, REQUEST, directory=tmp_path)
    (tmp_path / f"{cache_key(model, REQUEST)}.json").write_bytes(manifest)
    with pytest.warns(OnnxcamWarning, match="json (is not a manifest|records another)"):
        _, hit = cached_rewrite(model, REQUEST, directory=tmp_path)
    assert not hit and _no_warning_hit(model, REQUEST, tmp_path)[1]


def test_the_key_follows_the_libraries_and_every_module_of_the_rewrite(tmp_path, monkeypatch):
    names = {str(p.relative_to(ROOT / "onnxcam")) for p in cache.shaping_modules()}
    assert {"surgery.py", "model.py", "large_models.py", "cache.py", "autodiff/rules.py",
            "autodiff/engine.py", "autodiff/emitter.py", "autodiff/opset.py"} <= names
    copy = tmp_path / "onnxcam"
    shutil.copytree(ROOT / "onnxcam", copy, ignore=shutil.ignore_patterns("__pycache__"))
    fingerprint = cache.code_fingerprint.__wrapped__  # not the per-process memo
    before = fingerprint(copy)
    model_py = copy / "model.py"  # shape inference lives here
    model_py.write_text(model_py.read_text() + "\n# changed\n")
    assert fingerprint(copy) != before

    model = conv_classifier()
    key = cache_key(model, REQUEST)
    for library in ("onnx", "onnxruntime", "onnx_graphsurgeon"):
        changed = {**cache.versions(), library: "0.0.0"}
        monkeypatch.setattr(cache, "versions", lambda changed=changed: changed)
        assert cache_key(model, REQUEST) != key, library
        monkeypatch.undo()
    assert cache_key(model, RewriteRequest(("features",), "logits", relu="guided")) != key


def test_a_folder_others_can_write_is_not_used(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.warns(OnnxcamWarning, match=f"{folder} is writable by other users.*not using it"):
        rewritten, hit = cached_rewrite(conv_classifier(), REQUEST, directory=folder)
    assert not hit and rewritten.gradients and list(folder.iterdir()) == []
    folder.chmod(0o775)  # group-writable: refused too
    with pytest.warns(OnnxcamWarning, match="writable by other users"):
        cached_rewrite(conv_classifier(), REQUEST, directory=folder)
    assert list(folder.iterdir()) == []
    folder.chmod(0o755)
    cached_rewrite(conv_classifier(), REQUEST, directory=folder)
    assert any(folder.glob("*.json"))


@pytest.mark.skipif(os.name != "posix" or os.getuid() != 0, reason="changing a folder's owner needs root")
def test_a_folder_of_another_user_is_not_used(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 54321, -1)
    with pytest.warns(OnnxcamWarning, match="owned by another user"):
        _, hit = cached_rewrite(conv_classifier(), REQUEST, directory=folder)
    assert not hit and list(folder.iterdir()) == []


def test_an_entry_file_others_can_write_is_rebuilt(tmp_path):
    model = conv_classifier()
    cached_rewrite(model, REQUEST, directory=tmp_path)
    entry = tmp_path / f"{cache_key(model, REQUEST)}.onnx"
    assert entry.stat().st_mode & 0o077 == 0  # written owner-only
    entry.chmod(0o666)
    with pytest.warns(OnnxcamWarning, match=f"{entry} is writable by another user"):
        _, hit = cached_rewrite(model, REQUEST, directory=tmp_path)
    assert not hit and entry.stat().st_mode & 0o077 == 0


def test_an_error_from_a_cached_entry_names_the_file(folder, monkeypatch):
    """An entry that verifies but that onnxruntime refuses (here: stored by hand) is named
    in the error, with how to remove it."""
    model = conv_classifier()
    broken = rewrite(model, REQUEST).model
    broken.graph.node[0].op_type = "NoSuchOp"
    folder.mkdir(mode=0o700)
    key = cache_key(model, REQUEST)
    cache._store(folder, key, cache.large_models.fingerprint(model).hexdigest(), REQUEST, "x", broken)
    explainer = Explainer(model, provider="cpu")
    explainer.in_graph_maps = False  # the plain gradient rewrite, REQUEST (not the in-graph maps' one)
    with pytest.raises(OnnxcamError, match=f"cannot load the model \\(cached rewrite {folder / key}.onnx; "
                                           "'onnxcam cache clear' removes it\\)"):
        explainer.explain(np.zeros((1, 3, 16, 16), np.float32))


def test_no_cache_reads_and_writes_nothing(folder, tmp_path):
    model = conv_classifier()
    Explainer(model, provider="cpu", cache=False).explain(np.zeros((1, 3, 16, 16), np.float32))
    assert not folder.exists() or list(folder.iterdir()) == []
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(path), "-o", str(tmp_path / "e.onnx"), "--no-cache", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert not folder.exists() or list(folder.iterdir()) == []
    result = runner.invoke(app, ["export", str(path), "-o", str(tmp_path / "e.onnx")])
    assert result.exit_code == 0 and len(list(folder.glob("*.json"))) == 1


def test_cache_info_and_clear(folder):
    runner = CliRunner()
    for seed in (1, 2):
        Explainer(conv_classifier(seed=seed), provider="cpu").explain(np.zeros((1, 3, 16, 16), np.float32))
    size = sum(p.stat().st_size for p in folder.iterdir())
    result = runner.invoke(app, ["cache", "info"])
    assert result.exit_code == 0 and f"folder: {folder}" in result.output
    assert f"entries: 2, {size / 1024:.1f} KiB of at most 2.0 GiB" in result.output
    result = runner.invoke(app, ["cache", "clear"])
    assert result.exit_code == 0 and "removed 2 entries" in result.output
    assert list(folder.iterdir()) == []


def test_least_recently_used_entries_are_evicted(tmp_path, monkeypatch):
    models = [conv_classifier(seed=s) for s in (1, 2, 3)]
    keys = [cache_key(m, REQUEST) for m in models]
    for model in models[:2]:
        cached_rewrite(model, REQUEST, directory=tmp_path)
    entry_size = sum(p.stat().st_size for p in tmp_path.iterdir() if p.name.startswith(keys[0]))
    old = time.time() - 1000
    os.utime(tmp_path / f"{keys[0]}.json", (old, old))
    os.utime(tmp_path / f"{keys[1]}.json", (old + 10, old + 10))
    assert _no_warning_hit(models[0], REQUEST, tmp_path)[1]  # a hit makes entry 0 the most recent
    monkeypatch.setenv("ONNXCAM_CACHE_MAX_BYTES", str(int(entry_size * 2.5)))
    cached_rewrite(models[2], REQUEST, directory=tmp_path)
    present = {p.name[:32] for p in tmp_path.glob("*.json")}
    assert present == {keys[0], keys[2]}  # entry 1 was the least recently used
    assert not any(p.name.startswith(keys[1]) for p in tmp_path.iterdir())
    # An entry bigger than the whole bound is not stored at all.
    monkeypatch.setenv("ONNXCAM_CACHE_MAX_BYTES", "1K")
    _, hit = cached_rewrite(conv_classifier(seed=4), REQUEST, directory=tmp_path)
    assert not hit and list(tmp_path.glob("*.json")) == []


@pytest.mark.parametrize("failing", ["entry", "manifest"])
def test_a_full_disk_while_storing_leaves_no_entry_and_no_temporary(tmp_path, monkeypatch, failing):
    import errno
    model = conv_classifier(seed=5)
    real = files.atomic_write

    def full(path, write, mode=None):
        if Path(path).suffix == (".onnx" if failing == "entry" else ".json"):
            def partial(stream):
                stream.write(b"x" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, partial, mode)
        return real(path, write, mode)

    monkeypatch.setattr(files, "atomic_write", full)
    rewritten, hit = cached_rewrite(model, REQUEST, directory=tmp_path)
    assert not hit and rewritten.gradients  # the rewrite itself is fine
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OnnxcamWarning)  # nothing half-written to warn about
        assert not cached_rewrite(model, REQUEST, directory=tmp_path)[1]
    assert _no_warning_hit(model, REQUEST, tmp_path)[1]


def test_max_bytes_parsing(monkeypatch):
    for text, value in (("1000", 1000), ("500M", 500 * 2**20), ("2G", 2 * 2**30), ("1.5GiB", 3 * 2**29)):
        monkeypatch.setenv("ONNXCAM_CACHE_MAX_BYTES", text)
        assert cache.max_bytes() == value
    monkeypatch.setenv("ONNXCAM_CACHE_MAX_BYTES", "lots")
    with pytest.warns(OnnxcamWarning, match="not a size"):
        assert cache.max_bytes() == cache.DEFAULT_MAX_BYTES


_CONCURRENT = textwrap.dedent("""
    import hashlib, json, sys, time, warnings
    from pathlib import Path
    from onnxcam.cache import cached_rewrite
    from onnxcam.errors import OnnxcamWarning
    from onnxcam.model import load_model
    from onnxcam.surgery import RewriteRequest
    warnings.simplefilter("error", OnnxcamWarning)
    model = load_model(sys.argv[1])
    request = RewriteRequest((sys.argv[2],), sys.argv[3])
    go = Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.01)
    rewritten, hit = cached_rewrite(model, request, directory=Path(sys.argv[5]))
    print(json.dumps({"hit": hit, "digest": hashlib.sha256(rewritten.model.SerializeToString()).hexdigest()}))
""")


def test_two_processes_rewriting_the_same_model_at_once(mobilenet_small, tmp_path):
    explainer = Explainer(mobilenet_small, cache=False)
    layer, logits = explainer.targets_layers[0].name, explainer.logits_name
    folder, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(mobilenet_small), layer, logits,
                                   str(go), str(folder)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]
    time.sleep(2)  # all three are importing or waiting
    go.write_text("go")
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    # The lock makes the others wait for the first writer, then read its entry.
    assert sorted(r["hit"] for r in results) == [False, True, True]
    assert len({r["digest"] for r in results}) == 1
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    _, hit = _no_warning_hit(load_model(mobilenet_small), RewriteRequest((layer,), logits), folder)
    assert hit


_SLOW_CACHE_WRITE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from onnxcam import files, large_models
    from onnxcam.cache import cached_rewrite
    from onnxcam.surgery import RewriteRequest
    from tests.tiny_models import conv_classifier
    folder = Path(sys.argv[1])
    if sys.argv[2] == "handler":
        files.remove_temporaries_on_signal()  # as the CLI does
    plain = files.atomic_write_bytes
    def slow(path, data, mode=None):
        if str(path).endswith(".onnx"):
            def write(stream):
                stream.write(data[: len(data) // 2])
                stream.flush()
                (folder.parent / "started").write_text("1")
                time.sleep(60)
            return files.atomic_write(path, write, mode)
        return plain(path, data, mode)
    import onnxcam.cache
    onnxcam.cache.atomic_write_bytes = slow
    cached_rewrite(conv_classifier(), RewriteRequest(("features",), "logits"), directory=folder)
""")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_writer_killed_during_a_cache_write_leaves_nothing_for_good(tmp_path, how, monkeypatch):
    folder = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", _SLOW_CACHE_WRITE, str(folder),
                                "handler" if how == "SIGTERM" else "plain"], env=env)
    deadline = time.time() + 120
    while not (tmp_path / "started").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    temporaries = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(temporaries) == 1
    process.send_signal(getattr(signal, how))
    process.wait(timeout=60)
    left = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    if how == "SIGTERM":
        assert process.returncode == 128 + signal.SIGTERM and left == []
    else:  # nothing can run in the killed process: the next one sweeps it once stale
        assert left == temporaries
        old = time.time() - files.STALE_SECONDS - 60
        os.utime(left[0], (old, old))
    monkeypatch.setattr(cache, "_PREPARED", set())  # as in a new process
    monkeypatch.setattr(files, "_SWEPT", set())
    _, hit = cached_rewrite(conv_classifier(), REQUEST, directory=folder)
    assert not hit and not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert _no_warning_hit(conv_classifier(), REQUEST, folder)[1]


def test_the_cli_prints_a_warning_as_one_line(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    onnx.save(conv_classifier(), tmp_path / "m.onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONNXCAM_CACHE_DIR": str(folder)}
    result = subprocess.run([sys.executable, "-m", "onnxcam.cli", "export", str(tmp_path / "m.onnx"),
                             "-o", str(tmp_path / "e.onnx")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"warning: rewrite cache {folder} is writable by other users (mode 777); "
                                          "'chmod go-w' it after checking its contents: not using it "
                                          "(set ONNXCAM_CACHE_DIR to another folder)"]


def test_a_verified_hit_gives_the_session_the_entry_path_not_a_parsed_copy(mobilenet_small, folder):
    """Sessions of cache hits read the verified file themselves (the weights never become a
    Python object); the results are those of a run without the cache."""
    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 128, 128)).astype(np.float32)
    reference = Explainer(mobilenet_small, provider="cpu", cache=False).explain(x)
    first = Explainer(mobilenet_small, provider="cpu")
    missed = first.explain(x)  # a miss: built, stored, the session reads the entry just stored
    (built, _), = first._sessions.values()  # (the source's weights stay in its file)
    assert built.path is not None and Path(built.path).parent == folder and len(built.model.graph.node) > 0
    np.testing.assert_array_equal(missed.heatmaps, reference.heatmaps)
    again = Explainer(mobilenet_small, provider="cpu")
    result = again.explain(x)
    (hit, _), = again._sessions.values()
    assert hit.path is not None and Path(hit.path).parent == folder and Path(hit.path).is_file()
    assert len(hit.model.graph.node) == 0  # metadata only
    np.testing.assert_array_equal(result.targets, reference.targets)
    np.testing.assert_allclose(result.heatmaps, reference.heatmaps, atol=1e-6)
