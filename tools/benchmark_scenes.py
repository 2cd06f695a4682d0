"""Known-truth benchmark for ``onnxcam evaluate``: N fresh scenes from the demo's generator.

The bundled demo model (models/demo/shapes.onnx) was trained on scenes drawn by
tools/train_demo_model.py; this script draws N new ones with an unused seed (a third hold
two shapes of different classes), at the samples' 128x128, writes them with an onnxcam JSON
of their boxes and a label mapping (dataset label = model label), and runs ``onnxcam
evaluate`` on them with the given methods. Each image is explained for its best-scoring
object's class and judged against that object's box.

Usage::

    python tools/benchmark_scenes.py --count 500 --out /tmp/scenes [-- extra evaluate options]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("onnxcam-scenes"))
    parser.add_argument("extra", nargs="*", help="options passed to onnxcam evaluate (after --)")
    args = parser.parse_args()
    scenes = write_scenes(args.out / "scenes", args.count)
    command = [sys.executable, "-m", "onnxcam.cli", "evaluate", str(ROOT / "models/demo/shapes.onnx"), str(scenes),
               "--annotations", str(scenes / "annotations.json"), "--label-map", str(scenes / "map.json"),
               "-o", str(args.out / "report"), *args.extra]
    print(" ".join(command), flush=True)
    raise SystemExit(subprocess.call(command))


if __name__ == "__main__":
    main()
