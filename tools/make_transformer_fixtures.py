"""Transformer references: pytorch-grad-cam with its reshape transforms, and attention rollout /
gradient-weighted rollout written in torch from the papers' equations.

onnxcam reads transformer token layers and attention probabilities from the ONNX graph alone
(``onnxcam/tokens.py``, ``onnxcam/attention.py``). This script builds what the libraries users
already trust compute on the same weights and inputs, so ``tests/test_transformers.py`` can
compare with numpy and onnxruntime only (torch, timm and grad-cam are tools-only).

Models (random weights: ``torch.manual_seed``, every parameter perturbed by N(0, 0.05^2) so that
zero-initialised heads and unit LayerNorms do not make maps trivial; nothing downloaded):

* ``vit``: torchvision ``VisionTransformer`` (vit_b_16's architecture, small: 48x48 input,
  patch 8, 2 layers, width 32), CLS-pooled;
* ``deit``: timm ``deit_tiny_distilled_patch16_224`` with ``img_size=48, patch_size=8, depth=2``
  (CLS + distillation token: two prefix tokens, both read by the head);
* ``vitreg``: timm ``VisionTransformer`` with 4 register tokens (prefix 5, the head reads CLS);
* ``swin``: torchvision ``SwinTransformer`` (swin_t's architecture: patch 4, window 4, depths
  [2, 2], width 16, 64x64 input): NHWC stages with shifted windows, mean-pooled;
* ``vitgap``: timm ``VisionTransformer`` without class token, ``global_pool="avg"``, a
  non-square 32x48 input (grid 4x6), mean-pooled;
* ``maxvit``: torchvision ``MaxVit`` (maxvit_t's architecture, small: 64x64 input, stem 8,
  blocks [16, 32] of one layer each, partition 4, head dim 8): each layer an MBConv, window
  attention and grid attention, each attention cutting the NCHW map into partitions and
  putting it back with Reshape/Transpose; mean-pooled.

Each is exported with the TorchScript exporter and the dynamo exporter (opset 18, dynamic
batch, input ``input``, output ``logits``): ``<model>_ts.onnx``, ``<model>_dynamo.onnx``.

References, ``<model>.npz``, on a fixed batch of 2 inputs, for the top-1 classes and for the
classes (3, 5):

* ``gradcam``, ``gradcam++``, ``layercam`` (pytorch-grad-cam, ``ClassifierOutputTarget``) at
  the layer pytorch-grad-cam's tutorials use: ViT / DeiT the last block's first LayerNorm
  (``encoder.layers[-1].ln_1``, ``blocks[-1].norm1``) with ``reshape_transform`` dropping the
  prefix tokens; Swin the final norm (NHWC, permuted); ViT-GAP the last block's output;
  MaxViT the last block's last layer (``blocks[-1].layers[-1]``, NCHW after grid attention).
  The ONNX tensor holding that layer is found by value (onnxruntime runs every intermediate
  tensor of its shape as an output; the one equal to the torch forward hook's output), per
  exporter, and recorded as ``layer:<exporter>``; it must be onnxcam's default layer (the test
  checks).
* ``rollout`` (Abnar & Zuidema 2020) and ``gradient-rollout`` (Chefer, Gur & Wolf 2021) for
  ViT and DeiT: the attention probabilities from a torch forward in which every attention is an
  explicit ``softmax(QK^T/sqrt(d))`` tensor with ``retain_grad`` (its logits checked equal to
  the module's), gradients by ``torch.autograd`` of ``sum(logits * onehot(t))``; the relevance
  rows of the tokens the head reads (ViT: CLS; DeiT: CLS and distillation), the prefix dropped,
  scaled and resized by pytorch-grad-cam's ``scale_cam_image``.
* MaxViT also: ``gradient:classes``, the gradient of ``sum_n logits[n, classes[n]]`` at the
  reference layer by ``torch.autograd``, and ``early-gradient:classes`` at the first block's
  output (``blocks[0]``, recorded as ``early:<exporter>``), which reaches the logits through
  the whole last block (MBConv, window and grid attention).

``--full`` instead checks the full-size torchvision ``vit_b_16``, ``swin_t``, ``maxvit_t`` and timm
``deit_tiny_distilled_patch16_224`` (224x224, both exporters) the same way without writing
fixtures, prints every correlation (and how many maps are all zero on both sides) and MaxViT's
gradient errors, and times ViT-B/16 on CPU (onnxcam Grad-CAM, rollout,
gradient rollout vs the plain forward of the exported model in onnxruntime, medians).

Usage::

    python tools/make_transformer_fixtures.py [--out tests/fixtures/transformers] [--only vit deit]
    python tools/make_transformer_fixtures.py --full [--only vit_b_16 swin_t maxvit_t deit_tiny_distilled]
    python tools/make_transformer_fixtures.py --time 5      # ViT-B/16 timings only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLASSES = (3, 5)
METHODS = ("gradcam", "gradcam++", "layercam")


# -- models ------------------------------------------------------------------------------------

def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def small_models() -> dict:
    import timm
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return {
        "vit": dict(model=perturbed(VisionTransformer(image_size=48, patch_size=8, num_layers=2, num_heads=2,
                                                      hidden_dim=32, mlp_dim=64, num_classes=10), 1),
                    size=(48, 48), kind="tv_vit"),
        "deit": dict(model=perturbed(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                                                       img_size=48, patch_size=8, depth=2, embed_dim=32,
                                                       num_heads=2, num_classes=10), 2),
                     size=(48, 48), kind="timm_vit"),
        "swin": dict(model=perturbed(SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                                     window_size=[4, 4], num_classes=10), 3),
                     size=(64, 64), kind="tv_swin"),
        "vitreg": dict(model=perturbed(timm.models.vision_transformer.VisionTransformer(
            img_size=48, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, reg_tokens=4), 5),
            size=(48, 48), kind="timm_vit"),
        "vitgap": dict(model=perturbed(timm.models.vision_transformer.VisionTransformer(
            img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
            class_token=False, global_pool="avg"), 4), size=(32, 48), kind="timm_gap"),
        "maxvit": dict(model=perturbed(MaxVit(input_size=(64, 64), stem_channels=8, partition_size=4,
                                              block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                                              stochastic_depth_prob=0.0, num_classes=10), 6),
                       size=(64, 64), kind="tv_maxvit"),
    }


def full_models() -> dict:
    import timm
    import torchvision

    torch.manual_seed(0)
    return {
        "vit_b_16": dict(model=perturbed(torchvision.models.vit_b_16(weights=None), 1), size=(224, 224), kind="tv_vit"),
        "swin_t": dict(model=perturbed(torchvision.models.swin_t(weights=None), 3), size=(224, 224), kind="tv_swin"),
        "deit_tiny_distilled": dict(model=perturbed(timm.create_model("deit_tiny_distilled_patch16_224",
                                                                      pretrained=False), 2),
                                    size=(224, 224), kind="timm_vit"),
        "maxvit_t": dict(model=perturbed(torchvision.models.maxvit_t(weights=None), 6), size=(224, 224),
                         kind="tv_maxvit"),
    }


def target_layer(model, kind: str):
    """The module pytorch-grad-cam's tutorials explain, and its reshape transform."""
    if kind == "tv_vit":
        return model.encoder.layers[-1].ln_1, 1
    if kind == "timm_vit":
        return model.blocks[-1].norm1, model.num_prefix_tokens
    if kind == "tv_swin":
        return model.norm, None
    if kind == "tv_maxvit":
        return model.blocks[-1].layers[-1], "NCHW"
    return model.blocks[-1], 0


def reshape_transform(prefix: int | str | None, grid: tuple[int, int]):
    """pytorch-grad-cam's ViT / Swin tutorials' transforms: tokens (prefix dropped) or NHWC -> NCHW;
    none for an NCHW layer (MaxViT)."""
    if prefix == "NCHW":
        return None

    def transform(tensor):
        if prefix is None:  # NHWC (torchvision Swin)
            return tensor.permute(0, 3, 1, 2)
        patches = tensor[:, prefix:, :]
        return patches.reshape(tensor.size(0), grid[0], grid[1], tensor.size(2)).permute(0, 3, 1, 2)
    return transform


# -- export ------------------------------------------------------------------------------------

def export(model, size, path: Path, dynamo: bool) -> None:
    x = torch.randn(2, 3, *size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=64)
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},),
                                        external_data=False, verbose=False)
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=18, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 8)
    onnx.save(proto, str(path))


def tensor_by_value(path: Path, x: np.ndarray, value: np.ndarray) -> str:
    """The ONNX tensor equal to ``value`` (a torch activation), running the tensors of its shape
    (batch aside) as outputs: not every tensor, whose arrays full-size models cannot all hold."""
    from onnxcam.model import static_dims, with_shapes
    model = with_shapes(onnx.load(str(path)))
    known = {vi.name: vi for vi in model.graph.value_info
             if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
             and (static_dims(vi) or ())[1:] == value.shape[1:]}
    names = [n for node in model.graph.node for n in node.output if n in known]
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": x})
    scale = max(1.0, float(np.abs(value).max()))
    for name, out in zip(names, outputs):
        if out.shape == value.shape and float(np.abs(out - value).max()) < 1e-4 * scale:
            return name
    raise RuntimeError(f"{path}: no tensor equals the torch activation {value.shape}")


# -- references --------------------------------------------------------------------------------

def gradcam_references(model, kind: str, grid, x: torch.Tensor) -> dict[str, np.ndarray]:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, prefix = target_layer(model, kind)
    out = {}
    for name, cls in (("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus), ("layercam", LayerCAM)):
        with cls(model=model, target_layers=[layer], reshape_transform=reshape_transform(prefix, grid)) as cam:
            out[f"{name}:top1"] = cam(input_tensor=x, targets=None).astype(np.float32)
            out[f"{name}:classes"] = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in CLASSES]
                                         ).astype(np.float32)
    return out


def layer_gradient(model, layer, x: torch.Tensor) -> np.ndarray:
    """d sum_n logits[n, CLASSES[n]] / d (the output of ``layer``), by torch.autograd."""
    stash = {}

    def keep(module, inputs, output):
        output.retain_grad()
        stash["a"] = output

    handle = layer.register_forward_hook(keep)
    logits = model(x)
    handle.remove()
    logits[torch.arange(len(x)), torch.tensor(CLASSES)].sum().backward()
    model.zero_grad()
    return stash["a"].grad.numpy().astype(np.float32)


def activation(model, layer, x: torch.Tensor) -> np.ndarray:
    stash = {}
    handle = layer.register_forward_hook(lambda m, i, o: stash.update(a=o.detach().numpy()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return stash["a"]


def attention_probabilities(model, kind: str, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """logits and every attention's probabilities (N, heads, T, T), each retaining its gradient."""
    if kind == "tv_vit":
        return _tv_vit_forward(model, x)
    attentions = []

    def keep(module, inputs, output):
        output.retain_grad()
        attentions.append(output)

    handles = []
    for block in model.blocks:
        block.attn.fused_attn = False  # timm then writes softmax -> attn_drop -> @ v
        handles.append(block.attn.attn_drop.register_forward_hook(keep))
    logits = model(x)
    for handle in handles:
        handle.remove()
    return logits, attentions


def _tv_vit_forward(model, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torchvision's VisionTransformer with each nn.MultiheadAttention written out."""
    n = x.shape[0]
    tokens = model._process_input(x)
    tokens = torch.cat([model.class_token.expand(n, -1, -1), tokens], dim=1) + model.encoder.pos_embedding
    attentions = []
    for block in model.encoder.layers:
        y = block.ln_1(tokens)
        mha = block.self_attention
        width, heads = y.shape[-1], mha.num_heads
        q, k, v = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).split(width, dim=-1)
        q, k, v = (t.reshape(n, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        A = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width // heads), dim=-1)
        A.retain_grad()
        attentions.append(A)
        mixed = mha.out_proj((A @ v).transpose(1, 2).reshape(n, -1, width))
        tokens = tokens + mixed
        tokens = tokens + block.mlp(block.ln_2(tokens))
    logits = model.heads(model.encoder.ln(tokens)[:, 0])
    return logits, attentions


def rollout_references(model, kind: str, grid, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Abnar & Zuidema's rollout and Chefer et al.'s gradient-weighted rollout, from the equations."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    prefix = 1 if kind == "tv_vit" else model.num_prefix_tokens
    # the tokens the head reads: CLS (and DeiT's distillation token), not register tokens
    rows = list(range(prefix - model.num_reg_tokens)) if kind == "timm_vit" else [0]
    size = (x.shape[3], x.shape[2])
    out = {}
    for label, classes in (("top1", None), ("classes", CLASSES)):
        logits, attentions = attention_probabilities(model, kind, x)
        with torch.no_grad():
            expected = model(x)
        assert torch.allclose(logits, expected, atol=1e-5), "explicit attention forward != the module"
        chosen = logits.argmax(1) if classes is None else torch.tensor(classes)
        score = (logits * F.one_hot(chosen, logits.shape[1])).sum()
        score.backward()
        tokens = attentions[0].shape[-1]
        eye = torch.eye(tokens, dtype=torch.float64)
        plain = eye.expand(len(x), tokens, tokens)
        weighted = plain
        for A in attentions:
            a = A.detach().double()
            mixed = 0.5 * a.mean(1) + 0.5 * eye
            plain = (mixed / mixed.sum(-1, keepdim=True)) @ plain
            weighted = weighted + (A.grad.double() * a).clamp(min=0).mean(1) @ weighted
        for name, R in (("rollout", plain), ("gradient-rollout", weighted)):
            raw = R[:, rows, prefix:].mean(1).reshape(len(x), *grid).numpy().astype(np.float32)
            out[f"{name}:{label}"] = scale_cam_image(raw, size).astype(np.float32)
        model.zero_grad()
    return out


def grid_of(model, kind: str, size) -> tuple[int, int]:
    patch = {"tv_vit": lambda: model.patch_size, "timm_vit": lambda: model.patch_embed.patch_size[0],
             "timm_gap": lambda: model.patch_embed.patch_size[0], "tv_swin": lambda: 32,
             "tv_maxvit": lambda: 2 ** (len(model.blocks) + 1)}[kind]()
    return size[0] // patch, size[1] // patch


def references(name: str, spec: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The reference arrays, and the torch activations whose ONNX tensors are to be found by
    value (``layer``: the reference layer; ``early``: MaxViT's first block output)."""
    model, kind, size = spec["model"], spec["kind"], spec["size"]
    torch.manual_seed(10)
    x = torch.randn(2, 3, *size)
    grid = grid_of(model, kind, size)
    refs = gradcam_references(model, kind, grid, x)
    if kind in ("tv_vit", "timm_vit"):
        refs.update(rollout_references(model, kind, grid, x))
    values = {"layer": activation(model, target_layer(model, kind)[0], x)}
    if kind == "tv_maxvit":
        refs["gradient:classes"] = layer_gradient(model, target_layer(model, kind)[0], x)
        refs["early-gradient:classes"] = layer_gradient(model, model.blocks[0], x)
        values["early"] = activation(model, model.blocks[0], x)
    refs["x"] = x.numpy()
    with torch.no_grad():
        refs["logits"] = model(x).numpy()
    refs["classes"] = np.array(CLASSES)
    return refs, values


# -- comparison (for --full) -------------------------------------------------------------------

def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b, atol=1e-6) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def compare(path: Path, refs: dict, layer: str, early: str | None = None) -> dict[str, float]:
    """Correlations with the reference maps; for MaxViT also the gradients' largest error
    relative to torch's largest value, at ``layer`` and at ``early`` (the first block's output)."""
    from onnxcam import Explainer

    explainer = Explainer(path, cache=False)
    default = next(l for l in explainer.layers() if l.default)
    print(f"  {path.name}: default {default.name} ({default.kind}), reference layer {layer}")
    at_layer = Explainer(path, layer=layer, cache=False)
    results = {}
    classes = [int(c) for c in refs["classes"]]
    for key in sorted(k for k in refs if k.split(":")[0] in METHODS + ("rollout", "gradient-rollout")):
        method, which = key.split(":")
        targets = None if which == "top1" else classes
        chosen = explainer if method in ("rollout", "gradient-rollout") else at_layer
        maps = chosen.explain(refs["x"], method, targets).heatmaps
        # an all-zero map (nothing positive at the layer) agrees with an all-zero reference
        # vacuously: say how many there are
        zero = sum(not m.any() and not r.any() for m, r in zip(maps, refs[key]))
        results[f"{key} correlation" + (f" ({zero} of {len(maps)} maps all zero in both)" if zero else "")] = \
            correlation(maps, refs[key])
    for key, name in (("gradient:classes", layer), ("early-gradient:classes", early)):
        if key in refs and name is not None:
            at = at_layer if name == layer else Explainer(path, layer=name, cache=False)
            gradient = at.explain(refs["x"], "gradcam", classes).gradients[name]
            results[f"{key} max|error|/max|torch|"] = float(
                np.abs(gradient - refs[key]).max() / np.abs(refs[key]).max())
    return results


def write(out: Path, name: str, refs: dict, layers: dict) -> None:
    """``layers``: tensor names keyed ``<value>:<exporter>`` (``layer:ts``, ``early:dynamo``)."""
    arrays = {k: v for k, v in refs.items()}
    for key, layer in layers.items():
        arrays[key] = np.array(layer)
    np.savez_compressed(out / f"{name}.npz", **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "transformers")
    parser.add_argument("--full", action="store_true", help="also check the full-size models and time ViT-B/16")
    parser.add_argument("--only", nargs="*", help="model names")
    parser.add_argument("--exporters", nargs="*", default=["ts", "dynamo"], help="with --full: ts, dynamo")
    parser.add_argument("--time", type=int, metavar="ROUNDS", help="only time ViT-B/16 (ROUNDS round-robin rounds)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.time:
        time_vit_b_16(args.time)
        return
    if args.full:
        full(args.only, args.exporters)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    provenance = {"torch": torch.__version__, "onnx": onnx.__version__, "command": " ".join(sys.argv)}
    if args.only and (args.out / "provenance.json").is_file():
        provenance = {**json.loads((args.out / "provenance.json").read_text()),
                      "torch": torch.__version__, "onnx": onnx.__version__}
    for name, spec in small_models().items():
        if args.only and name not in args.only:
            continue
        refs, values = references(name, spec)
        layers = {}
        for exporter in ("ts", "dynamo"):
            path = args.out / f"{name}_{exporter}.onnx"
            export(spec["model"], spec["size"], path, exporter == "dynamo")
            layers.update({f"{key}:{exporter}": tensor_by_value(path, refs["x"], value)
                           for key, value in values.items()})
        write(args.out, name, refs, layers)
        print(name, layers, {k: v.shape for k, v in refs.items() if ":" in k})
        if args.only:  # the other models' fixtures stay as their own command made them
            provenance.setdefault("models", {})[name] = " ".join(sys.argv)
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")


def full(only, exporters=("ts", "dynamo")) -> None:
    """Full-size models: parity printed, nothing written; then ViT-B/16 timings."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in full_models().items():
            if only and name not in only:
                continue
            refs, values = references(name, spec)
            for exporter in exporters:
                path = Path(tmp) / f"{name}_{exporter}.onnx"
                started = time.perf_counter()
                export(spec["model"], spec["size"], path, exporter == "dynamo")
                layer = tensor_by_value(path, refs["x"], values["layer"])
                early = tensor_by_value(path, refs["x"], values["early"]) if "early" in values else None
                print(f"{name} {exporter} (export {time.perf_counter() - started:.0f} s)")
                for key, r in compare(path, refs, layer, early).items():
                    print(f"    {key:<40} {r:.7g}")
                if name == "vit_b_16" and exporter == "ts":
                    timings(path, spec["size"])
                os.remove(path)


def timings(path: Path, size, repeats: int = 5) -> None:
    """ViT-B/16 on CPU, batch 1: onnxcam methods vs the plain onnxruntime forward of the same
    export, run round-robin (one of each per round, after a warm-up round) so that a change of
    machine load hits all alike; medians."""
    from onnxcam import Explainer

    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    explainer = Explainer(path, provider="cpu", cache=False)
    runs = {"forward": lambda: session.run(None, {"input": x})}
    runs.update({m: (lambda m=m: explainer.explain(x, m)) for m in ("gradcam", "rollout", "gradient-rollout")})
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            if round_:
                seconds[name].append(time.perf_counter() - started)
    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    print(f"  {path.name} CPU batch 1 ({os.cpu_count()} cores, onnxruntime default threads), "
          f"medians of {repeats} round-robin rounds: forward {medians['forward'] * 1e3:.0f} ms")
    for name in ("gradcam", "rollout", "gradient-rollout"):
        print(f"    {name:<18} {medians[name] * 1e3:7.0f} ms  = {medians[name] / medians['forward']:.2f} x forward")


def time_vit_b_16(repeats: int) -> None:
    """Only the ViT-B/16 timings (TorchScript export, random weights)."""
    import torchvision

    torch.manual_seed(0)
    model = perturbed(torchvision.models.vit_b_16(weights=None), 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vit_b_16_ts.onnx"
        export(model, (224, 224), path, dynamo=False)
        timings(path, (224, 224), repeats)


if __name__ == "__main__":
    main()
