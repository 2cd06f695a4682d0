"""Ablation-CAM where the explained activation has negative values: onnxcam vs pytorch-grad-cam.

Desai & Ramaswamy (WACV 2020) ablate a channel by setting it to zero. pytorch-grad-cam's
``AblationLayer`` does so only when the activations' minimum is 0 (post-ReLU); otherwise it
writes ``torch.min(output) - 1e7``, and because ``output`` is the whole batch of ablated
copies and the minimum is taken again after each write, the i-th copy of a batch
(``batch_size`` 32) gets ``min(A) - (i + 1) * 1e7``. onnxcam (``perturbation.ablation_value``)
writes one value per image: 0 when ``min(A) == 0``, else ``min(A) - 1e7``.

On a model whose last activation is a Hardswish (torchvision mobilenet_v3_large, random
weights, BatchNorm statistics measured on the images so activations keep a sane scale,
classifier Linear layers at PyTorch's default init; nothing is downloaded), this script
explains the same images and classes (torch's top-1) with

* pytorch-grad-cam's AblationCAM on ``features[-1]``,
* onnxcam's ablationcam on the same tensor of the ONNX export (TorchScript exporter, opset 17),
* onnxcam with every ablated channel set to 0 (the paper),
* onnxcam with pytorch-grad-cam's per-copy values (the cascade above) substituted,

and prints each onnxcam variant's agreement with pytorch-grad-cam (Pearson r over the map's
pixels, max |difference|), per image. It takes minutes on a CPU: pytorch-grad-cam runs the
whole model once per channel (960 at the last layer of mobilenet_v3_large) per image. Usage::

    python tools/check_ablation_vs_pytorch_grad_cam.py [--model mobilenet_v3_large] [--size 224]
        [--images 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torchvision
from torch import nn

from pytorch_grad_cam import AblationCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnxcam  # noqa: E402
from onnxcam import perturbation  # noqa: E402

PGC_BATCH = 32  # AblationCAM's default batch_size


def build(name: str, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()  # torchvision's N(0, 0.01) leaves logits near 1e-3
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # running statistics = those of ``x``
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def images(count: int, size: int) -> np.ndarray:
    """Smooth random colour fields with blobs, ImageNet-normalized, NCHW."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    batch = []
    for _ in range(count):
        field = np.zeros((size, size, 3), np.float32) + rng.uniform(0.2, 0.8, 3)
        for _ in range(3):
            cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.06, 0.16)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))
            field += blob[..., None].astype(np.float32) * rng.uniform(-0.5, 0.5, 3).astype(np.float32)
        batch.append((np.clip(field, 0, 1) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    return np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2), dtype=np.float32)


def with_values(values):
    """perturbation.ablationcam_weights with channel k of image n set to ``values(A[n])[k]``
    (same formula otherwise: ``(y - y_k) / y``)."""
    def weights(A, seeds, head, batch_size=32):
        out = np.zeros(seeds.shape[:2] + (A.shape[1],), np.float32)
        for n in range(len(A)):
            fill = values(A[n])
            original = head(A[n][None], n)[0] @ seeds[n].T
            batch = np.repeat(A[n][None], A.shape[1], axis=0)
            for k in range(A.shape[1]):
                batch[k, k] = fill[k]
            ablated = np.concatenate([head(batch[s:s + batch_size], n) @ seeds[n].T
                                      for s in range(0, len(batch), batch_size)])
            out[n] = ((original[None] - ablated) / np.where(original != 0, original, 1.0)).T
        return out
    return weights


def pgc_cascade(A: np.ndarray) -> np.ndarray:
    """The value pytorch-grad-cam writes into each channel (float32, as torch computes it)."""
    low = np.float32(A.min())
    if low == 0:
        return np.zeros(A.shape[0], np.float32)
    values, current = [], low
    for k in range(A.shape[0]):
        if k % PGC_BATCH == 0:
            current = low  # a fresh batch of copies of the image
        current = np.float32(current - np.float32(1e7))
        values.append(current)
    return np.asarray(values, np.float32)


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    """Pearson r and max |difference| of two maps (r is undefined for a constant map)."""
    diff = float(np.abs(a - b).max())
    if a.std() == 0 or b.std() == 0:
        return f"a constant map ({'both' if a.std() == b.std() else 'one'}), max |diff| {diff:.3f}"
    return f"r {float(np.corrcoef(a.ravel(), b.ravel())[0, 1]):.4f}, max |diff| {diff:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x = images(args.images, args.size)
    model = build(args.model, torch.from_numpy(x))
    layer = model.features[-1]
    seen = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("A", out.detach().numpy()))
    with torch.no_grad():
        classes = model(torch.from_numpy(x)).argmax(1).numpy()
    handle.remove()
    print(f"{args.model}, {args.size}px, {args.images} images, classes {classes.tolist()}; "
          f"min of the explained activation per image: {[float(a.min()) for a in seen['A']]}")

    with AblationCAM(model=model, target_layers=[layer]) as cam:
        reference = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(int(c)) for c in classes])

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
        explainer = onnxcam.Explainer(path, provider="cpu", threads=args.threads)
        A = explainer.explain(x, "gradcam", targets=classes).activations[explainer.targets_layers[0].name]
        same = float(np.abs(A - seen["A"]).max())
        print(f"onnxcam's default layer {explainer.targets_layers[0].name}: max |A - torch's features[-1]| = {same:.2e}")
        variants = {"onnxcam (min(A) - 1e7)": None, "zero (the paper)": with_values(lambda a: np.zeros(a.shape[0])),
                    "pytorch-grad-cam's cascade": with_values(pgc_cascade)}
        original = perturbation.ablationcam_weights
        for name, weights in variants.items():
            perturbation.ablationcam_weights = weights or original
            try:
                maps = explainer.explain(x, "ablationcam", targets=classes).heatmaps
            finally:
                perturbation.ablationcam_weights = original
            rows = [agreement(maps[n], reference[n]) for n in range(len(x))]
            print(f"{name:28s} vs pytorch-grad-cam: " + "; ".join(rows), flush=True)


if __name__ == "__main__":
    main()
