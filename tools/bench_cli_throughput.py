"""Benchmark: `onnxcam explain` on a folder of real JPEGs vs decoding + a plain forward.

Issue 13's end-to-end measure. ~100 JPEGs (400-1200 px on the long side) are made from
../shared/data/photos and ../shared/data/annotated (repeated at several scales) in a temporary
folder; then, interleaved, ``--repeats`` times each:

* baseline: decode every image (onnxcam.load_image), preprocess, and run the *original*
  model in onnxruntime at the same batch size: what any inference loop must pay;
* cli: ``python -m onnxcam.cli explain MODEL FOLDER -o OUT -q`` (a fresh output folder each
  time, the rewrite cache warmed once before): decode, Grad-CAM, overlays and PNGs written;
  timed from the process's start to its end, and its own "in X s" (the streaming loop
  without Python start-up and model load);
* cli --overlay-size N (optional): the same with overlays bounded to N px.

Prints images/s of each and the CLI's throughput as a fraction of the baseline's (the goal is
>= 0.5), and the CPU seconds of each (less sensitive to other load on the machine; the CLI's
include its start-up). Usage:

    python tools/bench_cli_throughput.py [--model M] [--count 100] [--repeats 2] [--overlay-size 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxcam import Explainer, load_image  # noqa: E402

SHARED = REPO.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "mobilenet" / "mobilenet_v2_1.0_224.onnx"


def make_photos(folder: Path, count: int, side: int | None = None) -> list[Path]:
    """``count`` JPEGs from the shared photos, long side ``side`` or cycling over 400..1200 px."""
    sources = sorted(p for d in ("photos", "annotated") for p in (SHARED / "data" / d).iterdir()
                     if p.suffix.lower() in (".jpg", ".png", ".bmp") and "segmentation" not in p.name)
    pictures = [cv2.imread(str(p)) for p in sources]
    pictures = [p for p in pictures if p is not None]
    paths = []
    for i in range(count):
        picture = pictures[i % len(pictures)]
        factor = (side or 400 + (i * 97) % 801) / max(picture.shape[:2])
        resized = cv2.resize(picture, None, fx=factor, fy=factor,
                             interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)
        path = folder / f"{i:04d}.jpg"
        cv2.imwrite(str(path), resized, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def baseline(model: str, paths: list[Path], batch: int) -> tuple[float, float]:
    """(wall, CPU) seconds to decode, preprocess and run the plain model on every image
    (session built first)."""
    explainer = Explainer(model, provider="cpu")
    preprocess = explainer.preprocess("inception")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: preprocess([np.zeros((8, 8, 3), np.float32)])})
    started, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    for start in range(0, len(paths), batch):
        x = preprocess([load_image(p) for p in paths[start:start + batch]])
        if session.get_inputs()[0].shape[0] == 1:
            for row in x:
                session.run(None, {name: row[None]})
        else:
            session.run(None, {name: x})
    return time.perf_counter() - started, cpu_seconds(resource.RUSAGE_SELF) - cpu


def run_cli(arguments: list[str], prefix: tuple[str, ...] = ()) -> tuple[float, float, str, float]:
    """(wall seconds of the whole process, the run's own seconds, its stdout, its CPU seconds)
    of ``[*prefix] python -m onnxcam.cli explain *arguments -q``."""
    command = [*prefix, sys.executable, "-m", "onnxcam.cli", "explain", *arguments, "-q"]
    started, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the CLI failed: {done.stderr}")
    inner = float(re.search(r"images in ([0-9.]+) s", done.stdout).group(1))
    return wall, inner, done.stdout, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def cli(model: str, folder: Path, out: Path, batch: int, extra: list[str]) -> tuple[float, float, float]:
    """(wall seconds of the whole process, the run's own seconds, CPU seconds) of one CLI run."""
    wall, inner, _, cpu = run_cli([model, str(folder), "-o", str(out), "--preset", "inception", "--provider", "cpu",
                                   "--batch-size", str(batch), *extra])
    return wall, inner, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--overlay-size", type=int, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        folder = root / "photos"
        folder.mkdir()
        paths = make_photos(folder, args.count)
        sides = [max(cv2.imread(str(p)).shape[:2]) for p in paths[:20]]
        cli(args.model, folder / paths[0].name, root / "warm", args.batch_size, [])  # rewrite cached
        variants = {"cli": []}
        if args.overlay_size:
            variants[f"cli --overlay-size {args.overlay_size}"] = ["--overlay-size", str(args.overlay_size)]
        times: dict[str, list] = {"baseline": [], **{name: [] for name in variants}}
        for repeat in range(args.repeats):
            times["baseline"].append(baseline(args.model, paths, args.batch_size))
            for name, extra in variants.items():
                times[name].append(cli(args.model, folder, root / f"out-{len(times[name])}-{name[-3:]}",
                                       args.batch_size, extra))

    n = args.count
    print(f"{n} JPEGs (long side 400-1200 px, e.g. {sides[:6]}), {Path(args.model).name}, batch {args.batch_size}, "
          f"CPU provider; {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}; "
          f"median of {args.repeats} interleaved runs (a loaded machine: noisy)")
    base = statistics.median(t[0] for t in times["baseline"])
    base_cpu = statistics.median(t[1] for t in times["baseline"])
    print(f"{'baseline: decode + plain forward':<44} {n / base:7.1f} images/s  ({base:.2f} s; CPU {base_cpu:.2f} s)")
    for name in variants:
        wall = statistics.median(t[0] for t in times[name])
        inner = statistics.median(t[1] for t in times[name])
        cpu = statistics.median(t[2] for t in times[name])
        print(f"{name + ' (whole process)':<44} {n / wall:7.1f} images/s  ({wall:.2f} s)  ratio {base / wall:.2f}"
              f"   CPU {cpu:.2f} s, ratio {base_cpu / cpu:.2f}")
        print(f"{name + ' (streaming loop)':<44} {n / inner:7.1f} images/s  ({inner:.2f} s)  ratio {base / inner:.2f}")


if __name__ == "__main__":
    main()
