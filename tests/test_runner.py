"""Streaming folders (onnxcam/runner.py): names that never collide, resume, failures recorded,
the output folder checked first, Ctrl-C leaving a consistent folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxcam.cli import app
from onnxcam.runner import JOURNAL, Journal, find_images, output_names
from tests.tiny_models import conv_classifier

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def image(path: Path, seed: int = 0, size=(40, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    assert cv2.imwrite(str(path), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return path


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(conv_classifier(size=16), path)
    return path


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]


def test_output_names_are_distinct_for_the_issue_cases():
    names = output_names(["a/x.jpg", "b/x.jpg", "x-2.png"])
    assert names == {"a/x.jpg": "a/x", "b/x.jpg": "b/x", "x-2.png": "x-2"}
    names = output_names(["a/x.bmp", "a/x.jpg", "a/x-2.bmp"])
    assert names == {"a/x.bmp": "a/x.bmp", "a/x.jpg": "a/x.jpg", "a/x-2.bmp": "a/x-2"}
    # a stem equal to another input's whole name is not used: x.jpg.png would collide with x.jpg
    names = output_names(["x.jpg", "x.png", "x.jpg.png"])
    assert len(set(names.values())) == 3 and names["x.jpg.png"] == "x.jpg.png"
    # order never matters
    keys = ["a/x.bmp", "a/x.jpg", "a/x-2.bmp", "b/x.jpg", "x.jpg.png", "x.jpg"]
    assert output_names(keys) == output_names(keys[::-1])


@pytest.mark.parametrize("files", [["a/x.jpg", "b/x.jpg", "x-2.png"], ["a/x.bmp", "a/x.jpg", "a/x-2.bmp"]])
def test_same_stems_give_distinct_overlays_and_records(tiny, tmp_path, monkeypatch, files):
    """Issue 13: one overlay per image, each record pointing at its own file."""
    monkeypatch.chdir(tmp_path)
    for seed, name in enumerate(files):
        image(tmp_path / name, seed)
    code, output = run("explain", tiny, *files, "-o", "out", "--npy")
    assert code == 0, output
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    overlays = [r["overlay"] for rec in records for r in rec["targets"]]
    assert sorted(r["file"] for r in records) == sorted(files) and len(set(overlays)) == 3
    pngs = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert pngs == sorted(overlays)
    # each overlay is its own image's: the maps differ (different random pictures)
    maps = [np.load(tmp_path / "out" / o.replace(".png", ".npy")) for o in overlays]
    assert all(not np.array_equal(maps[0], m) for m in maps[1:])


def test_folder_walk_glob_non_images_and_output_inside(tiny, tmp_path):
    data = tmp_path / "data"
    for seed, name in enumerate(["a/1.png", "a/b/2.jpg", "3.bmp"]):
        image(data / name, seed)
    (data / "notes.txt").write_text("not an image")
    (data / "a" / "labels.csv").write_text("x")
    out = data / "out"  # inside the walked folder: never read back as input
    code, output = run("explain", tiny, data, "-o", out)
    assert code == 0, output
    assert "explained 3 of 3 images" in output and "2 non-image files skipped" in output
    assert (out / "a" / "b" / "2.gradcam.png").is_file() and (out / "3.gradcam.png").is_file()
    code, output = run("explain", tiny, data, "-o", out)  # a rerun finds the same 3, not the outputs
    assert code == 0 and "explained 0 of 3 images" in output and "3 already done" in output, output
    code, output = run("explain", tiny, data, "--glob", "a/*.png", "-o", tmp_path / "only-png")
    assert code == 0 and "explained 1 of 1 images" in output, output
    found = find_images([str(data / "a" / "*.png"), str(data / "3.bmp")])
    assert sorted(i.key for i in found.items) == ["3.bmp", "a/1.png"]
    code, output = run("explain", tiny, data, "--glob", "*.gif", "-o", tmp_path / "none")
    assert code == 2 and output.startswith("error: no image files found in") and not (tmp_path / "none").exists()


def test_resume_skips_done_redoes_missing_and_overwrite(tiny, tmp_path):
    folder = tmp_path / "in"
    for seed in range(5):
        image(folder / f"{seed}.png", seed)
    out = tmp_path / "out"
    code, output = run("explain", tiny, folder, "-o", out, "--batch-size", 2)
    assert code == 0 and "explained 5 of 5" in output, output
    first = {r["input"]: r for r in journal(out)}
    assert len(first) == 5 and all(set(r["files"]) == {r["overlay"] for r in r["targets"]} for r in first.values())
    (out / "3.gradcam.png").unlink()  # a lost output is redone, the others are not
    code, output = run("explain", tiny, folder, "-o", out)
    assert code == 0 and "explained 1 of 5" in output and "4 already done" in output, output
    assert (out / "3.gradcam.png").is_file()
    assert len(journal(out)) == 6 and len(json.loads((out / "results.json").read_text())) == 5  # last wins
    code, output = run("explain", tiny, folder, "-o", out, "-m", "gradcam++")  # another method: not done
    assert code == 0 and "explained 5 of 5" in output, output
    code, output = run("explain", tiny, folder, "-o", out, "--overwrite")
    assert code == 0 and "explained 5 of 5" in output, output
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 10 and len(journal(out)) == 10  # --overwrite replaced its records
    assert sorted({r["method"] for r in records}) == ["gradcam", "gradcam++"]


def test_failing_images_are_recorded_and_the_run_goes_on(tiny, tmp_path):
    good = image(tmp_path / "good.png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    result = runner.invoke(app, ["explain", str(tiny), str(broken), str(good), str(empty), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "2 failed" in result.output and f"failed: {broken}: " in result.output
    assert "cannot be decoded" in result.output
    records = {Path(r["file"]).name: r for r in journal(out)}
    assert "error" in records["broken.jpg"] and "error" in records["empty.png"]
    assert (out / records["good.png"]["targets"][0]["overlay"]).is_file()
    # a rerun retries the failures only
    result = runner.invoke(app, ["explain", str(tiny), str(broken), str(good), str(empty), "-o", str(out)])
    assert result.exit_code == 1 and "explained 0 of 3" in result.output and "1 already done" in result.output


def test_a_batch_with_one_bad_image_explains_the_others(tiny, tmp_path):
    """A failure of a batch inside the model is retried image by image: only the bad one fails."""
    from onnxcam.explainer import Explainer
    from onnxcam.runner import Settings, Worker, run_local
    paths = [image(tmp_path / f"{i}.png", i) for i in range(4)]
    cv2.imwrite(str(paths[2]), np.zeros((40, 60, 3), np.uint8))  # the one the "model" refuses
    explainer = Explainer(tiny, provider="cpu")
    worker = Worker(explainer, explainer.preprocess(), Settings(), tmp_path / "out")
    items = find_images([str(p) for p in paths]).items
    refused = worker.decode(items[2]).x
    real = explainer.explain

    def explain(x, **kwargs):
        if any(np.array_equal(row, refused) for row in x):
            raise RuntimeError("refused by the model")
        return real(x, **kwargs)

    explainer.explain = explain
    (tmp_path / "out").mkdir()
    summary = run_local(worker, items, Journal(tmp_path / "out"), batch_size=4)
    assert summary.explained == 3 and [Path(f).name for f, _ in summary.failed] == ["2.png"]
    assert summary.failed[0][1] == "RuntimeError: refused by the model"


def test_output_that_is_a_file_fails_before_any_work(tiny, tmp_path):
    photo = image(tmp_path / "photo.png")
    existing = tmp_path / "taken"
    existing.write_text("keep me")
    for out in (existing, existing / "sub"):
        code, output = run("explain", tiny, photo, "-o", out)
        lines = [l for l in output.splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "not a folder" in lines[0], output
    assert existing.read_text() == "keep me"


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write in: mode 0555, and immutable (chattr +i) for root, whom
    modes do not stop."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    os.chmod(folder, 0o555)
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i is unavailable: no folder is read-only to root")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    os.chmod(folder, 0o755)


def test_read_only_output_folder_is_one_line_error(tiny, tmp_path, read_only_folder):
    photo = image(tmp_path / "photo.png")
    for out in (read_only_folder, read_only_folder / "new"):
        code, output = run("explain", tiny, photo, "-o", out)
        lines = [l for l in output.splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
        assert lines[0].startswith(f"error: cannot write to the output folder {out}: "), output
    assert list(read_only_folder.iterdir()) == []


def test_torn_journal_line_is_cut_and_foreign_lines_ignored(tmp_path):
    good = {"file": "a.png", "input": "a.png", "method": "gradcam", "files": []}
    (tmp_path / JOURNAL).write_bytes((json.dumps(good) + "\nnot json\n{\"file\": \"b.png\", \"inp").encode())
    loaded = Journal(tmp_path)
    assert list(loaded.entries) == [("a.png", "gradcam")]
    assert (tmp_path / JOURNAL).read_bytes().endswith(b"not json\n")


def test_sigint_leaves_a_consistent_folder_and_the_rerun_continues(tiny, tmp_path):
    """Issue 10/13: Ctrl-C (a real SIGINT to a real process) right after the first image:
    no partial or hidden temporary file, results.jsonl lists exactly the images whose files
    are all there, and the same command finishes the rest."""
    folder = tmp_path / "in"
    count = 120
    for seed in range(count):
        image(folder / f"{seed:03d}.png", seed, size=(300, 400))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "onnxcam.cli", "explain", str(tiny), str(folder), "-o", str(out),
               "--batch-size", "2", "--npy", "--provider", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if out.is_dir() and any(out.glob("*.gradcam.png")):  # right after the first file
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, stderr)
    assert "interrupted" in stderr and "Traceback" not in stderr
    records = journal(out)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not [name for name in written if name.startswith(".") or name.endswith(".tmp")]
    listed = {name for record in records for name in record["files"]}
    assert written - {JOURNAL, "results.json"} == listed  # exactly what was fully written
    assert 1 <= len(records) < count
    assert json.loads((out / "results.json").read_text()) == records
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"explained {count - len(records)} of {count}" in done.stdout
    assert f"{len(records)} already done" in done.stdout
    assert len(journal(out)) == count and len({r["input"] for r in journal(out)}) == count


def test_overlay_size_quiet_and_progress_on_a_terminal(tiny, tmp_path):
    photo = image(tmp_path / "photo.png", size=(40, 60))
    code, output = run("explain", tiny, photo, "-o", tmp_path / "q", "--overlay-size", 30, "--npy", "-q")
    assert code == 0 and output.splitlines()[0].startswith("explained 1 of 1"), output  # no line per image
    assert cv2.imread(str(tmp_path / "q" / "photo.gradcam.png")).shape == (20, 30, 3)
    assert np.load(tmp_path / "q" / "photo.gradcam.npy").shape == (40, 60)  # maps stay at full size
    code, output = run("explain", tiny, photo, "-o", tmp_path / "b", "--overlay-size", 8)
    assert code == 2 and "--overlay-size" in output
    # a terminal gets the progress bar (images/s, ETA); a pipe (above) does not
    import pty
    leader, follower = pty.openpty()
    done = subprocess.run([sys.executable, "-m", "onnxcam.cli", "explain", str(tiny), str(photo), str(photo.parent),
                           "-o", str(tmp_path / "t"), "--provider", "cpu"], stdin=follower, stdout=follower,
                          stderr=follower, env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120"), timeout=300)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert done.returncode == 0, shown
    assert b"images/s" in shown and b"ETA" in shown and b"explaining" in shown, shown
