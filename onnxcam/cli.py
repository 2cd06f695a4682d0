"""Stage 6: the ``onnxcam`` command line (typer).

Errors in the user's input print one line, ``error: ...``, and exit with status 2; nothing is
written unless every image was explained (outputs are computed first, then written atomically).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .errors import OnnxcamError, TargetError
from .explainer import Explainer
from .export import export_explained, exportable_methods, save_explained
from .images import load_image, load_labels
from .methods import METHODS
from .files import atomic_write_bytes
from .visualize import encode_png, overlay, resize_map

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Explain ONNX image classifiers: Grad-CAM and relatives, on onnxruntime.")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        fail(f"{flag} takes numbers separated by commas, got '{text}'")
    return None


@app.command()
def layers(
    model: Annotated[Path, typer.Argument(help="ONNX classifier")],
    output: Annotated[Optional[str], typer.Option("--output", help="which model output to explain")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    size: Annotated[Optional[tuple[int, int]], typer.Option("--size", help="input H W for dynamic-size models")] = None,
) -> None:
    """List the spatial activations that can be explained; * marks the default."""
    try:
        explainer = Explainer(model, output=output, input_size=size)
        found = explainer.layers()
    except OnnxcamError as exc:
        fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps({"logits": explainer.logits_name, "input_layout": explainer.input_layout,
                               "layers": [l.__dict__ for l in found]}, indent=1))
        return
    typer.echo(f"explaining output: {explainer.logits_name}   input layout: {explainer.input_layout}")
    width = max(len(l.name) for l in found)
    typer.echo(f"  {'tensor':<{width}}  {'op':<18} {'C,H,W':<16} layout")
    for layer in found:
        mark = "*" if layer.default else " "
        shape = ",".join(map(str, layer.shape))
        typer.echo(f"{mark} {layer.name:<{width}}  {layer.op:<18} {shape:<16} {layer.layout}")


def resolve_target(text: Optional[str], labels: Optional[list[str]]) -> Optional[int]:
    """A class index, or a label (exact, then case-insensitive, then unique prefix)."""
    if text is None:
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    if not labels:
        raise TargetError(f"target '{text}' is not a class index and no labels are known (give --labels FILE)")
    for compare in (lambda l: l == text, lambda l: l.lower() == text.lower(),
                    lambda l: l.lower().split(",")[0].strip() == text.lower()):
        hits = [i for i, label in enumerate(labels) if compare(label)]
        if hits:
            return hits[0]
    prefix = [i for i, label in enumerate(labels) if label.lower().startswith(text.lower())]
    if len(prefix) == 1:
        return prefix[0]
    raise TargetError(f"target '{text}' matches {'no' if not prefix else len(prefix)} labels"
                      + (f" ({', '.join(labels[i] for i in prefix[:5])})" if prefix else ""))


def resolve_targets(texts: Optional[list[str]], labels: Optional[list[str]]) -> Optional[int | list[list[int]]]:
    """``-t`` values (repeated or comma-separated) -> one class, or several for every image."""
    if not texts:
        return None
    parts = [p.strip() for text in texts for p in (text.split(",") if not _is_label(text, labels) else [text])]
    classes = [resolve_target(p, labels) for p in parts if p]
    return classes[0] if len(classes) == 1 else [classes]


def _is_label(text: str, labels: Optional[list[str]]) -> bool:
    """ImageNet labels contain commas ("Samoyed, Samoyede"): a whole label is never split."""
    return bool(labels) and any(text.lower() == label.lower() for label in labels)


def _seed_vectors(path: Path, classes: Optional[int]) -> np.ndarray:
    """A seed-vector file: .npy of shape (C,) or (T, C) (or a text file of C numbers)."""
    if not path.is_file():
        raise OnnxcamError(f"{path}: no such seed-vector file")
    try:
        seeds = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=1)
    except (OSError, ValueError) as exc:
        raise OnnxcamError(f"{path}: cannot be read as seed vectors ({exc})") from None
    seeds = np.asarray(seeds, np.float32)
    if seeds.ndim not in (1, 2) or (classes is not None and seeds.shape[-1] != classes):
        raise OnnxcamError(f"{path}: seed vectors must have shape (C,) or (T, C) with C = {classes}, "
                           f"got {list(seeds.shape)}")
    return seeds if seeds.ndim == 1 else seeds[None]


@app.command()
def explain(
    model: Annotated[Path, typer.Argument(help="ONNX classifier")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    method: Annotated[str, typer.Option("-m", "--method", help=f"one of: {', '.join(METHODS)}")] = "gradcam",
    layer: Annotated[Optional[list[str]], typer.Option("-l", "--layer", help="tensor to explain (repeat for several)")] = None,
    target: Annotated[Optional[list[str]], typer.Option("-t", "--target", help="class index or label; repeat (or 3,7,9) for several")] = None,
    topk: Annotated[Optional[int], typer.Option("--topk", help="explain each image's K best classes")] = None,
    seed_vector: Annotated[Optional[Path], typer.Option("--seed-vector", help=".npy of shape (C,) or (T,C): explain s . logits")] = None,
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="output folder")] = Path("onnxcam-out"),
    labels_file: Annotated[Optional[Path], typer.Option("--labels", help="labels file, one per line")] = None,
    npy: Annotated[bool, typer.Option("--npy", help="also save the heatmap as float32 .npy")] = False,
    channels: Annotated[Optional[int], typer.Option("--channels", help="also the K most and K least important channels")] = None,
    eigen_smooth: Annotated[bool, typer.Option("--eigen-smooth", help="first principal component of the weighted activations")] = False,
    aug_smooth: Annotated[bool, typer.Option("--aug-smooth", help="average over flips and brightness changes")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="inputs per onnxruntime run")] = 16,
    max_channels: Annotated[Optional[int], typer.Option("--max-channels", help="Score-CAM: keep the N highest-variance channels")] = None,
    samples: Annotated[int, typer.Option("--samples", help="SmoothGrad: noisy copies")] = 25,
    noise: Annotated[float, typer.Option("--noise", help="SmoothGrad: sigma as a fraction of the input range")] = 0.15,
    steps: Annotated[int, typer.Option("--steps", help="Integrated Gradients: path steps")] = 50,
    baseline: Annotated[float, typer.Option("--baseline", help="Integrated Gradients: baseline value (model input space)")] = 0.0,
    provider: Annotated[str, typer.Option("--provider", help="auto, cpu or cuda")] = "auto",
    preset: Annotated[Optional[str], typer.Option("--preset", help="imagenet, inception, caffe or raw")] = None,
    size: Annotated[Optional[tuple[int, int]], typer.Option("--size", help="input H W for dynamic-size models")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="per-channel mean, e.g. 0.485,0.456,0.406")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="per-channel std")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", help="divide pixels by this first (default 255)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="which model output to explain")] = None,
    boxes: Annotated[bool, typer.Option("--boxes", help="also each map's weakly supervised box (results.json) and a binary pseudo-mask PNG")] = False,
    threshold: Annotated[float, typer.Option("--threshold", help="--boxes: binarize at this fraction of the map's max")] = 0.15,
) -> None:
    """Explain IMAGES with MODEL; writes overlays, optional .npy maps and results.json."""
    try:
        Explainer.method(method)
        if sum(x is not None and x != [] for x in (target, topk, seed_vector)) > 1:
            raise OnnxcamError("give only one of --target, --topk and --seed-vector")
        explainer = Explainer(model, layer=layer, provider=provider, output=output,
                              batch_size=batch_size, input_size=size)
        labels = load_labels(labels_file) if labels_file else explainer.labels()
        targets = (_seed_vectors(seed_vector, explainer.num_classes) if seed_vector
                   else resolve_targets(target, labels))
        options = dict(topk=topk, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth,
                       max_channels=max_channels, samples=samples, noise=noise, steps=steps,
                       baseline=baseline)
        preprocess = explainer.preprocess(preset, size, mean=_floats(mean, "--mean"),
                                          std=_floats(std, "--std"), scale=scale)
        pictures = [load_image(path) for path in images]  # every image decodes before any output
        stems = _unique_stems(images)
        records: list[dict] = []
        files: dict[str, bytes] = {}
        for start in range(0, len(pictures), batch_size):
            chunk = pictures[start:start + batch_size]
            started = time.perf_counter()
            x = preprocess(chunk)
            result = explainer.explain(x, method=method, targets=targets, **options)
            importance = explainer.channels(x, method, targets, k=channels, **options) if channels else None
            seconds = (time.perf_counter() - started) / len(chunk)
            for offset, picture in enumerate(chunk):
                stem = stems[start + offset]
                record = _explained_image(result, offset, picture, stem, method, labels, npy, files,
                                          box_threshold=_box_threshold(boxes, threshold))
                record.update(file=str(images[start + offset]), seconds=round(seconds, 4))
                if importance is not None:
                    record["channels"] = _channel_record(importance, offset, picture, stem, files)
                records.append(record)
        files["results.json"] = json.dumps(records, indent=1).encode()
    except OnnxcamError as exc:
        fail(str(exc))
        return
    outdir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(outdir / name, data)
    for record in records:
        shown = ", ".join(_describe_target(t) for t in record["targets"])
        typer.echo(f"{record['file']}: {shown} [{record['provider']}, {record['seconds'] * 1000:.0f} ms]")
    typer.echo(f"wrote {len(files)} files to {outdir}")


def _box_threshold(boxes: bool, threshold: float) -> Optional[float]:
    """--boxes/--threshold -> the threshold to box at, or None without --boxes."""
    if boxes and not 0.0 <= threshold < 1.0:
        raise OnnxcamError(f"--threshold must be in [0, 1), got {threshold}")
    return threshold if boxes else None


def _describe_target(target: dict) -> str:
    if target["target"] < 0:
        return "seed vector"
    label = f" ({target['label']})" if target["label"] else ""
    return f"class {target['target']}{label} p={target['probability']:.3f}"


def _explained_image(result, index: int, picture: np.ndarray, stem: str, method: str,
                     labels: Optional[list[str]], npy: bool, files: dict[str, bytes],
                     box_threshold: Optional[float] = None) -> dict:
    """Overlays (and .npy maps) of one image, one per target, and its results.json record."""
    targets = []
    classes = result.targets[index].reshape(-1)
    for slot, cls in enumerate(classes):
        cls = int(cls)
        name = f"{stem}.{method}" if len(classes) == 1 else f"{stem}.{method}.{cls if cls >= 0 else f'seed{slot}'}"
        heatmap = resize_map(result.per_target[index, slot], picture.shape[:2])
        files[f"{name}.png"] = encode_png(overlay(picture, heatmap))
        if npy:
            files[f"{name}.npy"] = _npy_bytes(heatmap)
        targets.append({
            "target": cls, "label": labels[cls] if labels and 0 <= cls < len(labels) else None,
            "probability": float(result.probabilities[index, cls]) if cls >= 0 else None,
            "overlay": f"{name}.png",
        })
        if box_threshold is not None:  # --boxes: weakly supervised box + pseudo-mask PNG
            from .evaluation.localization import box_outputs
            box, mask = box_outputs(heatmap, box_threshold, name)
            targets[-1].update(box)
            files.update(mask)
    record = {"target": targets[0]["target"], "label": targets[0]["label"],
              "probability": targets[0]["probability"], "targets": targets,
              "layer": result.layer, "method": method, "provider": result.provider}
    return record


def _channel_record(importance, index: int, picture: np.ndarray, stem: str, files: dict[str, bytes]) -> dict:
    """The K most and least important channels of one image (first target): a grid image
    (top row: most important, bottom row: least) and their indices and weights."""
    pick = (lambda a: a[index] if a.ndim in (2, 4) else a[index, 0])
    rows = []
    for maps in (importance.most_maps, importance.least_maps):
        chosen = maps[index] if maps.ndim == 4 else maps[index, 0]
        tiles = [overlay(picture, m) for m in chosen]
        tiles = [cv2_resize(t, (128, 128)) for t in tiles]
        rows.append(np.concatenate(tiles, axis=1))
    name = f"{stem}.{importance.method}.channels.png"
    files[name] = encode_png(np.concatenate(rows, axis=0))
    return {"layer": importance.layer, "grid": name,
            "most": [int(c) for c in pick(importance.most)],
            "most_weights": [float(w) for w in pick(importance.most_weights)],
            "least": [int(c) for c in pick(importance.least)],
            "least_weights": [float(w) for w in pick(importance.least_weights)]}


def cv2_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _unique_stems(paths: list[Path]) -> list[str]:
    """File stems, disambiguated when two images share one (a/x.jpg, b/x.png)."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _npy_bytes(array: np.ndarray) -> bytes:
    import io
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return buffer.getvalue()


@app.command("export")
def export_command(
    model: Annotated[Path, typer.Argument(help="ONNX classifier")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the self-explaining model to write (.onnx)")],
    method: Annotated[str, typer.Option("-m", "--method", help=f"one of: {', '.join(exportable_methods())}")] = "gradcam",
    layer: Annotated[Optional[str], typer.Option("-l", "--layer", help="tensor to explain (default: the last spatial one)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="which model output to explain")] = None,
    size: Annotated[Optional[tuple[int, int]], typer.Option("--size", help="input H W for dynamic-size models")] = None,
) -> None:
    """Write a model that onnxruntime runs to get the logits and the heatmap (input 'target',
    outputs 'heatmap', 'target_class'); no onnxcam needed to run it."""
    try:
        exported = export_explained(model, method, layer=layer, output=output, input_size=size)
    except OnnxcamError as exc:
        fail(str(exc))
        return
    try:
        save_explained(exported, out)  # atomic: a failed write leaves no file
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
        return
    meta = {p.key: p.value for p in exported.metadata_props}
    typer.echo(f"wrote {out}: {meta['onnxcam.method']} at layer {meta['onnxcam.layer']}; "
               f"inputs {', '.join(i.name for i in exported.graph.input)}; "
               f"outputs {', '.join(o.name for o in exported.graph.output)}")


@app.command()
def demo(
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="output folder")] = Path("onnxcam-demo"),
    provider: Annotated[str, typer.Option("--provider", help="auto, cpu or cuda")] = "auto",
) -> None:
    """Explain the bundled shapes classifier on its sample images (offline)."""
    from .demo import run_demo
    try:
        index, summary = run_demo(outdir, provider=provider)
    except OnnxcamError as exc:
        fail(str(exc))
        return
    typer.echo(summary)
    typer.echo(f"demo written: {index}")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="ONNX classifier")],
    images: Annotated[list[Path], typer.Argument(help="image files, or one folder")],
    annotations: Annotated[Path, typer.Option("--annotations", help="onnxcam JSON, COCO JSON, VOC/ImageNet XML (file or folder)")],
    method: Annotated[Optional[list[str]], typer.Option("-m", "--method", help="repeat for several (default gradcam)")] = None,
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="output folder")] = Path("onnxcam-eval"),
    label_map: Annotated[Optional[Path], typer.Option("--label-map", help="JSON {dataset label: model class}; default: explain the top-1")] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="families, comma-separated (default all): localization, pointing, confidence, deletion, road, faithfulness, sanity")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="box binarization, fraction of the max")] = 0.15,
    tolerance: Annotated[float, typer.Option("--tolerance", help="pointing game tolerance (pixels)")] = 15.0,
    score: Annotated[str, typer.Option("--score", help="probability or logit")] = "probability",
    steps: Annotated[int, typer.Option("--steps", help="deletion/insertion points per curve")] = 50,
    deletion_baseline: Annotated[str, typer.Option("--deletion-baseline", help="zeros, blur or mean")] = "zeros",
    insertion_baseline: Annotated[str, typer.Option("--insertion-baseline", help="zeros, blur or mean")] = "blur",
    occlusion: Annotated[tuple[int, int], typer.Option("--occlusion", help="occlusion window and stride (input pixels)")] = (32, 16),
    road_percentiles: Annotated[Optional[str], typer.Option("--road-percentiles", help="default 10,20,...,90")] = None,
    sanity_steps: Annotated[int, typer.Option("--sanity-steps", help="cascading randomization steps")] = 8,
    resamples: Annotated[int, typer.Option("--resamples", help="bootstrap resamples")] = 2000,
    layer: Annotated[Optional[list[str]], typer.Option("-l", "--layer", help="tensor to explain (repeat for several)")] = None,
    labels_file: Annotated[Optional[Path], typer.Option("--labels", help="labels file, one per line")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="inputs per onnxruntime run")] = 16,
    provider: Annotated[str, typer.Option("--provider", help="auto, cpu or cuda")] = "auto",
    preset: Annotated[Optional[str], typer.Option("--preset", help="imagenet, inception, caffe or raw")] = None,
    size: Annotated[Optional[tuple[int, int]], typer.Option("--size", help="input H W for dynamic-size models")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="per-channel mean, e.g. 0.485,0.456,0.406")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="per-channel std")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", help="divide pixels by this first (default 255)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="which model output to explain")] = None,
) -> None:
    """Evaluate methods on annotated images: localization, pointing, confidence, deletion/insertion,
    ROAD, occlusion faithfulness, sanity; writes results.json and index.html."""
    from .evaluation import EvaluationConfig, evaluate as run_evaluation, load_annotations, load_label_map, match_images
    from .evaluation.report import render_files
    try:
        methods = list(dict.fromkeys(method or ["gradcam"]))
        config = EvaluationConfig(
            threshold=threshold, tolerance=tolerance, score=score, steps=steps,
            deletion_baseline=deletion_baseline, insertion_baseline=insertion_baseline,
            occlusion_patch=occlusion[0], occlusion_stride=occlusion[1], sanity_steps=sanity_steps,
            resamples=resamples)
        if metrics:
            config.families = tuple(m.strip() for m in metrics.split(",") if m.strip())
        if road_percentiles:
            config.road_percentiles = tuple(int(v) for v in (_floats(road_percentiles, "--road-percentiles") or []))
        config.check()
        chosen = match_images(load_annotations(annotations), images)
        explainer = Explainer(model, layer=layer, provider=provider, output=output,
                              batch_size=batch_size, input_size=size)
        labels = load_labels(labels_file) if labels_file else explainer.labels()
        mapping = load_label_map(label_map, labels) if label_map else None
        preprocess = explainer.preprocess(preset, size, mean=_floats(mean, "--mean"),
                                          std=_floats(std, "--std"), scale=scale)
        result = run_evaluation(explainer, chosen, methods, preprocess, config, label_map=mapping,
                                labels=labels, progress=lambda text: typer.echo(text, err=True))
        files = render_files(result)
    except OnnxcamError as exc:
        fail(str(exc))
        return
    outdir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(outdir / name, data)
    for name, rows in result.results["summary"].items():
        shown = ", ".join(f"{k}={v['mean']:.3f}" for k, v in rows.items() if isinstance(v, dict))
        typer.echo(f"{name}: {shown}")
    typer.echo(f"wrote {len(files)} files to {outdir} (open {outdir / 'index.html'})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
