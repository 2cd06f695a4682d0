"""Whole-model check of onnxcam's autodiff against torch autograd on torchvision classifiers.

For each architecture (random weights, fixed seeds; BatchNorm statistics calibrated on random
batches, as training would, so activations have realistic scales, with tiny variances damped;
see :func:`build`), exported with the
TorchScript exporter (``dynamo=False``) at opsets 13 and 17 and with the dynamo exporter:

1. pick, from the ONNX graph alone as onnxcam does (``ModelGraph.layers()``), the default
   layer (last spatial activation) and a middle spatial layer (the one nearest the middle
   whose value some torch module output holds: a functional op's result has no hook);
2. rewrite the model with ``onnxcam.surgery.rewrite`` (gradients of ``sum(seed * logits)``
   with respect to both layers and the input) and run it in onnxruntime (CPU, 1 thread) with
   a random normal seed, so every class contributes;
3. take ``torch.autograd.grad((logits * seed).sum(), [A1, A2, x])`` at the matching torch
   module outputs (in-place activations switched off so captured tensors stay put), in
   float64 (the reference) and in float32;
4. report, per layer, the max relative error max|g_onnx - g_torch64| / max|g_torch64| at
   ORT_ENABLE_ALL (what onnxcam runs), worst over ``--inputs`` random inputs (and seeds).

Kinks: deep nets with ReLU/ReLU6/Hardswish have pre-activations within float32 rounding of a
kink (0, or 6 for ReLU6); two float32 forward passes (torch's and onnxruntime's, or
onnxruntime with and without its NCHWc layout optimizer) can put such a unit on different
sides, and the gradient then differs by that unit's whole contribution. Seen: mobilenet_v2
at 6e-3 from one unit at 6.0000033 in onnxruntime and 5.9999999 in torch float64 (torch's own
float32 gradient was 1e-2 away on another input); densenet121 at 7e-4 from one ReLU input
that onnxruntime's NCHWc Conv computed as 5e-6 instead of 0 (scale 43). So the reference
differentiates each kink (ReLU, ReLU6, Hardswish, Hardsigmoid modules, F.relu, and MaxPool's
argmax) at onnxruntime's float32 value of its input (:func:`onnx_decisions`): the remaining
difference is the rules' own, up to float32 rounding of smooth parts (the fp32floor column:
torch float32 against float64). The notes also show the plain difference ("as is"). Also reported: the rewritten graph's extra
node count, its size and the rewrite time.

Tools only (needs torch/torchvision, and onnxscript for the dynamo exporter). Heavy: run it in
the background, e.g. ``nohup python tools/autodiff_zoo.py > /tmp/zoo.log 2>&1 &``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torchvision.models as tv  # noqa: E402
from onnx import helper  # noqa: E402

from onnxcam.model import ModelGraph  # noqa: E402
from onnxcam.surgery import SEED, RewriteRequest, rewrite  # noqa: E402

MODELS = {
    "resnet18": lambda: tv.resnet18(weights=None),
    "resnet50": lambda: tv.resnet50(weights=None),
    "vgg16": lambda: tv.vgg16(weights=None),
    "mobilenet_v2": lambda: tv.mobilenet_v2(weights=None),
    "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(weights=None),
    "efficientnet_b0": lambda: tv.efficientnet_b0(weights=None),
    "densenet121": lambda: tv.densenet121(weights=None),
    "squeezenet1_1": lambda: tv.squeezenet1_1(weights=None),
    "googlenet": lambda: tv.googlenet(weights=None, aux_logits=False, init_weights=True),
    "shufflenet_v2_x1_0": lambda: tv.shufflenet_v2_x1_0(weights=None),
    "regnet_y_400mf": lambda: tv.regnet_y_400mf(weights=None),
    "convnext_tiny": lambda: tv.convnext_tiny(weights=None),
    "mnasnet0_5": lambda: tv.mnasnet0_5(weights=None),
}
#: The TorchScript exporter cannot export adaptive pooling to 7x7 from a size it does not divide.
INPUT_SIZE = {"vgg16": 224}

EXPORTERS = {"ts13": (False, 13), "ts17": (False, 17), "dynamo": (True, 18)}
ALL, OFF = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL


@dataclass
class Row:
    model: str
    exporter: str
    layer: str
    tensor: str
    error: float | None
    verdict: str
    note: str = ""
    floor: float | None = None


def build(name: str, size: int) -> torch.nn.Module:
    """The architecture with random weights, BN running statistics calibrated on two random
    batches (variances damped) and BN affine parameters perturbed (so folding them matters);
    in-place activations off (a hook's captured tensor must not change under it)."""
    torch.manual_seed(0)
    model = MODELS[name]()
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, size, size, generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
                # Channels nearly constant on noise get tiny variances whose 1/sqrt amplifies
                # float32 rounding until float32 itself is wrong (torch's own float32 input
                # gradient was 17% off float64 on efficientnet_b0): damp them.
                module.running_var.add_(module.running_var.mean() * 0.1)
    return model.eval()


def export(model: torch.nn.Module, x: torch.Tensor, dynamo: bool, opset: int, path: Path) -> onnx.ModelProto:
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=opset, dynamo=dynamo)
    if not dynamo:
        kwargs["do_constant_folding"] = True
    # Both exporters narrate (and dump whole graphs on failure): keep the table readable.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, (x,), str(path), **kwargs)
    exported = onnx.load(str(path))
    if exported.ir_version > 10:
        exported.ir_version = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14
    return exported


def session(model: onnx.ModelProto, level=ALL) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy that also returns the tensors ``names``."""
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    present = {o.name for o in copied.graph.output}
    copied.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                               for n in names if n not in present)
    return copied


def module_outputs(model: torch.nn.Module, x: torch.Tensor, decisions: list[np.ndarray] | None = None
                   ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The model's output and every tensor a named module or ``F.relu`` returned, in call
    order; with ``decisions``, kinks take onnxruntime's side (:func:`onnx_decisions`)."""
    captured: list[tuple[str, torch.Tensor]] = []
    # Decision hooks first: a hook sees the output the hooks registered before it returned.
    with onnx_decisions(model, decisions, captured):
        hooks = [module.register_forward_hook(
            lambda _m, _i, out, name=name: captured.append((name, out)) if isinstance(out, torch.Tensor) else None)
            for name, module in model.named_modules() if name]
        try:
            return model(x), captured
        finally:
            for hook in hooks:
                hook.remove()


def match(value: np.ndarray, captured: list[tuple[str, torch.Tensor]]) -> tuple[str, torch.Tensor] | None:
    """The module output equal to ``value`` (max relative difference below 1e-3)."""
    scale = max(float(np.abs(value).max()), 1e-12)
    best = None
    for index, (name, tensor) in enumerate(captured):
        if tuple(tensor.shape) == value.shape:
            error = float(np.abs(tensor.detach().double().numpy() - value).max()) / scale
            # On ties: a module over F.relu, the innermost (first finished) module over its parents.
            key = (error, name == "F.relu", index)
            if best is None or key < best[0]:
                best = (key, name, tensor)
    return (best[1], best[2]) if best is not None and best[0][0] < 1e-3 else None


def pick_layers(graph: ModelGraph, exported: onnx.ModelProto, x: np.ndarray,
                captured: list[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """onnxcam's default layer, and the spatial layer nearest the middle that torch can hook."""
    layers = graph.layers()
    default = next(layer for layer in layers if layer.default)
    middle = len(layers) // 2
    order = sorted(range(len(layers)), key=lambda i: (abs(i - middle), i))[:12]
    names = [default.name] + [layers[i].name for i in order if layers[i].name != default.name]
    values = session(with_outputs(exported, names), OFF).run(names, {graph.input.name: x})
    chosen = {"last": default.name}
    for name, value in zip(names[1:], values[1:]):
        if match(value, captured) is not None:
            chosen["middle"] = name
            break
    return chosen


#: torch modules with kinks (or argmax choices), and the ONNX ops whose first input is such a
#: module's input.
KINKED_MODULES = (torch.nn.Hardtanh, torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.MaxPool2d)  # ReLU: F.relu
KINKED_OPS = ("Relu", "Clip", "HardSwish", "HardSigmoid", "MaxPool")


def kink_inputs(model: onnx.ModelProto) -> list[str]:
    """Inputs of the forward graph's kinked ops (not of onnxcam's gradient nodes)."""
    return sorted({n.input[0] for n in model.graph.node
                   if n.op_type in KINKED_OPS and not n.name.startswith("onnxcam/")})


def _decided_like(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """y's value with the derivative the module has at ``at`` (onnxruntime's input): for an
    elementwise kink f, y + f'(at) (x - x); for MaxPool, y + (x - x) gathered at the argmax
    of ``at`` (first index on ties, as onnxruntime and torch both pick)."""
    delta = x - x.detach()  # zero-valued, carries d/dx
    if isinstance(module, torch.nn.MaxPool2d):
        _, index = torch.nn.functional.max_pool2d(at, module.kernel_size, module.stride, module.padding,
                                                  module.dilation, ceil_mode=module.ceil_mode, return_indices=True)
        picked = delta.flatten(2).gather(2, index.flatten(2)).view_as(y)
        return y.detach() + picked
    at = at.clone().requires_grad_(True)
    with torch.enable_grad():  # forward(), not __call__: the hooks must not fire again
        slope = torch.autograd.grad(module.forward(at).sum(), at)[0]
    return y.detach() + slope * delta


@contextlib.contextmanager
def onnx_decisions(model: torch.nn.Module, values: list[np.ndarray] | None, captured: list):
    """``F.relu`` never in place (a captured tensor must not change afterwards; densenet and
    googlenet call ``F.relu(x, inplace=True)``), its outputs recorded in ``captured``. With
    ``values`` (onnxruntime's float32 inputs of the kinked ops), each kink differentiates at
    onnxruntime's value of its input, matched by value, instead of its own
    (:func:`_decided_like`); per call, so a module used several times (resnet's shared ReLU)
    is handled. Where the two forward passes agree this changes nothing; where float32 rounding
    put a unit on the other side of a kink (or changed a MaxPool argmax) torch takes
    onnxruntime's side, so what remains of the difference is the rules' own."""
    functional_relu = torch.nn.functional.relu

    def relu(input, inplace=False):
        output = functional_relu(input)
        found = None if values is None else match_array(input.detach().double().numpy(), values)
        if found is not None:
            output = output.detach() + (torch.from_numpy(found) > 0).to(input.dtype) * (input - input.detach())
        captured.append(("F.relu", output))
        return output

    def after(module, args, output):
        found = match_array(args[0].detach().double().numpy(), values)
        if found is None:
            return None
        return _decided_like(module, args[0], output, torch.from_numpy(found).to(args[0].dtype))

    hooks = [] if values is None else [
        module.register_forward_hook(after) for module in model.modules() if isinstance(module, KINKED_MODULES)]
    torch.nn.functional.relu = relu
    try:
        yield
    finally:
        torch.nn.functional.relu = functional_relu
        for hook in hooks:
            hook.remove()


def match_array(value: np.ndarray, candidates: list[np.ndarray]) -> np.ndarray | None:
    """The candidate equal to ``value`` (max relative difference below 1e-3)."""
    scale = max(float(np.abs(value).max()), 1e-12)
    best = None
    for candidate in candidates:
        if candidate.shape == value.shape:
            error = float(np.abs(candidate - value).max()) / scale
            if best is None or error < best[0]:
                best = (error, candidate)
    return best[1] if best is not None and best[0] < 1e-3 else None


def torch_gradients(model: torch.nn.Module, x: np.ndarray, seed: np.ndarray, activations: dict[str, np.ndarray],
                    dtype: torch.dtype, decisions: list[np.ndarray] | None = None) -> dict[str, tuple]:
    """For each ONNX activation, (module name, gradient at the torch module output with the
    same value) or (None, None); and the input gradient; computed in ``dtype``, with the kinks
    decided by onnxruntime's values when ``decisions`` (see :func:`onnx_decisions`)."""
    model = copy.deepcopy(model).to(dtype)
    x_t = torch.from_numpy(x).to(dtype).requires_grad_(True)
    logits, captured = module_outputs(model, x_t, decisions)
    matches = {label: match(value, captured) for label, value in activations.items()}
    wanted = [m[1] for m in matches.values() if m is not None] + [x_t]
    grads = iter(torch.autograd.grad((logits * torch.from_numpy(seed).to(dtype)).sum(), wanted,
                                     allow_unused=True))
    result = {}
    for label, found in matches.items():
        if found is None:
            result[label] = (None, None)
            continue
        grad = next(grads)
        result[label] = (found[0], np.zeros(activations[label].shape) if grad is None else grad.double().numpy())
    result["input"] = ("x", next(grads).double().numpy())
    result["logits"] = ("logits", logits.detach().double().numpy())
    return result


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max()) / max(float(np.abs(theirs).max()), 1e-30)


def check(name: str, exporter: str, tolerance: float, inputs: int, workdir: Path) -> list[Row]:
    dynamo, opset = EXPORTERS[exporter]
    size = INPUT_SIZE.get(name, 128)
    model = build(name, size)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 3, size, size)).astype(np.float32) for _ in range(inputs)]
    try:
        exported = export(model, torch.from_numpy(xs[0]), dynamo, opset, workdir / f"{name}-{exporter}.onnx")
    except Exception as exc:  # noqa: BLE001 - report, do not stop the sweep
        return [Row(name, exporter, "-", "-", None, "FAIL", f"export failed: {str(exc).splitlines()[0][:90]}")]
    graph = ModelGraph(exported, name)
    with torch.no_grad():
        captured = module_outputs(model, torch.from_numpy(xs[0]))[1]
    layers = pick_layers(graph, exported, xs[0], captured)
    del captured
    logits_name = graph.logits()
    start = time.perf_counter()
    try:
        rewritten = rewrite(exported, RewriteRequest(tuple(layers.values()), logits_name,
                                                     input_gradient=True, dynamic_batch=False), name)
    except Exception as exc:  # noqa: BLE001
        return [Row(name, exporter, "-", "-", None, "FAIL", f"rewrite failed: {str(exc).splitlines()[0][:120]}")]
    seconds = time.perf_counter() - start
    extra = len(rewritten.model.graph.node) - len(exported.graph.node)
    megabytes = len(rewritten.model.SerializeToString()) / 2 ** 20
    opset_after = rewritten.model.opset_import[0].version
    stats = f"+{extra} nodes, {megabytes:.1f} MB, rewrite {seconds:.1f}s, opset {opset_after}, {size}px"

    classes = int(np.prod(graph.dims(logits_name)[1:]))
    checked = list(layers.items()) + [("input", rewritten.input)]
    kinks = kink_inputs(rewritten.model)
    names = [logits_name] + list(layers.values()) + [rewritten.gradients[t] for _, t in checked]
    runner = session(with_outputs(rewritten.model, kinks), ALL)
    labels = ["logits"] + [c[0] for c in checked]
    errors: dict[str, list[float]] = {label: [] for label in labels}   # vs torch float64, ORT's kinks
    plain: dict[str, list[float]] = {label: [] for label in labels}    # vs torch float64 as is
    floors: dict[str, list[float]] = {label: [] for label in labels}   # torch float32 vs float64
    modules: dict[str, str | None] = {}
    for x in xs:
        seed = rng.standard_normal((1, classes)).astype(np.float32)
        values = runner.run(names + kinks, {rewritten.input: x, SEED: seed})
        outputs = dict(zip(names, values))
        activations = {label: outputs[tensor] for label, tensor in layers.items()}
        decided = torch_gradients(model, x, seed, activations, torch.float64, values[len(names):])
        reference = torch_gradients(model, x, seed, activations, torch.float64)
        single = torch_gradients(model, x, seed, activations, torch.float32)
        errors["logits"].append(relative_error(outputs[logits_name], reference["logits"][1]))
        for label, tensor in checked:
            modules[label], expected = decided[label]
            if expected is None or single[label][1] is None:
                continue
            ours = outputs[rewritten.gradients[tensor]]
            errors[label].append(relative_error(ours, expected))
            plain[label].append(relative_error(ours, reference[label][1]))
            floors[label].append(relative_error(single[label][1], reference[label][1]))

    error = max(errors["logits"])
    rows = [Row(name, exporter, "logits", logits_name, error, "pass" if error < tolerance else "FAIL", stats)]
    for label, tensor in checked:
        if len(errors[label]) < len(xs):
            rows.append(Row(name, exporter, label, tensor, None, "FAIL", "no torch module output matches"))
            continue
        error = max(errors[label])
        note = (f"torch: {modules[label]}; as is: ours {max(plain[label]):.1e}, "
                f"torch fp32 {max(floors[label]):.1e}")
        rows.append(Row(name, exporter, label, tensor, error, "pass" if error < tolerance else "FAIL", note,
                        max(floors[label])))
    return rows


def print_row(row: Row) -> None:
    error = "n/a" if row.error is None else f"{row.error:.2e}"
    floor = "" if row.floor is None else f"{row.floor:.2e}"
    tensor = row.tensor if len(row.tensor) <= 40 else "..." + row.tensor[-37:]
    print(f"{row.model:19s} {row.exporter:6s} {row.layer:6s} {tensor:40s} {error:>9s} {floor:>9s} "
          f"{row.verdict:4s}  {row.note}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--exporters", nargs="*", default=list(EXPORTERS))
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--inputs", type=int, default=3, help="random inputs per model (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("ONNXCAM_CACHE_DIR", tempfile.mkdtemp(prefix="onnxcam-zoo-"))
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, CPU 1 thread, "
          f"batch 1, tolerance {args.tolerance:g} (max relative error vs torch float64)")
    print(f"{'model':19s} {'export':6s} {'layer':6s} {'tensor':40s} {'rel.err':>9s} {'fp32floor':>9s} ok    notes")
    print(f"(worst of {args.inputs} random inputs and seeds; rel.err against torch float64 differentiating "
          "its kinks at onnxruntime's values, fp32floor: torch float32 against torch float64)")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="onnxcam-zoo-") as tmp:
        for name in args.models:
            for exporter in args.exporters:
                try:
                    found = check(name, exporter, args.tolerance, args.inputs, Path(tmp))
                except Exception as exc:  # noqa: BLE001 - one broken case must not end the sweep
                    traceback.print_exc()
                    found = [Row(name, exporter, "-", "-", None, "FAIL", f"crashed: {exc!r}"[:120])]
                for row in found:
                    print_row(row)
                rows.extend(found)
                for leftover in Path(tmp).glob("*"):
                    leftover.unlink()
    failed = sum(r.verdict == "FAIL" for r in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} rows pass")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
