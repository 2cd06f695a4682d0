"""Build the segmentation fixture: what torch and pytorch-grad-cam compute for a region target.

pytorch-grad-cam explains a semantic segmentation model with ``SemanticSegmentationTarget``:
the score is ``sum(output[category] * mask)`` over a binary region mask (its segmentation
tutorial takes the mask as "the pixels where the category wins"). onnxcam seeds the same
functional on the model's dense output (:mod:`onnxcam.dense`). This script makes the
reference once; ``tests/test_dense.py`` reads it with numpy and onnxruntime only (torch is not
available in CI).

Deterministically (fixed seeds, one thread):

1. torchvision's LR-ASPP (``torchvision.models.segmentation.lraspp``: the same
   ``_lraspp_mobilenetv3`` head that ``lraspp_mobilenet_v3_large`` builds) on a
   width-reduced MobileNetV3-Large backbone (``width_mult=0.35, reduced_tail=True,
   dilated=True``: 273 k parameters, so the ONNX file stays near 1 MB), 6 classes, random
   weights; BatchNorm calibrated and perturbed as in ``tools/make_reference_fixtures.py``
   (whose helpers are reused).
2. Exported with the TorchScript exporter at opset 13, input ``input`` [N, 3, 96, 128]
   (dynamic batch; non-square so that H and W cannot be swapped unnoticed), output ``out``
   [N, 6, 96, 128] (the ``"out"`` entry of torchvision's dict output).
3. The target layer is the backbone's last activation (``backbone.16``, LR-ASPP's "high"
   feature, stride 16), found in the ONNX graph by value; onnxcam's default layer for a
   segmentation output must be it (recorded, and checked by the test).
4. Two images, two region targets: image 0 explains the class that wins the most pixels,
   over the pixels where it wins (``argmax``); image 1 explains another class over a box.
   Stored: the masks, torch's activation and ``d score / d A`` (autograd), and
   pytorch-grad-cam's maps for Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM and
   Score-CAM with ``SemanticSegmentationTarget``.
5. With ``--check-defaults``: torchvision's full ``fcn_resnet50``,
   ``deeplabv3_mobilenet_v3_large`` and ``lraspp_mobilenet_v3_large`` (random weights,
   BatchNorm calibrated, 21 classes, aux heads where the constructor has them) are exported
   to a temporary folder; onnxcam's default layer is compared, by value, with the backbone's
   output that pytorch-grad-cam's tutorials explain (``backbone.layer4`` / the last
   ``features`` block), and onnxcam's Grad-CAM there with pytorch-grad-cam's for the
   dominant class over its argmax region. Only the outcome goes into provenance.json.

Usage::

    python tools/make_segmentation_fixture.py [--out tests/fixtures/segmentation] [--check-defaults]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import onnx
import torch
import torchvision
from torch import nn



def _reference_tool():
    """tools/make_reference_fixtures.py, whose helpers (images, BatchNorm calibration, finding a
    module's ONNX tensor by value, the byte-stable npz writer) are reused. It imports Captum
    for the classifier references; Captum plays no part here, so where it is not installed
    empty stand-ins let the module import."""
    import importlib
    import types
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import captum  # noqa: F401
    except ImportError:
        stub = types.ModuleType("captum")
        stub.__version__ = "absent"
        stub._utils = types.ModuleType("captum._utils")
        stub._utils.common = types.ModuleType("captum._utils.common")
        stub._utils.common._register_backward_hook = None
        stub.attr = types.ModuleType("captum.attr")
        stub.attr.GuidedBackprop = stub.attr.IntegratedGradients = stub.attr.Saliency = object
        sys.modules.update({"captum": stub, "captum._utils": stub._utils,
                            "captum._utils.common": stub._utils.common, "captum.attr": stub.attr})
    return importlib.import_module("make_reference_fixtures")


ref = _reference_tool()

import pytorch_grad_cam as pgc  # noqa: E402
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget  # noqa: E402

from onnxcam import Explainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "segmentation"
HEIGHT, WIDTH = 96, 128
NUM_CLASSES = 6
BOX = (70, 20, 120, 80)  # x0, y0, x1, y1 (x1, y1 exclusive), output pixels, for image 1
MAX_BYTES = 2_000_000
PGC_METHODS = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
               "hirescam": pgc.HiResCAM, "layercam": pgc.LayerCAM, "scorecam": pgc.ScoreCAM}
CONSTRUCTOR = ("torchvision.models.segmentation.lraspp._lraspp_mobilenetv3(torchvision.models."
               "mobilenet_v3_large(width_mult=0.35, reduced_tail=True, dilated=True), 6)")


class Out(nn.Module):
    """torchvision segmentation models return a dict (``out``: the per-pixel class scores,
    ``aux``: the auxiliary head's); this returns the entries ``keys`` (one: a tensor)."""

    def __init__(self, model: nn.Module, keys: Sequence[str] = ("out",)):
        super().__init__()
        self.model, self.keys = model, tuple(keys)

    def forward(self, x: torch.Tensor):
        result = self.model(x)
        return result[self.keys[0]] if len(self.keys) == 1 else tuple(result[k] for k in self.keys)


def build() -> nn.Module:
    from torchvision.models.segmentation.lraspp import _lraspp_mobilenetv3
    backbone = torchvision.models.mobilenet_v3_large(width_mult=0.35, reduced_tail=True, dilated=True)
    return _lraspp_mobilenetv3(backbone, NUM_CLASSES)


def images(count: int, seed: int) -> np.ndarray:
    """Normalized NCHW float32 images HEIGHT x WIDTH (the reference tool's smooth images, cropped)."""
    square = ref.smooth_images(count, WIDTH, seed)
    top = (WIDTH - HEIGHT) // 2
    return ref.normalize(square[:, top:top + HEIGHT])


def export(model: nn.Module, x: torch.Tensor, path: Path, outputs: Sequence[str] = ("out",),
           budget: int | None = MAX_BYTES) -> onnx.ModelProto:
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=list(outputs),
                      dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                      do_constant_folding=True)
    proto = onnx.load(str(path))
    proto.ir_version = 8
    onnx.save(proto, str(path))
    if budget is not None and path.stat().st_size > budget:
        raise SystemExit(f"{path}: {path.stat().st_size} bytes, over the {budget} budget")
    return proto


def region_targets(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes (2,), masks (2, H, W) float32): image 0 the class winning most pixels where it
    wins; image 1 the runner-up class over BOX."""
    winners = logits.argmax(axis=1)
    counts = [np.bincount(w.reshape(-1), minlength=NUM_CLASSES) for w in winners]
    first = int(np.argmax(counts[0]))
    second = int(np.argsort(-counts[1], kind="stable")[1])
    masks = np.zeros((2, HEIGHT, WIDTH), np.float32)
    masks[0] = winners[0] == first
    x0, y0, x1, y1 = BOX
    masks[1, y0:y1, x0:x1] = 1.0
    return np.array([first, second], np.int64), masks


def torch_reference(model: nn.Module, layer: nn.Module, x: np.ndarray, classes: np.ndarray,
                    masks: np.ndarray) -> dict[str, np.ndarray]:
    xt = torch.from_numpy(x)
    out, (activation,) = ref.forward_with(model, [layer], xt)
    seed = torch.zeros_like(out)
    for n, (c, m) in enumerate(zip(classes, masks)):
        seed[n, c] = torch.from_numpy(m)
    (gradient,) = torch.autograd.grad((out * seed).sum(), [activation])
    return {"logits": out.detach().numpy(), "activation": activation.detach().numpy(),
            "gradient": gradient.numpy()}


def pgc_maps_for(model: nn.Module, layer: nn.Module, x: np.ndarray, classes, masks: np.ndarray,
                 methods: dict[str, type] = PGC_METHODS) -> dict[str, np.ndarray]:
    targets = [SemanticSegmentationTarget(int(c), m) for c, m in zip(classes, masks)]
    maps = {}
    for key, cls in methods.items():
        with cls(model=model, target_layers=[layer]) as cam:
            maps[key] = np.asarray(cam(input_tensor=torch.from_numpy(x), targets=targets), np.float32)
    return maps


def onnx_name_of(model: nn.Module, module: nn.Module, proto: onnx.ModelProto, x: np.ndarray,
                 candidates: Sequence[str], what: str) -> str:
    with torch.no_grad():
        _, (value,) = ref.forward_with(model, [module], torch.from_numpy(x))
    name, _ = ref.onnx_layer_name(ref.all_float_tensors(proto, x), value.numpy(), candidates, what)
    return name


def default_of(path: Path) -> tuple[str, list[str]]:
    explainer = Explainer(path, provider="cpu", cache=False)
    layers = explainer.layers()
    return next(l.name for l in layers if l.default), [l.name for l in layers]


def make_fixture(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    x = images(2, ref.IMAGE_SEED)
    calibration = images(ref.N_CALIBRATION, ref.CALIBRATION_SEED)
    torch.manual_seed(ref.TORCH_SEED)
    net = build()
    ref.calibrate_batchnorm(net, torch.from_numpy(calibration))
    ref.perturb_batchnorm(net, torch.Generator().manual_seed(ref.TORCH_SEED + 1))
    model = Out(net).eval()
    layer = net.backbone["16"]
    proto = export(model, torch.from_numpy(x), out / "model.onnx")

    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    classes, masks = region_targets(logits)
    default, candidates = default_of(out / "model.onnx")
    name = onnx_name_of(model, layer, proto, x, candidates, "backbone.16")
    arrays: dict[str, np.ndarray] = {"input": x, "classes": classes, "masks": masks,
                                     "box": np.array(BOX, np.int64), "layer": np.array(name)}
    arrays.update(torch_reference(model, layer, x, classes, masks))
    arrays.update(pgc_maps_for(model, layer, x, classes, masks))
    ref.write_npz(out / "reference.npz", arrays)
    size = (out / "reference.npz").stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"reference.npz: {size} bytes, over the {MAX_BYTES} budget")
    return {"constructor": CONSTRUCTOR, "target_module": "backbone.16", "layer": name,
            "onnxcam_default_layer": default, "default_is_layer": default == name,
            "classes": classes.tolist(), "regions": ["argmax", list(BOX)],
            "mask_pixels": masks.sum(axis=(1, 2)).astype(int).tolist(),
            "activation_shape": list(arrays["activation"].shape),
            "model_bytes": (out / "model.onnx").stat().st_size, "reference_bytes": size}


def gradcam_agreement(model: nn.Module, layer: nn.Module, path: Path, x: np.ndarray) -> dict:
    """onnxcam's Grad-CAM at its default layer vs pytorch-grad-cam's at ``layer``, for the
    class winning the most pixels over its argmax region."""
    from onnxcam import SegmentationTarget
    result = Explainer(path, provider="cpu", cache=False).explain(x, "gradcam", targets=SegmentationTarget())
    category = int(result.targets[0])
    mask = result.seeds[0, 0, category]
    theirs = pgc_maps_for(model, layer, x, [category], mask[None], {"gradcam": pgc.GradCAM})["gradcam"]
    ours = result.heatmaps
    return {"gradcam_class": category, "gradcam_region_pixels": int(mask.sum()),
            "gradcam_correlation": float(np.corrcoef(ours.reshape(-1), theirs.reshape(-1))[0, 1]),
            "gradcam_max_abs_diff": float(np.abs(ours - theirs).max())}


def check_defaults() -> dict:
    """onnxcam's default layer on torchvision's full segmentation models vs the backbone output."""
    from torchvision.models import segmentation as seg
    cases = {
        "fcn_resnet50": (lambda: seg.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True),
                         "backbone.layer4", ("out", "aux")),
        "deeplabv3_mobilenet_v3_large": (lambda: seg.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, aux_loss=True), "backbone.16", ("out", "aux")),
        "lraspp_mobilenet_v3_large": (lambda: seg.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None), "backbone.16", ("out",)),
    }
    x = images(1, ref.IMAGE_SEED)
    calibration = torch.from_numpy(images(ref.N_CALIBRATION, ref.CALIBRATION_SEED))
    found = {}
    with tempfile.TemporaryDirectory() as folder:
        for key, (make, module, outputs) in cases.items():
            torch.manual_seed(ref.TORCH_SEED)
            net = make()
            ref.calibrate_batchnorm(net, calibration)  # else activations vanish and many tensors "match"
            net.eval()
            model = Out(net, outputs).eval()
            path = Path(folder) / f"{key}.onnx"
            proto = export(model, torch.from_numpy(x), path, outputs, budget=None)
            default, candidates = default_of(path)
            name = onnx_name_of(Out(net), net.get_submodule(module), proto, x, candidates, f"{key}.{module}")
            found[key] = {"module": module, "layer": name, "onnxcam_default_layer": default,
                          "default_is_layer": default == name, "outputs": list(outputs),
                          **gradcam_agreement(Out(net).eval(), net.get_submodule(module), path, x)}
            print(f"{key}: backbone output {name}, onnxcam default {default}, Grad-CAM vs "
                  f"pytorch-grad-cam r = {found[key]['gradcam_correlation']:.6f}")
    return found


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check-defaults", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
    info = make_fixture(args.out)
    manifest = {
        "purpose": "references for tests/test_dense.py (torch autograd, pytorch-grad-cam "
                   "SemanticSegmentationTarget)",
        "command": "python tools/make_segmentation_fixture.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "versions": {k: v for k, v in ref.versions().items() if k != "captum"},
        "input": {"size": [HEIGHT, WIDTH], "images": 2, "image_seed": ref.IMAGE_SEED,
                  "normalization": "imagenet mean/std"},
        "torch_seed": ref.TORCH_SEED, "fixture": info,
    }
    if args.check_defaults:
        manifest["default_layers"] = check_defaults()
    (args.out / "provenance.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"layer {info['layer']} (onnxcam default {info['onnxcam_default_layer']}), "
          f"model {info['model_bytes']} B, reference {info['reference_bytes']} B")


if __name__ == "__main__":
    main()
