"""The bundled demo: explain our own small shapes classifier on its sample images, offline.

The model (``models/demo/shapes.onnx``) is trained by ``tools/train_demo_model.py`` on
synthetic shapes over cluttered backgrounds; it declares its preprocessing and labels in its
metadata. Samples with two objects of different classes show that Grad-CAM is
class-discriminative: each class's map should peak on its own object (scored with the pointing
game against the sample's boxes). Output: one overlay per sample and class, and index.html.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OnnxcamError
from .explainer import Explainer
from .images import load_image
from .metrics import pointing_hit
from .files import atomic_write_bytes
from .visualize import encode_png, overlay, resize_map


def demo_dir() -> Path:
    """Where the demo model and samples live: $ONNXCAM_DEMO_DIR, else the checkout's models/demo."""
    if os.environ.get("ONNXCAM_DEMO_DIR"):
        return Path(os.environ["ONNXCAM_DEMO_DIR"])
    return Path(__file__).resolve().parent.parent / "models" / "demo"


@dataclass
class DemoRow:
    """One sample explained for one class."""

    image: str
    label: str
    probability: float
    overlay: str
    hit: bool | None


def run_demo(outdir: Path, provider: str = "auto", method: str = "gradcam", threads: int = 0) -> tuple[Path, str]:
    """Explain every sample for each of its objects' classes; returns the index.html path and
    a one-line summary."""
    folder = demo_dir()
    model_path, samples_file = folder / "shapes.onnx", folder / "samples" / "samples.json"
    if not model_path.exists() or not samples_file.exists():
        raise OnnxcamError(f"the bundled demo is missing ({model_path}); run from a source checkout "
                           "installed with `pip install -e .`, or set ONNXCAM_DEMO_DIR")
    explainer = Explainer(model_path, provider=provider, threads=threads)
    labels = explainer.labels() or []
    preprocess = explainer.preprocess()
    samples = json.loads(samples_file.read_text())

    rows: list[DemoRow] = []
    files: dict[str, bytes] = {}
    for sample in samples:
        picture = load_image(folder / "samples" / sample["image"])
        x = preprocess([picture])
        objects = sample["objects"]
        classes = [labels.index(o["label"]) for o in objects] or [None]
        x_batch = np.repeat(x, len(classes), axis=0)
        result = explainer.explain(x_batch, method=method, targets=None if classes == [None] else classes)
        stem = Path(sample["image"]).stem
        for row, obj in enumerate(objects or [None]):
            heatmap = resize_map(result.heatmaps[row], picture.shape[:2])
            target = int(result.targets[row])
            name = f"{stem}.{labels[target] if labels else target}.{method}.png"
            files[name] = encode_png(overlay(picture, heatmap))
            rows.append(DemoRow(sample["image"], labels[target] if labels else str(target),
                                float(result.probabilities[row, target]), name,
                                pointing_hit(heatmap, obj["box_xyxy"]) if obj else None))
        files[sample["image"]] = encode_png(np.uint8(np.clip(picture, 0, 255)))

    hits = [r.hit for r in rows if r.hit is not None]
    files["index.html"] = _index_html(rows, hits, explainer.provider, method).encode()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(outdir / name, data)
    summary = (f"{len(rows)} maps for {len(samples)} images on {explainer.provider}; "
               f"pointing game: {sum(hits)}/{len(hits)} peaks inside their object's box")
    return outdir / "index.html", summary


def _index_html(rows: list[DemoRow], hits: list[bool], provider: str, method: str) -> str:
    cells = []
    for row in rows:
        verdict = "" if row.hit is None else ("peak on its object" if row.hit else "peak elsewhere")
        cells.append(
            f'<figure><img src="{html.escape(row.image)}" width="160"><img src="{html.escape(row.overlay)}" '
            f'width="160"><figcaption>{html.escape(row.label)} p={row.probability:.2f} '
            f"{verdict}</figcaption></figure>")
    return (
        "<!doctype html><meta charset=utf-8><title>onnxcam demo</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:8px}</style>"
        f"<h1>onnxcam demo: {html.escape(method)}</h1>"
        f"<p>Provider: {html.escape(provider)}. Pointing game: {sum(hits)}/{len(hits)} maps peak inside "
        "the box of the class they explain. Two-object images are explained once per class.</p>"
        + "\n".join(cells))
