"""Benchmark: what Grad-CAM costs on top of one plain forward pass.

Side by side in one process: onnxruntime on the original model (forward only) and onnxcam's
``Explainer.explain`` (the rewritten model's forward + in-graph backward, then the map),
same provider, same inputs. Prints medians and the ratio, then Score-CAM's time at batch 1
and, on CUDA, how many nodes onnxruntime placed on the CPU. Usage:

    python tools/bench_overhead.py [MODEL] [--device cpu|cuda|auto] [--batch 1 8] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxcam import Explainer  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "models" / "mobilenet" / "mobilenet_v2_1.0_224.onnx"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(DEFAULT))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", "--provider", dest="device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    parser.add_argument("--scorecam-repeats", type=int, default=3, help="0 skips Score-CAM")
    args = parser.parse_args()

    explainer = Explainer(args.model, provider=args.device, threads=args.threads)
    rewritten, session = explainer.prepared()
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    plain = ort.InferenceSession(args.model, options, providers=session.session.get_providers())
    input_name = plain.get_inputs()[0].name
    print(f"{Path(args.model).name} on {session.provider}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"{'batch':>5} {'forward ms':>11} {'gradcam ms':>11} {'ratio':>6}")
    rng = np.random.default_rng(0)
    ratios: dict[str, str] = {}
    for batch in args.batch:
        height, width = explainer.input_size
        shape = (batch, 3, height, width) if explainer.input_layout == "NCHW" else (batch, height, width, 3)
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        static = explainer.graph.static_batch()

        def forward() -> None:
            step = static or batch
            for start in range(0, batch, step):
                plain.run(None, {input_name: x[start:start + step]})

        fwd = median_ms(forward, args.repeats)
        cam = median_ms(lambda: explainer.explain(x), args.repeats)
        print(f"{batch:>5} {fwd:>11.1f} {cam:>11.1f} {cam / fwd:>6.2f}")
        ratios.setdefault("ratio", f"{cam / fwd:.2f} (batch {batch})")
    if args.scorecam_repeats:
        x = rng.uniform(-1, 1, (1,) + shape[1:]).astype(np.float32)
        score = median_ms(lambda: explainer.explain(x, "scorecam"), args.scorecam_repeats)
        print(f"scorecam ms (batch 1): {score:.0f}")
    placement = session.placement
    print(f"provider: {session.provider}")
    print("cpu-placed nodes: " + (placement.describe() if placement else "not counted (CPU session)"))
    print(f"gradcam/forward ratio: {ratios.get('ratio', '-')}")


if __name__ == "__main__":
    main()
