"""Explain many images: folders walked, decoded, explained and written batch by batch.

The CLI's ``explain`` (and :mod:`onnxcam.distributed` on Ray) run through here:

    find_images -> Worker.check (one blank image: model, method and target errors first)
    -> prepare_outdir (writable, before any image is read) -> Journal (what is done already)
    -> per batch: decode (thread pool, ahead of the model) -> Explainer.explain (the model)
       -> overlays, PNG encoding, atomic writes (thread pool, behind the model)
       -> one line per image appended to results.jsonl once its files exist.

Memory is bounded by the batch: at most two batches are decoded ahead and at most two
batches' images wait to be written, whatever the number of images. OpenCV's decode, resize
and PNG encoder and onnxruntime release the GIL, so the pools overlap with the model.

Outputs mirror the inputs' paths relative to their common folder (:func:`output_names`), so
``a/x.jpg`` and ``b/x.jpg`` never share a file. A rerun skips the images ``results.jsonl``
records as done whose files still exist; an image that fails (unreadable, refused by the
model) is recorded with its error and the run goes on.
"""

from __future__ import annotations

import glob as globbing
import json
import math
import os
import posixpath
import signal
import tempfile
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from . import dense
from .errors import OnnxcamError, OnnxcamWarning, TargetError
from .explainer import ChannelImportance, Explainer, Explanation
from .files import atomic_write, atomic_write_bytes
from .images import Preprocess, load_image
from .visualize import bounded, encode_png, overlay, resize_map, to_uint8

#: File name endings OpenCV decodes; other files found in a folder are skipped (and counted).
IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .jp2 .png .bmp .dib .tif .tiff .webp .avif .pbm .pgm .ppm .pxm .pnm .pfm "
    ".sr .ras .exr .hdr .pic".split())
JOURNAL = "results.jsonl"
SUMMARY = "results.json"
GRID_TILE = 128  # side of one tile of the --channels grid


# -- which images, under which names ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Item:
    """One input image: ``path`` as found, ``key`` its path relative to the inputs' common
    folder (what results.jsonl records), ``name`` its outputs' base name under the output folder."""

    path: str
    key: str
    name: str


@dataclass
class Inputs:
    items: list[Item]
    ignored: list[str] = field(default_factory=list)  # files in folders that are not images


def find_images(arguments: Sequence[str | os.PathLike], pattern: str | None = None,
                exclude: str | os.PathLike | None = None) -> Inputs:
    """Image files from files, folders (walked recursively, in sorted order) and glob patterns
    (``photos/**/*.jpg``). ``pattern`` keeps only the folders' files whose name or relative
    path matches it; ``exclude`` (the output folder) is never walked."""
    found: list[tuple[str, str]] = []  # (root, path)
    ignored: list[str] = []
    skip = os.path.abspath(exclude) if exclude is not None else None
    for argument in arguments:
        text = os.fspath(argument)
        if os.path.isdir(text):
            for path in _walk(text, skip):
                relative = os.path.relpath(path, text).replace(os.sep, "/")
                if pattern and not (fnmatch(os.path.basename(path), pattern) or fnmatch(relative, pattern)):
                    continue
                if Path(path).suffix.lower() in IMAGE_SUFFIXES:
                    found.append((text, path))
                else:
                    ignored.append(path)
        elif os.path.isfile(text):
            found.append((os.path.dirname(text) or ".", text))
        elif globbing.has_magic(text):
            matches = sorted(p for p in globbing.glob(text, recursive=True) if os.path.isfile(p))
            if not matches:
                raise OnnxcamError(f"{text}: no image file matches this pattern")
            found += [(_glob_root(text), p) for p in matches]
        else:
            raise OnnxcamError(f"{text}: no such image file or folder")
    unique: dict[str, tuple[str, str]] = {}
    for root, path in found:
        unique.setdefault(os.path.abspath(path), (os.path.abspath(root), path))
    if not unique:
        return Inputs([], ignored)
    keys = _relative_keys({absolute: root for absolute, (root, _) in unique.items()})
    names = output_names(keys.values())
    return Inputs([Item(path, keys[absolute], names[keys[absolute]]) for absolute, (_, path) in unique.items()],
                  ignored)


def _walk(folder: str, skip: str | None) -> Iterator[str]:
    for current, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders
                            if not f.startswith(".") and os.path.abspath(os.path.join(current, f)) != skip)
        for name in sorted(files):
            if not name.startswith("."):  # hidden files (.DS_Store, temporary files) are not inputs
                yield os.path.join(current, name)


def _glob_root(pattern: str) -> str:
    """The folder of a glob pattern before its first wildcard component."""
    parts = Path(pattern).parts
    fixed = parts[:next(i for i, p in enumerate(parts) if globbing.has_magic(p))]
    return os.path.join(*fixed) if fixed else "."


def _relative_keys(roots: dict[str, str]) -> dict[str, str]:
    """Each file's path relative to the common folder of every input's root, '/'-separated."""
    try:
        common = os.path.commonpath(list(roots.values()))
    except ValueError:  # different drives: keep whole paths, without their anchors
        return {path: PurePosixPath(*Path(path).parts[1:]).as_posix() for path in roots}
    return {path: os.path.relpath(path, common).replace(os.sep, "/") for path in roots}


def output_names(keys: Iterable[str]) -> dict[str, str]:
    """Output base names (without ``.<method>.png``) for relative input paths: the same
    folders, and the file's stem, unless another input in that folder has the same stem or is
    named like it, then the whole file name: ``a/x.jpg`` -> ``a/x``; ``a/x.bmp``, ``a/x.jpg``,
    ``a/x-2.bmp`` -> ``a/x.bmp``, ``a/x.jpg``, ``a/x-2``.

    Distinct inputs get distinct names: stems used are unique in their folder and are no
    input's whole name there, whole names are distinct. A name depends only on the inputs in
    its own folder, never on their order."""
    by_folder: dict[str, list[str]] = {}
    for key in keys:
        folder, name = posixpath.split(key)
        by_folder.setdefault(folder, []).append(name)
    names: dict[str, str] = {}
    for folder, files in by_folder.items():
        stems = Counter(PurePosixPath(f).stem for f in files)
        whole = set(files)
        for file in files:
            stem = PurePosixPath(file).stem
            base = stem if stems[stem] == 1 and stem not in whole else file
            names[posixpath.join(folder, file)] = posixpath.join(folder, base)
    return names


# -- what to do with each image -------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What is explained and written per image. ``targets`` and ``options`` are
    :meth:`Explainer.explain`'s (they apply to every batch); ``channels`` adds the K most and
    least important channels; ``overlay_size`` bounds the overlays' longer side (None: the
    image's own size); ``npy`` also writes the map at the image's size."""

    method: str = "gradcam"
    targets: Any = None
    options: dict = field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    npy: bool = False
    channels: int | None = None
    overlay_size: int | None = None
    #: segmentation / detection outputs (onnxcam.dense): the region and anchor of the targets
    region: str | None = None
    anchor: int | None = None
    box_values: int = 4
    #: ``--boxes``: each map's weakly supervised box and pseudo-mask, binarized at this
    #: fraction of its max (onnxcam.evaluation.localization); None: none
    box_threshold: float | None = None


@dataclass
class Decoded:
    item: Item
    x: np.ndarray  # the preprocessed image, model layout, no batch axis
    picture: np.ndarray  # RGB uint8, already bounded to the overlay size
    size: tuple[int, int]  # the image's own (H, W)


@dataclass
class Explained:
    decoded: Decoded
    result: Explanation
    importance: ChannelImportance | None
    index: int
    seconds: float


class Worker:
    """Decodes, explains and writes images with one explainer (its onnxruntime sessions).
    Every step is a plain method so a local pipeline and a Ray actor schedule the same code."""

    def __init__(self, explainer: Explainer, preprocess: Preprocess, settings: Settings, outdir: str | os.PathLike):
        self.explainer, self.preprocess, self.settings = explainer, preprocess, settings
        self.outdir = Path(outdir)

    def check(self) -> None:
        """One blank image through the whole path (preprocessing, rewrite, sessions, method,
        targets, channels): problems that would fail every image are raised before any is read."""
        x = self.preprocess([np.zeros((8, 8, 3), np.float32)])
        with warnings.catch_warnings():  # what a blank image's map looks like is no news
            warnings.simplefilter("ignore", OnnxcamWarning)
            self._run(x, [(8, 8)])

    def decode(self, item: Item) -> Decoded | dict:
        """The image read and preprocessed, or its failure record (see :func:`failure`)."""
        try:
            picture = load_image(item.path)
            x = self.preprocess([picture])[0]
        except Exception as exc:  # noqa: BLE001 - an unreadable image is recorded, the run goes on
            return failure(item, self.settings.method, exc)
        size = picture.shape[:2]
        return Decoded(item, x, to_uint8(bounded(picture, self.settings.overlay_size)), size)

    def process(self, items: Sequence[Item], pool: ThreadPoolExecutor | None = None) -> list[dict]:
        """One batch from files to records, decoding and writing in ``pool`` (a Ray actor's
        whole job per batch; the local pipeline overlaps these steps across batches instead)."""
        mapper = pool.map if pool is not None else map
        decoded = list(mapper(self.decode, items))
        records = [d for d in decoded if isinstance(d, dict)]
        outcomes = self.explain([d for d in decoded if not isinstance(d, dict)])
        records += [o for o in outcomes if isinstance(o, dict)]
        return records + list(mapper(self.write, [o for o in outcomes if not isinstance(o, dict)]))

    def explain(self, batch: list[Decoded]) -> list[Explained | dict]:
        """The batch explained in one call; when that fails, image by image, so one bad image
        becomes one failure record (see :func:`failure`) and the others are explained."""
        if not batch:
            return []
        started = time.perf_counter()
        try:
            result, importance = self._run(np.stack([d.x for d in batch]), [d.size for d in batch])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            if len(batch) == 1:
                return [failure(batch[0].item, self.settings.method, exc)]
            return [outcome for decoded in batch for outcome in self.explain([decoded])]
        seconds = (time.perf_counter() - started) / len(batch)
        return [Explained(d, result, importance, i, seconds) for i, d in enumerate(batch)]

    def _run(self, x: np.ndarray, sizes: list[tuple[int, int]]) -> tuple[Explanation, ChannelImportance | None]:
        s = self.settings
        targets = self._targets(sizes)
        result = self.explainer.explain(x, method=s.method, targets=targets, **s.options)
        importance = (self.explainer.channels(x, s.method, targets, k=s.channels, **s.options)
                      if s.channels else None)
        return result, importance

    def _targets(self, sizes: list[tuple[int, int]]) -> Any:
        """The settings' targets, or per image for a segmentation region or a detection anchor
        (a box in image pixels and a mask are scaled to each image: :func:`dense.image_targets`)."""
        s, output = self.settings, self.explainer.dense
        if output is None:
            if s.region is not None or s.anchor is not None:
                raise TargetError(f"--region and --anchor explain segmentation and detection outputs; "
                                  f"'{self.explainer.logits_name}' holds class scores")
            return s.targets
        if isinstance(s.targets, np.ndarray) or (s.region is None and s.anchor is None and s.box_values == 4):
            return s.targets  # classes (or a seed file) go to the explainer as they are
        return dense.image_targets(output, s.targets, dense.parse_region(s.region), s.anchor, s.box_values, sizes)

    def write(self, done: Explained) -> dict:
        """The image's files (overlays, maps, channel grid) written atomically, then its record;
        a failure record when writing fails."""
        try:
            files, record = self.render(done)
            for name, data in files.items():
                target = self.outdir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(target, data)
        except Exception as exc:  # noqa: BLE001 - a full disk fails this image, not the run
            return failure(done.decoded.item, self.settings.method, exc)
        return record

    def render(self, done: Explained) -> tuple[dict[str, bytes], dict]:
        """Files (name -> bytes) and the results record of one explained image."""
        s, item, result, index = self.settings, done.decoded.item, done.result, done.index
        files: dict[str, bytes] = {}
        targets = []
        classes = result.targets[index].reshape(-1)
        dense_output = self.explainer.dense
        # a map from non-finite outputs would be garbage: none is written, the record says why
        error = None if result.finite[index] else "the model's outputs are NaN or Inf for this image"
        for slot, cls in enumerate(classes):
            cls = int(cls)
            name = (f"{item.name}.{s.method}" if len(classes) == 1
                    else f"{item.name}.{s.method}.{cls if cls >= 0 else f'seed{slot}'}")
            small = result.per_target[index, slot]
            full = None
            if error is None:
                files[f"{name}.png"] = encode_png(overlay(done.decoded.picture, small))
                if s.npy or s.box_threshold is not None:  # both in the image's own pixels
                    full = resize_map(small, done.decoded.size)
                if s.npy:
                    files[f"{name}.npy"] = _npy_bytes(full)
            targets.append({
                "target": cls,
                "label": s.labels[cls] if s.labels and 0 <= cls < len(s.labels) else None,
                "probability": (_finite(result.probabilities[index, cls])
                                if cls >= 0 and dense_output is None else None),
                "overlay": f"{name}.png" if error is None else None,
            })
            if dense_output is not None:
                targets[-1].update(dense.describe(dense_output, result.logits[index], result.seeds[index, slot]))
            if full is not None and s.box_threshold is not None:  # --boxes: box + pseudo-mask PNG
                from .evaluation.localization import box_outputs
                box, mask = box_outputs(full, s.box_threshold, name)
                targets[-1].update(box)
                files.update(mask)
        record = {"file": item.path, "input": item.key, "target": targets[0]["target"],
                  "label": targets[0]["label"], "probability": targets[0]["probability"],
                  "targets": targets, "layer": result.layer, "method": s.method,
                  "provider": result.provider, "seconds": round(done.seconds, 4)}
        if error is not None:
            record["error"] = error
        elif done.importance is not None:
            grids, record["channels"] = _channels(done.importance, index, done.decoded.picture, item.name)
            files.update(grids)
        record["files"] = list(files)
        return files, record


def failure(item: Item, method: str, exc: BaseException) -> dict:
    """The results record of an image that could not be explained: its error in one line."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else type(exc).__name__
    if not isinstance(exc, OnnxcamError):
        message = f"{type(exc).__name__}: {message}"
    return {"file": item.path, "input": item.key, "method": method, "error": message}


def _channels(importance: ChannelImportance, index: int, picture: np.ndarray,
              name: str) -> tuple[dict[str, bytes], dict | list[dict]]:
    """The K most and least important channels of one image for each explained target: a grid
    image per target (top row: most important, bottom row: least; tiles drawn at tile size) and
    the channels' indices and weights, each record naming its target; a list of them when the
    image has several targets."""
    import cv2
    multi = importance.targets.ndim == 2
    classes = importance.targets[index].reshape(-1)
    tile = cv2.resize(picture, (GRID_TILE, GRID_TILE), interpolation=cv2.INTER_AREA)
    files: dict[str, bytes] = {}
    records = []
    for slot, cls in enumerate(int(c) for c in classes):
        pick = (lambda a: a[index, slot]) if multi else (lambda a: a[index])
        rows = [np.concatenate([overlay(tile, m) for m in pick(maps)], axis=1)
                for maps in (importance.most_maps, importance.least_maps)]
        which = f".{cls if cls >= 0 else f'seed{slot}'}" if multi else ""
        grid = f"{name}.{importance.method}{which}.channels.png"
        files[grid] = encode_png(np.concatenate(rows, axis=0))
        records.append({"target": cls, "layer": importance.layer, "grid": grid,
                        "most": [int(c) for c in pick(importance.most)],
                        "most_weights": [_finite(w) for w in pick(importance.most_weights)],
                        "least": [int(c) for c in pick(importance.least)],
                        "least_weights": [_finite(w) for w in pick(importance.least_weights)]})
    return files, (records if multi else records[0])


def _finite(value: Any) -> float | None:
    """A JSON-safe number: NaN and infinities (non-finite logits) become null."""
    value = float(value)
    return value if math.isfinite(value) else None


def _npy_bytes(array: np.ndarray) -> bytes:
    import io
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return buffer.getvalue()


# -- the output folder and its journal ----------------------------------------------------------
def check_outdir(outdir: str | os.PathLike) -> None:
    """onnxcam's one-line error unless ``outdir`` is a folder that can be written, or can be
    created in one (a probe file is written and removed); creates nothing."""
    outdir = Path(outdir)
    existing = next(p for p in (outdir, *outdir.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "exists" if existing == outdir else f"lies under {existing}, which exists"
        raise OnnxcamError(f"{outdir}: {where} and is not a folder; give -o a folder (new or existing)")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".onnxcam-probe."):
            pass
    except OSError as exc:
        raise OnnxcamError(f"cannot write to the output folder {outdir}: {exc.strerror or exc}") from None


def prepare_outdir(outdir: str | os.PathLike) -> Path:
    """The output folder, checked (:func:`check_outdir`) and created."""
    check_outdir(outdir)
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxcamError(f"cannot create the output folder {outdir}: {exc.strerror or exc}") from None
    return outdir


class Journal:
    """``results.jsonl``: one JSON record per image and line, appended and flushed once the
    image's files are written, so after any interruption it lists exactly what is complete.
    A torn last line (power loss during the append) is cut off when the journal is opened.
    Records are keyed by (input, method); the last one counts. Only each key's line number
    and files are kept in memory (a few hundred bytes per image): ``results.json`` is written
    by streaming the file."""

    def __init__(self, outdir: str | os.PathLike):
        self.outdir = Path(outdir)
        self.path = self.outdir / JOURNAL
        self.entries: dict[tuple[str, str], tuple[int, str | None]] = {}  # -> (line, files joined by \n)
        self._count = 0
        self._stream = None
        if self.path.exists():
            _cut_torn_line(self.path)
            for record in self.read():
                self._note(record)

    def read(self) -> Iterator[dict]:
        """The file's records in order (lines that are not onnxcam records are skipped)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as stream:
            for line in stream:
                try:
                    record = json.loads(line)
                    if isinstance(record, dict) and isinstance(record.get("input"), str) and "method" in record:
                        yield record
                except ValueError:
                    continue  # a line written by something else: ignored, never fatal

    def _note(self, record: dict) -> None:
        files = None if "error" in record else "\n".join(record.get("files", ()))
        self.entries[(record["input"], record["method"])] = (self._count, files)
        self._count += 1

    def done(self, item: Item, method: str) -> bool:
        """Explained before, and every file its record names is still there."""
        entry = self.entries.get((item.key, method))
        return (entry is not None and entry[1] is not None
                and all((self.outdir / name).is_file() for name in entry[1].split("\n") if name))

    def forget(self, items: Iterable[Item], method: str) -> None:
        """Drop the records of ``items`` (``--overwrite``): the file is rewritten atomically."""
        gone = {(item.key, method) for item in items}
        if not gone & self.entries.keys():
            return
        kept = [r for r in self.read() if (r["input"], r["method"]) not in gone]
        atomic_write_bytes(self.path, b"".join(_line(r) for r in kept))
        self.entries, self._count = {}, 0
        for record in kept:
            self._note(record)

    def append(self, record: dict) -> None:
        if self._stream is None:
            self._stream = open(self.path, "ab")
        self._stream.write(_line(record))
        self._stream.flush()
        self._note(record)

    def sync(self) -> None:
        """Flushed to the disk (once per batch: an fsync per image would cost more than a map)."""
        if self._stream is not None:
            os.fsync(self._stream.fileno())

    def close(self) -> None:
        """Synced, closed, and ``results.json`` (the last record of every image, one JSON
        list) rewritten from the file."""
        if self._stream is not None:
            self.sync()
            self._stream.close()
            self._stream = None
        if not self.entries:
            return
        last = {index for index, _ in self.entries.values()}

        def write(stream) -> None:
            separator = b"[\n"
            for index, record in enumerate(self.read()):
                if index in last:
                    stream.write(separator + json.dumps(record, allow_nan=False).encode())
                    separator = b",\n"
            stream.write(b"\n]\n")
        atomic_write(self.outdir / SUMMARY, write)


def _cut_torn_line(path: Path) -> None:
    """Truncate ``path`` after its last newline (reading backwards, never the whole file)."""
    with open(path, "r+b") as stream:
        position = stream.seek(0, os.SEEK_END)
        if position == 0:
            return
        stream.seek(position - 1)
        if stream.read(1) == b"\n":
            return
        while position > 0:
            step = min(1 << 16, position)
            position -= step
            stream.seek(position)
            cut = stream.read(step).rfind(b"\n")
            if cut >= 0:
                stream.truncate(position + cut + 1)
                return
        stream.truncate(0)


def _line(record: dict) -> bytes:
    return (json.dumps(record, allow_nan=False) + "\n").encode()


# -- running ------------------------------------------------------------------------------------
@dataclass
class Summary:
    """What a run did. ``exit_code``: 0 all explained, 1 some images failed, 130 interrupted."""

    outdir: str
    total: int = 0
    explained: int = 0
    skipped: int = 0  # done by an earlier run
    ignored: int = 0  # files in folders that are not images
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, error)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 1 if self.failed else 0

    def lines(self) -> list[str]:
        rate = self.explained / self.seconds if self.seconds > 0 else 0.0
        parts = [f"explained {self.explained} of {self.total} images in {self.seconds:.1f} s ({rate:.1f} images/s)"]
        if self.skipped:
            parts.append(f"{self.skipped} already done")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        if self.ignored:
            parts.append(f"{self.ignored} non-image files skipped")
        lines = [", ".join(parts) + f"; results in {self.outdir}"]
        lines += [f"failed: {file}: {error}" for file, error in self.failed]
        if self.interrupted:
            lines.append("interrupted: run the same command again to continue")
        return lines


def plan(journal: Journal, items: Sequence[Item], method: str, overwrite: bool) -> tuple[list[Item], int]:
    """The items still to explain, and how many are skipped as done."""
    if overwrite:
        journal.forget(items, method)
        return list(items), 0
    todo = [item for item in items if not journal.done(item, method)]
    return todo, len(items) - len(todo)


@contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (images/s, ETA) on stderr when ``enabled`` and it is a terminal;
    yields ``advance(n)``."""
    from rich.console import Console
    console = Console(stderr=True)
    if not enabled or not console.is_terminal or total == 0:
        yield lambda n: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    columns = (TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    started = time.perf_counter()
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("explain", total=total, rate="")
        count = 0

        def advance(n: int) -> None:
            nonlocal count
            count += n
            elapsed = time.perf_counter() - started
            bar.update(task, advance=n, rate=f"{count / elapsed:.1f} images/s" if elapsed > 0 else "")
        yield advance


def recorder(journal: Journal, summary: Summary, on_record: Callable[[dict], None] | None,
             advance: Callable[[int], None] | None) -> Callable[[dict], None]:
    """What happens to each finished image's record: journal, summary, caller, progress."""
    def record(outcome: dict) -> None:
        journal.append(outcome)
        if "error" in outcome:
            summary.failed.append((outcome["file"], outcome["error"]))
        else:
            summary.explained += 1
        if on_record:
            on_record(outcome)
        if advance:
            advance(1)
    return record


@contextmanager
def interruptible() -> Iterator[Callable[[], bool]]:
    """Ctrl-C (SIGINT) asks the run to stop after the batch under way, whose files and records
    are completed; a second Ctrl-C interrupts at once. Yields ``stopping()``. (Python's
    KeyboardInterrupt could land between a finished write and its record, or inside the
    record's append.) Off the main thread, where handlers cannot be set, Ctrl-C is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    asked: list[bool] = []

    def handler(signum: int, frame: Any) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_local(worker: Worker, items: Sequence[Item], journal: Journal, batch_size: int,
              on_record: Callable[[dict], None] | None = None, advance: Callable[[int], None] | None = None,
              stopping: Callable[[], bool] = lambda: False, decode_threads: int | None = None,
              write_threads: int | None = None) -> Summary:
    """Explain ``items`` (those still to do) batch by batch, decode and writes overlapped
    with the model; every finished image is appended to ``journal``. When ``stopping()``
    turns true (Ctrl-C, see :func:`interruptible`) the run stops after the batch under way
    and its writes: no partial file, and the journal lists exactly the finished images.
    The pools have 2 threads, up to 4 on machines of 8 cores or more (PNG encoding of large
    photos costs more than a small model's run)."""
    threads = min(4, max(2, (os.cpu_count() or 2) // 2))
    summary = Summary(str(journal.outdir), total=len(items))
    batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    decoding = ThreadPoolExecutor(decode_threads or threads, thread_name_prefix="onnxcam-decode")
    writing_pool = ThreadPoolExecutor(write_threads or threads, thread_name_prefix="onnxcam-write")
    ahead: deque[list[Future]] = deque()
    writing: deque[Future] = deque()
    started = time.perf_counter()
    record = recorder(journal, summary, on_record, advance)

    def settle(limit: int) -> None:
        while writing and (len(writing) > limit or writing[0].done()):
            record(writing.popleft().result())

    try:
        submitted = 0
        for batch in batches:
            if stopping():
                summary.interrupted = True
                break
            while submitted < len(batches) and len(ahead) < 2:
                ahead.append([decoding.submit(worker.decode, item) for item in batches[submitted]])
                submitted += 1
            decoded = []
            for future in ahead.popleft():
                outcome = future.result()
                if isinstance(outcome, dict):
                    record(outcome)
                else:
                    decoded.append(outcome)
            for outcome in worker.explain(decoded):
                if isinstance(outcome, dict):
                    record(outcome)
                else:
                    writing.append(writing_pool.submit(worker.write, outcome))
            settle(2 * batch_size)
            journal.sync()
        for futures in ahead:
            for future in futures:
                future.cancel()
        settle(0)  # the writes under way finish (atomically) and are recorded
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; files stay whole, some may lack records
        summary.interrupted = True
    finally:
        decoding.shutdown(wait=True, cancel_futures=True)
        writing_pool.shutdown(wait=True, cancel_futures=True)
        summary.seconds = time.perf_counter() - started
    return summary


def explain_folder(worker: Worker, inputs: Sequence[str | os.PathLike], outdir: str | os.PathLike, *,
                   pattern: str | None = None, batch_size: int = 16, overwrite: bool = False,
                   progress: bool = True, on_record: Callable[[dict], None] | None = None,
                   ray: str | None = None, ray_workers: int = 2, ray_gpus: float = 0.0) -> Summary:
    """The whole run: find the images, check the model (one blank image) and the output
    folder before any image is read, then explain what is not done yet, locally or on Ray
    (``ray``: a cluster address, or "local"); results.json is rewritten at the end."""
    found = find_images(inputs, pattern, exclude=outdir)
    if not found.items:
        others = f" ({len(found.ignored)} other files skipped)" if found.ignored else ""
        raise OnnxcamError(f"no image files found in {', '.join(map(os.fspath, inputs))}{others}")
    check_outdir(outdir)
    worker.check()
    journal = Journal(prepare_outdir(outdir))
    todo, skipped = plan(journal, found.items, worker.settings.method, overwrite)
    try:
        with interruptible() as stopping, progress_bar(len(todo), progress) as advance:
            if ray is not None:
                from .distributed import run_ray
                summary = run_ray(worker, todo, journal, batch_size, address=ray, workers=ray_workers,
                                  gpus=ray_gpus, on_record=on_record, advance=advance, stopping=stopping)
            else:
                summary = run_local(worker, todo, journal, batch_size, on_record=on_record, advance=advance,
                                    stopping=stopping)
    finally:
        journal.close()
    summary.total, summary.skipped, summary.ignored = len(found.items), skipped, len(found.ignored)
    return summary
