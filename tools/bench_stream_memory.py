"""Benchmark: peak memory of `onnxcam explain` on a folder must not grow with the image count.

Generates N small random PNGs per count (e.g. 1,000 and 10,000) in a temporary folder and runs
``python -m onnxcam.cli explain MODEL FOLDER -o OUT -q`` on each, every run in a fresh wrapper
process whose only child is the CLI, so ``RUSAGE_CHILDREN``'s ``ru_maxrss`` is that run's peak
resident memory. Prints peak RSS and images/s per count, and the ratio of the largest count's
peak to the smallest's (streaming: about 1; holding every output: grows with N).

    python tools/bench_stream_memory.py [--counts 1000,10000] [--size 64] [--model M] [--batch-size 16]

The default model is the small shared MobileNet (mobilenet_v1_0.25_128).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli_throughput import REPO, run_cli  # noqa: E402

DEFAULT_MODEL = REPO.parent / "shared" / "models" / "mobilenet" / "mobilenet_v1_0.25_128.onnx"

WRAPPER = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "sys.stderr.write(done.stderr); sys.stdout.write(done.stdout); "
           "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 255, (64, size, size, 3), dtype=np.uint8)  # 64 distinct pictures, reused
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"  # 1,000 per folder, as datasets are laid out
        sub.mkdir(exist_ok=True)
        cv2.imwrite(str(sub / f"{i:06d}.png"), palette[i % 64])


def peak(model: str, folder: Path, out: Path, batch: int) -> tuple[float, float, str]:
    """(peak RSS in MiB, seconds, the CLI's summary line) of one run."""
    seconds, _, stdout, _ = run_cli([model, str(folder), "-o", str(out), "--provider", "cpu",
                                  "--batch-size", str(batch)], prefix=(sys.executable, "-c", WRAPPER))
    kib = int(re.search(r"PEAK_KB (\d+)", stdout).group(1))
    return kib / 1024, seconds, stdout.splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,10000")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print(f"{Path(args.model).name}, {args.size}x{args.size} PNGs, batch {args.batch_size}, CPU; "
          f"{platform.machine()}, {os.cpu_count()} cores")
    peaks = []
    with tempfile.TemporaryDirectory() as temporary:
        for count in counts:
            folder = Path(temporary) / f"images-{count}"
            folder.mkdir()
            make_images(folder, count, args.size)
            mib, seconds, summary = peak(args.model, folder, Path(temporary) / f"out-{count}", args.batch_size)
            peaks.append(mib)
            print(f"{count:>7} images: peak RSS {mib:7.1f} MiB, {seconds:6.1f} s for the whole process   [{summary}]")
    print(f"peak RSS ratio {counts[-1]} / {counts[0]} images: {peaks[-1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
