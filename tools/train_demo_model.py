"""Train the small shape classifier bundled with onnxcam as its offline demo.

onnxcam's demo has to run without a network connection and without third-party weights whose
licence or provenance we cannot vouch for, so we ship our own model. This script builds it from
scratch, deterministically:

* A synthetic data set is drawn on the fly with OpenCV from fixed seeds: 64x64 RGB images of one
  of four shapes (circle, square, triangle, cross) with random colour, size, position and slight
  rotation, on a cluttered background (low-frequency colour field, thin lines, small blobs,
  pixel noise). A fifth of the training images hold two shapes of different classes, one in
  each half, with soft labels 0.5/0.5, so the model ranks both classes first on such images.
* The model is a small CNN whose head is global average pooling followed by one linear layer:
  that is the architecture Class Activation Mapping (CAM) is defined on, and its last 8x8 feature
  map suits Grad-CAM and friends too.
* Training runs on CPU with fixed seeds and deterministic algorithms, so two runs print the
  same numbers. Its first epochs pool with a global max, blending into the average: a GAP head
  trained from scratch sits on a long plateau here (see ``train``).
* The model is exported to ONNX (opset 13, IR version 8, dynamic batch axis, input ``input``,
  pre-softmax output ``logits``) with two metadata entries onnxcam reads:
  ``onnxcam.preprocess`` (the exact normalization used in training) and ``onnxcam.labels``
  (the class names). onnxruntime's logits are checked against torch's.
* Sample images (128x128, some holding two shapes of different classes) are written with
  ``samples.json`` listing each object's class and box, and the model's predictions on them
  are checked.

Usage::

    python tools/train_demo_model.py [--out models/demo] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZE = 64  # model input side, pixels
SAMPLE_SCALE = 2  # sample images are drawn at SIZE * SAMPLE_SCALE
TRAIN_SEED, TEST_SEED, SAMPLE_SEED, TORCH_SEED = 1234, 5678, 4242, 0
N_TRAIN_SINGLE, N_TRAIN_PAIR = 8000, 2000
N_TEST_SINGLE, N_TEST_PAIR = 1200, 400
BATCH_SIZE = 64
LEARNING_RATE = 5e-3
MAX_POOL_EPOCHS, BLEND_EPOCHS = 3, 3  # pooling schedule of the head in training, see train()
PAIR_GAP = 4  # pixels (at 64x64) kept free on each side of the vertical midline in pair images

# Sample images: one single-object image per class, then pairs (left class, right class).
SAMPLE_SINGLES: tuple[str, ...] = CLASSES
SAMPLE_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "square"),
    ("triangle", "cross"),
    ("square", "triangle"),
    ("cross", "circle"),
)


@dataclass(frozen=True)
class DrawnObject:
    """One shape drawn in an image: its class and its box (x1, y1, x2, y2) in pixels."""

    label: str
    box_xyxy: tuple[int, int, int, int]


def shape_polygon(label: str, size: float, angle_deg: float) -> np.ndarray:
    """Outline of a shape of nominal extent ``size`` centred on the origin, turned ``angle_deg``."""
    r = size / 2.0
    if label == "circle":
        t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * r
    elif label == "square":
        pts = np.array([[-r, -r], [r, -r], [r, r], [-r, r]])
    elif label == "triangle":
        # Equilateral triangle with side ``size``, centred on its centroid, apex up.
        h = size * np.sqrt(3.0) / 2.0
        pts = np.array([[0.0, -2.0 * h / 3.0], [r, h / 3.0], [-r, h / 3.0]])
    elif label == "cross":
        a = size / 6.0  # half the arm width: arms are a third of the span wide
        pts = np.array(
            [[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a],
             [a, r], [-a, r], [-a, a], [-r, a], [-r, -a], [-a, -a]]
        )
    else:
        raise ValueError(f"unknown shape {label!r}")
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return pts @ rot.T


def draw_background(rng: np.random.Generator, side: int, scale: int) -> np.ndarray:
    """Cluttered RGB background: smooth colour field, thin lines, small blobs and pixel noise."""
    base = rng.uniform(40.0, 215.0, size=3)
    coarse = (base + rng.uniform(-60.0, 60.0, size=(3, 3, 3))).astype(np.float32)
    img = cv2.resize(coarse, (side, side), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img, 0.0, 255.0).astype(np.uint8)
    for _ in range(rng.integers(2, 6)):
        p1 = tuple(int(v) for v in rng.integers(0, side, 2))
        p2 = tuple(int(v) for v in rng.integers(0, side, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.line(img, p1, p2, colour, thickness=scale, lineType=cv2.LINE_AA)
    for _ in range(rng.integers(2, 7)):
        centre = tuple(int(v) for v in rng.integers(0, side, 2))
        radius = int(rng.integers(1, 4)) * scale
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, centre, radius, colour, thickness=-1, lineType=cv2.LINE_AA)
    return img


def draw_shape(
    img: np.ndarray,
    rng: np.random.Generator,
    label: str,
    region: tuple[int, int, int, int],
    scale: int,
    max_size: float,
) -> DrawnObject:
    """Draw ``label`` fully inside ``region`` (x1, y1, x2, y2) of ``img`` in place; return its box.

    Size is drawn in 14..``max_size`` pixels at 64x64 (times ``scale``); the colour is drawn until
    it stands out from the background under the shape.
    """
    x1, y1, x2, y2 = region
    angle = 0.0 if label == "circle" else float(rng.uniform(-20.0, 20.0))
    while True:
        pts = shape_polygon(label, float(rng.uniform(14.0, max_size)) * scale, angle)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        if hi[0] - lo[0] <= x2 - x1 and hi[1] - lo[1] <= y2 - y1:
            break
    cx = rng.uniform(x1 - lo[0], x2 - hi[0])
    cy = rng.uniform(y1 - lo[1], y2 - hi[1])
    pts = pts + np.array([cx, cy])
    fixed_point = [np.round(pts * 16).astype(np.int32)]  # 4 fractional bits, see shift=4
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(mask, fixed_point, 255, cv2.LINE_8, shift=4)
    under = img[mask > 0].astype(np.float32).mean(axis=0)
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - under).sum() >= 150:
            break
    cv2.fillPoly(img, fixed_point, tuple(int(v) for v in colour), cv2.LINE_AA, shift=4)
    bx1, by1 = np.floor(pts.min(axis=0)).astype(int)
    bx2, by2 = np.ceil(pts.max(axis=0)).astype(int)
    return DrawnObject(label, (int(bx1), int(by1), int(bx2), int(by2)))


def add_noise(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Add mild Gaussian pixel noise."""
    noisy = img.astype(np.float32) + rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    return np.clip(noisy, 0.0, 255.0).astype(np.uint8)


def render(
    rng: np.random.Generator, labels: tuple[str, ...], scale: int = 1
) -> tuple[np.ndarray, list[DrawnObject]]:
    """Render an RGB image (side ``SIZE * scale``) holding one shape, or two side by side."""
    side = SIZE * scale
    margin = 2 * scale
    img = draw_background(rng, side, scale)
    if len(labels) == 1:
        regions = [(margin, margin, side - margin, side - margin)]
        max_size = 28.0
    else:
        mid, gap = side // 2, PAIR_GAP * scale
        regions = [
            (margin, margin, mid - gap, side - margin),
            (mid + gap, margin, side - margin, side - margin),
        ]
        max_size = 24.0
    objects = [draw_shape(img, rng, lab, reg, scale, max_size) for lab, reg in zip(labels, regions)]
    return add_noise(rng, img), objects


def make_dataset(seed: int, n_single: int, n_pair: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 64, 64, 3) uint8 RGB and soft targets (N, classes) float32.

    Single-object images have one-hot targets; two-object images (distinct classes) 0.5/0.5.
    """
    rng = np.random.default_rng(seed)
    n = n_single + n_pair
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    targets = np.zeros((n, len(CLASSES)), np.float32)
    for i in range(n):
        if i < n_single:
            idx = [i % len(CLASSES)]
        else:
            idx = [int(v) for v in rng.choice(len(CLASSES), size=2, replace=False)]
        images[i], _ = render(rng, tuple(CLASSES[k] for k in idx))
        targets[i, idx] = 1.0 / len(idx)
    return images, targets


class ShapeNet(nn.Module):
    """Five Conv3x3-BN-ReLU blocks (64x64 -> 32 -> 16 -> 8 by two strided convs and a max-pool)
    to a 64x8x8 feature map, then global average pooling and one linear layer (the CAM head)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, 32, stride=2),
            *block(32, 32, stride=2),
            *block(32, 48), nn.MaxPool2d(2),
            *block(48, 48),
            *block(48, 64),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW, ``(x / 255 - mean) / std`` per channel."""
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of ``model`` (in eval mode) on normalized NCHW inputs, batched."""
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [model(torch.from_numpy(x[i : i + 256])).numpy() for i in range(0, len(x), 256)]
        )


def report_accuracy(logits: np.ndarray, targets: np.ndarray, n_single: int) -> tuple[float, float]:
    """Top-1 accuracy on the single-object part, and on the pair part the share of images whose
    top-2 classes are exactly the two objects' classes."""
    top1 = (logits[:n_single].argmax(1) == targets[:n_single].argmax(1)).mean()
    top2 = np.sort(np.argsort(-logits[n_single:], axis=1)[:, :2], axis=1)
    truth = np.sort(np.argsort(-targets[n_single:], axis=1)[:, :2], axis=1)
    pair = (top2 == truth).all(axis=1).mean()
    return float(top1), float(pair)


def pool_weight(epoch: float) -> float:
    """Weight of global max pooling (against average pooling) at a fractional epoch."""
    return min(1.0, max(0.0, 1.0 - (epoch - MAX_POOL_EPOCHS) / BLEND_EPOCHS))


def train(
    images: np.ndarray, targets: np.ndarray, mean: np.ndarray, std: np.ndarray, epochs: int
) -> ShapeNet:
    """Train ShapeNet with Adam, a cosine learning-rate decay and soft-target cross-entropy.

    With global average pooling from the start, training sits on a plateau for over a thousand
    steps: a shape covers a tenth of the image, so the gradient reaching each position is mostly
    about background. Pooling with a global max instead sends the gradient to the most responsive
    position and finds shape features within a few hundred steps. So the head pools with
    ``w * max + (1 - w) * mean``, ``w`` being 1 for MAX_POOL_EPOCHS epochs, then falling linearly
    to 0 over BLEND_EPOCHS epochs; the remaining epochs train the plain GAP head that is exported.
    """
    model = ShapeNet(len(CLASSES))
    x_all = torch.from_numpy(normalize(images, mean, std))
    y_all = torch.from_numpy(targets)
    steps = (len(x_all) + BATCH_SIZE - 1) // BATCH_SIZE
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    gen = torch.Generator().manual_seed(TORCH_SEED)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        start = time.perf_counter()
        for s in range(steps):
            idx = perm[s * BATCH_SIZE : (s + 1) * BATCH_SIZE]
            w = pool_weight(epoch + s / steps)
            features = model.features(x_all[idx])
            pooled = w * features.amax(dim=(2, 3)) + (1.0 - w) * features.mean(dim=(2, 3))
            loss = F.cross_entropy(model.fc(pooled), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(
            f"epoch {epoch + 1}/{epochs} (max-pool weight {pool_weight(epoch):.2f}"
            f"->{pool_weight(epoch + 1):.2f}): train loss {total / len(x_all):.4f}"
            f" ({time.perf_counter() - start:.1f}s)"
        )
    return model.eval()


def export_onnx(model: ShapeNet, path: Path, preprocess: dict[str, object]) -> None:
    """Export to ONNX (opset 13, IR 8, dynamic batch) with onnxcam's metadata; check the model."""
    dummy = torch.zeros(1, 3, SIZE, SIZE)
    # The TorchScript exporter is deprecated but chosen on purpose: it folds BatchNorm into the
    # convolutions and emits a plain Conv/Relu/MaxPool/GlobalAveragePool/Flatten/Gemm graph.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=13,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(path))
    proto.ir_version = 8
    del proto.metadata_props[:]
    for key, value in (("onnxcam.preprocess", preprocess), ("onnxcam.labels", list(CLASSES))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def write_samples(out: Path) -> list[tuple[str, np.ndarray, list[DrawnObject]]]:
    """Write the sample PNGs and samples.json; return (file name, RGB image, objects) per sample."""
    rng = np.random.default_rng(SAMPLE_SEED)
    samples_dir = out / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    specs = [(f"{lab}.png", (lab,)) for lab in SAMPLE_SINGLES]
    specs += [(f"{a}_{b}.png", (a, b)) for a, b in SAMPLE_PAIRS]
    samples = []
    for name, labels in specs:
        img, objects = render(rng, labels, scale=SAMPLE_SCALE)
        cv2.imwrite(str(samples_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        samples.append((name, img, objects))
    index = [
        {
            "image": name,
            "objects": [{"label": o.label, "box_xyxy": list(o.box_xyxy)} for o in objects],
        }
        for name, _, objects in samples
    ]
    (samples_dir / "samples.json").write_text(json.dumps(index, indent=2) + "\n")
    return samples


def check_samples(
    session: ort.InferenceSession,
    samples: list[tuple[str, np.ndarray, list[DrawnObject]]],
    mean: np.ndarray,
    std: np.ndarray,
) -> bool:
    """Run the ONNX model on the samples, resized to 64x64 with INTER_AREA.

    Single-object samples must be classified correctly; two-object samples must have both
    classes as the top 2. Prints each result; returns whether all passed.
    """
    ok = True
    for name, img, objects in samples:
        small = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        logits = session.run(["logits"], {"input": normalize(small[None], mean, std)})[0][0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        ranked = np.argsort(-probs)
        passed = {CLASSES[k] for k in ranked[: len(objects)]} == {o.label for o in objects}
        ok &= passed
        top2 = ", ".join(f"{CLASSES[k]} {probs[k]:.3f}" for k in ranked[:2])
        print(f"  {name}: top-2 {top2} -> {'ok' if passed else 'FAIL'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="output folder")
    min_epochs = MAX_POOL_EPOCHS + BLEND_EPOCHS + 1
    parser.add_argument(
        "--epochs", type=int, default=12, help=f"training epochs, at least {min_epochs}"
    )
    args = parser.parse_args()
    if args.epochs < min_epochs:
        parser.error(f"--epochs must be at least {min_epochs}")

    torch.manual_seed(TORCH_SEED)
    torch.use_deterministic_algorithms(True)
    # Only needed to expose reads of uninitialized memory, which we do not do; costs ~20% time.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    train_x, train_y = make_dataset(TRAIN_SEED, N_TRAIN_SINGLE, N_TRAIN_PAIR)
    test_x, test_y = make_dataset(TEST_SEED, N_TEST_SINGLE, N_TEST_PAIR)
    # Rounded so the stored metadata is exactly what training used.
    pixels = train_x.reshape(-1, 3).astype(np.float64) / 255.0
    mean_list = [round(float(v), 3) for v in pixels.mean(0)]
    std_list = [round(float(v), 3) for v in pixels.std(0)]
    mean, std = np.array(mean_list, np.float32), np.array(std_list, np.float32)
    elapsed = time.perf_counter() - start
    print(f"data: {len(train_x)} train, {len(test_x)} test images ({elapsed:.1f}s)")

    start = time.perf_counter()
    model = train(train_x, train_y, mean, std, args.epochs)
    print(f"training time: {time.perf_counter() - start:.1f}s")

    test_in = normalize(test_x, mean, std)
    logits = predict(model, test_in)
    top1, pair = report_accuracy(logits, test_y, N_TEST_SINGLE)
    print(f"test accuracy (single object, top-1): {top1:.4f}")
    print(f"test two-object images with both classes in top-2: {pair:.4f}")

    preprocess = {
        "mean": mean_list,
        "std": std_list,
        "scale": 255.0,
        "channel_order": "RGB",
        "layout": "NCHW",
        "size": [SIZE, SIZE],
    }
    onnx_path = args.out / "shapes.onnx"
    export_onnx(model, onnx_path, preprocess)
    (args.out / "labels.txt").write_text("\n".join(CLASSES) + "\n")

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"input": test_in[:64]})[0]
    diff = float(np.abs(ort_logits - logits[:64]).max())
    print(f"onnxruntime vs torch, batch of 64: max abs diff {diff:.2e}")
    if diff >= 1e-4:
        raise SystemExit("ONNX export does not match torch")

    print("samples:")
    if not check_samples(session, write_samples(args.out), mean, std):
        raise SystemExit("the model gets some sample images wrong")
    print(f"preprocess: {json.dumps(preprocess)}")


if __name__ == "__main__":
    main()
