"""Benchmark: K target classes for one image in one pass vs K separate explain calls.

One pass = the forward model once + the head (the layers after the explained activation) fed
the activation K times, backward included; separate = K runs of the full forward + backward
model. Both give the same maps (checked here). Usage:

    python tools/bench_multitarget.py [MODEL] [--method gradcam] [--repeats 7] [--image FILE]

Prints one row per K: the median and best wall time of each way, the ratio of the medians,
and the largest difference between the maps of the two ways.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxcam import Explainer, load_image  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_MODEL = SHARED / "models" / "mobilenet" / "mobilenet_v2_1.0_224.onnx"
DEFAULT_IMAGE = SHARED / "data" / "photos" / "cat.bmp"


def timings(calls, repeats: int) -> list[list[float]]:
    """Seconds of each call, ``repeats`` times, interleaved so that a burst of load from
    elsewhere on the machine hits all of them alike; one warm-up round first."""
    for call in calls:
        call()  # sessions built, caches filled
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, spent in zip(calls, times):
            started = time.perf_counter()
            call()
            spent.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ks", default="1,5,10")
    parser.add_argument("--provider", default="cpu")
    args = parser.parse_args()

    explainer = Explainer(args.model, provider=args.provider)
    preprocess = explainer.preprocess("inception") if "mobilenet" in args.model else explainer.preprocess()
    x = preprocess([load_image(args.image)]) if os.path.exists(args.image) else \
        np.random.default_rng(0).uniform(-1, 1, (1, 3) + explainer.input_size).astype(np.float32)
    logits = explainer.forward(x)[explainer.logits_name]
    ranked = np.argsort(-logits[0])

    print(f"model {Path(args.model).name}, method {args.method}, provider {explainer.provider}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.repeats} interleaved repeats (median / best), {time.strftime('%Y-%m-%d')}")
    print(f"{'K':>3} {'one pass ms':>17} {'K calls ms':>17} {'speed-up':>9} {'max |diff|':>11}")
    for k in [int(v) for v in args.ks.split(",")]:
        classes = [int(c) for c in ranked[:k]]
        one = explainer.explain(x, args.method, targets=[classes])
        separate = [explainer.explain(x, args.method, targets=c) for c in classes]
        diff = max(float(np.abs(one.heatmaps[0, i] - s.heatmaps[0]).max()) for i, s in enumerate(separate))
        t_one, t_sep = timings([lambda: explainer.explain(x, args.method, targets=[classes]),
                                lambda: [explainer.explain(x, args.method, targets=c) for c in classes]],
                               args.repeats)
        one_ms = (statistics.median(t_one) * 1e3, min(t_one) * 1e3)
        sep_ms = (statistics.median(t_sep) * 1e3, min(t_sep) * 1e3)
        print(f"{k:>3} {one_ms[0]:>8.1f} / {one_ms[1]:>6.1f} {sep_ms[0]:>8.1f} / {sep_ms[1]:>6.1f} "
              f"{sep_ms[0] / one_ms[0]:>8.2f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
