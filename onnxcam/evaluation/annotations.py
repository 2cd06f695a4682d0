"""Ground truth for evaluation: objects (label, box) and optional masks per image.

Three formats are read, chosen by the file:

* **onnxcam JSON** (the format of ``../shared/data/annotated/annotations.json``): a JSON list,
  one entry per image::

      [{"image": "2011_000003.jpg",                 # path relative to the JSON file's folder
        "objects": [{"label": "person",             # dataset label
                     "box_xyxy": [191, 107, 313, 329]}],   # optional; pixels, x2/y2 exclusive
        "mask": "masks/2011_000003_class.png",      # optional: object mask (PNG/BMP, image size)
        "mask_object": [15],                        # optional: mask values that are object
        "mask_note": "0=background, 255=void, ..."  # optional free text, see below
        }, ...]

  Other keys (``source``...) are kept and ignored. Which mask values are the object:
  ``mask_object`` when given; otherwise ``value=meaning`` pairs in ``mask_note`` (else in
  ``source``): values meaning background are background, values meaning void/border/ignore are
  neither, any other named value is object (``"0=pet,1=background,2=border"`` -> object 0);
  with no such pairs, 0 is background, 255 is void and every other value is object (VOC); a
  note that starts with "same" takes the previous entry's values.
  Entries whose objects have no box use the mask's bounding box per connected region for
  box metrics. Colour masks (OpenCV decodes VOC's palette PNGs to colours) are mapped back
  to class indices through the VOC palette.
* **PASCAL VOC XML** (also ImageNet's localization XML, the same schema): one
  ``<annotation>`` file per image, or a folder of them; ``<filename>``, ``<object><name>``,
  ``<bndbox>`` with 1-based inclusive ``xmin..xmax`` (box ``(xmin - 1, ymin - 1, xmax, ymax)``).
* **COCO JSON** (a dict with ``images``, ``annotations``, ``categories``): ``bbox`` is
  ``[x, y, w, h]`` -> ``(x, y, x + w, y + h)``; label = the category's name.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..errors import OnnxcamError

Box = tuple[float, float, float, float]

_BACKGROUND = {"background", "bg", "backdrop"}
_IGNORE = {"void", "border", "ignore", "unknown", "boundary"}


@dataclass
class GroundTruthObject:
    label: str
    box: Box | None = None


@dataclass
class Annotation:
    """One image's ground truth. ``mask_object``: mask values that are object (None: the
    default rule, every value but 0 and 255); ``mask_ignore`` values are neither."""

    image: Path
    objects: list[GroundTruthObject]
    mask: Path | None = None
    mask_object: tuple[int, ...] | None = None
    mask_ignore: tuple[int, ...] = (255,)
    mask_background: tuple[int, ...] = (0,)
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(o.label for o in self.objects))

    def boxes(self, labels: Sequence[str] | None = None) -> list[Box]:
        """Boxes of the objects (of ``labels`` only, when given)."""
        return [o.box for o in self.objects if o.box is not None and (labels is None or o.label in labels)]

    def object_mask(self) -> np.ndarray | None:
        """Boolean (H, W) object pixels of the mask, or None without a mask."""
        if self.mask is None:
            return None
        raw = cv2.imread(str(self.mask), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise OnnxcamError(f"{self.mask}: mask cannot be read (for image {self.image.name}); "
                               "give a PNG/BMP of class values")
        if raw.ndim == 3:  # OpenCV expands palette PNGs (VOC) to colours: back to class indices
            raw = voc_indices(raw)
        if self.mask_object is not None:
            return np.isin(raw, self.mask_object)
        return ~np.isin(raw, self.mask_background + self.mask_ignore)


def voc_palette() -> np.ndarray:
    """(256, 3) RGB colours of PASCAL VOC's class-index palette (the devkit's ``labelcolormap``)."""
    colours = np.zeros((256, 3), np.int64)
    for index in range(256):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (red, green, blue)
    return colours


def voc_indices(bgr: np.ndarray) -> np.ndarray:
    """Class indices of a colour mask drawn with the VOC palette (BGR as OpenCV reads it);
    colours outside the palette become 1 (object)."""
    rgb = bgr[..., 2::-1].astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    palette = voc_palette()
    lookup = dict(zip(((palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]).tolist(), range(256)))
    unique, inverse = np.unique(codes, return_inverse=True)
    return np.array([lookup.get(int(c), 1) for c in unique], np.uint8)[inverse].reshape(codes.shape)


def mask_boxes(mask: np.ndarray) -> list[Box]:
    """Bounding boxes of the 8-connected regions of a boolean mask."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [(float(x), float(y), float(x + w), float(y + h)) for x, y, w, h, _ in stats[1:count]]


def load_annotations(path: str | os.PathLike) -> list[Annotation]:
    """Annotations from an onnxcam JSON, a COCO JSON, a VOC/ImageNet XML, or a folder of XMLs."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.xml"))
        if not files:
            raise OnnxcamError(f"{path}: folder holds no VOC .xml annotation files")
        return [read_voc(f) for f in files]
    if not path.is_file():
        raise OnnxcamError(f"{path}: no such annotations file")
    if path.suffix.lower() == ".xml":
        return [read_voc(path)]
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxcamError(f"{path}: not a JSON or VOC XML annotations file ({exc})") from None
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return read_coco(data, path)
    if isinstance(data, list):
        return read_onnxcam(data, path)
    raise OnnxcamError(f"{path}: JSON is neither an onnxcam list of images nor COCO "
                       "(a dict with 'images', 'annotations', 'categories')")


def read_onnxcam(entries: list, path: Path) -> list[Annotation]:
    """The onnxcam JSON format (see the module docstring)."""
    root = path.parent
    found = []
    for number, entry in enumerate(entries):
        where = f"{path}: entry {number}"
        if not isinstance(entry, dict) or "image" not in entry:
            raise OnnxcamError(f"{where}: every entry needs an 'image' (and 'objects')")
        objects = []
        for item in entry.get("objects", []):
            box = item.get("box_xyxy")
            if box is not None:
                box = _check_box(box, f"{where} ({entry['image']})")
            objects.append(GroundTruthObject(str(item.get("label", "")), box))
        annotation = Annotation(root / entry["image"], objects,
                                mask=root / entry["mask"] if entry.get("mask") else None,
                                extra={k: v for k, v in entry.items() if k not in ("image", "objects", "mask")})
        note = entry.get("mask_note") or entry.get("source") or ""
        if "mask_object" in entry:
            annotation.mask_object = tuple(int(v) for v in entry["mask_object"])
        elif note.lower().startswith("same") and found:  # "same, 256x256": the previous entry's values
            previous = found[-1]
            annotation.mask_object, annotation.mask_ignore, annotation.mask_background = (
                previous.mask_object, previous.mask_ignore, previous.mask_background)
        else:
            _apply_note(annotation, note)
        found.append(annotation)
    return found


def _apply_note(annotation: Annotation, note: str) -> None:
    """Mask values from ``value=meaning`` pairs in free text (see the module docstring)."""
    pairs = [(int(v), m.lower()) for v, m in re.findall(r"\b(\d+)\s*=\s*([A-Za-z]+)", note)]
    if not pairs:
        return
    annotation.mask_background = tuple(v for v, m in pairs if m in _BACKGROUND)
    annotation.mask_ignore = tuple(v for v, m in pairs if m in _IGNORE) or annotation.mask_ignore
    objects = tuple(v for v, m in pairs if m not in _BACKGROUND and m not in _IGNORE)
    annotation.mask_object = objects or None


def _check_box(box, where: str) -> Box:
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise OnnxcamError(f"{where}: box_xyxy must be 4 numbers [x1, y1, x2, y2], got {box!r}") from None
    if x2 <= x1 or y2 <= y1:
        raise OnnxcamError(f"{where}: box_xyxy {list(box)} is empty (need x2 > x1 and y2 > y1)")
    return (x1, y1, x2, y2)


def read_voc(path: Path) -> Annotation:
    """One PASCAL VOC (or ImageNet localization) XML file."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise OnnxcamError(f"{path}: not a readable VOC XML file ({exc})") from None
    filename = root.findtext("filename")
    if not filename:
        raise OnnxcamError(f"{path}: VOC annotation has no <filename>")
    if not Path(filename).suffix:  # ImageNet's XML names the image without its extension
        filename += ".JPEG"
    objects = []
    for item in root.iter("object"):
        box = item.find("bndbox")
        parsed = None
        if box is not None:
            try:
                x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise OnnxcamError(f"{path}: <bndbox> needs numeric xmin, ymin, xmax, ymax") from None
            parsed = _check_box((x1 - 1, y1 - 1, x2, y2), str(path))
        objects.append(GroundTruthObject(item.findtext("name") or "", parsed))
    return Annotation(path.parent / filename, objects)


def read_coco(data: dict, path: Path) -> list[Annotation]:
    """A COCO instances JSON: images resolved relative to the JSON's folder."""
    names = {c["id"]: c.get("name", str(c["id"])) for c in data.get("categories", [])}
    by_image: dict = {image["id"]: [] for image in data["images"]}
    for item in data["annotations"]:
        if item.get("image_id") not in by_image or "bbox" not in item:
            continue
        x, y, w, h = (float(v) for v in item["bbox"])
        if w <= 0 or h <= 0:
            continue
        label = names.get(item.get("category_id"), str(item.get("category_id")))
        by_image[item["image_id"]].append(GroundTruthObject(label, (x, y, x + w, y + h)))
    return [Annotation(path.parent / image["file_name"], by_image[image["id"]]) for image in data["images"]]


def match_images(annotations: list[Annotation], images: Sequence[str | os.PathLike]) -> list[Annotation]:
    """The annotations of the images given: files (each must be annotated, matched by file
    name) or one folder (every annotated image found in it). Image paths are the given ones."""
    by_name: dict[str, Annotation] = {}
    for annotation in annotations:
        by_name.setdefault(annotation.image.name, annotation)
    paths = [Path(p) for p in images]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        chosen = [_at(a, folder / a.image.name) for a in annotations if (folder / a.image.name).is_file()]
        if not chosen:
            raise OnnxcamError(f"{folder}: none of the {len(annotations)} annotated images is in this folder")
        return chosen
    chosen = []
    for path in paths:
        if path.name not in by_name:
            raise OnnxcamError(f"{path}: no annotation for this image (matched by file name)")
        chosen.append(_at(by_name[path.name], path))
    return chosen


def _at(annotation: Annotation, image: Path) -> Annotation:
    from dataclasses import replace
    return replace(annotation, image=image)


def load_label_map(path: str | os.PathLike, model_labels: Sequence[str] | None) -> dict[str, list[int]]:
    """A mapping file: JSON ``{"dataset label": class}`` where a class is a model class index,
    a model label, or a list of them (e.g. ``{"dog": ["Samoyed", 207]}``)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxcamError(f"{path}: label mapping must be JSON {{\"dataset label\": class}} ({exc})") from None
    if not isinstance(raw, dict):
        raise OnnxcamError(f"{path}: label mapping must be a JSON object {{\"dataset label\": class}}")
    lowered = {l.lower(): i for i, l in enumerate(model_labels or [])}
    mapping: dict[str, list[int]] = {}
    for key, value in raw.items():
        classes = []
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int):
                classes.append(item)
            elif isinstance(item, str) and item.lower() in lowered:
                classes.append(lowered[item.lower()])
            else:
                raise OnnxcamError(f"{path}: '{key}' maps to {item!r}, which is neither a class index "
                                   "nor one of the model's labels (give --labels FILE)")
        mapping[str(key)] = classes
    return mapping
