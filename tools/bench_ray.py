"""Benchmark: images/s of one process vs Ray with N actors, on the same folder.

Makes ``--count`` photos (512 px long side, from ../shared/data) in a temporary folder, then
explains them (Grad-CAM, mobilenet_v2, overlays written) three ways, each into a fresh output
folder, the rewrite cache warmed first:

* local, onnxruntime's default threads (one per core): ``onnxcam explain`` as one process;
* local, 1 onnxruntime thread: what one Ray actor has;
* Ray, ``--workers`` actors of 1 CPU and 1 thread each, on a local cluster started here
  (``ray.init(num_cpus=workers)``); the cluster's and actors' start-up is timed separately
  from the run (a warm-up run first; each run starts its own actors, so the timed run is reported with
  and without the time to its first batch: model load and session per actor).

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


def local(model: str, folder: Path, out: Path, batch: int, threads: int) -> float:
    explainer = Explainer(model, provider="cpu", batch_size=batch, threads=threads)
    worker = Worker(explainer, explainer.preprocess("inception"), Settings(), out)
    summary = explain_folder(worker, [folder], out, batch_size=batch, progress=False)
    assert summary.explained and not summary.failed
    return summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import ray
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        (root / "photos").mkdir()
        make_photos(root / "photos", args.count, side=512)
        (root / "warm").mkdir()
        make_photos(root / "warm", args.batch_size * args.workers, side=512)
        local(args.model, root / "warm", root / "warm-out", args.batch_size, 0)  # rewrite cached
        rows = [("local process, default threads", local(args.model, root / "photos", root / "l0", args.batch_size, 0)),
                ("local process, 1 thread", local(args.model, root / "photos", root / "l1", args.batch_size, 1))]
        started = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        common = dict(provider="cpu", batch_size=args.batch_size, workers=args.workers, threads=1, preset="inception")
        explain_dataset(root / "warm", args.model, root / "ray-warm", **common)
        startup = time.perf_counter() - started
        arrivals: list[float] = []
        summary = explain_dataset(root / "photos", args.model, root / "ray",
                                  on_record=lambda record: arrivals.append(time.perf_counter()), **common)
        rows.append((f"Ray, {args.workers} actors x 1 thread (with actor start)", summary.seconds))
        first = args.batch_size  # from the first batch back to the last: actors up and running
        steady = (arrivals[-1] - arrivals[first - 1]) / (len(arrivals) - first)
        rows.append((f"Ray, {args.workers} actors, after the first batch", steady * args.count))
        ray.shutdown()
    print(f"{args.count} photos (512 px), {Path(args.model).name}, Grad-CAM + overlays, batch {args.batch_size}; "
          f"{platform.machine()}, {os.cpu_count()} cores (shared with other work: noisy)")
    base = rows[0][1]
    for name, seconds in rows:
        print(f"{name:<52} {args.count / seconds:7.1f} images/s  ({seconds:.2f} s, x{base / seconds:.2f} vs the first row)")
    print(f"Ray cluster start + first (warm-up) run: {startup:.1f} s")


if __name__ == "__main__":
    main()
