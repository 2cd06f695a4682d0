"""Stage 6: the ``onnxcam`` command line (typer).

Errors in the user's input print one line, ``error: ...``, and exit with status 2, before any
output is written. ``explain`` streams through :mod:`onnxcam.runner`: an image that fails is
recorded and the others go on (exit status 1); every file is written atomically.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .errors import OnnxcamError, OnnxcamWarning
from .explainer import Explainer
from .files import atomic_write_bytes
from .deploy import CHECK_TOLERANCE, DEFAULT_ORT_WEB, check_export, write_triton, write_web
from .export import export_explained, exportable_methods, save_explained
from .images import make_preprocess
from .labels import check_labels, load_labels, resolve_name, split_names
from .methods import METHODS
from .runner import Settings, Worker, explain_folder
from .validate import same_file


#: click's base exception (typer may vendor its own click): usage errors derive from it.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (an option out of range, a missing argument) as one ``error:`` line with
    status 2, like onnxcam's own errors; onnxcam's warnings as one ``warning:`` line."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("always", OnnxcamWarning)
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
            try:
                code = super().main(*args, standalone_mode=False, **kwargs)
            except _CLICK_ERROR as exc:
                if type(exc).__name__ == "NoArgsIsHelpError":  # bare `onnxcam`: the help
                    exc.show()
                    sys.exit(exc.exit_code)
                command = exc.ctx.command_path if getattr(exc, "ctx", None) else "onnxcam"
                typer.echo(f"error: {exc.format_message()} (see {command} --help)", err=True)
                sys.exit(exc.exit_code)
            except typer.Abort:
                typer.echo("aborted", err=True)
                sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _show_warning(previous, message, category, *args, **kwargs) -> None:
    if issubclass(category, OnnxcamWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        previous(message, category, *args, **kwargs)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_OneLineErrors,
                  help="Explain ONNX image classifiers: Grad-CAM and relatives, on onnxruntime.")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _finite(ctx: typer.Context, param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
    """A float option must be a finite number (typer takes "nan" and "inf" as floats)."""
    if value is not None and not np.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def _floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        fail(f"{flag} takes numbers separated by commas, got '{text}'")
    return None


GridOption = Annotated[Optional[tuple[int, int]], typer.Option(
    "--grid", help="token layers: the patch grid H W, when the graph does not say")]
PrefixOption = Annotated[Optional[int], typer.Option(
    "--prefix", help="token layers: how many tokens (CLS, distillation, registers) precede the patches")]


@app.command()
def layers(
    model: Annotated[Path, typer.Argument(help="ONNX classifier")],
    output: Annotated[Optional[str], typer.Option("--output", help="which model output to explain")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    size: Annotated[Optional[tuple[int, int]], typer.Option("--size", min=1, help="input H W for dynamic-size models")] = None,
    grid: GridOption = None,
    prefix: PrefixOption = None,
) -> None:
    """List the spatial activations that can be explained (NCHW, NHWC, transformer tokens);
    * marks the default."""
    try:
        explainer = Explainer(model, output=output, input_size=size, grid=grid, prefix=prefix)
        found = explainer.layers()
    except OnnxcamError as exc:
        fail(str(exc))
        return
    if as_json:
        kind = {"output_kind": explainer.dense.kind, "output_shape": list(explainer.dense.shape)} if explainer.dense else {}
        typer.echo(json.dumps({"logits": explainer.logits_name, "input_layout": explainer.input_layout,
                               **kind, "layers": [{**l.__dict__, "kind": l.kind} for l in found]}, indent=1))
        return
    kind = f"   {explainer.dense.kind} output {list(explainer.dense.shape)}" if explainer.dense else ""
    typer.echo(f"explaining output: {explainer.logits_name}   input layout: {explainer.input_layout}{kind}")
    width = max(len(l.name) for l in found)
    typer.echo(f"  {'tensor':<{width}}  {'op':<18} {'C,H,W':<16} kind")
    for layer in found:
        mark = "*" if layer.default else " "
        shape = ",".join(map(str, layer.shape))
        typer.echo(f"{mark} {layer.name:<{width}}  {layer.op:<18} {shape:<16} {layer.kind}")


def resolve_target(text: Optional[str], labels: Optional[list[str]]) -> Optional[int]:
    """A class index, or a label name (:func:`onnxcam.labels.match_label`: every synonym of a
    line; a name that matches several classes is an error, a partial match is reported)."""
    if text is None:
        return None
    match = resolve_name(text, labels)
    if match.note:
        warnings.warn(match.note, OnnxcamWarning, stacklevel=2)
    return match.index


def resolve_targets(texts: Optional[list[str]], labels: Optional[list[str]]) -> Optional[int | list[list[int]]]:
    """``-t`` values (repeated or comma-separated) -> one class, or several for every image."""
    if not texts:
        return None
    classes = [resolve_target(p, labels) for p in split_names(texts, labels)]
    return classes[0] if len(classes) == 1 else [classes]


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
    topk: Annotated[Optional[int], typer.Option("--topk", min=1, help="explain each image's K best classes (segmentation: the K classes winning most pixels; detection: the K best anchors)")] = None,
    seed_vector: Annotated[Optional[Path], typer.Option("--seed-vector", help=".npy of shape (C,) or (T,C): explain s . logits")] = None,
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="output folder")] = Path("onnxcam-out"),
    labels_file: Annotated[Optional[Path], typer.Option("--labels", help="labels file: one per line, a JSON list or {index: name}")] = None,
    npy: Annotated[bool, typer.Option("--npy", help="also save the heatmap as float32 .npy")] = False,
    channels: Annotated[Optional[int], typer.Option("--channels", min=1, help="also the K most and K least important channels")] = None,
    eigen_smooth: Annotated[bool, typer.Option("--eigen-smooth", help="first principal component of the weighted activations")] = False,
    aug_smooth: Annotated[bool, typer.Option("--aug-smooth", help="average over flips and brightness changes")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="inputs per onnxruntime run")] = 16,
    max_channels: Annotated[Optional[int], typer.Option("--max-channels", min=1, help="Score-CAM: keep the N highest-variance channels")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="SmoothGrad: noisy copies")] = 25,
    noise: Annotated[float, typer.Option("--noise", min=0.0, callback=_finite, help="SmoothGrad: sigma as a fraction of the input range")] = 0.15,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Integrated Gradients: path steps")] = 50,
    baseline: Annotated[float, typer.Option("--baseline", callback=_finite, help="Integrated Gradients: baseline value (model input space)")] = 0.0,
    provider: Annotated[str, typer.Option("--provider", help="auto, cpu or cuda")] = "auto",
    preset: Annotated[Optional[str], typer.Option("--preset", help="imagenet, inception, caffe or raw")] = None,
    size: Annotated[Optional[tuple[int, int]], typer.Option("--size", min=1, help="input H W for dynamic-size models")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="per-channel mean, e.g. 0.485,0.456,0.406")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="per-channel std")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", callback=_finite, help="divide pixels by this first (default 255)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="which model output to explain")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="rewrite the model without the rewrite cache")] = False,
    threads: Annotated[int, typer.Option("--threads", min=0, help="onnxruntime intra-op threads (0: one per core)")] = 0,
    region: Annotated[Optional[str], typer.Option("--region", help="segmentation: argmax, all, x0,y0,x1,y1 (image pixels) or a mask image")] = None,
    anchor: Annotated[Optional[int], typer.Option("--anchor", help="detection head: the anchor (column) to explain; default the best")] = None,
    box_values: Annotated[int, typer.Option("--box-values", help="detection head: values before the class scores (4, 5 with objectness)")] = 4,
    glob: Annotated[Optional[str], typer.Option("--glob", help="in folders, only files matching this pattern (e.g. '*.jpg')")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="redo images results.jsonl records as done")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="no progress bar and no line per image")] = False,
    overlay_size: Annotated[Optional[int], typer.Option("--overlay-size", min=16, help="overlays' longer side at most this (default: the image's size)")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help="run on Ray: a cluster address (ray://host:10001, auto) or 'local'")] = None,
    ray_workers: Annotated[int, typer.Option("--ray-workers", min=1, help="Ray: actors, each with its own onnxruntime session")] = 2,
    ray_gpus: Annotated[float, typer.Option("--ray-gpus", min=0.0, help="Ray: GPUs per actor (use with --provider cuda)")] = 0.0,
    grid: GridOption = None,
    prefix: PrefixOption = None,
    boxes: Annotated[bool, typer.Option("--boxes", help="also each map's weakly supervised box (results.json) and a binary pseudo-mask PNG")] = False,
    threshold: Annotated[float, typer.Option("--threshold", help="--boxes: binarize at this fraction of the map's max")] = 0.15,
) -> None:
    """Explain IMAGES (files, folders walked recursively, glob patterns) with MODEL; writes
    overlays, optional .npy maps, results.jsonl (resumable) and results.json. Exit status:
    0 all explained, 1 some images failed (listed), 2 usage or model error."""
    try:
        Explainer.method(method)
        if sum(x is not None and x != [] for x in (target, topk, seed_vector)) > 1:
            raise OnnxcamError("give only one of --target, --topk and --seed-vector")
        explainer = Explainer(model, layer=layer, provider=provider, output=output,
                              batch_size=batch_size, input_size=size, cache=not no_cache, threads=threads,
                              grid=grid, prefix=prefix)
        labels = (check_labels(load_labels(labels_file), explainer.num_classes, str(labels_file), explicit=True)
                  if labels_file else explainer.labels())
        targets = (_seed_vectors(seed_vector, explainer.num_classes) if seed_vector
                   else resolve_targets(target, labels))
        options = dict(topk=topk, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth,
                       max_channels=max_channels, samples=samples, noise=noise, steps=steps,
                       baseline=baseline)
        preprocess = explainer.preprocess(preset, size, mean=_floats(mean, "--mean"),
                                          std=_floats(std, "--std"), scale=scale)
        settings = Settings(method, targets, options, tuple(labels) if labels else None, npy, channels, overlay_size,
                            region=region, anchor=anchor, box_values=box_values,
                            box_threshold=_box_threshold(boxes, threshold))
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


def _box_threshold(boxes: bool, threshold: float) -> Optional[float]:
    """--boxes/--threshold -> the threshold to box at, or None without --boxes."""
    if boxes and not 0.0 <= threshold < 1.0:
        raise OnnxcamError(f"--threshold must be in [0, 1), got {threshold}")
    return threshold if boxes else None


def _describe_target(target: dict) -> str:
    if target.get("error"):
        return f"class {target['target']}: no map ({target['error']})"
    if target["target"] < 0:
        return "seed vector"
    label = f" ({target['label']})" if target["label"] else ""
    if "score" in target:  # a dense output (onnxcam.dense.describe)
        where = f"anchor {target['anchor']}" if "anchor" in target else f"{target['region_pixels']} px"
        return f"class {target['target']}{label} {where} score={target['score']:.3f}"
    return f"class {target['target']}{label} p={target['probability']:.3f}"


@app.command("export")
def export_command(
    paths: Annotated[list[Path], typer.Argument(help="MODEL to export; with --check: IMAGES to check it on", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="the self-explaining model to write (.onnx); with --check: the overlay folder")] = None,
    method: Annotated[str, typer.Option("-m", "--method", help=f"one of: {', '.join(exportable_methods())}")] = "gradcam",
    layer: Annotated[Optional[str], typer.Option("-l", "--layer", help="tensor to explain (default: the last spatial one)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="which model output to explain")] = None,
    size: Annotated[Optional[tuple[int, int]], typer.Option("--size", min=1, help="input H W for dynamic-size models")] = None,
    topk: Annotated[Optional[int], typer.Option("--topk", min=1, help="heatmaps of each image's K best classes in one run (no target input)")] = None,
    labels_file: Annotated[Optional[Path], typer.Option("--labels", help="labels file to store in the metadata")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="preprocessing to store in the metadata: imagenet, inception, caffe or raw")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="per-channel mean, e.g. 0.485,0.456,0.406")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="per-channel std")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", help="divide pixels by this first (default 255)")] = None,
    check: Annotated[Optional[Path], typer.Option("--check", help="run this exported file on IMAGES with plain onnxruntime and compare with the Explainer")] = None,
    web: Annotated[Optional[Path], typer.Option("--web", help="also write a static page that runs the model with onnxruntime-web")] = None,
    ort_web: Annotated[str, typer.Option("--ort-web", help="where the page loads onnxruntime-web from (folder URL)")] = DEFAULT_ORT_WEB,
    triton: Annotated[Optional[Path], typer.Option("--triton", help="also write a Triton model repository (config.pbtxt + 1/model.onnx)")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="rewrite the model without the rewrite cache")] = False,
    threads: Annotated[int, typer.Option("--threads", min=0, help="onnxruntime intra-op threads (0: one per core)")] = 0,
    grid: GridOption = None,
    prefix: PrefixOption = None,
) -> None:
    """Write a model that onnxruntime runs to get the logits and the heatmap (input 'target',
    outputs 'heatmap', 'target_class'); no onnxcam needed to run it. With --check EXPORTED
    IMAGES...: test an exported file on images (overlays and check.json in -o)."""
    try:
        normalization = dict(preset=preset, mean=_floats(mean, "--mean"), std=_floats(std, "--std"), scale=scale)
        if check is not None:
            _check_export(check, paths, out, normalization)
            return
        if len(paths) != 1 or out is None:
            raise OnnxcamError("give one MODEL and -o OUT.onnx (or --check EXPORTED.onnx IMAGES...)")
        model = paths[0]
        check_export_destination(model, out)
        labels = load_labels(labels_file) if labels_file else None
        # layout and size are the model's: export_explained fills them in
        declared = any(v is not None for v in normalization.values())
        preprocess = make_preprocess(layout="NCHW", size=size, **normalization) if declared else None
        exported = export_explained(model, method, layer=layer, output=output, input_size=size, topk=topk,
                                    labels=labels, preprocess=preprocess, cache=not no_cache, threads=threads,
                                    grid=grid, prefix=prefix)
    except OnnxcamError as exc:
        fail(str(exc))
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_explained(exported, out)  # atomic: a failed write leaves no file
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
        return
    meta = {p.key: p.value for p in exported.metadata_props}
    typer.echo(f"wrote {out}: {meta['onnxcam.method']} at layer {meta['onnxcam.layer']}; "
               f"inputs {', '.join(i.name for i in exported.graph.input)}; "
               f"outputs {', '.join(o.name for o in exported.graph.output)}")
    try:
        if web is not None:
            typer.echo(f"wrote {write_web(out, web, ort_web)} (serve {web} over http; the page loads "
                       f"onnxruntime-web from {ort_web})")
        if triton is not None:
            typer.echo(f"wrote {write_triton(out, triton)}")
    except OnnxcamError as exc:
        fail(str(exc))


def _check_export(exported: Path, images: list[Path], outdir: Optional[Path], normalization: dict) -> None:
    """``export --check``: one line per image, a verdict, exit 1 when the file disagrees."""
    outdir = outdir or exported.with_name(exported.name.split(".")[0] + "-check")
    report = check_export(exported, images, outdir, **normalization)
    for record in report.records:
        shown = ", ".join(f"{c}" + (f" ({l})" if l else "") for c, l in zip(record["classes"], record["labels"]))
        verdict = "ok" if record["classes_equal"] and record["max_difference"] <= CHECK_TOLERANCE else "MISMATCH"
        typer.echo(f"{record['file']}: {shown}; max |file - Explainer| = {record['max_difference']:.1e} {verdict}")
    typer.echo(f"{'passed' if report.passed else 'FAILED'}: {len(report.records)} images, {report.method} at "
               f"{report.layer}, tolerance {CHECK_TOLERANCE:g}; overlays and check.json in {outdir}")
    if not report.passed:
        raise typer.Exit(1)


def check_export_destination(model: Path, out: Path) -> None:
    """Before any work: ``out`` must not be the source model (also through a link or another
    spelling of the path) nor a folder."""
    if same_file(out, model):
        fail(f"{out}: is the source model itself; write the export to another file")
    if out.is_dir():
        fail(f"{out}: is a folder; give the file to write, e.g. {out / (model.stem + '.explained.onnx')}")


@app.command()
def demo(
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="output folder")] = Path("onnxcam-demo"),
    provider: Annotated[str, typer.Option("--provider", help="auto, cpu or cuda")] = "auto",
    threads: Annotated[int, typer.Option("--threads", min=0, help="onnxruntime intra-op threads (0: one per core)")] = 0,
) -> None:
    """Explain the bundled shapes classifier on its sample images (offline)."""
    from .demo import run_demo
    try:
        index, summary = run_demo(outdir, provider=provider, threads=threads)
    except OnnxcamError as exc:
        fail(str(exc))
        return
    typer.echo(summary)
    typer.echo(f"demo written: {index}")


cache_app = typer.Typer(no_args_is_help=True, help="The rewrite cache: where, how big; clear it.")
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info() -> None:
    """The cache folder, its entries and size, and its bound ($ONNXCAM_CACHE_MAX_BYTES)."""
    from . import cache
    found = cache.info()
    typer.echo(f"folder: {found.folder}" + (f" (not used: it {found.refused})" if found.refused else ""))
    typer.echo(f"entries: {found.entries}, {_size(found.bytes)} of at most {_size(found.max_bytes)}")


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every cached rewrite."""
    from . import cache
    folder = cache.cache_dir()
    why = cache.refusal(folder)
    if why is not None:
        fail(f"rewrite cache {folder} {why}: not clearing it")
    count, size = cache.clear(folder)
    typer.echo(f"removed {count} entries ({_size(size)}) from {folder}")


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
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
    import logging
    import os

    from .files import remove_temporaries_on_signal
    # ONNXCAM_LOG=info shows e.g. how many nodes onnxruntime placed on the CPU under CUDA
    level = logging.getLevelName(os.environ.get("ONNXCAM_LOG", "warning").upper())
    logging.basicConfig(level=level if isinstance(level, int) else logging.WARNING, format="%(levelname)s: %(message)s")
    remove_temporaries_on_signal()  # SIGTERM: no temporary file left behind
    app()


if __name__ == "__main__":
    main()
