"""ROAD's noisy linear imputer: scipy's sparse LU against the numpy conjugate-gradient path.

One 224x224 photo (``--image``, default ``../shared/data/annotated/000000000009.jpg``) is
explained by Grad-CAM on MobileNetV2 (``--model``, default the shared
``mobilenet_v2_1.0_224.onnx``, preset inception); each of ROAD's 18 keep masks (MoRF and
LeRF at the percentiles 10, ..., 90) is imputed by both solvers, interleaved (both once per
round, ``--repeats`` rounds, medians), so load from elsewhere hits both columns alike. Prints
the seconds per mask, their ratio, the largest difference between the two imputations (CG at
its default tolerance, and at 1e-10, where it must agree with the exact solve) and the totals
of one image's ROAD (the 18 imputations). Usage::

    python tools/bench_road_imputer.py [--image PHOTO] [--model MODEL] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from onnxcam import Explainer
from onnxcam.evaluation.road import PERCENTILES, linear_impute, road_keep_mask, scipy_available
from onnxcam.images import load_image
from onnxcam.visualize import resize_map

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SIZE = 224


def seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=SHARED / "data/annotated/000000000009.jpg")
    parser.add_argument("--model", type=Path, default=SHARED / "models/mobilenet/mobilenet_v2_1.0_224.onnx")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for path in (args.image, args.model):
        if not path.exists():
            raise SystemExit(f"{path} does not exist: pass --image / --model")
    if not scipy_available():
        raise SystemExit("scipy is not importable: there is no sparse LU to compare with (pip install scipy)")

    explainer = Explainer(args.model, provider="cpu")
    preprocess = explainer.preprocess("inception", (SIZE, SIZE))
    x = preprocess([load_image(args.image)])
    heatmap = resize_map(explainer.explain(x, "gradcam").heatmaps[0], (SIZE, SIZE))
    image = np.asarray(x[0], np.float32)
    if image.shape[0] != 3:  # NHWC model: the imputer works on (C, H, W)
        image = image.transpose(2, 0, 1)

    print(f"{args.image.name} at {SIZE}x{SIZE}, Grad-CAM of {args.model.name}; "
          f"load average {os.getloadavg()[0]:.2f}; medians of {args.repeats} interleaved rounds")
    print("| mask | removed % | scipy LU s | numpy CG s | CG / LU | max diff (CG tol 1e-4) | max diff (CG tol 1e-10) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    totals = {"scipy": 0.0, "cg": 0.0}
    for most in (True, False):
        for percentile in PERCENTILES:
            keep = road_keep_mask(heatmap, percentile, most)
            times: dict[str, list[float]] = {"scipy": [], "cg": []}
            for _ in range(args.repeats):
                for solver, row in times.items():
                    row.append(seconds(lambda keep=keep, solver=solver: linear_impute(image, keep, noise=0.0,
                                                                                      solver=solver)))
            exact = linear_impute(image, keep, noise=0.0, solver="scipy")
            default = np.abs(linear_impute(image, keep, noise=0.0, solver="cg") - exact).max()
            tight = np.abs(linear_impute(image, keep, noise=0.0, solver="cg", tolerance=1e-10) - exact).max()
            lu, cg = statistics.median(times["scipy"]), statistics.median(times["cg"])
            totals["scipy"] += lu
            totals["cg"] += cg
            print(f"| {'MoRF' if most else 'LeRF'} {percentile} | {100 * (~keep).mean():.0f} | {lu:.4f} | {cg:.4f} "
                  f"| {cg / lu:.1f} | {default:.1e} | {tight:.1e} |")
    print(f"one image's ROAD (18 imputations): scipy LU {totals['scipy']:.3f} s, numpy CG {totals['cg']:.3f} s, "
          f"CG / LU {totals['cg'] / totals['scipy']:.1f}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
