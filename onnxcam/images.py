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

import cv2
import numpy as np

from .decode import load_image, to_rgb  # noqa: F401 - decoding lives in decode.py, re-exported
from .errors import OnnxcamError
from .labels import load_labels  # noqa: F401 - moved to onnxcam.labels; importable from here as before


#: Luma weights of R, G, B (ITU-R BT.601, as OpenCV's and PIL's conversion to gray).
LUMA = (0.299, 0.587, 0.114)

#: What :meth:`Preprocess.__call__` takes: one image (H, W, 3) or (H, W), a path, or a sequence
#: (or an (N, H, W, 3) array) of them.
Images = np.ndarray | str | os.PathLike | Sequence[np.ndarray | str | os.PathLike]


@dataclass(frozen=True)
class Preprocess:
    """How pixels become model input: ``(x / scale - mean) / std``, then order and layout.

    ``channels`` is the model's channel count: 3 takes the RGB image (in ``channel_order``), 1
    its luma ``0.299 R + 0.587 G + 0.114 B`` normalized with the same weighting of the
    per-channel ``mean`` and ``std`` (equal values, as ``--mean 0.5``, stay what they are)."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 255.0
    channel_order: str = "RGB"
    layout: str = "NCHW"
    size: tuple[int, int] | None = None  # (H, W)
    channels: int = 3

    def __post_init__(self) -> None:
        check_normalization(self.mean, self.std, self.scale)
        if self.channels not in (1, 3):
            raise OnnxcamError(f"the model takes {self.channels} input channels; onnxcam feeds images as "
                               "1 (gray) or 3 (RGB) channels")

    def __call__(self, images: Images) -> np.ndarray:
        """A float32 batch from RGB images (H, W, 3) in [0, 255] (gray (H, W) too), image
        files, or a sequence of them."""
        if self.size is None:
            raise OnnxcamError("the model's input size is dynamic: give its size, "
                               "Explainer(input_size=(H, W)) or preprocess(size=(H, W)) (CLI: --size H W)")
        pictures = _as_images(images)
        height, width = self.size
        mean, std = self._per_channel(self.mean), self._per_channel(self.std)
        batch = []
        for image in pictures:
            # Shrinking averages pixels (like torchvision's antialiased resize); bilinear would
            # alias thin structures away. Enlarging interpolates bilinearly.
            shrinking = image.shape[0] > height or image.shape[1] > width
            resized = cv2.resize(image.astype(np.float32), (width, height),
                                 interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
            if self.channels == 1:
                resized = resized @ np.asarray(LUMA, np.float32)[:, None]
            elif self.channel_order == "BGR":
                resized = resized[..., ::-1]
            normalized = (resized / self.scale - mean) / std
            batch.append(normalized.transpose(2, 0, 1) if self.layout == "NCHW" else normalized)
        return np.ascontiguousarray(np.stack(batch), dtype=np.float32)

    def _per_channel(self, values: tuple[float, ...]) -> np.ndarray:
        """Per-channel values in the order the model takes (the luma weighting for 1 channel)."""
        rgb = np.asarray(values, np.float32)
        if self.channels == 1:
            return np.asarray([rgb @ np.asarray(LUMA, np.float32)], np.float32)
        return rgb


def _as_images(images: Images) -> list[np.ndarray]:
    """One image, a path, or a sequence of them -> a list of RGB float32 images."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    elif isinstance(images, np.ndarray) and images.ndim in (2, 3):
        images = [images]
    pictures = [load_image(item) if isinstance(item, (str, os.PathLike)) else _rgb_array(np.asarray(item))
                for item in images]
    if not pictures:
        raise OnnxcamError("no images to preprocess (an empty batch)")
    return pictures


def _rgb_array(image: np.ndarray) -> np.ndarray:
    """An image given as an array: (H, W, 3) RGB as is, (H, W) or (H, W, 1) gray replicated."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise OnnxcamError(f"an image must be an (H, W, 3) RGB or (H, W) gray array in [0, 255], "
                           f"got shape {list(image.shape)}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def check_normalization(mean: Sequence[float], std: Sequence[float], scale: float) -> None:
    """``(x / scale - mean) / std`` must be finite: a zero or non-finite ``std`` or ``scale``,
    or a non-finite ``mean``, is refused (it would feed the model NaN or Inf)."""
    checks = (("mean", mean, lambda v: np.isfinite(v)), ("std", std, lambda v: np.isfinite(v) and v != 0),
              ("scale", [scale], lambda v: np.isfinite(v) and v != 0))
    for name, values, valid in checks:
        bad = [float(v) for v in values if not valid(float(v))]
        if bad:
            need = "finite" if name == "mean" else "finite and non-zero"
            raise OnnxcamError(f"{name} (CLI: --{name}) must be {need}, got {bad[0]:g}: the input would "
                               "be NaN or Inf")


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


def preprocess_to_metadata(preprocess: Preprocess) -> str:
    """The ``onnxcam.preprocess`` metadata value that :func:`preprocess_from_metadata` reads."""
    return json.dumps({"mean": list(preprocess.mean), "std": list(preprocess.std), "scale": preprocess.scale,
                       "channel_order": preprocess.channel_order, "layout": preprocess.layout,
                       "size": list(preprocess.size) if preprocess.size else None})


def make_preprocess(preset: str | None, layout: str, size: tuple[int, int] | None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    scale: float | None = None, declared: Preprocess | None = None,
                    channels: int = 3) -> Preprocess:
    """A preset (or the model's declared normalization) with explicit overrides applied."""
    if preset is not None:
        if preset not in PRESETS:
            raise OnnxcamError(f"unknown preprocessing preset '{preset}': choose one of {', '.join(PRESETS)}")
        base = PRESETS[preset]
    else:
        base = declared or PRESETS["imagenet"]
    changes = dict(layout=layout, size=size or base.size, channels=channels)
    if mean is not None:
        changes["mean"] = _three(mean, "mean")
    if std is not None:
        changes["std"] = _three(std, "std")
    if scale is not None:
        changes["scale"] = float(scale)
    return replace(base, **changes)


def _three(values: Sequence[float], name: str) -> tuple[float, float, float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise OnnxcamError(f"{name} (CLI: --{name}) takes 1 or 3 values, got {len(values)}")
    return tuple(values)  # type: ignore[return-value]


