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

from .errors import OnnxcamError, TargetError, UnsupportedOpError
from .explainer import Explainer
from .images import load_image, load_labels
from .methods import METHODS
from .surgery import atomic_write_bytes
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
) -> None:
    """List the spatial activations that can be explained; * marks the default."""
    try:
        explainer = Explainer(model, output=output)
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


@app.command()
def explain(
    model: Annotated[Path, typer.Argument(help="ONNX classifier")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    method: Annotated[str, typer.Option("-m", "--method", help=f"one of: {', '.join(METHODS)}")] = "gradcam",
    layer: Annotated[Optional[list[str]], typer.Option("-l", "--layer", help="tensor to explain (repeat for several)")] = None,
    target: Annotated[Optional[str], typer.Option("-t", "--target", help="class index or label (default: top-1)")] = None,
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="output folder")] = Path("onnxcam-out"),
    labels_file: Annotated[Optional[Path], typer.Option("--labels", help="labels file, one per line")] = None,
    npy: Annotated[bool, typer.Option("--npy", help="also save the heatmap as float32 .npy")] = False,
    provider: Annotated[str, typer.Option("--provider", help="auto, cpu or cuda")] = "auto",
    preset: Annotated[Optional[str], typer.Option("--preset", help="imagenet, inception, caffe or raw")] = None,
    size: Annotated[Optional[tuple[int, int]], typer.Option("--size", help="input H W for dynamic-size models")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="per-channel mean, e.g. 0.485,0.456,0.406")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="per-channel std")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", help="divide pixels by this first (default 255)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="which model output to explain")] = None,
) -> None:
    """Explain IMAGES with MODEL; writes overlays, optional .npy maps and results.json."""
    try:
        if method not in METHODS:
            raise OnnxcamError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
        explainer = Explainer(model, layer=layer, provider=provider, output=output)
        labels = load_labels(labels_file) if labels_file else explainer.labels()
        target_index = resolve_target(target, labels)
        preprocess = explainer.preprocess(preset, size, mean=_floats(mean, "--mean"),
                                          std=_floats(std, "--std"), scale=scale)
        pictures = [load_image(path) for path in images]  # every image decodes before any output
        stems = _unique_stems(images)
        records: list[dict] = []
        files: dict[str, bytes] = {}
        batch = 16  # images per session run: amortizes the session call, bounds memory
        for start in range(0, len(pictures), batch):
            chunk = pictures[start:start + batch]
            started = time.perf_counter()
            result = explainer.explain(preprocess(chunk), method=method, targets=target_index)
            seconds = (time.perf_counter() - started) / len(chunk)
            for offset, picture in enumerate(chunk):
                path, stem = images[start + offset], stems[start + offset]
                heatmap = resize_map(result.heatmaps[offset], picture.shape[:2])
                index = int(result.targets[offset])
                files[f"{stem}.{method}.png"] = encode_png(overlay(picture, heatmap))
                if npy:
                    files[f"{stem}.{method}.npy"] = _npy_bytes(heatmap)
                records.append({
                    "file": str(path), "target": index,
                    "label": labels[index] if labels and index < len(labels) else None,
                    "probability": float(result.probabilities[offset, index]),
                    "layer": result.layer, "method": method, "provider": result.provider,
                    "seconds": round(seconds, 4),
                })
        files["results.json"] = json.dumps(records, indent=1).encode()
    except UnsupportedOpError as exc:
        fail(f"{exc}; {_suggestion(model, output)}")
        return
    except OnnxcamError as exc:
        fail(str(exc))
        return
    outdir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(outdir / name, data)
    for record in records:
        label = f" ({record['label']})" if record["label"] else ""
        typer.echo(f"{record['file']}: class {record['target']}{label} p={record['probability']:.3f} "
                   f"[{record['provider']}, {record['seconds'] * 1000:.0f} ms]")
    typer.echo(f"wrote {len(files)} files to {outdir}")


def _suggestion(model: Path, output: Optional[str]) -> str:
    """Which layers have a fully supported gradient path, for the unsupported-op error."""
    import onnx_graphsurgeon as gs

    from .autodiff import plan
    from .model import ModelGraph, load_model

    graph = ModelGraph(load_model(model), str(model))
    tensors = gs.import_onnx(graph.model).tensors()
    logits = tensors[graph.logits(output)]
    working = [l.name for l in graph.layers(output) if not plan([tensors[l.name]], logits).missing]
    if not working:
        return "no spatial layer of this model avoids those ops: please report the op"
    return f"a layer after them works, e.g. -l {working[-1]}"


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


@app.command()
def demo(
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="output folder")] = Path("onnxcam-demo"),
    provider: Annotated[str, typer.Option("--provider", help="auto, cpu or cuda")] = "auto",
) -> None:
    """Explain the bundled shapes classifier on its sample images (offline)."""
    from .demo import run_demo
    try:
        index = run_demo(outdir, provider=provider)
    except OnnxcamError as exc:
        fail(str(exc))
        return
    typer.echo(f"demo written: {index}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
