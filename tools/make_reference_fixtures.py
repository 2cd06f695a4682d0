"""Build the reference fixtures: what PyTorch, pytorch-grad-cam and Captum compute.

onnxcam differentiates ONNX graphs with its own reverse-mode autodiff and computes the CAM
family in numpy. Whether it is right is checked against the libraries users already trust,
on the same weights and the same images. This script computes those references once and
stores them under ``tests/fixtures/reference/``; ``tests/test_reference_parity.py`` reads
them with numpy and onnxruntime only. torch, torchvision, pytorch-grad-cam (``grad-cam``) and
Captum are therefore tools-only dependencies: neither the package nor its tests import them.

For each architecture in :data:`ARCHS`, deterministically (fixed seeds, one thread):

1. Build the torchvision model with random weights (``torch.manual_seed``; nothing is
   downloaded). BatchNorm gets non-trivial statistics: running mean/variance measured on
   smooth random images in train mode, then perturbed, and a perturbed affine. Then eval().
2. Export it to ONNX with the TorchScript exporter: opset 13, IR version 8, dynamic batch,
   input ``input``, output ``logits``. The exporter folds BatchNorm into Conv and renames
   tensors, so the ONNX name of a module's output cannot be read off the module tree:
3. find it by value. onnxruntime runs a copy of the model with every intermediate tensor as an
   output, and the tensor equal to the torch forward-hook activation (max abs diff < 1e-4 x max(1, max |A|)) is
   the one. The target layer is the last spatial activation (the tensor right before global
   pooling), which must be onnxcam's default layer; the outcome is recorded either way.
4. With torch on the same weights and inputs: the activation A, ``dA = d logit[t] / dA`` and
   ``dx = d logit[t] / dx`` by ``torch.autograd.grad`` of ``sum(logits * onehot(t))``; the
   pytorch-grad-cam maps of ten methods (``ClassifierOutputTarget``, no augmentation or eigen
   smoothing) and of Grad-CAM on two layers (its mean-over-layers aggregation); Captum's
   Saliency (``abs=True``, max over channels), IntegratedGradients (zero baseline, 32 steps,
   ``riemann_right``: the Riemann sum of Sundararajan et al. 2017, eq. 3) and GuidedBackprop;
   and Grad-CAM with pytorch-grad-cam's test-time augmentation (``gradcam:aug_smooth``).
   Where the head is global average pooling -> one linear layer, ``cam`` (CAM, Zhou et al.
   2016) is the Grad-CAM map: there the two differ by the factor 1/hw only.
5. Write ``<arch>/model.onnx``, ``<arch>/reference.npz`` (float32; byte-identical across runs)
   and ``provenance.json`` (library versions, the command, layers and sizes).

Two references depend on a convention:

* Eigen-CAM / Eigen-Grad-CAM: the sign of a singular vector is arbitrary (pytorch-grad-cam's
  depends on the BLAS build, its issues #315 and #364). Stored: pytorch-grad-cam's map, its raw
  projection (``<key>:projection``) and the map of the negated projection
  (``<key>:negated``), post-processed by pytorch-grad-cam's own functions.
* Guided backprop: Captum (like pytorch-grad-cam) only rewrites ``nn.ReLU`` modules, so ReLU6
  (MobileNet's rectifier, a Clip from 0 in ONNX) would keep its plain gradient, and on
  MobileNetV2 "guided backprop" would be the plain input gradient. onnxcam treats both
  rectifiers alike, so ``guided-backprop`` is Captum's GuidedBackprop with its own guided
  hook on ReLU6 modules too; how far Captum as is lies from it is in provenance.json.

Usage::

    python tools/make_reference_fixtures.py [--out tests/fixtures/reference] [--only ARCH ...]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import sys
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # ScoreCAM/AblationCAM progress bars: noise here

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import captum
import pytorch_grad_cam as pgc
from captum._utils.common import _register_backward_hook  # what GuidedBackprop itself uses
from captum.attr import GuidedBackprop, IntegratedGradients, Saliency
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from onnxcam.model import ModelGraph

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "reference"

SIZE = 112  # input side: the last feature maps are 4x4, the two-layer case mixes 7x7 and 4x4
NUM_CLASSES = 10
TARGETS = (3, 8)  # one fixed class per image, whatever the model predicts (top-1 in provenance)
IMAGE_SEED, CALIBRATION_SEED, TORCH_SEED = 20240611, 777, 0
N_CALIBRATION = 8
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet normalization, as torchvision
STD = np.array([0.229, 0.224, 0.225], np.float32)
MATCH_RTOL = 1e-4  # torch vs onnxruntime, relative to max |value| (BatchNorm is folded in ONNX)
MAX_MODEL_BYTES = 1_500_000
IG_STEPS, IG_METHOD = 32, "riemann_right"
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Arch:
    """A torchvision architecture and the modules whose outputs are explained."""

    name: str
    build: Callable[[], nn.Module]
    constructor: str  # the same call as text, for provenance.json
    layer: str  # module path of the last spatial activation (right before global pooling)
    extra_layer: str  # a second, earlier module for the two-layer Grad-CAM
    linear_head: bool  # global average pooling -> one linear layer: CAM is defined


ARCHS: tuple[Arch, ...] = (
    # ReLU6 (Clip in ONNX), inverted residual blocks (Add), GlobalAveragePool -> Gemm head.
    Arch("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=NUM_CLASSES),
         "torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10)", "features.18", "features.13", True),
    # MaxPool, channel split and shuffle (Split/Slice, Reshape, Transpose, Concat), ReduceMean head.
    # shufflenet_v2_x0_5 with a 512-channel (not 1024) last conv: 1.52 MB otherwise.
    Arch("shufflenet_v2", lambda: torchvision.models.ShuffleNetV2(
        [4, 8, 4], [24, 48, 96, 192, 512], num_classes=NUM_CLASSES),
        "torchvision.models.ShuffleNetV2([4, 8, 4], [24, 48, 96, 192, 512], num_classes=10)",
        "conv5", "stage3", True),
    # Hardswish/Hardsigmoid, squeeze-and-excitation (a GlobalAveragePool and Mul inside the
    # body), a two-layer MLP head. A ResNet does not fit: ResNet(BasicBlock, [1, 1, 1, 1])
    # alone weighs 4.9 M parameters (19.6 MB).
    Arch("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(
        width_mult=0.5, reduced_tail=True, num_classes=NUM_CLASSES),
        "torchvision.models.mobilenet_v3_small(width_mult=0.5, reduced_tail=True, num_classes=10)",
        "features.12", "features.6", False),
)

PGC_METHODS: dict[str, type] = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "hirescam": pgc.HiResCAM,
    "gradcam-elementwise": pgc.GradCAMElementWise,
    "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM,
    "eigengradcam": pgc.EigenGradCAM,
    "scorecam": pgc.ScoreCAM,
    "ablationcam": pgc.AblationCAM,
}


# -- inputs ---------------------------------------------------------------------------------
def smooth_images(count: int, size: int, seed: int) -> np.ndarray:
    """``count`` uint8 RGB images (count, size, size, 3): a low-frequency colour field (a 5x5
    random grid, bicubic) plus three Gaussian blobs, so maps have structure to find."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        field = cv2.resize(rng.uniform(40, 215, (5, 5, 3)).astype(np.float32), (size, size),
                           interpolation=cv2.INTER_CUBIC)
        for _ in range(3):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            radius = rng.uniform(0.06, 0.16)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))
            field += blob[..., None].astype(np.float32) * rng.uniform(-140, 140, 3).astype(np.float32)
        images.append(np.clip(field, 0, 255).round().astype(np.uint8))
    return np.stack(images)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW, ``(x / 255 - mean) / std``."""
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


# -- the model ------------------------------------------------------------------------------
def batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics = the batch statistics of ``x`` (a cumulative average over one
    batch), so activations keep a sane scale through a randomly initialized network."""
    for bn in batchnorms(model):
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for bn in batchnorms(model):
        bn.momentum = 0.1
    model.eval()


def perturb_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Make every part of inference-mode BatchNorm matter: scale, shift, mean and variance."""
    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    with torch.no_grad():
        for bn in batchnorms(model):
            c = bn.num_features
            bn.weight.copy_(uniform(c, 0.6, 1.4))
            bn.bias.copy_(0.1 * torch.randn(c, generator=generator))
            bn.running_mean.add_(0.1 * torch.randn(c, generator=generator) * bn.running_var.sqrt())
            bn.running_var.mul_(uniform(c, 0.7, 1.4))


def build_model(arch: Arch, calibration: torch.Tensor) -> nn.Module:
    torch.manual_seed(TORCH_SEED)
    model = arch.build()
    for module in model.modules():
        if hasattr(module, "inplace"):
            # In-place activations break Captum's backward hooks; the maths is the same.
            module.inplace = False
        if isinstance(module, nn.Linear):
            # torchvision draws classifier weights from N(0, 0.01), which leaves random
            # logits near 1e-3; PyTorch's default init gives them a scale near 1.
            module.reset_parameters()
    calibrate_batchnorm(model, calibration)
    perturb_batchnorm(model, torch.Generator().manual_seed(TORCH_SEED + 1))
    return model.eval()


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> onnx.ModelProto:
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      do_constant_folding=True)
    proto = onnx.load(str(path))
    proto.ir_version = 8  # onnxruntime rejects the IR version onnx 1.23 writes by default
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise SystemExit(f"{path}: {size} bytes, over the {MAX_MODEL_BYTES} budget")
    return proto


# -- finding the ONNX tensor of a module's output --------------------------------------------
def ort_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def all_float_tensors(proto: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every float tensor a node produces, by name, from one onnxruntime run on ``x``."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    elem = {vi.name: vi.type.tensor_type.elem_type
            for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    probe = copy.deepcopy(proto)
    del probe.graph.output[:]
    names = [o for node in proto.graph.node for o in node.output
             if o and elem.get(o) == onnx.TensorProto.FLOAT]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names)
    values = ort_session(probe).run(names, {"input": x})
    return dict(zip(names, values))


def tensors_equal_to(values: dict[str, np.ndarray], reference: np.ndarray) -> list[str]:
    """Names (graph order) of the tensors equal to ``reference``: max abs diff below
    MATCH_RTOL * max(1, max |reference|) (float32 rounding grows with the values' scale)."""
    tolerance = MATCH_RTOL * max(1.0, float(np.abs(reference).max()))
    return [name for name, value in values.items()
            if value.shape == reference.shape and np.abs(value - reference).max() < tolerance]


def onnx_layer_name(values: dict[str, np.ndarray], reference: np.ndarray, candidates: Sequence[str],
                    what: str) -> tuple[str, list[str]]:
    """The ONNX tensor holding ``reference``, and all tensors that do. Where copies exist
    (Identity, Dropout), one of onnxcam's layer ``candidates`` first, else the first in graph
    order (onnxcam may miss a layer, e.g. where shape inference loses its shape)."""
    matches = tensors_equal_to(values, reference)
    if not matches:
        raise SystemExit(f"{what}: no ONNX tensor equals the torch activation")
    usable = [m for m in matches if m in candidates]
    return (usable or matches)[0], matches


# -- the references --------------------------------------------------------------------------
def forward_with(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor):
    """Logits and the outputs of ``modules`` (forward hooks, removed afterwards)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, _i, out, k=k: seen.__setitem__(k, out))
               for k, m in enumerate(modules)]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, [seen[k] for k in range(len(modules))]


def autograd_reference(model: nn.Module, module: nn.Module, x: np.ndarray,
                       targets: np.ndarray) -> dict[str, np.ndarray]:
    """A, dA and dx of ``score = sum_n logits[n, targets[n]]`` (images are independent in
    eval mode, so each row of the gradient is its own image's)."""
    xt = torch.from_numpy(x).requires_grad_(True)
    logits, (activation,) = forward_with(model, [module], xt)
    onehot = F.one_hot(torch.from_numpy(targets), logits.shape[1]).to(logits.dtype)
    d_activation, d_input = torch.autograd.grad((logits * onehot).sum(), [activation, xt])
    return {"logits": logits.detach().numpy(), "activation": activation.detach().numpy(),
            "gradient": d_activation.numpy(), "input_gradient": d_input.numpy()}


def pgc_map(cls: type, model: nn.Module, modules: Sequence[nn.Module], x: np.ndarray,
            targets: np.ndarray, aug_smooth: bool = False) -> np.ndarray:
    with cls(model=model, target_layers=list(modules)) as cam:
        maps = cam(input_tensor=torch.from_numpy(x),
                   targets=[ClassifierOutputTarget(int(t)) for t in targets],
                   aug_smooth=aug_smooth, eigen_smooth=False)
    return np.asarray(maps, np.float32)


def pgc_postprocess(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's path from one layer's raw cam to the map (BaseCAM.forward):
    ReLU, scale and resize, then the (single-layer) aggregation: ReLU, mean, scale."""
    per_layer = scale_cam_image(np.maximum(raw, 0), (size[1], size[0]))
    return scale_cam_image(np.maximum(per_layer[:, None], 0).mean(axis=1))


def eigen_variants(key: str, raw: np.ndarray, pgc_output: np.ndarray, size: tuple[int, int]) -> dict:
    """The projection and the map of the other sign, checked to reproduce pgc's own map."""
    if np.abs(pgc_postprocess(raw, size) - pgc_output).max() > 1e-6:
        raise SystemExit(f"{key}: re-deriving pytorch-grad-cam's map from its projection failed")
    return {f"{key}:projection": raw, f"{key}:negated": pgc_postprocess(-raw, size)}


class GuidedBackpropRectifiers(GuidedBackprop):
    """Captum's GuidedBackprop with its guided hook (``relu`` of the gradient leaving the
    module) also on ReLU6 modules; the same override Captum applies to ``nn.ReLU``."""

    def _register_hooks(self, module: nn.Module) -> None:
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            self.backward_hooks.extend(_register_backward_hook(module, self._backward_hook, self))


def captum_references(model: nn.Module, x: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    xt, target = torch.from_numpy(x), torch.from_numpy(targets)
    saliency = Saliency(model).attribute(xt, target=target, abs=True).amax(dim=1)
    integrated = IntegratedGradients(model).attribute(
        xt, baselines=torch.zeros_like(xt), target=target, n_steps=IG_STEPS, method=IG_METHOD)
    guided = GuidedBackpropRectifiers(model).attribute(xt, target=target)
    relu_only = GuidedBackprop(model).attribute(xt, target=target)
    return {"saliency": saliency, "integrated-gradients": integrated, "guided-backprop": guided,
            "captum-guided-backprop-relu-only": relu_only}


# -- one fixture -----------------------------------------------------------------------------
def locate_layers(arch: Arch, model: nn.Module, proto: onnx.ModelProto, x: np.ndarray) -> dict:
    """The ONNX names of the two modules' outputs (by value), and what onnxcam makes of them."""
    with torch.no_grad():
        torch_logits, (a_layer, a_extra) = forward_with(
            model, [model.get_submodule(arch.layer), model.get_submodule(arch.extra_layer)],
            torch.from_numpy(x))
    values = all_float_tensors(proto, x)
    layers = ModelGraph(proto, arch.name).layers()
    candidates = [l.name for l in layers]
    default = next(l.name for l in layers if l.default)
    name, matches = onnx_layer_name(values, a_layer.numpy(), candidates, f"{arch.name}.{arch.layer}")
    extra_name, _ = onnx_layer_name(values, a_extra.numpy(), candidates, f"{arch.name}.{arch.extra_layer}")
    if default != name:
        print(f"warning: {arch.name}: onnxcam's default layer {default} is not {name}, the "
              f"output of {arch.layer}", file=sys.stderr)
    return {
        "target_module": arch.layer, "layer": name, "onnxcam_default_layer": default,
        "default_is_layer": default == name, "layer_is_onnxcam_candidate": name in candidates,
        "value_matches": matches,
        "multilayer_modules": [arch.extra_layer, arch.layer], "multilayer_layers": [extra_name, name],
        "torch_vs_onnxruntime_logits_max_abs": float(np.abs(values["logits"] - torch_logits.numpy()).max()),
    }


def pgc_references(model: nn.Module, layer: nn.Module, extra: nn.Module, x: np.ndarray,
                   targets: np.ndarray, activation: np.ndarray, gradient: np.ndarray) -> dict:
    """pytorch-grad-cam's maps: the ten methods, the eigen methods' other sign, Grad-CAM with
    test-time augmentation (flip x brightness [0.9, 1, 1.1]) and on two layers."""
    maps = {key: pgc_map(cls, model, [layer], x, targets) for key, cls in PGC_METHODS.items()}
    size = (x.shape[2], x.shape[3])
    maps.update(eigen_variants("eigencam", get_2d_projection(activation), maps["eigencam"], size))
    maps.update(eigen_variants("eigengradcam", get_2d_projection(gradient * activation),
                               maps["eigengradcam"], size))
    maps["gradcam:aug_smooth"] = pgc_map(pgc.GradCAM, model, [layer], x, targets, aug_smooth=True)
    maps["gradcam-multilayer"] = pgc_map(pgc.GradCAM, model, [extra, layer], x, targets)
    return maps


def make_fixture(arch: Arch, out: Path, x: np.ndarray, calibration: np.ndarray) -> dict:
    """Write ``out/<arch>/{model.onnx, reference.npz}``; returns the provenance entry."""
    targets = np.asarray(TARGETS, np.int64)
    folder = out / arch.name
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(arch, torch.from_numpy(calibration))
    proto = export_onnx(model, torch.from_numpy(x), folder / "model.onnx")
    info = locate_layers(arch, model, proto, x)

    layer, extra = model.get_submodule(arch.layer), model.get_submodule(arch.extra_layer)
    arrays: dict[str, np.ndarray] = {"input": x, "targets": targets, "layer": np.array(info["layer"])}
    arrays.update(autograd_reference(model, layer, x, targets))
    arrays.update(pgc_references(model, layer, extra, x, targets, arrays["activation"], arrays["gradient"]))
    arrays["gradcam-multilayer:layers"] = np.array(info["multilayer_layers"])
    if arch.linear_head:
        # CAM's map sum_k W[c, k] A_k is Grad-CAM's times 1/hw (Selvaraju et al. 2017,
        # sec. 3.1), which the scaling removes: pytorch-grad-cam's Grad-CAM is CAM's reference.
        arrays["cam"] = arrays["gradcam"]
    captum_arrays = {k: v.detach().numpy() for k, v in captum_references(model, x, targets).items()}
    relu_only = captum_arrays.pop("captum-guided-backprop-relu-only")
    arrays.update(captum_arrays)
    arrays["integrated-gradients:steps"] = np.array(IG_STEPS)
    write_npz(folder / "reference.npz", arrays)

    return {
        "constructor": arch.constructor, **info,
        "activation_shape": list(arrays["activation"].shape),
        "captum_guided_backprop_as_is_vs_stored_max_abs": float(np.abs(relu_only - arrays["guided-backprop"]).max()),
        "captum_guided_backprop_as_is_vs_input_gradient_max_abs":
            float(np.abs(relu_only - arrays["input_gradient"]).max()),
        "torch_logits": arrays["logits"].round(4).tolist(),
        "torch_top1": arrays["logits"].argmax(axis=1).tolist(),
        "model_bytes": (folder / "model.onnx").stat().st_size,
        "reference_bytes": (folder / "reference.npz").stat().st_size,
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so reruns are byte-identical."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            value = np.asarray(value)
            if value.dtype.kind == "f":
                value = value.astype(np.float32)
            payload = io.BytesIO()
            np.lib.format.write_array(payload, value.copy(order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, payload.getvalue(), compresslevel=9)
    path.write_bytes(buffer.getvalue())


def versions() -> dict[str, str]:
    from importlib.metadata import version
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "grad-cam": version("grad-cam"),
            "captum": captum.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "numpy": np.__version__, "opencv": cv2.__version__}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", nargs="*", choices=[a.name for a in ARCHS])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore", module="captum")  # "setting backward hooks", requires_grad
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
    x = normalize(smooth_images(len(TARGETS), SIZE, IMAGE_SEED))
    calibration = normalize(smooth_images(N_CALIBRATION, SIZE, CALIBRATION_SEED))

    manifest_path = args.out / "provenance.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update({
        "purpose": "references for tests/test_reference_parity.py (torch, pytorch-grad-cam, captum)",
        "command": "python tools/make_reference_fixtures.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "versions": versions(),
        "input": {"size": [SIZE, SIZE], "images": len(TARGETS), "image_seed": IMAGE_SEED,
                  "normalization": "imagenet mean/std", "targets": list(TARGETS)},
        "integrated_gradients": {"baseline": "zeros", "n_steps": IG_STEPS, "method": IG_METHOD},
        "torch_seed": TORCH_SEED,
    })
    archs = manifest.setdefault("architectures", {})
    for arch in ARCHS:
        if args.only and arch.name not in args.only:
            continue
        archs[arch.name] = make_fixture(arch, args.out, x, calibration)
        info = archs[arch.name]
        print(f"{arch.name}: layer {info['layer']} (onnxcam default {info['onnxcam_default_layer']}), "
              f"model {info['model_bytes']} B, reference {info['reference_bytes']} B")
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
