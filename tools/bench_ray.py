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

``--actor-memory MODEL...``: instead, the peak RSS (``VmHWM``) of what one actor builds, in
fresh processes, the rewrite cache warm: the Explainer on the driver's file (an actor on the
driver's machine or a shared file system), on a copy of the object store's bytes in a file of
its own (another node), and, for comparison, on a ModelProto parsed from those bytes (what
every actor built before 27b5d71); each explains one image.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
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


#: One actor's Explainer, built the way argv[1] says from the model argv[2]; prints VmHWM (KiB).
ACTOR_PROBE = r"""
import os, sys, tempfile
import numpy as np
import onnx
sys.path.insert(0, sys.argv[3])
from onnxcam import Explainer
kind, path = sys.argv[1], sys.argv[2]
if kind == "ModelProto from the bytes":
    data = open(path, "rb").read()
    model = onnx.load_model_from_string(data)
    del data
elif kind == "own copy of the bytes":
    data = open(path, "rb").read()
    model = os.path.join(tempfile.mkdtemp(prefix="onnxcam-bench-"), os.path.basename(path))
    with open(model, "wb") as stream:
        stream.write(data)
    del data
else:
    model = path
explainer = Explainer(model, provider="cpu", threads=1)
h, w = explainer.input_size or (224, 224)
shape = (1, 3, h, w) if explainer.input_layout == "NCHW" else (1, h, w, 3)
explainer.explain(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32))
print([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1])
"""
ACTOR_KINDS = ("the driver's file", "own copy of the bytes", "ModelProto from the bytes")


def actor_memory(models: list[str]) -> None:
    print(f"{'model':<28} {'MiB':>5}   " + "   ".join(f"{kind:>26}" for kind in ACTOR_KINDS))
    for model in models:
        def peak(kind: str) -> float:
            done = subprocess.run([sys.executable, "-c", ACTOR_PROBE, kind, model, str(REPO)],
                                  capture_output=True, text=True, check=True)
            return int(done.stdout.split()[-1]) / 1024
        peak(ACTOR_KINDS[0])  # the rewrite cache warm, as for every actor after the driver's check
        peaks = {kind: peak(kind) for kind in ACTOR_KINDS}
        base = peaks[ACTOR_KINDS[-1]]
        print(f"{Path(model).name:<28} {os.path.getsize(model) / 2**20:5.0f}   " + "   ".join(
            f"{mib:14.0f} MiB ({mib / base:4.2f}x)" for mib in peaks.values()))


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
    parser.add_argument("--actor-memory", nargs="+", metavar="MODEL", help="peak RSS of one actor's Explainer")
    args = parser.parse_args()
    if args.actor_memory:
        return actor_memory(args.actor_memory)
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
