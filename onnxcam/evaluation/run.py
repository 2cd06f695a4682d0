"""``evaluate``: every metric family for every method over an annotated image set.

The model runs once per image batch to fix the explained classes (a mapped dataset label,
or the top-1), each method explains the batch, and each metric family works on those maps:
boxes and pointing at the original image size (where the ground truth lives), perturbation
metrics on the preprocessed input with the map at the input size. Per image values go to
``images``; ``summary`` holds means with percentile-bootstrap 95 % intervals over images;
``cost`` the seconds and forward passes per image of each family.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import OnnxcamError
from ..explainer import Explainer
from ..images import Preprocess, load_image
from ..visualize import resize_map
from . import localization as loc
from .annotations import Annotation, mask_boxes
from .confidence import confidence_change
from .curves import BASELINES, auc, perturbation_curve
from .faithfulness import occlusion_correlation, occlusion_sensitivity
from .pointing import energy_pointing, pointing_game
from .road import PERCENTILES, road
from .sanity import cascading_randomization
from .scoring import ScoreModel
from .stats import bootstrap_ci

FAMILIES = ("localization", "pointing", "confidence", "deletion", "road", "faithfulness", "sanity")

#: summary metric -> (family, label, better: "higher"/"lower", percent)
SUMMARY = {
    "loc_acc": ("localization", "Loc. acc. (IoU>=0.5)", "higher", True),
    "iou": ("localization", "IoU", "higher", False),
    "maxboxacc": ("localization", "MaxBoxAcc", "higher", True),
    "maxboxacc_v2": ("localization", "MaxBoxAccV2", "higher", True),
    "pointing": ("pointing", "Pointing game", "higher", True),
    "energy_pointing": ("pointing", "Energy pointing", "higher", True),
    "average_drop": ("confidence", "Average Drop", "lower", True),
    "increase": ("confidence", "Increase in Conf.", "higher", True),
    "deletion_auc": ("deletion", "Deletion AUC", "lower", False),
    "insertion_auc": ("deletion", "Insertion AUC", "higher", False),
    "road_combined": ("road", "ROAD combined", "higher", False),
    "occlusion_rho": ("faithfulness", "Occlusion rank corr.", "higher", False),
}


@dataclass
class EvaluationConfig:
    """Metric settings. ``threshold``: box binarization (fraction of the max); ``tolerance``:
    pointing game pixels; ``score``: probability or logit; ``steps``: deletion/insertion
    points per curve (pixels per step = HW / steps; RISE uses HW / 224); baselines: zeros,
    blur or mean; occlusion window and stride in input pixels; ``sanity_steps`` cascade
    steps; ``resamples`` bootstrap resamples."""

    families: tuple[str, ...] = FAMILIES
    threshold: float = 0.15
    tolerance: float = 15.0
    score: str = "probability"
    steps: int = 50
    deletion_baseline: str = "zeros"
    insertion_baseline: str = "blur"
    road_percentiles: tuple[int, ...] = PERCENTILES
    occlusion_patch: int = 32
    occlusion_stride: int = 16
    occlusion_baseline: str = "zeros"
    sanity_steps: int = 8
    resamples: int = 2000
    seed: int = 0

    def check(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise OnnxcamError(f"unknown metric family '{unknown[0]}': choose from {', '.join(FAMILIES)}")
        for baseline in (self.deletion_baseline, self.insertion_baseline, self.occlusion_baseline):
            if baseline not in BASELINES:
                raise OnnxcamError(f"unknown baseline '{baseline}': choose one of {', '.join(BASELINES)}")
        if not 0.0 <= self.threshold < 1.0:
            raise OnnxcamError(f"--threshold must be in [0, 1), got {self.threshold}")
        if self.steps < 1:
            raise OnnxcamError(f"--steps must be at least 1, got {self.steps}")


@dataclass
class Evaluation:
    """The results (JSON-ready) and, for the report, the pictures and maps at original size."""

    results: dict
    pictures: list[np.ndarray] = field(repr=False)
    maps: dict[str, list[np.ndarray]] = field(repr=False)


def _choose_classes(probabilities: np.ndarray, annotations: list[Annotation],
                    label_map: dict[str, list[int]] | None) -> tuple[np.ndarray, list[list[str] | None]]:
    """Per image: the explained class and the dataset labels it stands for (None: all objects).
    With a mapping, the best-scoring class among those the image's labels map to; images whose
    labels map to nothing, and every image without a mapping, explain the top-1."""
    classes, which = [], []
    for row, annotation in zip(probabilities, annotations):
        candidates = [(c, label) for label in annotation.labels for c in (label_map or {}).get(label, [])]
        if candidates:
            best = max(candidates, key=lambda item: row[item[0]])[0]
            classes.append(best)
            which.append([label for c, label in candidates if c == best])
        else:
            classes.append(int(np.argmax(row)))
            which.append(None)
    return np.array(classes, np.int64), which


def evaluate(explainer: Explainer, annotations: Sequence[Annotation], methods: Sequence[str],
             preprocess: Preprocess, config: EvaluationConfig | None = None,
             label_map: dict[str, list[int]] | None = None, labels: Sequence[str] | None = None,
             method_options: dict[str, dict] | None = None,
             progress: Callable[[str], None] | None = None) -> Evaluation:
    """Evaluate ``methods`` on the annotated images (see the module docstring)."""
    config = config or EvaluationConfig()
    config.check()
    for method in methods:
        Explainer.method(method)
    say = progress or (lambda _: None)
    options = method_options or {}
    annotations = list(annotations)
    pictures = [load_image(a.image) for a in annotations]  # every image decodes before any work
    model = ScoreModel(explainer, config.score)
    x = model.to_nchw(np.concatenate([preprocess(pictures[i:i + 16]) for i in range(0, len(pictures), 16)]))
    logits = model.logits(x)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    classes, chosen_labels = _choose_classes(probabilities, annotations, label_map)
    original = model(x, classes)
    cost = {f: {"seconds": 0.0, "passes": 0} for f in config.families}
    cost["explain"] = {"seconds": 0.0, "passes": 0}

    def timed(family: str, work: Callable):
        passes, started = model.passes, time.perf_counter()
        value = work()
        cost[family]["seconds"] += time.perf_counter() - started
        cost[family]["passes"] += model.passes - passes
        return value

    images = []
    for n, (annotation, picture) in enumerate(zip(annotations, pictures)):
        wanted = chosen_labels[n]
        mask = annotation.object_mask()
        if mask is not None and mask.shape != picture.shape[:2]:
            raise OnnxcamError(f"{annotation.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                               f"{annotation.image.name} {picture.shape[1]}x{picture.shape[0]}")
        boxes = annotation.boxes(wanted)
        if not boxes and mask is not None:
            boxes = mask_boxes(mask)
        images.append({"file": str(annotation.image), "size": [int(picture.shape[1]), int(picture.shape[0])],
                       "target": int(classes[n]), "label": labels[classes[n]] if labels and classes[n] < len(labels) else None,
                       "probability": float(probabilities[n, classes[n]]),
                       "objects": wanted or annotation.labels, "boxes": [list(map(float, b)) for b in boxes],
                       "has_mask": mask is not None, "methods": {}, "_mask": mask})

    sensitivities = None
    if "faithfulness" in config.families:
        say("occlusion sensitivity")
        sensitivities = timed("faithfulness", lambda: [
            occlusion_sensitivity(model, x[n], int(classes[n]), config.occlusion_patch, config.occlusion_stride,
                                  config.occlusion_baseline, original=float(original[n])) for n in range(len(x))])

    all_maps: dict[str, np.ndarray] = {}
    full_maps: dict[str, list[np.ndarray]] = {}
    curves: dict[str, dict[str, np.ndarray]] = {}
    height, width = x.shape[2:]
    step = max(1, int(np.ceil(height * width / config.steps)))
    for method in methods:
        say(f"{method}: explaining")
        started = time.perf_counter()
        explained = explainer.explain(model.to_model(x), method, targets=classes, **options.get(method, {}))
        cost["explain"]["seconds"] += time.perf_counter() - started
        maps = explained.heatmaps
        all_maps[method] = maps
        full_maps[method] = [resize_map(m, p.shape[:2]) for m, p in zip(maps, pictures)]
        iou_rows, iou_rows_all = [], []
        for n, record in enumerate(images):
            heatmap, full = maps[n], full_maps[method][n]
            boxes, mask, target = record["boxes"], record["_mask"], int(classes[n])
            metrics: dict[str, float | None] = {}
            entry: dict = {"metrics": metrics}
            if "localization" in config.families:
                def localize():
                    box = loc.box_from_map(full, config.threshold)
                    overlap = loc.best_iou([box], boxes) if box and boxes else (0.0 if boxes else None)
                    rows = loc.iou_curves(full, boxes)
                    return box, overlap, rows
                box, overlap, rows = timed("localization", localize)
                entry["box"] = list(box) if box else None
                metrics["iou"] = overlap
                metrics["loc_acc"] = None if overlap is None else float(overlap >= 0.5)
                if boxes:
                    iou_rows.append(rows[0])
                    iou_rows_all.append(rows[1])
            if "pointing" in config.families:
                hit, energy = timed("pointing", lambda: (
                    pointing_game(full, boxes, mask, config.tolerance), energy_pointing(full, boxes, mask)))
                metrics["pointing"] = float(hit) if (boxes or mask is not None) else None
                metrics["energy_pointing"] = energy if (boxes or mask is not None) else None
            if "deletion" in config.families:
                def both():
                    return (perturbation_curve(model, x[n], heatmap, target, "deletion", step, config.deletion_baseline),
                            perturbation_curve(model, x[n], heatmap, target, "insertion", step, config.insertion_baseline))
                (fd, sd), (fi, si) = timed("deletion", both)
                metrics["deletion_auc"], metrics["insertion_auc"] = auc(fd, sd), auc(fi, si)
                entry["curves"] = {"fractions": [round(float(v), 5) for v in fd],
                                   "deletion": [float(v) for v in sd], "insertion": [float(v) for v in si]}
            if "road" in config.families:
                scores = timed("road", lambda: road(model, x[n], heatmap, target, config.road_percentiles,
                                                    seed=config.seed + n, original=float(original[n])))
                metrics.update(road_morf=scores["morf"], road_lerf=scores["lerf"], road_combined=scores["combined"])
            if sensitivities is not None:
                metrics["occlusion_rho"] = timed("faithfulness", lambda: occlusion_correlation(
                    heatmap, sensitivities[n], config.occlusion_patch, config.occlusion_stride))
            record["methods"][method] = entry
        if "confidence" in config.families:
            drop, increase = timed("confidence", lambda: confidence_change(model, x, maps, classes, original))
            for n, record in enumerate(images):
                record["methods"][method]["metrics"].update(average_drop=float(drop[n]), increase=float(increase[n]))
        curves[method] = {"largest": np.array(iou_rows), "all": np.array(iou_rows_all)}

    sanity = None
    if "sanity" in config.families:
        say("sanity check: cascading randomization")
        layer_names = [l.name for l in explainer.targets_layers]
        sanity = timed("sanity", lambda: cascading_randomization(
            explainer._proto, model.to_model(x), classes, all_maps, layer=layer_names,  # the model as run (size pinned)
            steps=config.sanity_steps, seed=config.seed, provider=explainer.provider_requested,
            method_options=options))

    summary = _summarize(images, methods, curves, config)
    if sanity is not None:
        for method in methods:
            summary[method]["sanity_changed_at"] = sanity[method]["changed_at"]
            summary[method]["sanity_stops_changing_at"] = sanity[method]["stops_changing_at"]
    for record in images:
        record.pop("_mask")
    count = max(len(images), 1)
    per_image = {family: {"seconds": round(c["seconds"] / count / (1 if family in ("sanity", "explain") else len(methods)), 4),
                          "passes": c["passes"] / count / (1 if family in ("sanity", "explain") else len(methods))}
                 for family, c in cost.items()}
    results = {"model": explainer.source, "layer": ",".join(l.name for l in explainer.targets_layers),
               "provider": explainer.provider, "methods": list(methods), "config": asdict(config),
               "images": images, "summary": summary, "sanity": sanity,
               "cost_per_image_and_method": per_image,
               "metrics": {k: {"label": v[1], "better": v[2], "percent": v[3]} for k, v in SUMMARY.items()}}
    return Evaluation(results, pictures, full_maps)


def _summarize(images: list[dict], methods: Sequence[str], curves: dict, config: EvaluationConfig) -> dict:
    summary: dict[str, dict] = {}
    for method in methods:
        rows: dict = {}
        for name, (family, *_rest) in SUMMARY.items():
            if family not in config.families or name.startswith("maxboxacc"):
                continue
            values = [r["methods"][method]["metrics"].get(name) for r in images]
            values = [v for v in values if v is not None and np.isfinite(v)]
            mean, low, high = bootstrap_ci(values, config.resamples, seed=config.seed)
            rows[name] = {"mean": mean, "low": low, "high": high, "n": len(values)}
        if "localization" in config.families and len(curves[method]["largest"]):
            largest, every = curves[method]["largest"], curves[method]["all"]
            for name, data, deltas in (("maxboxacc", largest, (0.5,)), ("maxboxacc_v2", every, (0.3, 0.5, 0.7))):
                mean, low, high = bootstrap_ci(data, config.resamples, seed=config.seed,
                                               statistic=lambda d, deltas=deltas: loc.max_box_acc(d, deltas))
                rows[name] = {"mean": mean, "low": low, "high": high, "n": len(data)}
            rows["maxboxacc"]["threshold"] = loc.best_threshold(largest)
        summary[method] = rows
    return summary
