"""Stage 6: the ``onnxcam`` command line (typer).

Errors in the user's input print one line, ``error: ...``, and exit with status 2, before any
output is written. ``explain`` streams through :mod:`onnxcam.runner`: an image that fails is
recorded and the others go on (exit status 1); every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .errors import OnnxcamError, TargetError
from .explainer import Explainer
from .export import export_explained, exportable_methods, save_explained
from .images import load_labels
from .methods import METHODS
from .runner import Settings, Worker, explain_folder

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
    images: Annotated[list[Path], typer.Argument(help="image files, folders (recursive) or quoted glob patterns")],
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
    glob: Annotated[Optional[str], typer.Option("--glob", help="in folders, only files matching this pattern (e.g. '*.jpg')")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="redo images results.jsonl records as done")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="no progress bar and no line per image")] = False,
    overlay_size: Annotated[Optional[int], typer.Option("--overlay-size", min=16, help="overlays' longer side at most this (default: the image's size)")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help="run on Ray: a cluster address (ray://host:10001, auto) or 'local'")] = None,
    ray_workers: Annotated[int, typer.Option("--ray-workers", min=1, help="Ray: actors, each with its own onnxruntime session")] = 2,
    ray_gpus: Annotated[float, typer.Option("--ray-gpus", min=0.0, help="Ray: GPUs per actor (use with --provider cuda)")] = 0.0,
) -> None:
    """Explain IMAGES (files, folders walked recursively, glob patterns) with MODEL; writes
    overlays, optional .npy maps, results.jsonl (resumable) and results.json. Exit status:
    0 all explained, 1 some images failed (listed), 2 usage or model error."""
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
        settings = Settings(method, targets, options, tuple(labels) if labels else None, npy, channels, overlay_size)
        summary = explain_folder(Worker(explainer, preprocess, settings, outdir), images, outdir,
                                 pattern=glob, batch_size=batch_size, overwrite=overwrite, progress=not quiet,
                                 on_record=None if quiet else _echo_record, ray=ray,
                                 ray_workers=ray_workers, ray_gpus=ray_gpus)
    except OnnxcamError as exc:
        fail(str(exc))
        return
    for line in summary.lines():
        typer.echo(line, err=line.startswith(("failed:", "interrupted:")))
    raise typer.Exit(summary.exit_code)


def _echo_record(record: dict) -> None:
    if "error" in record:
        typer.echo(f"{record['file']}: error: {record['error']}", err=True)
        return
    shown = ", ".join(_describe_target(t) for t in record["targets"])
    typer.echo(f"{record['file']}: {shown} [{record['provider']}, {record['seconds'] * 1000:.0f} ms]")


def _describe_target(target: dict) -> str:
    if target["target"] < 0:
        return "seed vector"
    label = f" ({target['label']})" if target["label"] else ""
    return f"class {target['target']}{label} p={target['probability']:.3f}"


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
