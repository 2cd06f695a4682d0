"""Independent references for onnxcam.evaluation: writes tests/fixtures/evaluation/.

The same maps, images and masks go to the reference implementations users know, and the
numbers they return are stored for tests/test_evaluation_reference.py:

* pytorch-grad-cam (``grad-cam``): ROADMostRelevantFirst / LeastRelevantFirst / Combined and
  CamMultImageConfidenceChange (raw-logit targets), on a small random-weight torch CNN
  exported to ONNX (onnxcam runs the ONNX file; the imputer's noise is set to 0 on both sides
  so results are comparable), with smooth random maps;
* Quantus: PointingGame and RelevanceMassAccuracy on the same maps and masks;
* MaxBoxAcc as Choe et al.'s ``wsolevaluation`` computes it (``cv2.findContours``, largest
  contour by ``cv2.contourArea``, inclusive-pixel IoU), reimplemented here from their paper
  and code description, against onnxcam's connected-component version;
* scipy's ``spearmanr`` (with ties) and scikit-image's ``structural_similarity`` (Gaussian
  window, sigma 1.5, population covariance) on pairs of maps;
* the ROAD imputer's accuracy: onnxcam's conjugate-gradient solve (its path without scipy) and
  its scipy path against pytorch-grad-cam's scipy LU solve on 224x224 images at 10/50/90 %
  removal (printed).

Usage: ``python tools/check_evaluation.py [--out tests/fixtures/evaluation]`` (torch, grad-cam,
quantus needed; CPU, under a minute).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import torch
from torch import nn

from onnxcam.evaluation import localization as loc
from onnxcam.evaluation.road import linear_impute, road_keep_mask
from onnxcam.explainer import Explainer

SIZE, CLASSES, IMAGES = 32, 4, 6


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def smooth_images(rng: np.random.Generator) -> np.ndarray:
    """Preprocessed-like inputs: smooth random fields (imputation is meaningful on them)."""
    raw = rng.normal(size=(IMAGES, 3, SIZE, SIZE)).astype(np.float32)
    return np.stack([[cv2.GaussianBlur(c, (0, 0), 2) * 3 for c in image] for image in raw]).astype(np.float32)


def blob_maps(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    maps = []
    for _ in range(count):
        field = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / 8)
        maps.append((field - field.min()) / (field.max() - field.min()))
    return np.stack(maps)


def choe_boxes(scoremap: np.ndarray, threshold: float, multi_contour: bool) -> list[list[float]]:
    """wsolevaluation's compute_bboxes_from_scoremaps for one map (boxes with exclusive edges)."""
    image = np.uint8(scoremap * 255)
    _, binary = cv2.threshold(image, int(threshold * np.max(image)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if not contours:
        return [[0, 0, 0, 0]]
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    return [[x, y, x + w, y + h] for x, y, w, h in (cv2.boundingRect(c) for c in contours)]


def choe_max_box_acc(maps: np.ndarray, truth: list[list[float]], deltas, multi_contour: bool) -> float:
    accuracies = []
    for delta in deltas:
        best = 0.0
        for threshold in loc.SWEEP:
            hits = [max(loc.iou(b, truth[n]) for b in choe_boxes(maps[n], threshold, multi_contour)) >= delta
                    for n in range(len(maps))]
            best = max(best, float(np.mean(hits)))
        accuracies.append(best)
    return float(np.mean(accuracies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/evaluation"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = Tiny().eval()
    with torch.no_grad():  # a random head barely reacts to smooth changes: make the logits sensitive
        net.fc.weight.mul_(20.0)
    path = args.out / "tiny.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, SIZE, SIZE), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=13, dynamo=False)
    model = onnx.load(str(path))
    model.ir_version = 8  # onnxruntime reads at most IR 13; onnx 1.23 writes 14
    onnx.save(model, str(path))

    x = smooth_images(rng)
    explainer = Explainer(path, provider="cpu", cache=False)
    explained = explainer.explain(x, "gradcam")
    classes = explained.targets.astype(np.int64)
    # smooth random maps in [0, 1]: a random network's Grad-CAM is often all zero, which would
    # leave the comparisons little to compare
    maps = blob_maps(rng, IMAGES, SIZE).astype(np.float16).astype(np.float32)  # stored as float16
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(x)).numpy()
    assert np.allclose(torch_logits, explained.logits, atol=1e-4), "torch and onnxruntime disagree"

    # pytorch-grad-cam, noise-free imputation
    from pytorch_grad_cam.metrics import road as road_module
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    road_module.NoisyLinearImputer.__init__.__defaults__ = (0.0, road_module.neighbors_weights)
    targets = [ClassifierOutputTarget(int(c)) for c in classes]  # the raw logit: onnxcam's score='logit'
    tensor = torch.from_numpy(x)
    percentiles = [20, 50, 80]
    reference = {
        "road_morf": road_module.ROADMostRelevantFirstAverage(percentiles)(tensor, maps, targets, net).tolist(),
        "road_lerf": road_module.ROADLeastRelevantFirstAverage(percentiles)(tensor, maps, targets, net).tolist(),
        "road_combined": road_module.ROADCombined(percentiles)(tensor, maps, targets, net).tolist(),
        "confidence_change": CamMultImageConfidenceChange()(tensor, maps, targets, net).tolist(),
        "road_percentiles": percentiles,
    }

    # Quantus on masks: half the images get a mask around the map's peak region, half elsewhere
    import quantus
    masks = np.zeros((IMAGES, SIZE, SIZE), bool)
    for n in range(IMAGES):  # even images: a mask around the map's peak; odd: one far from it
        py, px = np.unravel_index(int(np.argmax(maps[n])), maps[n].shape)
        if n % 2:
            py, px = (py + SIZE // 2) % SIZE, (px + SIZE // 2) % SIZE
        masks[n, max(py - 5, 0):py + 5, max(px - 6, 0):px + 6] = True
    a_batch, s_batch = maps[:, None], masks[:, None].astype(np.float32)
    reference["quantus_pointing_game"] = [bool(v) for v in quantus.PointingGame(disable_warnings=True)(
        model=None, x_batch=x, y_batch=classes, a_batch=a_batch, s_batch=s_batch, channel_first=True)]
    reference["quantus_relevance_mass_accuracy"] = [float(v) for v in quantus.RelevanceMassAccuracy(
        disable_warnings=True)(model=None, x_batch=x, y_batch=classes, a_batch=a_batch, s_batch=s_batch,
                               channel_first=True)]

    # MaxBoxAcc the wsolevaluation way: maps with a Gaussian bump (plus a weaker second one and
    # noise), ground truth a jittered box around the main bump
    blobs, truth = [], []
    ys, xs = np.mgrid[0:64, 0:64]
    for _ in range(16):
        cx, cy, cx2, cy2 = rng.uniform(12, 52, 4)
        sx, sy = rng.uniform(4, 10, 2)
        bump = np.exp(-((xs - cx) ** 2 / (2 * sx ** 2) + (ys - cy) ** 2 / (2 * sy ** 2)))
        bump += 0.5 * np.exp(-((xs - cx2) ** 2 + (ys - cy2) ** 2) / (2 * 5.0 ** 2)) + 0.05 * rng.random((64, 64))
        blobs.append(((bump - bump.min()) / (bump.max() - bump.min())).astype(np.float32))
        jitter = rng.normal(0, 2, 4)
        truth.append([float(np.clip(cx - 2 * sx + jitter[0], 0, 63)), float(np.clip(cy - 2 * sy + jitter[1], 0, 63)),
                      float(np.clip(cx + 2 * sx + jitter[2], 1, 64)), float(np.clip(cy + 2 * sy + jitter[3], 1, 64))])
    blobs = np.stack(blobs).astype(np.float16).astype(np.float32)
    reference["maxboxacc_choe"] = choe_max_box_acc(blobs, truth, (0.5,), multi_contour=False)
    reference["maxboxacc_v2_choe"] = choe_max_box_acc(blobs, truth, (0.3, 0.5, 0.7), multi_contour=True)
    reference["box_truth"] = truth

    # scipy's Spearman (with ties) and scikit-image's SSIM on pairs of maps
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity
    tied = np.round(maps * 8) / 8
    reference["scipy_spearman"] = [float(spearmanr(a.ravel(), b.ravel()).correlation)
                                   for a, b in zip(maps, np.roll(tied, 1, axis=0))]
    reference["skimage_ssim"] = [float(structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                                             use_sample_covariance=False))
                                 for a, b in zip(blobs, np.roll(blobs, 1, axis=0))]

    np.savez_compressed(args.out / "inputs.npz", x=x, maps=maps.astype(np.float16), classes=classes,
                        masks=masks, blobs=blobs.astype(np.float16))
    reference["provenance"] = {"tool": "tools/check_evaluation.py", "torch": torch.__version__,
                               "grad-cam": _version("grad-cam"), "quantus": quantus.__version__,
                               "date": time.strftime("%Y-%m-%d")}
    (args.out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(json.dumps({k: v for k, v in reference.items() if k != "box_truth"}, indent=1))

    # imputer accuracy at the default tolerance, 224x224, against scipy's exact solve
    image = np.stack([cv2.GaussianBlur(c, (0, 0), 3) for c in rng.normal(size=(3, 224, 224)).astype(np.float32)])
    heatmap = blob_maps(rng, 1, 224)[0]
    for percentile in (10, 50, 90):
        keep = road_keep_mask(heatmap, percentile, True)
        started = time.perf_counter()
        ours = linear_impute(image, keep, noise=0.0, solver="cg")  # the path without scipy
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        exact = road_module.NoisyLinearImputer(noise=0.0)(torch.from_numpy(image),
                                                          torch.from_numpy(keep.astype(np.float32))).numpy()
        exact_s = time.perf_counter() - started
        fast = np.abs(linear_impute(image, keep, noise=0.0, solver="scipy") - exact).max()
        print(f"imputer, {100 - percentile}% removed: max |onnxcam CG - scipy LU| = {np.abs(ours - exact).max():.2e}, "
              f"{ours_s:.2f} s vs {exact_s:.2f} s; max |onnxcam's scipy path - pytorch-grad-cam's| = {fast:.2e}")


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


if __name__ == "__main__":
    main()
