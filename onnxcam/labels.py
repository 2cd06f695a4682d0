"""Class names: labels files in, names given by the user (``-t "tabby cat"``) -> class indices.

Labels files come in a few formats, all mapping class index i to a name:

* text, one label per line (line i = class i; blank lines keep their place);
* a JSON list ``["tench", "goldfish", ...]``;
* a JSON object from class index to a name or to ``[id, name]`` (Keras'
  ``imagenet_class_index.json``: ``{"0": ["n01440764", "tench"]}``), or a Hugging Face config
  holding ``id2label``.

A line may list synonyms separated by commas (ImageNet: ``"tabby, tabby cat"``); a name matches
a class when it equals any of them. Matching never guesses silently: a name that names several
classes, or matches only as part of a label, is an error listing the candidates with their
indices, except a partial match to exactly one class, which is taken and reported
(:class:`Match` ``.note``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import OnnxcamError, OnnxcamWarning, TargetError


class LabelsError(OnnxcamError):
    """A labels file cannot be read or does not fit the model."""


#: File signatures of formats that are certainly not a labels file (an image passed by mistake).
_SIGNATURES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
               b"BM": "a BMP image", b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image",
               b"RIFF": "a RIFF file (WebP image?)", b"PK\x03\x04": "a zip archive",
               b"\x93NUMPY": "a numpy .npy file", b"\x08": "an ONNX model"}


def load_labels(path: str | os.PathLike, classes: int | None = None) -> list[str]:
    """The labels in ``path`` (see the module docstring for the formats), label i naming class i.

    With ``classes`` (the model's class count), a file of another length is reported with an
    :class:`~onnxcam.errors.OnnxcamWarning` (the CLI refuses it, :func:`check_labels`)."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"{path}: no such labels file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text, bad = None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
    if text is None or "\x00" in text:
        kind = next((k for s, k in _SIGNATURES.items() if raw.startswith(s)), None)
        if kind is not None or text is not None:
            raise LabelsError(f"{path}: not a labels file (it looks like {kind or 'binary data'}); give a "
                              "text file with one label per line, or a JSON list or object")
        raise LabelsError(f"{path}: {bad}; save the labels file as UTF-8")
    labels = _parse(text, path)
    if classes is not None:
        problem = count_problem(labels, classes, str(path))
        if problem:
            warnings.warn(problem, OnnxcamWarning, stacklevel=2)
    return labels


def _parse(text: str, path: Path) -> list[str]:
    first = text.lstrip()[:1]
    if first in ("[", "{"):
        try:
            return _from_json(json.loads(text), path)
        except json.JSONDecodeError as exc:
            if first == "{":  # a label line never starts so: a broken JSON object
                raise LabelsError(f"{path}: looks like JSON but does not parse ({exc.msg}, line "
                                  f"{exc.lineno})") from None
            # "[unused0]"-style first label: a text file after all
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise LabelsError(f"{path}: the labels file is empty")
    return labels


def _from_json(data, path: Path) -> list[str]:
    """A JSON list of names, or an object index -> name / [id, name] (also under ``id2label``),
    or name -> index (``label2id``)."""
    if isinstance(data, dict) and isinstance(data.get("id2label"), dict):
        data = data["id2label"]
    if isinstance(data, list) and all(isinstance(v, str) for v in data):
        return list(data)
    if isinstance(data, dict) and data:
        if (all(isinstance(v, int) and not isinstance(v, bool) for v in data.values())
                and not any(str(k).isdigit() for k in data)):
            data = {str(v): k for k, v in data.items()}  # label2id: name -> index
        if all(str(k).lstrip("-").isdigit() for k in data):
            indexed = {int(k): _name(v) for k, v in data.items()}
            if None not in indexed.values() and min(indexed) >= 0:
                labels = [""] * (max(indexed) + 1)  # missing indices stay empty: none shifts
                for index, name in indexed.items():
                    labels[index] = name
                return labels
    raise LabelsError(f"{path}: labels format not understood; onnxcam reads one label per line, a JSON "
                      'list of names, or a JSON object from class index to a name or [id, name] '
                      '(Keras: {"0": ["n01440764", "tench"]})')


def _name(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[-1]  # Keras: [wordnet id, name]
    return None


def count_problem(labels: Sequence[str], classes: int, source: str) -> str | None:
    """Why ``labels`` do not fit a ``classes``-way model (None when they do)."""
    if len(labels) == classes:
        return None
    message = f"{source}: {len(labels)} labels for a model with {classes} classes"
    if len(labels) == classes - 1:
        message += (" (1001-class models such as TF's have 'background' as class 0: "
                    "add it as the first label)")
    elif len(labels) == classes + 1 and labels[0].strip().lower() == "background":
        message += " (the first label, 'background', belongs to 1001-class models: remove it)"
    return message


def check_labels(labels: list[str] | None, classes: int | None, source: str,
                 explicit: bool) -> list[str] | None:
    """``labels`` when they fit the model. A mismatch is an error for labels the user gave
    (``explicit``), else a warning and no labels (names that may be shifted are worse than none)."""
    if labels is None or classes is None:
        return labels
    problem = count_problem(labels, classes, source)
    if problem is None:
        return labels
    if explicit:
        raise LabelsError(f"{problem}; give the labels file of this model")
    warnings.warn(f"{problem}; class names are not shown", OnnxcamWarning, stacklevel=2)
    return None


# -- names -> classes ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Match:
    """A name resolved to a class; ``note`` says how when it was not an exact match."""

    index: int
    note: str | None = None


def synonyms(label: str) -> list[str]:
    """The names a label line lists: ``"tabby, tabby cat"`` -> ``["tabby", "tabby cat"]``."""
    return [part.strip() for part in label.split(",") if part.strip()]


def _describe(indices: Sequence[int], labels: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(f"{i} ({labels[i]})" for i in indices[:limit])
    return shown + (f", ... ({len(indices) - limit} more)" if len(indices) > limit else "")


def match_label(name: str, labels: Sequence[str]) -> Match:
    """The class ``name`` designates.

    In order: the whole label (exact, then case-insensitive), then one of its synonyms
    (case-insensitive); the first rule that matches decides, and must designate one class.
    Failing those, a partial match (a prefix of a synonym, or a part of a label) is taken only
    when it designates one class, with a note; several are an error listing them, whole-word
    matches first (``cat``: tabby cat, Siamese cat, ... before catamaran), with indices."""
    wanted = " ".join(name.split()).lower()
    lowered = [" ".join(label.split()).lower() for label in labels]
    for rule in (lambda i: labels[i] == name, lambda i: lowered[i] == wanted,
                 lambda i: wanted in (s.lower() for s in synonyms(labels[i]))):
        hits = [i for i in range(len(labels)) if rule(i)]
        if len(hits) > 1:
            raise TargetError(f"target '{name}' names {len(hits)} classes: {_describe(hits, labels)}; "
                              "give the class index instead")
        if hits:
            return Match(hits[0])
    word = re.compile(rf"\b{re.escape(wanted)}\b")
    ranks = {i: 0 if word.search(lowered[i]) else 1 if any(s.lower().startswith(wanted) for s in synonyms(labels[i]))
             else 2 for i in range(len(labels)) if wanted and wanted in lowered[i]}
    hits = sorted(ranks, key=lambda i: (ranks[i], i))
    if len(hits) == 1:
        return Match(hits[0], f"target '{name}' is part of one label only, class {hits[0]} ({labels[hits[0]]}): "
                              "explaining it")
    if hits:
        raise TargetError(f"target '{name}' is no label but part of {len(hits)}: {_describe(hits, labels)}; "
                          "give the class index or the full label")
    raise TargetError(f"target '{name}' matches no label ({len(labels)} classes); give a class index or a "
                      "label as written in the labels file")


def resolve_name(text: str, labels: Sequence[str] | None) -> Match:
    """A class index (``"281"``) or a label name (:func:`match_label`)."""
    if text.strip().lstrip("-").isdigit():
        return Match(int(text))
    if not labels:
        raise TargetError(f"target '{text}' is not a class index and no labels are known "
                          "(give the labels: CLI --labels FILE)")
    return match_label(text, labels)


def split_names(texts: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """``-t`` values, repeated or comma-separated (``-t 3,7,9``); a value equal to a whole label
    line (``"tabby, tabby cat"``) is never split at its commas."""
    lowered = {" ".join(label.split()).lower() for label in labels or ()}
    parts: list[str] = []
    for text in texts:
        whole = " ".join(text.split()).lower() in lowered
        parts += [p.strip() for p in ([text] if whole else text.split(",")) if p.strip()]
    return parts
