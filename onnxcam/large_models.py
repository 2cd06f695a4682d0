"""Models over protobuf's 2 GiB limit: the few places that serialize a whole model.

A protobuf message cannot be serialized beyond 2 GiB, yet onnx keeps a model loaded with its
external data as one message, and onnx's shape inference, version converter and
onnxruntime's in-memory session all go through serialization. Graph work itself (onnx-
graphsurgeon, the autodiff) never serializes, so only these entry points need care:

- :func:`infer_shapes`, :func:`convert_version`: run on a *skeleton*, the model with its big
  initializers replaced by placeholders (same name, type and dims; data marked external at
  :data:`DETACHED`), and the weights put back afterwards;
- :func:`session`: onnxruntime loads the model from a temporary file with external data
  (it maps the weights rather than copying them through protobuf);
- :func:`fingerprint` hashes the skeleton and the weights' bytes;
- :func:`save` writes ``path`` and, for big models, ``path + ".data"`` (ONNX external data,
  readable by ``onnx.load`` and every onnxruntime binding), each atomically.

A large model read from a file never holds its weights in memory: :func:`load_external_data`
leaves each big initializer external, pointing at its file (the ``basepath`` key of ONNX
external data names the model's folder, which ONNX otherwise leaves to the caller). Every
model derived from it (shape-annotated, rewritten, batch made dynamic) copies only those
references; the bytes are streamed from the file where they are needed (:func:`fingerprint`,
:func:`save`, :func:`array`) and onnxruntime maps them from the files :func:`save` writes. A
Grad-CAM explanation of a model with 0.72 GiB of weights so peaks at 1.7x them when rewriting
and 1.3x from the cache, where holding and copying them took 4.7x and 2.3x
(``python tools/check_large_model.py --memory``). Such a model needs its files while it is
used, as onnxruntime's own sessions do.

Small models take the plain path everywhere, but for one thing: an Explainer with the rewrite
cache reads a small model's file with :func:`parse_leaving_weights`, which leaves its big
inline weights in the ``.onnx`` file itself (external data whose ``location`` is the model
file, at the offsets of the protobuf's ``raw_data`` bytes). The model then takes the path
above (its rewrites are cached with their weights beside them, and onnxruntime maps them):
the Explainer holds no second copy of the weights while onnxruntime builds its session.
:func:`self_contained` reads them back into a model handed on (an export).
:data:`INLINE_LIMIT` decides the rest (tests lower it to run the big-model path on a small
model).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .files import atomic_write, atomic_write_bytes

#: Weight bytes above which a model is never serialized whole (2 GiB less room for the graph
#: and the gradient subgraph's own constants).
INLINE_LIMIT = 2**31 - 2**28
#: Initializers at least this big are detached; smaller ones (shapes, axes, scalars that
#: shape inference and the autodiff read) stay in the skeleton.
DETACH_MIN_BYTES = 1024
#: External-data location that marks a detached initializer in a skeleton.
DETACHED = "onnxcam-detached-weight"
#: The external-data key (one ONNX defines) naming the folder a weight's file is in.
BASEPATH = "basepath"
#: Bytes read from a weight file at a time: big enough to stream fast, small beside the weights.
CHUNK = 1 << 24


def tensor_bytes(tensor: TensorProto) -> int:
    """Size of an initializer's data, without serializing it (or reading it from its file;
    a detached placeholder counts 0: its weight is counted where it is held)."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    if tensor.data_location == TensorProto.EXTERNAL and _location(tensor) == DETACHED:
        return 0
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize \
        if tensor.data_type != TensorProto.STRING else 1
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def load_external_data(model: onnx.ModelProto, folder: str | os.PathLike) -> None:
    """Resolve the external data of a model read from ``folder`` (in place): a large model's
    big initializers stay in their files, marked with the folder (:data:`BASEPATH`), so the
    weights are never copied into memory; everything else (a small model, the shapes and axes
    shape inference reads) is read in. The caller has checked the files (bounds, folder)."""
    folder = str(Path(folder).resolve())
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        # a basepath the file itself carries could point anywhere: only ours is followed
        kept = [entry for entry in tensor.external_data if entry.key != BASEPATH]
        if len(kept) != len(tensor.external_data):
            del tensor.external_data[:]
            tensor.external_data.extend(kept)
    if is_large(model):
        for tensor in model.graph.initializer:
            if _location(tensor) is not None and tensor_bytes(tensor) >= DETACH_MIN_BYTES:
                entry = tensor.external_data.add()
                entry.key, entry.value = BASEPATH, folder
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor) and in_file(tensor) is None:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, folder)


def parse_leaving_weights(path: str | os.PathLike) -> tuple[onnx.ModelProto, dict[int, tuple[int, int]]] | None:
    """The model in ``path`` (a plain, inline ONNX file) parsed without its big weights: each
    initializer's ``raw_data`` of at least :data:`DETACH_MIN_BYTES` is left out, and where its
    bytes lie in the file is returned as (offset, length) by initializer index, for
    :func:`leave_in_file`. The file is mapped and only the fields around the weights are
    read, so the weights are never copied into memory, not even while parsing. None when the
    file is not laid out as expected (empty, protobuf groups, not protobuf): the caller parses
    it whole and reports what is wrong."""
    try:
        with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as view:
            skeleton, spans = _without_weights(view)
        model = onnx.ModelProto.FromString(skeleton)
    except Exception:  # noqa: BLE001 - not what we expected: the caller's full parse names it
        return None
    if len(model.graph.initializer) < len(spans) or any(
            model.graph.initializer[index].data_location == TensorProto.EXTERNAL for index in spans):
        return None  # raw and external data at once: left to the full parse to judge
    return model, spans


def leave_in_file(model: onnx.ModelProto, spans: dict[int, tuple[int, int]], path: str | os.PathLike) -> None:
    """Point each initializer of :func:`parse_leaving_weights`'s ``spans`` at its bytes in
    ``path`` (in place; ONNX external data: ``location`` the file itself, the offset of the
    bytes inside the protobuf, :data:`BASEPATH` its folder), as :func:`load_external_data`
    leaves a large model's weights: every reader of weights (:func:`array`, :func:`save`,
    :func:`fingerprint`) streams them from there."""
    path = Path(path).resolve()
    for index, (offset, length) in spans.items():
        tensor = model.graph.initializer[index]
        _mark_external(tensor, path.name, offset, length)
        entry = tensor.external_data.add()
        entry.key, entry.value = BASEPATH, str(path.parent)


#: Protobuf field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9


def _without_weights(view: mmap.mmap) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """The ModelProto bytes in ``view`` minus every big initializer's raw_data field, and
    (offset, length) of each one's bytes in ``view`` by initializer index (in the order the
    parsed graph holds them: protobuf merges repeated ``graph`` fields in file order)."""
    spans: dict[int, tuple[int, int]] = {}
    count = 0
    out = bytearray()
    for field, start, body, end in _fields(view, 0, len(view)):
        if field != (_GRAPH, 2):
            out += view[start:end]
            continue
        graph = bytearray()
        for inner, istart, ibody, iend in _fields(view, body, end):
            if inner != (_INITIALIZER, 2):
                graph += view[istart:iend]
                continue
            tensor, weight = bytearray(), None
            for leaf, lstart, lbody, lend in _fields(view, ibody, iend):
                if leaf == (_RAW_DATA, 2):
                    weight = (lbody, lend - lbody)  # protobuf: the last occurrence wins
                else:
                    tensor += view[lstart:lend]
            if weight is None or weight[1] < DETACH_MIN_BYTES:
                graph += view[istart:iend]
            else:
                spans[count] = weight
                graph += _tag(_INITIALIZER) + _varint(len(tensor)) + tensor
            count += 1
        out += _tag(_GRAPH) + _varint(len(graph)) + graph
    return bytes(out), spans


def _fields(view: mmap.mmap, position: int, end: int) -> Iterator[tuple[tuple[int, int], int, int, int]]:
    """The fields of the message in ``view[position:end]``: ((number, wire type), start of
    the field, start of its value, end), without reading any length-delimited value."""
    while position < end:
        start = position
        key, position = _read_varint(view, position)
        kind, body = key & 7, position
        if kind == 0:
            _, position = _read_varint(view, position)
        elif kind == 2:
            length, body = _read_varint(view, position)
            position = body + length
        elif kind in (1, 5):
            body, position = position, position + (8 if kind == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {kind} (groups) at byte {start}")
        if position > end:
            raise ValueError(f"a field at byte {start} runs past its message")
        yield (key >> 3, kind), start, body, position


def _read_varint(view: mmap.mmap, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError(f"a varint longer than 10 bytes at byte {position}")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int) -> bytes:
    return _varint(field << 3 | 2)


def is_large(model: onnx.ModelProto) -> bool:
    """True when the model's weights are too big to serialize it as one message, or some are
    still in their files (a head cut from a large model may hold less, but it cannot be
    serialized with them either)."""
    initializers = model.graph.initializer
    return sum(tensor_bytes(t) for t in initializers) > INLINE_LIMIT or any(in_file(t) for t in initializers)


def detach(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, TensorProto]]:
    """The skeleton (every field copied but big initializers' data) and the detached
    initializers by name (references into ``model``, not copies)."""
    skeleton = onnx.ModelProto()
    _copy_fields(skeleton, model, skip="graph")
    _copy_fields(skeleton.graph, model.graph, skip="initializer")
    weights: dict[str, TensorProto] = {}
    for tensor in model.graph.initializer:
        if tensor_bytes(tensor) < DETACH_MIN_BYTES and in_file(tensor) is None:
            skeleton.graph.initializer.add().CopyFrom(tensor)
            continue
        placeholder = skeleton.graph.initializer.add()
        placeholder.name, placeholder.data_type = tensor.name, tensor.data_type
        placeholder.dims.extend(tensor.dims)
        _mark_external(placeholder, DETACHED)
        weights[tensor.name] = tensor
    return skeleton, weights


def attach(skeleton: onnx.ModelProto, weights: dict[str, TensorProto]) -> onnx.ModelProto:
    """Put detached weights back into ``skeleton`` (in place; returned for chaining)."""
    for tensor in skeleton.graph.initializer:
        if _location(tensor) == DETACHED and tensor.name in weights:
            tensor.CopyFrom(weights[tensor.name])
    return skeleton


def on_skeleton(model: onnx.ModelProto, transform: Callable[[onnx.ModelProto], onnx.ModelProto]
                ) -> onnx.ModelProto:
    """``transform(model)``, run on the skeleton when the model is large."""
    if not is_large(model):
        return transform(model)
    skeleton, weights = detach(model)
    return attach(transform(skeleton), weights)


def infer_shapes(model: onnx.ModelProto, in_place: bool = False, **options: Any) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` for models of any size, run on the skeleton
    (inference on the whole model serializes it, parses it in C++ and back: four copies of
    the weights at once, resnet50 a 587 MiB peak to load it). A small model's result is one
    copy of it with the inferred value_info and outputs, as onnx's own; a large model is
    annotated in place rather than copied: every copy of a multi-GB model is that much more
    memory; ``in_place`` annotates a small model in place too."""
    inferred = onnx.shape_inference.infer_shapes(detach(model)[0], **options)
    if not in_place and not is_large(model):
        annotated = onnx.ModelProto()
        annotated.CopyFrom(model)
        model = annotated
    for name in ("value_info", "output"):
        field = getattr(model.graph, name)
        del field[:]
        field.extend(getattr(inferred.graph, name))
    return model


def convert_version(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``onnx.version_converter.convert_version`` for models of any size."""
    return on_skeleton(model, lambda m: onnx.version_converter.convert_version(m, opset))


def fingerprint(model: onnx.ModelProto) -> hashlib._Hash:
    """SHA-256 of the model's content: the skeleton, then each detached weight's bytes.
    ``value_info`` is left out: it is derived (shape inference adds it, in place for large
    models) and must not change the identity of a model."""
    skeleton, weights = detach(model)
    del skeleton.graph.value_info[:]
    digest = hashlib.sha256(skeleton.SerializeToString())
    for name in sorted(weights):
        digest.update(name.encode())
        for chunk in _chunks(weights[name]):
            digest.update(chunk)
    return digest


def session(model: onnx.ModelProto, options, providers: list[str]):
    """An ``onnxruntime.InferenceSession`` for ``model`` of any size. A large model is
    written with external data to a temporary folder and loaded from there: onnxruntime
    maps external weights from the file instead of holding another copy in memory."""
    import onnxruntime as ort

    if not is_large(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="onnxcam-session-") as folder:
        path = Path(folder) / "model.onnx"
        save(model, path)
        return ort.InferenceSession(str(path), options, providers=providers)


def save(model: onnx.ModelProto, path: str | os.PathLike, mode: int | None = None) -> None:
    """Write ``model`` to ``path`` atomically; a large model's weights go to
    ``path + ".data"`` (ONNX external data, offsets 4 KiB-aligned), written first so a
    reader never finds the model without its complete data. ``mode``: the files' permissions
    (default: as ``open()`` creates them)."""
    path = Path(path)
    if not is_large(model):
        atomic_write_bytes(path, model.SerializeToString(), mode)
        return
    skeleton, weights = detach(model)
    data_name = path.name + ".data"
    entries = {t.name: t for t in skeleton.graph.initializer if _location(t) == DETACHED}

    def write_weights(stream) -> None:
        for name, tensor in weights.items():
            offset = -(-stream.tell() // 4096) * 4096
            stream.write(b"\0" * (offset - stream.tell()))
            for chunk in _chunks(tensor):
                stream.write(chunk)
            _mark_external(entries[name], data_name, offset, stream.tell() - offset)

    atomic_write(path.with_name(data_name), write_weights, mode)
    atomic_write_bytes(path, skeleton.SerializeToString(), mode)


def self_contained(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as a message that stands alone when its weights fit in one (those still in
    their files read in, into a copy: a model handed to the caller, an export, must not
    depend on its source's file); a large one as it is."""
    if not is_large(model) or sum(tensor_bytes(t) for t in model.graph.initializer) > INLINE_LIMIT:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if in_file(tensor) is not None:
            tensor.CopyFrom(_read_in(tensor))
    return copy


def array(tensor: TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` for any initializer, one still in its file included (read
    from there: a copy in memory, for the few readers of a weight's values, CAM's head)."""
    return numpy_helper.to_array(_read_in(tensor) if in_file(tensor) is not None else tensor)


def _read_in(tensor: TensorProto) -> TensorProto:
    """A copy of an initializer still in its file, with its data read in."""
    where = in_file(tensor)
    loaded = TensorProto()
    loaded.CopyFrom(tensor)
    onnx.external_data_helper.load_external_data_for_tensor(loaded, str(where[0].parent))
    return loaded


def _chunks(tensor: TensorProto) -> Iterator[bytes]:
    """An initializer's little-endian raw bytes in pieces: streamed from its file, at most
    :data:`CHUNK` bytes in memory at a time, when it is still there."""
    where = in_file(tensor)
    if where is None:
        if tensor.data_location == TensorProto.EXTERNAL:
            raise ValueError(f"initializer '{tensor.name}' keeps its data in an external file that was "
                             "not read (load the model with onnxcam.model.load_model or onnx.load)")
        yield tensor.raw_data if tensor.HasField("raw_data") else \
            numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
        return
    path, offset, length = where
    with open(path, "rb") as stream:
        stream.seek(offset)
        while length > 0:
            chunk = stream.read(min(CHUNK, length))
            if not chunk:
                raise ValueError(f"'{path}' ends before the {tensor_bytes(tensor)} bytes of initializer "
                                 f"'{tensor.name}' (changed since the model was loaded)")
            length -= len(chunk)
            yield chunk


def in_file(tensor: TensorProto) -> tuple[Path, int, int] | None:
    """(file, offset, length) of an initializer left in its file by :func:`load_external_data`,
    else None."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    info = {entry.key: entry.value for entry in tensor.external_data}
    if BASEPATH not in info or "location" not in info:
        return None
    length = int(info["length"]) if "length" in info else tensor_bytes(tensor)
    return Path(info[BASEPATH]) / info["location"], int(info.get("offset", 0)), length


def _location(tensor: TensorProto) -> str | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), None)


def _mark_external(tensor: TensorProto, location: str, offset: int | None = None,
                   length: int | None = None) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    entries = [("location", location)]
    if offset is not None:
        entries += [("offset", str(offset)), ("length", str(length))]
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _copy_fields(destination, source, skip: str) -> None:
    """Copy every set field of a protobuf message but ``skip`` (shallow in the sense that
    the skipped field's data is never touched)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(destination, field.name).extend(value)
        elif field.message_type is not None:
            getattr(destination, field.name).CopyFrom(value)
        else:
            setattr(destination, field.name, value)
