"""Known-truth benchmark for ``onnxcam evaluate``: N fresh scenes from the demo's generator.

The bundled demo model (models/demo/shapes.onnx) was trained on scenes drawn by
tools/train_demo_model.py; this script draws N new ones with an unused seed (a third hold
two shapes of different classes), at the samples' 128x128, writes them with an onnxcam JSON
of their boxes and a label mapping (dataset label = model label), and runs ``onnxcam
evaluate`` on them with the given methods. Each image is explained for its best-scoring
object's class and judged against that object's box.

``--analyze`` reads a finished run instead (``OUT/report/results.json``): per method, the
pointing misses in one- and two-shape scenes and, in two-shape scenes, where the map's peak
falls (the explained shape, the other one, neither), the share of its mass on the other
shape, and the mean map value (how much of ``input * map`` the confidence metric keeps). The maps are recomputed for the report's targets; their pointing result is checked
against the report's.

Usage::

    python tools/benchmark_scenes.py --count 500 --out /tmp/scenes [-- extra evaluate options]
    python tools/benchmark_scenes.py --out /tmp/scenes --analyze
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import CLASSES, SAMPLE_SCALE, render  # noqa: E402

from onnxcam import Explainer  # noqa: E402
from onnxcam.evaluation.pointing import energy_pointing, pointing_game  # noqa: E402
from onnxcam.images import load_image  # noqa: E402
from onnxcam.visualize import resize_map  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_SEED = 9090  # distinct from the training, test and sample seeds


def write_scenes(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(BENCHMARK_SEED)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(count):
        pair = index % 3 == 2
        labels = tuple(CLASSES[k] for k in (rng.choice(len(CLASSES), 2, replace=False) if pair
                                            else [index % len(CLASSES)]))
        image, objects = render(rng, labels, scale=SAMPLE_SCALE)
        name = f"scene{index:04d}.png"
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        entries.append({"image": name, "objects": [{"label": o.label, "box_xyxy": list(map(float, o.box_xyxy))}
                                                   for o in objects]})
    (folder / "annotations.json").write_text(json.dumps(entries, indent=1))
    (folder / "map.json").write_text(json.dumps({c: c for c in CLASSES}))
    return folder


def analyze(out: Path) -> None:
    """Print the per-method breakdown of a finished run (see the module docstring)."""
    report = out / "report" / "results.json"
    if not report.exists():
        raise SystemExit(f"{report} does not exist: run the benchmark with --out {out} first")
    results = json.loads(report.read_text())
    tolerance = results["config"]["tolerance"]
    scenes = out / "scenes"
    objects = {e["image"]: e["objects"] for e in json.loads((scenes / "annotations.json").read_text())}
    records = results["images"]
    pictures = [load_image(Path(r["file"])) for r in records]
    others = [[o["box_xyxy"] for o in objects[Path(r["file"]).name] if o["label"] not in r["objects"]]
              for r in records]
    pairs = [n for n, boxes in enumerate(others) if boxes]
    explainer = Explainer(ROOT / "models/demo/shapes.onnx")
    x = explainer.preprocess()(pictures)
    targets = np.array([r["target"] for r in records])
    print(f"{len(records)} scenes ({len(pairs)} with two shapes), pointing tolerance {tolerance:g} px")
    # a peak within the tolerance of both shapes counts for both
    print("| method | pointing hits | misses: one shape / two shapes | two shapes: peak at the explained "
          "/ the other / neither | mass on the other shape % | mean map value | MaxBoxAcc threshold |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method in results["methods"]:
        maps = explainer.explain(x, method, targets=targets).heatmaps
        full = [resize_map(m, p.shape[:2]) for m, p in zip(maps, pictures)]
        reported = [r["methods"][method]["metrics"]["pointing"] for r in records]
        recomputed = [float(pointing_game(f, r["boxes"], None, tolerance)) for f, r in zip(full, records)]
        if recomputed != reported:
            differ = sum(a != b for a, b in zip(recomputed, reported))
            raise SystemExit(f"{method}: recomputed maps point differently from the report in {differ} scenes")
        misses = [n for n, hit in enumerate(reported) if not hit]
        on_other = [n for n in pairs if pointing_game(full[n], others[n], None, tolerance)]
        on_target = [n for n in pairs if reported[n]]
        neither = [n for n in pairs if not reported[n] and n not in on_other]
        masses = [energy_pointing(full[n], others[n]) for n in pairs]
        mass = 100 * float(np.nanmean(masses)) if not np.all(np.isnan(masses)) else float("nan")
        summary = results["summary"][method]
        threshold = summary.get("maxboxacc", {}).get("threshold")
        print(f"| {method} | {sum(map(int, reported))}/{len(records)} | {len([n for n in misses if n not in pairs])}"
              f" / {len([n for n in misses if n in pairs])} | {len(on_target)} / {len(on_other)} / {len(neither)} "
              f"| {mass:.1f} | {float(np.mean(maps)):.3f} | {'–' if threshold is None else f'{threshold:.2f}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("onnxcam-scenes"))
    parser.add_argument("--analyze", action="store_true", help="break down a finished run in --out (no new run)")
    parser.add_argument("extra", nargs="*", help="options passed to onnxcam evaluate (after --)")
    args = parser.parse_args()
    if args.analyze:
        analyze(args.out)
        return
    scenes = write_scenes(args.out / "scenes", args.count)
    command = [sys.executable, "-m", "onnxcam.cli", "evaluate", str(ROOT / "models/demo/shapes.onnx"), str(scenes),
               "--annotations", str(scenes / "annotations.json"), "--label-map", str(scenes / "map.json"),
               "-o", str(args.out / "report"), *args.extra]
    print(" ".join(command), flush=True)
    raise SystemExit(subprocess.call(command))


if __name__ == "__main__":
    main()
