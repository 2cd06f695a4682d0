"""Dense outputs: explain a region of a segmentation map, or one detection of a detector head.

A classifier is explained through a seed vector ``s`` over its logits: the score is
``s . y``. A dense output ``y`` is explained the same way with a seed of ``y``'s own shape,
``score = sum(seed * y)``, so the gradient graph (:mod:`onnxcam.surgery`) is the classifier's,
fed a bigger seed; only the seeds differ:

* **semantic segmentation**, ``y`` [N, K, H, W] (or NHWC): a class ``c`` and a region mask
  ``M`` (binary, or weights) give ``score = sum_ij y[c, i, j] M[i, j]``, pytorch-grad-cam's
  ``SemanticSegmentationTarget``: the seed is ``M`` on class ``c``'s plane, zero elsewhere.
  Regions: ``"argmax"`` (the pixels where ``c`` wins, as pytorch-grad-cam's segmentation
  tutorial), ``"all"``, a box ``(x0, y0, x1, y1)`` in output pixels (``x0 <= x < x1``), or a
  mask array (resized to the output with nearest neighbours when its size differs);
* **detection heads exported without NMS**, ``y`` [N, B + K, A] or [N, A, B + K] (YOLO-style:
  ``B`` box attributes, 4, or 5 with an objectness score, then ``K`` class scores for each of
  ``A`` anchors): anchor ``a`` and class ``c`` give ``score = y[B + c, a]``, a one-hot seed.
  The attribute axis is the shorter one unless the target names the layout.

Defaults mirror "the top-1 class": a segmentation target without a class explains the class
that wins the most pixels, over the pixels where it wins; a detection target without an
anchor explains the highest class score (and its class), or the best anchor for the given class.

The default layer for a dense output (:func:`default_layer`) is the backbone's last spatial
activation, as pytorch-grad-cam's tutorials choose (``model.backbone.layer4``), or without
named scopes the head's last hidden activation at the coarsest resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import TargetError
from .model import Layer, ModelGraph
from .targets import TargetSet

REGIONS = ("argmax", "all")
DETECTION_LAYOUTS = ("attributes-first", "anchors-first")


@dataclass(frozen=True)
class DenseOutput:
    """A dense model output: ``kind`` "segmentation" or "detection", ``shape`` per image (no
    batch axis), ``class_axis`` the per-image axis of the classes (segmentation only)."""

    kind: str
    name: str
    shape: tuple[int, ...]
    class_axis: int = 0

    @property
    def classes(self) -> int | None:
        return self.shape[self.class_axis] if self.kind == "segmentation" else None

    @property
    def spatial(self) -> tuple[int, int]:
        """(H, W) of a segmentation output."""
        h, w = (a for i, a in enumerate(self.shape) if i != self.class_axis)
        return h, w


@dataclass(frozen=True)
class SegmentationTarget:
    """A class (None: the class that wins the most pixels) over a region: "argmax", "all", a
    box (x0, y0, x1, y1) in output pixels, or a mask (H, W) of weights."""

    category: int | None = None
    region: str | tuple[int, int, int, int] | np.ndarray = "argmax"


@dataclass(frozen=True)
class DetectionTarget:
    """One detection: ``anchor`` (None: the best one) and ``category`` (None: the anchor's
    best class). ``boxes`` attributes precede the class scores (4; 5 with objectness);
    ``layout`` "attributes-first" [N, B+K, A] or "anchors-first" [N, A, B+K] (None: the
    shorter axis holds the attributes)."""

    anchor: int | None = None
    category: int | None = None
    boxes: int = 4
    layout: str | None = None


DenseTarget = SegmentationTarget | DetectionTarget


# -- which outputs are dense -------------------------------------------------------------------

def output_of(graph: ModelGraph, name: str) -> DenseOutput | None:
    """The dense output ``name`` is, or None for a class-score vector [N, C] (or a tensor whose
    shape is unknown: the classifier path reports it). Rank 4 with static per-image dims is a
    segmentation map, rank 3 a detection head."""
    dims = graph.dims(name)
    if dims is None or len(dims) not in (3, 4) or not all(isinstance(d, int) for d in dims[1:]):
        return None
    shape = tuple(int(d) for d in dims[1:])
    if len(dims) == 4:
        layout = graph.layouts.get(name, "NCHW")
        return DenseOutput("segmentation", name, shape, class_axis=2 if layout == "NHWC" else 0)
    return DenseOutput("detection", name, shape)


def check_target(dense: DenseOutput, named: bool, targets) -> None:
    """A dense tensor picked by name (``output=``, ``--output``) is explained only with a dense
    target (a :class:`SegmentationTarget` / :class:`DetectionTarget`, a seed of its shape; on
    the command line ``--region`` or ``--anchor``): naming a feature map [N, C, H, W] as the
    output is more often a mistake than a segmentation map. The model's own (first) output
    also takes classes and the default target."""
    if not named or _dense_request(targets):
        return
    hint = ("a region (--region argmax|all|x0,y0,x1,y1|mask.png, or SegmentationTarget)"
            if dense.kind == "segmentation" else "an anchor (--anchor, or DetectionTarget)")
    raise TargetError(f"output '{dense.name}' has shape [N, {', '.join(map(str, dense.shape))}]: not a "
                      f"class-score vector [N, C]; to explain it as a {dense.kind} output give {hint}")


def _dense_request(targets) -> bool:
    if isinstance(targets, np.ndarray):
        return targets.dtype.kind == "f"
    if isinstance(targets, (SegmentationTarget, DetectionTarget)):
        return True
    if isinstance(targets, (list, tuple)):
        return any(_dense_request(t) for t in targets)
    return False


# -- the default layer -------------------------------------------------------------------------

def default_layer(graph: ModelGraph, layers: Sequence[Layer], dense: DenseOutput) -> Layer:
    """The default layer for a segmentation output:

    1. the last one at the coarsest resolution (the deepest stride) among the candidates
       computed in a module scope named ``backbone`` (torchvision, mmsegmentation
       and detectron2 name their feature extractors so; the TorchScript exporter writes scopes
       into node names, the dynamo exporter into the ``namespace`` metadata): the tensor
       pytorch-grad-cam's segmentation tutorial explains (``model.backbone.layer4``);
    2. without such scopes, among the candidates at the coarsest resolution, the last one with
       more channels than the output has classes: the head's last hidden activation before
       its per-pixel classifier.

    A detection head gets the same rule with "values per anchor" for "classes": the last
    neck activation at the coarsest scale, as pytorch-grad-cam's YOLO tutorial chooses
    (``model.model.model[-2]``)."""
    nodes = {node.name: node for node in graph.model.graph.node}
    backbone = [l for l in layers if "backbone" in _scopes(nodes.get(l.node))]
    if backbone:
        return _coarsest(backbone)[-1]
    deep = _coarsest(layers)
    wanted = dense.classes if dense.kind == "segmentation" else min(dense.shape)
    return ([l for l in deep if l.shape[0] > wanted] or deep)[-1]


def _coarsest(layers: Sequence[Layer]) -> list[Layer]:
    """The layers at the smallest spatial size, in graph order."""
    smallest = min(l.shape[1] * l.shape[2] for l in layers)
    return [l for l in layers if l.shape[1] * l.shape[2] == smallest]


def _scopes(node) -> set[str]:
    """Module names a node was exported from: '/model/backbone/layer4/...' (TorchScript) or the
    dynamo exporter's ``namespace`` (': Out/model: LRASPP/model.backbone: ...')."""
    if node is None:
        return set()
    parts = node.name.split("/")
    for entry in node.metadata_props:
        if entry.key == "namespace":
            parts += [p.split(":")[0].strip() for p in entry.value.split("/")]
    return {piece for part in parts for piece in part.split(".") if piece}


def mark_default(layers: list[Layer], chosen: Layer) -> list[Layer]:
    """``layers`` with only ``chosen`` marked as the default."""
    return [replace(l, default=l.name == chosen.name) for l in layers]


# -- targets -> seeds --------------------------------------------------------------------------

def resolve(dense: DenseOutput, targets, batch: int, topk: int | None = None) -> TargetSet:
    """Targets for a dense output as seeds of the output's shape (N, T, *shape) and classes
    (N, T) (-1 for a raw seed).

    Accepted: None (the default target), a class (int) or a :class:`SegmentationTarget` /
    :class:`DetectionTarget` for every image, one per image (a sequence of N), several per
    image (N, T), or float seeds of the output's shape (shape, (N, *shape) or (N, T, *shape)).
    Targets that need the output (argmax regions, defaults) are resolved once it is known.

    ``topk=T`` explains T targets per image picked from the output, as "the T best classes"
    does for a classifier (:func:`top_targets`): segmentation, the T classes that win the most
    pixels, each over its own pixels; detection, the T anchors with the highest class score,
    each for its best class (or for the class a target names). ``targets`` may then give one
    open target per image (a :class:`DetectionTarget` with ``boxes`` / ``layout`` / a class,
    no anchor)."""
    if isinstance(targets, np.ndarray) and targets.dtype.kind == "f":
        if topk is not None:
            raise TargetError("give either seeds or topk, not both")
        return _raw_seeds(dense, targets, batch)
    grid, multi = _grid(targets, batch)
    items = [[_as_target(dense, t) for t in row] for row in grid]
    if topk is not None:
        return _top(dense, items, int(topk))
    if any(_needs_output(item) for row in items for item in row):
        return TargetSet(None, None, multi, resolver=lambda outputs: _build(dense, items, multi, outputs))
    return _build(dense, items, multi, None)


def _build(dense: DenseOutput, items: list[list[DenseTarget]], multi: bool,
           outputs: np.ndarray | None) -> TargetSet:
    """Seeds (N, T, *shape) and classes (N, T) of targets, given the outputs where needed."""
    seeds = np.zeros((len(items), len(items[0])) + dense.shape, np.float32)
    classes = np.zeros((len(items), len(items[0])), np.int64)
    for n, row in enumerate(items):
        for t, item in enumerate(row):
            seeds[n, t], classes[n, t] = _seed(dense, item, None if outputs is None else outputs[n], n)
    return TargetSet(seeds, classes, multi)


def _top(dense: DenseOutput, items: list[list[DenseTarget]], k: int) -> TargetSet:
    """``topk`` targets per image from one open target each (see :func:`resolve`)."""
    if any(len(row) != 1 for row in items):
        raise TargetError("topk picks several targets per image: give at most one (open) target per image")
    opened = [row[0] for row in items]
    for item in opened:
        if isinstance(item, SegmentationTarget) and (item.category is not None or not _is_argmax(item.region)):
            raise TargetError("topk picks the classes that win the most pixels, each over its own pixels: "
                              "give no class or region with it")
        if isinstance(item, DetectionTarget) and item.anchor is not None:
            raise TargetError("topk picks the anchors with the highest class scores: give no anchor with it")
    limit = (dense.classes if dense.kind == "segmentation"
             else dense.shape[detection_axes(dense, opened[0].layout)[1]])
    if not 1 <= k <= limit:
        what = "classes" if dense.kind == "segmentation" else "anchors"
        raise TargetError(f"topk must be between 1 and {limit} (the {what} of output '{dense.name}'), got {k}")

    def build(outputs: np.ndarray) -> TargetSet:
        picked = [top_targets(dense, item, outputs[n], k, n) for n, item in enumerate(opened)]
        return replace(_build(dense, picked, True, outputs), topk=k)
    return TargetSet(None, None, True, topk=k, resolver=build)


def top_targets(dense: DenseOutput, item: DenseTarget, output: np.ndarray, k: int,
                image: int) -> list[DenseTarget]:
    """The ``k`` best targets of one image's output, best first (ties: the lower index).

    Segmentation: the classes by the number of pixels they win (only classes that win some;
    fewer than ``k`` is an error naming the count). Detection: anchors by their best class
    score (by the score of ``item.category`` when it is given), objectness not applied."""
    if isinstance(item, SegmentationTarget):
        winners = np.moveaxis(output, dense.class_axis, 0).argmax(axis=0)
        counts = np.bincount(winners.reshape(-1), minlength=dense.classes)
        order = np.argsort(-counts, kind="stable")
        won = [int(c) for c in order if counts[c] > 0]
        if len(won) < k:
            raise TargetError(f"topk {k}: only {len(won)} class{'es' if len(won) != 1 else ''} win pixels of "
                              f"image {image} (each top class is explained over the pixels it wins)")
        return [SegmentationTarget(c, "argmax") for c in won[:k]]
    attributes, anchors = detection_axes(dense, item.layout)
    scores = np.moveaxis(output, (attributes, anchors), (0, 1))[item.boxes:]  # (K, A)
    if item.category is not None and not 0 <= item.category < len(scores):
        raise TargetError(f"class {item.category} is out of range: output '{dense.name}' has {len(scores)} "
                          f"classes (0..{len(scores) - 1})")
    ranked = scores[item.category] if item.category is not None else scores.max(axis=0)
    best = np.argsort(-ranked, kind="stable")[:k]
    return [replace(item, anchor=int(a), category=item.category if item.category is not None
                    else int(np.argmax(scores[:, a]))) for a in best]


def _is_argmax(region) -> bool:
    return isinstance(region, str) and region == "argmax"


def _grid(targets, batch: int) -> tuple[list[list], bool]:
    """Targets as N rows of T each, and whether several per image were asked."""
    if isinstance(targets, np.ndarray):
        if targets.dtype.kind not in "iu" or targets.ndim > 2:
            raise TargetError(f"targets must be classes, region/detection targets or float seeds of the "
                              f"output's shape, got {targets.dtype} of shape {list(targets.shape)}")
        targets = targets.tolist()
    if targets is None or isinstance(targets, (int, np.integer, SegmentationTarget, DetectionTarget)):
        return [[targets] for _ in range(batch)], False
    rows = list(targets)
    multi = any(isinstance(r, (list, tuple)) for r in rows)
    rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in rows]
    if multi and len(rows) == 1:
        rows = rows * batch
    if len(rows) != batch:
        raise TargetError(f"{len(rows)} targets for a batch of {batch} images")
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise TargetError("every image needs the same number of targets (at least one)")
    return rows, multi


def _as_target(dense: DenseOutput, item) -> DenseTarget:
    if isinstance(item, (SegmentationTarget, DetectionTarget)):
        wanted = SegmentationTarget if dense.kind == "segmentation" else DetectionTarget
        if not isinstance(item, wanted):
            raise TargetError(f"output '{dense.name}' is a {dense.kind} output: use a {wanted.__name__}, "
                              f"not a {type(item).__name__}")
        return item
    if item is not None and not isinstance(item, (int, np.integer)):
        raise TargetError(f"a target is a class index, a SegmentationTarget or a DetectionTarget, got {item!r}")
    category = None if item is None else int(item)
    return SegmentationTarget(category) if dense.kind == "segmentation" else DetectionTarget(category=category)


def _needs_output(item: DenseTarget) -> bool:
    if isinstance(item, SegmentationTarget):
        return item.category is None or (isinstance(item.region, str) and item.region == "argmax")
    return item.anchor is None or item.category is None


def _seed(dense: DenseOutput, item: DenseTarget, output: np.ndarray | None, image: int) -> tuple[np.ndarray, int]:
    if isinstance(item, SegmentationTarget):
        return _segmentation_seed(dense, item, output, image)
    return _detection_seed(dense, item, output)


def _segmentation_seed(dense: DenseOutput, item: SegmentationTarget, output: np.ndarray | None,
                       image: int) -> tuple[np.ndarray, int]:
    """``M`` on the class's plane: score = sum_ij y[c, i, j] M[i, j]."""
    classes = dense.classes
    planes = None if output is None else np.moveaxis(output, dense.class_axis, 0)  # (K, H, W)
    winners = None if planes is None else planes.argmax(axis=0)
    category = item.category
    if category is None:
        category = int(np.bincount(winners.reshape(-1), minlength=classes).argmax())
    if not 0 <= category < classes:
        raise TargetError(f"target class {category} is out of range: output '{dense.name}' has {classes} "
                          f"classes (0..{classes - 1})")
    mask = region_mask(item.region, dense.spatial, None if winners is None else winners == category)
    if not mask.any():
        what = f"class {category} wins no pixel of image {image}" if isinstance(item.region, str) \
            else f"the region of image {image} is empty"
        raise TargetError(f"{what}: give another class or a box or mask region")
    seed = np.zeros((classes,) + dense.spatial, np.float32)
    seed[category] = mask
    return np.moveaxis(seed, 0, dense.class_axis), category


def region_mask(region, size: tuple[int, int], winners: np.ndarray | None = None) -> np.ndarray:
    """A region as float32 weights (H, W): "argmax" (``winners``, the pixels where the class
    wins), "all", a box (x0, y0, x1, y1) clipped to the output (x1, y1 exclusive), or a mask
    array (nearest-neighbour resized when its size differs)."""
    height, width = size
    if isinstance(region, str):
        if region == "all":
            return np.ones(size, np.float32)
        if region == "argmax" and winners is not None:
            return winners.astype(np.float32)
        raise TargetError(f"unknown region '{region}': use argmax, all, a box x0,y0,x1,y1 or a mask")
    if isinstance(region, np.ndarray) and region.ndim == 2:
        mask = region.astype(np.float32)
        if not np.all(np.isfinite(mask)):
            raise TargetError("a region mask must be finite")
        if mask.shape != size:
            import cv2
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        return mask
    box = np.asarray(region).reshape(-1)
    if box.size != 4 or box.dtype.kind not in "iuf":
        raise TargetError(f"a region is argmax, all, a box (x0, y0, x1, y1) or an (H, W) mask, got {region!r}")
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    mask = np.zeros(size, np.float32)
    mask[max(y0, 0):max(min(y1, height), 0), max(x0, 0):max(min(x1, width), 0)] = 1.0
    return mask


def detection_axes(dense: DenseOutput, layout: str | None) -> tuple[int, int]:
    """(attribute axis, anchor axis) of a detection output, per image."""
    if layout is None:
        layout = "attributes-first" if dense.shape[0] <= dense.shape[1] else "anchors-first"
    if layout not in DETECTION_LAYOUTS:
        raise TargetError(f"unknown detection layout '{layout}': use {' or '.join(DETECTION_LAYOUTS)}")
    return (0, 1) if layout == "attributes-first" else (1, 0)


def _detection_seed(dense: DenseOutput, item: DetectionTarget, output: np.ndarray | None) -> tuple[np.ndarray, int]:
    """One-hot on y[boxes + c, a]: score = the class-c score of anchor a."""
    attributes, anchors = detection_axes(dense, item.layout)
    classes = dense.shape[attributes] - item.boxes
    if classes < 1 or item.boxes < 0:
        raise TargetError(f"output '{dense.name}' {list(dense.shape)} has {dense.shape[attributes]} values per "
                          f"anchor: no class scores after {item.boxes} box values")
    count = dense.shape[anchors]
    for value, limit, what in ((item.anchor, count, "anchor"), (item.category, classes, "class")):
        if value is not None and not 0 <= value < limit:
            raise TargetError(f"{what} {value} is out of range: output '{dense.name}' has {limit} "
                              f"{what}{'s' if what == 'anchor' else 'es'} (0..{limit - 1})")
    anchor, category = item.anchor, item.category
    if output is not None:
        scores = np.moveaxis(output, (attributes, anchors), (0, 1))[item.boxes:]  # (K, A)
        if anchor is None and category is None:
            category, anchor = (int(i) for i in np.unravel_index(np.argmax(scores), scores.shape))
        elif anchor is None:
            anchor = int(np.argmax(scores[category]))
        elif category is None:
            category = int(np.argmax(scores[:, anchor]))
    seed = np.zeros(dense.shape, np.float32)
    index = [0, 0]
    index[attributes], index[anchors] = item.boxes + category, anchor
    seed[tuple(index)] = 1.0
    return seed, category


def _raw_seeds(dense: DenseOutput, values: np.ndarray, batch: int) -> TargetSet:
    extra = values.ndim - len(dense.shape)
    if extra not in (0, 1, 2) or values.shape[extra:] != dense.shape:
        raise TargetError(f"a seed for output '{dense.name}' has its shape {list(dense.shape)} (or N or "
                          f"N, T of them), got {list(values.shape)}")
    grid = values.reshape((1, 1) + dense.shape if extra == 0 else
                          (values.shape[0], 1) + dense.shape if extra == 1 else values.shape)
    if len(grid) == 1:
        grid = np.broadcast_to(grid, (batch,) + grid.shape[1:])
    if len(grid) != batch:
        raise TargetError(f"{len(grid)} seeds for a batch of {batch} images")
    flat = grid.reshape(grid.shape[:2] + (-1,))
    if not np.all(np.isfinite(flat)) or not np.all(np.abs(flat).sum(axis=-1) > 0):
        raise TargetError("a seed must be finite and not all zero")
    seeds = np.ascontiguousarray(grid, dtype=np.float32)
    return TargetSet(seeds, np.full(seeds.shape[:2], -1, np.int64), extra == 2)


# -- the command line --------------------------------------------------------------------------

def parse_region(text: str | None) -> str | tuple[float, float, float, float] | Path | None:
    """``--region``: argmax, all, x0,y0,x1,y1 (image pixels) or a mask image file."""
    if text is None or text in REGIONS:
        return text
    parts = text.replace(" ", "").split(",")
    if len(parts) == 4:
        try:
            return tuple(float(p) for p in parts)
        except ValueError:
            pass
    path = Path(text)
    if not path.is_file():
        raise TargetError(f"--region '{text}' is not argmax, all, a box x0,y0,x1,y1 or a mask file")
    return path


def image_targets(dense: DenseOutput, categories: int | list[list[int]] | None, region,
                  anchor: int | None, boxes: int, image_sizes: Sequence[tuple[int, int]]) -> list[list[DenseTarget]]:
    """The command line's targets, one row per image: a box in image pixels is scaled to the
    output (the image is resized to the model's input, which a segmentation output matches);
    a mask file is read as grey levels (non-zero = inside) and resized to the output."""
    if dense.kind == "detection" and region is not None:
        raise TargetError(f"--region applies to segmentation outputs; '{dense.name}' is a detection head "
                          "(use --anchor)")
    if dense.kind == "segmentation" and anchor is not None:
        raise TargetError(f"--anchor applies to detection heads; '{dense.name}' is a segmentation output "
                          "(use --region)")
    cats = [None] if categories is None else [categories] if isinstance(categories, int) else categories[0]
    mask = _read_mask(region) if isinstance(region, Path) else None
    rows = []
    for height, width in image_sizes:
        row = []
        for category in cats:
            if dense.kind == "detection":
                row.append(DetectionTarget(anchor, category, boxes))
                continue
            place = region or "argmax"
            if mask is not None:
                place = mask
            elif isinstance(region, tuple):
                out_h, out_w = dense.spatial
                sx, sy = out_w / width, out_h / height
                place = (region[0] * sx, region[1] * sy, region[2] * sx, region[3] * sy)
            row.append(SegmentationTarget(category, place))
        rows.append(row)
    return rows


def _read_mask(path: Path) -> np.ndarray:
    import cv2
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise TargetError(f"{path}: cannot be read as a mask image")
    return (image > 0).astype(np.float32)


def describe(dense: DenseOutput, output: np.ndarray, seed: np.ndarray) -> dict:
    """What results.json records for one dense target: the explained score and the region's
    pixel count (segmentation) or the anchor and its box values (detection)."""
    record = {"score": float((output.astype(np.float64) * seed).sum())}
    if dense.kind == "segmentation":
        record["region_pixels"] = int(np.count_nonzero(seed))
    else:
        attributes, anchors = detection_axes(dense, None)
        position = np.unravel_index(int(np.argmax(np.abs(seed))), seed.shape)
        anchor = int(position[anchors])
        values = np.moveaxis(output, (attributes, anchors), (0, 1))[:, anchor]
        record.update(anchor=anchor, box=[float(v) for v in values[:4]])
    return record

