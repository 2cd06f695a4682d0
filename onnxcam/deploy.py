"""Interfaces: shipping a self-explaining model (:mod:`onnxcam.export`) and checking it.

* :func:`check_export` runs an exported file on images with plain onnxruntime (nothing of
  onnxcam between the file and the runtime but the image decoding), writes the overlays, and
  compares the heatmaps with :class:`onnxcam.explainer.Explainer` on the forward graph that
  the file itself carries, so the file a user ships is the file that was tested.
* :func:`write_web` writes a static page that runs the file with onnxruntime-web (WASM) on an
  image the user picks and draws the overlay; no server-side code.
* :func:`write_triton` writes a Triton model repository (``NAME/config.pbtxt``,
  ``NAME/1/model.onnx``) for Triton's ONNX Runtime backend.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from .errors import ModelError, OnnxcamError
from .export import HEATMAP, TARGET, TARGET_CLASS
from .files import atomic_write_bytes
from .images import METADATA_LABELS, Preprocess, load_image, make_preprocess, preprocess_from_metadata
from .visualize import encode_png, overlay, resize_map

#: Max |file - Explainer| on maps in [0, 1] accepted by the check (both float32; the sums and
#: the resize differ in order only: measured <= 2e-6, see tests/test_deploy.py).
CHECK_TOLERANCE = 1e-4


@dataclass
class ExportedModel:
    """What an exported file declares: its IO and its ``onnxcam.*`` metadata."""

    path: Path
    model: onnx.ModelProto
    metadata: dict[str, str]
    image_input: str
    layout: str
    topk: int | None
    has_target: bool

    @staticmethod
    def load(path: str | os.PathLike) -> ExportedModel:
        path = Path(path)
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
            raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
        metadata = {p.key: p.value for p in model.metadata_props}
        outputs = {o.name for o in model.graph.output}
        if "onnxcam.method" not in metadata or not {HEATMAP, TARGET_CLASS} <= outputs:
            raise ModelError(f"{path}: not a model written by `onnxcam export` (no heatmap/target_class "
                             f"outputs or onnxcam.* metadata)")
        inputs = [i for i in model.graph.input if i.name != TARGET]
        dims = inputs[0].type.tensor_type.shape.dim
        layout = "NCHW" if len(dims) == 4 and dims[1].dim_value in (1, 3) else "NHWC"
        topk = int(metadata["onnxcam.topk"]) if "onnxcam.topk" in metadata else None
        return ExportedModel(path, model, metadata, inputs[0].name, layout, topk,
                             any(i.name == TARGET for i in model.graph.input))

    @property
    def input_hw(self) -> tuple[int, int] | None:
        dims = self.model.graph.input[[i.name for i in self.model.graph.input].index(self.image_input)]
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims.type.tensor_type.shape.dim]
        hw = shape[2:4] if self.layout == "NCHW" else shape[1:3]
        return None if None in hw else (int(hw[0]), int(hw[1]))

    @property
    def labels(self) -> list[str] | None:
        raw = self.metadata.get(METADATA_LABELS)
        return list(json.loads(raw)) if raw else None

    @property
    def explained_outputs(self) -> list[str]:
        """The source model's own outputs (the logits among them)."""
        return [o.name for o in self.model.graph.output if o.name not in (HEATMAP, TARGET_CLASS)]

    def forward_model(self) -> onnx.ModelProto:
        """The source classifier as the file carries it: the subgraph from the image to the
        model's own outputs (onnx.utils.Extractor), for an independent Explainer run."""
        extracted = onnx.utils.Extractor(self.model).extract_model([self.image_input], self.explained_outputs)
        extracted.ir_version = self.model.ir_version
        del extracted.opset_import[:]
        extracted.opset_import.extend(self.model.opset_import)
        return extracted


@dataclass
class CheckReport:
    """Per image: the classes the file explained and max |file heatmap - Explainer heatmap|."""

    method: str
    layer: str
    provider: str
    records: list[dict] = field(default_factory=list)

    @property
    def max_difference(self) -> float:
        return max((r["max_difference"] for r in self.records), default=0.0)

    @property
    def passed(self) -> bool:
        return all(r["classes_equal"] and r["max_difference"] <= CHECK_TOLERANCE for r in self.records)


def check_export(path: str | os.PathLike, images: list[str | os.PathLike], outdir: str | os.PathLike,
                 preset: str | None = None, mean=None, std=None, scale: float | None = None) -> CheckReport:
    """Run the exported file at ``path`` on ``images`` with a plain onnxruntime session, write
    ``outdir/<stem>.<method>.png`` overlays (one per class with ``--topk``) and ``check.json``,
    and compare with the Explainer (same method and layer, each image's top-1 or top-K).

    The preprocessing is the file's ``onnxcam.preprocess`` metadata unless a preset or
    mean/std/scale is given."""
    import onnxruntime as ort

    from .explainer import Explainer

    exported = ExportedModel.load(path)
    preprocess = _preprocess(exported, preset, mean, std, scale)
    pictures = [load_image(p) for p in images]  # every image decodes before anything is run
    x_all = preprocess(pictures)
    session = ort.InferenceSession(exported.model.SerializeToString(), providers=["CPUExecutionProvider"])
    method, layer = exported.metadata["onnxcam.method"], exported.metadata["onnxcam.layer"]
    explainer = Explainer(exported.forward_model(), layer=layer, provider="cpu", cache=False)
    report = CheckReport(method, layer, "cpu")
    outdir = Path(outdir)
    files: dict[str, bytes] = {}
    for index, (image_path, picture) in enumerate(zip(images, pictures)):
        x = x_all[index:index + 1]
        feeds = {exported.image_input: x}
        if exported.has_target:
            feeds[TARGET] = np.full((1,), -1, np.int64)
        heatmap, classes = session.run([HEATMAP, TARGET_CLASS], feeds)
        reference = explainer.explain(x, method, topk=exported.topk)
        maps = heatmap.reshape((1, -1) + heatmap.shape[-2:])
        expected = reference.heatmaps.reshape(maps.shape)
        file_classes = classes.reshape(-1).tolist()
        stem = Path(image_path).stem
        names = []
        for slot, cls in enumerate(file_classes):
            name = f"{index:04d}-{stem}.{method}" + (f".{cls}" if exported.topk else "") + ".png"
            files[name] = encode_png(overlay(picture, resize_map(maps[0, slot], picture.shape[:2])))
            names.append(name)
        labels = exported.labels
        report.records.append({
            "file": str(image_path), "classes": file_classes,
            "labels": [labels[c] if labels and 0 <= c < len(labels) else None for c in file_classes],
            "explainer_classes": reference.targets.reshape(-1).tolist(),
            "classes_equal": file_classes == reference.targets.reshape(-1).tolist(),
            "max_difference": float(np.abs(maps - expected).max()), "overlays": names})
    files["check.json"] = json.dumps({"model": str(path), "method": method, "layer": layer,
                                      "tolerance": CHECK_TOLERANCE, "passed": report.passed,
                                      "images": report.records}, indent=1).encode()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            atomic_write_bytes(outdir / name, data)
    except OSError as exc:
        raise OnnxcamError(f"cannot write to {outdir}: {exc.strerror or exc}") from None
    return report


def _preprocess(exported: ExportedModel, preset, mean, std, scale) -> Preprocess:
    declared = preprocess_from_metadata(exported.metadata)
    return make_preprocess(preset, exported.layout, exported.input_hw or (declared.size if declared else None),
                           mean=mean, std=std, scale=scale, declared=declared)


# -- the browser --------------------------------------------------------------------------------

#: Where the page looks for onnxruntime-web unless told otherwise (``?ort=URL``): a copy
#: installed beside it with ``npm install onnxruntime-web``.
DEFAULT_ORT_WEB = "node_modules/onnxruntime-web/dist/"


def write_web(path: str | os.PathLike, directory: str | os.PathLike, ort_web: str = DEFAULT_ORT_WEB,
              preset: str | None = None, mean=None, std=None, scale: float | None = None) -> Path:
    """A static page in ``directory`` (index.html, onnxcam-web.js, config.json, model.onnx)
    that runs the exported file with onnxruntime-web on a picked image and draws the overlay.

    The page writes what it computed into ``<pre id="result">`` (class, heatmap sum/min/max,
    milliseconds), so a browser test can compare it with Python onnxruntime."""
    exported = ExportedModel.load(path)
    if exported.input_hw is None:
        raise OnnxcamError(f"{path}: the page needs a fixed input size: export with --size H W")
    preprocess = _preprocess(exported, preset, mean, std, scale)
    directory = Path(directory)
    config = {"model": "model.onnx", "ort": ort_web, "input": exported.image_input,
              "layout": exported.layout, "size": list(exported.input_hw),
              "channels": _channels(exported), "target": exported.has_target, "topk": exported.topk,
              "method": exported.metadata["onnxcam.method"], "labels": exported.labels,
              "mean": list(preprocess.mean), "std": list(preprocess.std), "scale": preprocess.scale,
              "channel_order": preprocess.channel_order}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _copy_model(path, directory / "model.onnx")
        for name in ("index.html", "onnxcam-web.js"):
            atomic_write_bytes(directory / name, resources.files("onnxcam.web").joinpath(name).read_bytes())
        atomic_write_bytes(directory / "config.json", json.dumps(config, indent=1).encode())
    except OSError as exc:
        raise OnnxcamError(f"cannot write to {directory}: {exc.strerror or exc}") from None
    return directory / "index.html"


def _copy_model(source: str | os.PathLike, destination: Path) -> None:
    """Copy an exported file atomically, and its external weights (``.data``, under the name
    the model refers to) when it has them."""
    atomic_write_bytes(destination, Path(source).read_bytes())
    weights = Path(f"{source}.data")
    if weights.exists():
        atomic_write_bytes(destination.parent / weights.name, weights.read_bytes())


def _channels(exported: ExportedModel) -> int:
    dims = exported.model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[1].dim_value if exported.layout == "NCHW" else dims[3].dim_value)


# -- serving ------------------------------------------------------------------------------------

_TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                 onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64",
                 onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.UINT8: "TYPE_UINT8",
                 onnx.TensorProto.BOOL: "TYPE_BOOL"}


def triton_config(exported: ExportedModel, name: str, max_batch_size: int = 8) -> str:
    """config.pbtxt for Triton's ONNX Runtime backend. A batch-dynamic file gets
    ``max_batch_size`` and dims without the batch axis ([N] tensors as ``dims: [1]`` with an
    empty ``reshape``, as Triton documents); a fixed-batch file gets ``max_batch_size: 0`` and
    full dims. Other dynamic axes are -1."""
    graph = exported.model.graph
    batched = all(_dims(v)[0] == -1 for v in [*graph.input, *graph.output])
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"',
             f"max_batch_size: {max_batch_size if batched else 0}"]
    for kind, values in (("input", graph.input), ("output", graph.output)):
        entries = []
        for value in values:
            elem = value.type.tensor_type.elem_type
            if elem not in _TRITON_TYPES:
                raise OnnxcamError(f"{exported.path}: {kind} '{value.name}' has a type Triton's config "
                                   f"cannot name ({onnx.TensorProto.DataType.Name(elem)})")
            dims = _dims(value)[1:] if batched else _dims(value)
            entry = f'  {{\n    name: "{value.name}"\n    data_type: {_TRITON_TYPES[elem]}\n'
            if not dims:  # a per-image scalar: Triton wants one dim, reshaped away
                entry += "    dims: [ 1 ]\n    reshape: { shape: [ ] }\n  }"
            else:
                entry += f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}"
            entries.append(entry)
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    return "\n".join(lines) + "\n"


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def write_triton(path: str | os.PathLike, repository: str | os.PathLike, name: str | None = None,
                 max_batch_size: int = 8) -> Path:
    """A Triton model repository: ``repository/NAME/config.pbtxt`` and ``NAME/1/model.onnx``."""
    exported = ExportedModel.load(path)
    name = name or Path(path).name.split(".")[0]
    folder = Path(repository) / name
    config = triton_config(exported, name, max_batch_size)
    try:
        (folder / "1").mkdir(parents=True, exist_ok=True)
        _copy_model(path, folder / "1" / "model.onnx")
        atomic_write_bytes(folder / "config.pbtxt", config.encode())
    except OSError as exc:
        raise OnnxcamError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    return folder / "config.pbtxt"
