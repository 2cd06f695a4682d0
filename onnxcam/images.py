"""Images in: decode any file OpenCV reads and turn it into the tensor a model expects.

Every image is first brought to RGB float32 in [0, 255] (gray is replicated, alpha dropped,
16-bit scaled by 1/257, float images in [0, 1] scaled by 255), then resized to the model's
input size and normalized as ``(x / scale - mean) / std`` per channel, in the channel order
and layout the model takes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageError, OnnxcamError


@dataclass(frozen=True)
class Preprocess:
    """How pixels become model input: ``(x / scale - mean) / std``, then order and layout."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 255.0
    channel_order: str = "RGB"
    layout: str = "NCHW"
    size: tuple[int, int] | None = None  # (H, W)

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """A float32 batch from RGB images (H, W, 3) in [0, 255]."""
        if self.size is None:
            raise OnnxcamError("the model's input size is dynamic: give --size H W")
        height, width = self.size
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        batch = []
        for image in images:
            # Shrinking averages pixels (like torchvision's antialiased resize); bilinear would
            # alias thin structures away. Enlarging interpolates bilinearly.
            shrinking = image.shape[0] > height or image.shape[1] > width
            resized = cv2.resize(image.astype(np.float32), (width, height),
                                 interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
            if self.channel_order == "BGR":
                resized = resized[..., ::-1]
            normalized = (resized / self.scale - mean) / std
            batch.append(normalized.transpose(2, 0, 1) if self.layout == "NCHW" else normalized)
        return np.ascontiguousarray(np.stack(batch), dtype=np.float32)


#: Named normalizations of popular model zoos.
PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(),  # torchvision
    "inception": Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),  # x/127.5 - 1 (TF, Keras)
    "caffe": Preprocess(mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), scale=1.0,
                        channel_order="BGR"),  # Keras VGG/ResNet50 "caffe" mode
    "raw": Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),  # x/255
}

METADATA_PREPROCESS = "onnxcam.preprocess"
METADATA_LABELS = "onnxcam.labels"


def preprocess_from_metadata(metadata: dict[str, str]) -> Preprocess | None:
    """The normalization a model declares in its ``onnxcam.preprocess`` metadata, if any."""
    raw = metadata.get(METADATA_PREPROCESS)
    if not raw:
        return None
    spec = json.loads(raw)
    return Preprocess(mean=tuple(spec["mean"]), std=tuple(spec["std"]), scale=float(spec["scale"]),
                      channel_order=spec.get("channel_order", "RGB"), layout=spec.get("layout", "NCHW"),
                      size=tuple(spec["size"]) if spec.get("size") else None)


def make_preprocess(preset: str | None, layout: str, size: tuple[int, int] | None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    scale: float | None = None, declared: Preprocess | None = None) -> Preprocess:
    """A preset (or the model's declared normalization) with explicit overrides applied."""
    if preset is not None:
        if preset not in PRESETS:
            raise OnnxcamError(f"unknown preprocessing preset '{preset}': choose one of {', '.join(PRESETS)}")
        base = PRESETS[preset]
    else:
        base = declared or PRESETS["imagenet"]
    chosen = replace(base, layout=layout, size=size or base.size)
    if mean is not None:
        chosen = replace(chosen, mean=_three(mean, "--mean"))
    if std is not None:
        chosen = replace(chosen, std=_three(std, "--std"))
    if scale is not None:
        chosen = replace(chosen, scale=float(scale))
    return chosen


def _three(values: Sequence[float], flag: str) -> tuple[float, float, float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise OnnxcamError(f"{flag} takes 1 or 3 values, got {len(values)}")
    return tuple(values)  # type: ignore[return-value]


def load_image(path: str | os.PathLike) -> np.ndarray:
    """RGB float32 (H, W, 3) in [0, 255] from any image file OpenCV decodes."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    raw = np.fromfile(str(path), dtype=np.uint8)  # imdecode also handles non-ASCII paths
    image = _quiet_decode(raw) if raw.size else None
    if image is None:
        raise ImageError(f"{path}: cannot be decoded as an image (jpg, png, bmp, tiff, webp, ...)")
    return to_rgb(image)


def _quiet_decode(raw: np.ndarray) -> np.ndarray | None:
    """``cv2.imdecode`` without OpenCV's own log line on a bad file: the caller reports it,
    naming the file, in one line."""
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        return cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    finally:
        logging.setLogLevel(level)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Decoded OpenCV image (any depth, 1/3/4 channels, BGR) -> RGB float32 in [0, 255]."""
    if image.dtype == np.uint16:
        pixels = image.astype(np.float32) / 257.0
    elif image.dtype.kind == "f":
        pixels = image.astype(np.float32)
        finite = pixels[np.isfinite(pixels)]
        if finite.size and finite.max() <= 1.0:
            pixels = pixels * 255.0
        pixels = np.nan_to_num(np.clip(pixels, 0.0, 255.0))
    else:
        pixels = image.astype(np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[2]
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels == 4:  # alpha is dropped, as torchvision/PIL convert("RGB") does
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB)
    if channels != 3:
        raise ImageError(f"unsupported image with {channels} channels")
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)  # numpy's [..., ::-1] copy: ~20x slower


def load_labels(path: str | os.PathLike) -> list[str]:
    """One label per line, line i naming class i (a JSON list is accepted too).

    Blank lines inside the file are kept as empty labels so indices never shift."""
    path = Path(path)
    if not path.is_file():
        raise OnnxcamError(f"{path}: no such labels file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return [str(label) for label in json.loads(text)]
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    return labels
