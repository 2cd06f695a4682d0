"""Benchmark: images/s of one process vs Ray with N actors, and what is per worker vs per image.

Makes photos (512 px long side, from ../shared/data) in a temporary folder and explains them
(Grad-CAM, mobilenet_v2, overlays written, the rewrite cache warmed first), each run into a
fresh output folder, timed from the API call to its return (model load, check, sessions or
actor start included):

* local, onnxruntime's default threads (one per core), as ``onnxcam explain`` runs;
* local, 1 onnxruntime thread: what one Ray actor has;
* Ray, ``--workers`` actors of 1 CPU and 1 thread each, on a local cluster started here
  (``ray.init(num_cpus=workers)``; its start is reported apart, and every way runs once
  unmeasured first: Ray's first run also starts worker processes and imports onnxcam).

Each way runs ``--count`` / 4 and ``--count`` images: the slope (extra images / extra seconds)
is the per-image throughput, the intercept the fixed cost per run (for Ray: actor start, model
load and session per actor). Ray Data hands results back in blocks, so per-record arrival times
do not measure the rate; two sizes do.

    python tools/bench_ray.py [--count 64] [--workers 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxcam import Explainer  # noqa: E402
from onnxcam.distributed import explain_dataset  # noqa: E402
from onnxcam.runner import Settings, Worker, explain_folder  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli_throughput import make_photos  # noqa: E402

SHARED = REPO.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "mobilenet" / "mobilenet_v2_1.0_224.onnx"


def local(model: str, folder: Path, out: Path, batch: int, threads: int) -> None:
    explainer = Explainer(model, provider="cpu", batch_size=batch, threads=threads)
    worker = Worker(explainer, explainer.preprocess("inception"), Settings(), out)
    summary = explain_folder(worker, [folder], out, batch_size=batch, progress=False)
    assert summary.explained and not summary.failed


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import ray
    sizes = (args.count // 4, args.count)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        for size in sizes:
            (root / f"photos-{size}").mkdir()
            make_photos(root / f"photos-{size}", size, side=512)
        local(args.model, root / f"photos-{sizes[0]}", root / "warm", args.batch_size, 0)  # rewrite cached
        ways = {"local process, default threads": lambda folder, out: local(args.model, folder, out, args.batch_size, 0),
                "local process, 1 thread": lambda folder, out: local(args.model, folder, out, args.batch_size, 1)}
        common = dict(provider="cpu", batch_size=args.batch_size, workers=args.workers, threads=1, preset="inception")
        ways[f"Ray, {args.workers} actors x 1 thread"] = (
            lambda folder, out: explain_dataset(folder, args.model, out, **common))
        startup = timed(lambda: ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False))
        for i, way in enumerate(ways.values()):  # worker processes, imports, caches: not per run
            way(root / f"photos-{sizes[0]}", root / f"warm-{i}")
        seconds = {name: [timed(lambda: way(root / f"photos-{size}", root / f"{i}-{size}")) for size in sizes]
                   for i, (name, way) in enumerate(ways.items())}
        ray.shutdown()
    print(f"photos of 512 px, {Path(args.model).name}, Grad-CAM + overlays, batch {args.batch_size}; "
          f"{platform.machine()}, {os.cpu_count()} cores (shared with other work: noisy); Ray start {startup:.1f} s")
    print(f"{'':<36} {sizes[0]:>4} images  {sizes[1]:>4} images   per image         fixed per run")
    for name, (small, large) in seconds.items():
        slope = (large - small) / (sizes[1] - sizes[0])
        print(f"{name:<36} {small:9.2f} s  {large:9.2f} s   {1 / slope:6.1f} images/s   {small - slope * sizes[0]:6.2f} s")


if __name__ == "__main__":
    main()
