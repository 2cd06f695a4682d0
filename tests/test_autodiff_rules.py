"""The op grid: every VJP rule as a single-node model over shapes and attributes, checked
against float64 central finite differences of the forward model (tests/autodiff_reference.py).

Each case is (id, op, args, attrs, options); args follow :func:`node_model`: ``Input`` is a
differentiated graph input, a bare array a constant initializer, ``None`` an empty optional
input. Inputs avoid kinks and ties where the op has them (``distinct``: shuffled, spaced
values) and stay in the domain where the op is smooth (``positive`` for Log, Sqrt, ...).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcam.errors import UnsupportedOpError
from tests.autodiff_reference import (DISABLE_ALL, ENABLE_ALL, Input, check_vjp, distinct, engine_gradients,
                                      graph_model, node_model, normal, positive)

I64 = np.int64
CASES: list = []


def case(case_id: str, op: str, args, attrs=None, **options) -> None:
    CASES.append(pytest.param(op, args, attrs or {}, options, id=case_id))


def x(shape, kind=normal, seed=0, symbolic=(), **kwargs) -> Input:
    return Input(kind(shape, seed=seed, **kwargs), symbolic=symbolic)


def ints(*values) -> np.ndarray:
    return np.array(values, I64)


def w(shape, seed=1, scale=0.5) -> np.ndarray:
    return normal(shape, seed=seed, scale=scale)


# -- convolution ------------------------------------------------------------------------------

CONV = {
    "k3p1": dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "k3s2p1": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "k3s2_tf_same": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
    "k3s2_pads_begin": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 2, 0, 0]),
    "k3s2_same_upper": dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    "k4s2_same_lower": dict(kernel_shape=[4, 4], strides=[2, 2], auto_pad="SAME_LOWER"),
    "k3s2_valid": dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID"),
    "k1s2": dict(kernel_shape=[1, 1], strides=[2, 2]),
    "k7s2p3": dict(kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3]),
    "dil2": dict(kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2]),
    "dil2s2_asym": dict(kernel_shape=[3, 3], dilations=[2, 1], strides=[2, 3], pads=[1, 0, 2, 1]),
    "k3s3_leftover": dict(kernel_shape=[3, 3], strides=[3, 3]),
    "k1x3": dict(kernel_shape=[1, 3], pads=[0, 1, 0, 1]),
    "group2": dict(kernel_shape=[3, 3], group=2, pads=[1, 1, 1, 1]),
    "depthwise_s2": dict(kernel_shape=[3, 3], group=4, strides=[2, 2], pads=[1, 1, 1, 1]),
}
for name, attrs in CONV.items():
    group = attrs.get("group", 1)
    for shape in [(1, 4, 8, 8), (2, 4, 7, 9)]:
        weight = w([6 if group < 4 else 4, 4 // group] + attrs["kernel_shape"])
        case(f"conv-{name}-{'x'.join(map(str, shape))}", "Conv", [x(shape), weight], attrs)
case("conv-bias", "Conv", [x((2, 3, 6, 6)), w([5, 3, 3, 3]), x((5,), seed=3)], dict(strides=[2, 2]))
case("conv-1d", "Conv", [x((2, 3, 11)), w([4, 3, 3])], dict(strides=[2], pads=[1, 0]))
case("conv-3d", "Conv", [x((1, 2, 4, 5, 5)), w([3, 2, 2, 3, 3])], dict(strides=[1, 2, 2], pads=[0, 1, 1, 1, 0, 1]))
for name in ("k3s2_tf_same", "k7s2p3", "dil2s2_asym", "k3s3_leftover", "depthwise_s2"):
    attrs = CONV[name]  # sizes unknown until run time: crop/pad read from the shapes
    weight = w([4, 1] + attrs["kernel_shape"]) if "group" in attrs else w([6, 4] + attrs["kernel_shape"])
    case(f"conv-{name}-dynamic-spatial", "Conv", [x((2, 4, 7, 9), symbolic=(0, 2, 3)), weight], attrs)
case("conv-batch-dynamic", "Conv", [x((3, 2, 6, 6), symbolic=(0,)), w([4, 2, 3, 3])], dict(pads=[1, 1, 1, 1]))

# Stride 1: the input gradient is a Conv with the flipped, per-group transposed kernel and pads
# d(k-1) - p (negative where a pad exceeds the kernel's reach: g is cropped first).
CONV_STRIDE1 = {
    "k1": dict(kernel_shape=[1, 1]),
    "k1p1_pads_beyond_kernel": dict(kernel_shape=[1, 1], pads=[1, 0, 2, 1]),
    "k3_valid": dict(kernel_shape=[3, 3]),
    "k3p2_asym": dict(kernel_shape=[3, 3], pads=[2, 0, 1, 3]),
    "k3_same_upper": dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
    "k4_same_lower": dict(kernel_shape=[4, 4], auto_pad="SAME_LOWER"),
    "k2x3_dil3x2_asym": dict(kernel_shape=[2, 3], dilations=[3, 2], pads=[1, 2, 0, 1]),
    "group2_k3p1": dict(kernel_shape=[3, 3], group=2, pads=[1, 1, 1, 1]),
    "depthwise_k3p1": dict(kernel_shape=[3, 3], group=4, pads=[1, 1, 1, 1]),
    "depthwise_x2_k5p2_dil2": dict(kernel_shape=[5, 5], group=4, pads=[2, 2, 2, 2], dilations=[2, 1]),
}


def conv_weight_shape(name: str, attrs: dict, channels: int = 4) -> list[int]:
    """[M, C/group, k...]: 6 out channels, ``channels`` for depthwise, twice that for a
    depthwise multiplier 2 (``_x2_`` in the name)."""
    group = attrs.get("group", 1)
    out = 2 * channels if "_x2_" in name else (channels if group == channels else 6)
    return [out, channels // group] + attrs["kernel_shape"]


for name, attrs in CONV_STRIDE1.items():
    shape = conv_weight_shape(name, attrs)
    case(f"conv-s1-{name}", "Conv", [x((2, 4, 7, 9)), w(shape)], attrs)
    case(f"conv-s1-{name}-dynamic-weight", "Conv", [x((2, 4, 7, 9)), Input(w(shape), differentiate=False)], attrs)
case("conv-s1-dynamic-spatial", "Conv", [x((2, 4, 7, 9), symbolic=(0, 2, 3)), w([6, 2, 3, 3])],
     dict(kernel_shape=[3, 3], group=2, pads=[2, 0, 1, 3]))
case("conv-s1-1d", "Conv", [x((2, 3, 11)), w([4, 3, 3])], dict(pads=[4, 0]))
case("conv-s1-3d", "Conv", [x((1, 2, 4, 5, 5)), w([3, 2, 2, 3, 3])], dict(pads=[0, 1, 1, 1, 0, 1]))

# Weight gradients: the weight is a differentiated graph input (a kernel computed from data).
for name, attrs in {**CONV, **{f"s1-{k}": v for k, v in CONV_STRIDE1.items()}}.items():
    case(f"conv-dW-{name}", "Conv", [x((2, 4, 7, 9)), x(conv_weight_shape(name, attrs), seed=1, scale=0.5)], attrs)
case("conv-dW-bias", "Conv", [x((2, 3, 6, 6)), x((5, 3, 3, 3), seed=1), x((5,), seed=3)], dict(strides=[2, 2]))
case("conv-dW-1d", "Conv", [x((2, 3, 11)), x((4, 3, 3), seed=1)], dict(strides=[2], pads=[1, 0], dilations=[2]))
case("conv-dW-1d-depthwise", "Conv", [x((2, 3, 11)), x((6, 1, 4), seed=1)], dict(group=3, strides=[3], pads=[0, 2]))
case("conv-dW-3d", "Conv", [x((1, 2, 4, 5, 5)), x((3, 2, 2, 3, 3), seed=1)],
     dict(strides=[1, 2, 2], pads=[0, 1, 1, 1, 0, 1]))
case("conv-dW-3d-group2-dil", "Conv", [x((2, 4, 5, 5, 6)), x((4, 2, 2, 2, 3), seed=1)],
     dict(group=2, dilations=[2, 1, 2], strides=[1, 2, 1], pads=[1, 0, 0, 0, 1, 2]))
case("conv-dW-1x1-head", "Conv", [x((3, 5, 1, 1)), x((7, 5, 1, 1), seed=1)])
for name in ("k3s2_tf_same", "dil2s2_asym", "k3s3_leftover", "depthwise_s2", "k3s2_same_upper", "k4s2_same_lower"):
    attrs = CONV[name]
    shape = [4, 1] + attrs["kernel_shape"] if "group" in attrs else [6, 4] + attrs["kernel_shape"]
    case(f"conv-dW-{name}-dynamic-spatial", "Conv", [x((2, 4, 7, 9), symbolic=(0, 2, 3)), x(shape, seed=1)], attrs)
case("conv-dW-s1-same_lower-k4-dynamic-spatial", "Conv", [x((2, 4, 7, 8), symbolic=(0, 2, 3)), x((6, 4, 4, 4), seed=1)],
     CONV_STRIDE1["k4_same_lower"])
case("conv-dW-image-as-kernel", "Conv", [x((2, 2, 3, 3))], {}, same_input=True)
case("conv-dW-computed-kernel", "Conv", [x((2, 3, 6, 6)), x((4, 3, 3, 3), seed=1)],
     nodes=[("Sigmoid", [1], {}, 1), ("Conv", [0, "n0"], dict(pads=[1, 0, 0, 1], strides=[1, 2]), 1)])

CONV_TRANSPOSE = {
    "k3s2": dict(strides=[2, 2]),
    "k3s2p1op1": dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    "k4s2p1": dict(strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[4, 4]),
    "asym_pads": dict(strides=[2, 3], pads=[1, 0, 0, 2], output_padding=[1, 0]),
    "op_beyond_pads": dict(strides=[3, 3], pads=[0, 0, 0, 0], output_padding=[2, 1]),
    "dil2": dict(dilations=[2, 2], pads=[1, 1, 1, 1]),
    "group2": dict(group=2, strides=[2, 2], pads=[0, 1, 1, 0]),
    "output_shape": dict(strides=[2, 2], output_shape=[8, 9]),
    "output_shape_same_upper": dict(strides=[2, 2], output_shape=[8, 9], auto_pad="SAME_UPPER"),
    "same_upper": dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    "same_lower_dil": dict(strides=[2, 2], auto_pad="SAME_LOWER", dilations=[2, 1]),
    "k1s2": dict(strides=[2, 2], kernel_shape=[1, 1]),
}
for name, attrs in CONV_TRANSPOSE.items():
    kernel = attrs.get("kernel_shape", [3, 3])
    group = attrs.get("group", 1)
    case(f"convtranspose-{name}", "ConvTranspose", [x((2, 4, 4, 5)), w([4, 3] + kernel)], attrs)
case("convtranspose-bias", "ConvTranspose", [x((1, 2, 3, 3)), w([2, 3, 3, 3]), x((3,), seed=4)], dict(strides=[2, 2]))
for name, attrs in CONV_TRANSPOSE.items():
    kernel = attrs.get("kernel_shape", [3, 3])
    case(f"convtranspose-dW-{name}", "ConvTranspose", [x((2, 4, 4, 5)), x([4, 3] + kernel, seed=1)], attrs)
case("convtranspose-dW-bias", "ConvTranspose", [x((1, 2, 3, 3)), x((2, 3, 3, 3), seed=1), x((3,), seed=4)],
     dict(strides=[2, 2]))
case("convtranspose-dW-1d", "ConvTranspose", [x((2, 3, 5)), x((3, 2, 4), seed=1)],
     dict(strides=[3], pads=[1, 2], output_padding=[1], dilations=[2]))
case("convtranspose-dW-3d-group3", "ConvTranspose", [x((1, 3, 3, 2, 3)), x((3, 2, 2, 2, 3), seed=1)],
     dict(group=3, strides=[2, 1, 2], pads=[0, 1, 1, 1, 0, 0]))
for name in ("asym_pads", "group2", "same_upper", "output_shape_same_upper"):
    case(f"convtranspose-dW-{name}-dynamic-spatial", "ConvTranspose",
         [x((2, 4, 4, 5), symbolic=(0, 2, 3)), x([4, 3, 3, 3], seed=1)], CONV_TRANSPOSE[name])
case("convtranspose-dW-depthwise", "ConvTranspose", [x((2, 4, 4, 5)), x((4, 1, 3, 3), seed=1)],
     dict(group=4, strides=[2, 2], pads=[1, 0, 1, 1]))

# Sizes known only at run time (dynamic-axes exports, tf2onnx's None H/W). auto_pad SAME pads
# depend on n mod s there; 7 and 8 on the two axes take odd and even sizes, even kernels make
# the pads asymmetric (the odd one at the end for SAME_UPPER, the begin for SAME_LOWER).
DYNAMIC = (0, 2, 3)
SAME = {f"{mode.lower()}-k{'x'.join(map(str, k))}s{'x'.join(map(str, s))}d{'x'.join(map(str, d))}":
        dict(kernel_shape=k, strides=s, dilations=d, auto_pad=mode)
        for mode in ("SAME_UPPER", "SAME_LOWER")
        for k, s, d in [([2, 2], [1, 1], [1, 1]), ([3, 3], [1, 1], [1, 1]), ([2, 2], [2, 2], [1, 1]),
                        ([3, 3], [2, 2], [1, 1]), ([4, 4], [2, 2], [1, 1]), ([2, 2], [3, 3], [1, 1]),
                        ([3, 3], [3, 3], [1, 1]), ([3, 3], [2, 2], [2, 2]), ([3, 2], [2, 3], [2, 1])]}
UNDILATED_SAME = {name: attrs for name, attrs in SAME.items() if attrs["dilations"] == [1, 1]}
for name, attrs in UNDILATED_SAME.items():  # (onnxruntime runs no Conv with SAME and dilations)
    for symbolic in ((), DYNAMIC):
        case(f"conv-{name}{'-dynamic-spatial' if symbolic else ''}", "Conv",
             [x((2, 4, 7, 8), symbolic=symbolic), w([6, 4] + attrs["kernel_shape"])], attrs)
case("conv-same_upper-1d-dynamic-spatial", "Conv", [x((2, 3, 11), symbolic=(0, 2)), w([4, 3, 4])],
     dict(strides=[3], auto_pad="SAME_UPPER"))
case("conv-same_lower-depthwise-dynamic-spatial", "Conv", [x((2, 4, 7, 8), symbolic=DYNAMIC), w([4, 1, 3, 3])],
     dict(group=4, strides=[2, 2], auto_pad="SAME_LOWER"))
for name, attrs in CONV_TRANSPOSE.items():
    kernel = attrs.get("kernel_shape", [3, 3])
    for shape in [(2, 4, 4, 5)] + ([] if "output_shape" in attrs else [(1, 4, 3, 2)]):
        case(f"convtranspose-{name}-{'x'.join(map(str, shape))}-dynamic-spatial", "ConvTranspose",
             [x(shape, symbolic=DYNAMIC), w([4, 3] + kernel)], attrs)
case("convtranspose-bias-dynamic-spatial", "ConvTranspose",
     [x((1, 2, 3, 3), symbolic=DYNAMIC), w([2, 3, 3, 3]), x((3,), seed=4)], dict(strides=[2, 2], pads=[0, 1, 1, 0]))

# -- pooling ----------------------------------------------------------------------------------

POOL = {
    "k3s2p1": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "k2s2": dict(kernel_shape=[2, 2], strides=[2, 2]),
    "k3s1p1": dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "k3s2_asym": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0]),
    "k3s2": dict(kernel_shape=[3, 3], strides=[2, 2]),
    "k3s2_same_upper": dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
}
for name, attrs in POOL.items():
    for ceil in (0, 1):
        for include in (0, 1):
            if "auto_pad" in attrs and ceil:
                continue  # ceil_mode has no effect under SAME padding
            case(f"averagepool-{name}-ceil{ceil}-pad{include}", "AveragePool", [x((2, 3, 7, 8))],
                 dict(attrs, ceil_mode=ceil, count_include_pad=include))
case("averagepool-1d", "AveragePool", [x((2, 3, 9))], dict(kernel_shape=[3], strides=[2], pads=[1, 1]))
case("averagepool-dilated-opset19", "AveragePool", [x((1, 2, 9, 9))],
     dict(kernel_shape=[3, 3], strides=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1]), opset=19)

for name, attrs in {**POOL, "k3s2_dil2": dict(kernel_shape=[3, 3], strides=[2, 2], dilations=[2, 2]),
                    "k3s2_ceil": dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
                    "k3s2p1_ceil": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)}.items():
    for opset in (13, 17):
        case(f"maxpool-{name}-opset{opset}", "MaxPool", [x((2, 3, 7, 8), distinct)], attrs, opset=opset)
case("maxpool-1d", "MaxPool", [x((2, 2, 10), distinct)], dict(kernel_shape=[3], strides=[2]))
case("maxpool-dynamic-batch", "MaxPool", [x((3, 2, 6, 6), distinct, symbolic=(0,))],
     dict(kernel_shape=[2, 2], strides=[2, 2]))

for shape, symbolic in [((2, 3, 5, 6), ()), ((1, 4, 1, 1), ()), ((2, 3, 4, 4), (0, 2, 3)), ((2, 3, 7), ())]:
    tag = "x".join(map(str, shape)) + ("-dynamic" if symbolic else "")
    case(f"globalaveragepool-{tag}", "GlobalAveragePool", [x(shape, symbolic=symbolic)])
    case(f"globalmaxpool-{tag}", "GlobalMaxPool", [x(shape, distinct, symbolic=symbolic)])
for p in (2, 3):
    case(f"globallppool-p{p}", "GlobalLpPool", [x((2, 3, 4, 5), distinct)], dict(p=p))
    for name in ("k3s2p1", "k2s2", "k3s2_asym"):
        case(f"lppool-{name}-p{p}", "LpPool", [x((2, 3, 7, 8), distinct)], dict(POOL[name], p=p))

# AveragePool's divisors come from the run-time sizes (a window sum of ones); SAME pads too.
DILATED = {"k3s2d2p1": dict(kernel_shape=[3, 3], strides=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1]),
           "k2s3d2x1_asym": dict(kernel_shape=[2, 3], strides=[3, 2], dilations=[2, 1], pads=[0, 1, 1, 0])}
for name, attrs in {**POOL, **DILATED}.items():
    for ceil in (0, 1):
        for include in (0, 1):
            if "auto_pad" in attrs and ceil:
                continue
            opset = 19 if "dilations" in attrs else 13  # AveragePool has dilations from opset 19
            for symbolic in (() if name in POOL else ((),)) + (DYNAMIC,):
                case(f"averagepool-{name}-ceil{ceil}-pad{include}{'-dynamic-spatial' if symbolic else ''}",
                     "AveragePool", [x((2, 3, 7, 8), symbolic=symbolic)],
                     dict(attrs, ceil_mode=ceil, count_include_pad=include), opset=opset)
# onnxruntime's MaxPool under SAME_LOWER and LpPool under ceil_mode disagree with the float64
# reference, which is wrong there (windows one step off): onnxruntime's float32 forward is the
# reference then, differentiated with eps 0.1 for MaxPool (piecewise linear: exact while no two
# of the inputs, 0.5 apart, swap order) and 1e-2 for LpPool (smooth).
ORT_PIECEWISE, ORT_SMOOTH = dict(reference="ort", eps=0.1), dict(reference="ort", eps=1e-2)
for name, attrs in SAME.items():
    for symbolic in ((), DYNAMIC):
        tag = f"{name}{'-dynamic-spatial' if symbolic else ''}"
        wide = x((2, 3, 7, 8), distinct, symbolic=symbolic, step=0.5)
        if attrs["dilations"] != [1, 1]:
            # onnxruntime pads SAME pools without the dilation, so its output size is not the
            # spec's (nor ONNX shape inference's): only MaxPool, differentiated through
            # onnxruntime's own argmax, follows it, and only with sizes left to run time.
            if symbolic:
                case(f"maxpool-{tag}", "MaxPool", [wide], attrs, **ORT_PIECEWISE)
            continue
        plain = {k: v for k, v in attrs.items() if k != "dilations"}
        for include in (0, 1):
            case(f"averagepool-{tag}-pad{include}", "AveragePool", [x((2, 3, 7, 8), symbolic=symbolic)],
                 dict(plain, count_include_pad=include))
        lower = attrs["auto_pad"] == "SAME_LOWER"
        case(f"maxpool-{tag}", "MaxPool", [wide if lower else x((2, 3, 7, 8), distinct, symbolic=symbolic)],
             plain, **(ORT_PIECEWISE if lower else {}))
        case(f"lppool-{tag}", "LpPool", [x((2, 3, 7, 8), distinct, symbolic=symbolic)], dict(plain, p=2))
for name in ("k3s2p1", "k2s2", "k3s2_asym"):
    case(f"lppool-{name}-p3-dynamic-spatial", "LpPool", [x((2, 3, 7, 8), distinct, symbolic=DYNAMIC)],
         dict(POOL[name], p=3))
for symbolic in ((), DYNAMIC):
    case(f"lppool-k3s2p1-ceil{'-dynamic-spatial' if symbolic else ''}-opset18", "LpPool",
         [x((2, 3, 7, 8), distinct, symbolic=symbolic)], dict(POOL["k3s2p1"], ceil_mode=1, p=2), opset=18,
         **ORT_SMOOTH)
case("maxpool-k3s2p1_ceil-dynamic-spatial", "MaxPool", [x((2, 3, 7, 8), distinct, symbolic=DYNAMIC)],
     dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1))
case("averagepool-1d-same_lower-dynamic-spatial", "AveragePool", [x((2, 3, 9), symbolic=(0, 2))],
     dict(kernel_shape=[4], strides=[2], auto_pad="SAME_LOWER"))

# -- linear algebra ---------------------------------------------------------------------------

for trans_a in (0, 1):
    for trans_b in (0, 1):
        for alpha, beta in ((1.0, 1.0), (0.5, 2.0)):
            for c_shape in (None, (5,), (1, 5), (3, 5), (3, 1), ()):
                if c_shape in ((1, 5), (3, 1), ()) and (alpha, beta) == (1.0, 1.0):
                    continue
                a = x((4, 3) if trans_a else (3, 4), seed=1)
                bm = x((5, 4) if trans_b else (4, 5), seed=2)
                args = [a, bm] + ([] if c_shape is None else [x(c_shape, seed=3)])
                case(f"gemm-tA{trans_a}-tB{trans_b}-a{alpha}-b{beta}-C{c_shape}", "Gemm", args,
                     dict(transA=trans_a, transB=trans_b, alpha=alpha, beta=beta))
case("gemm-constant-weight", "Gemm", [x((2, 6)), w([4, 6]), w([4], seed=2)], dict(transB=1))

for lhs, rhs in [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (3, 4, 5)),
                 ((3, 4), (2, 4, 5)), ((1, 3, 4), (2, 4, 2))]:
    case(f"matmul-{lhs}-{rhs}", "MatMul", [x(lhs, seed=1), x(rhs, seed=2)])
case("matmul-dynamic-batch", "MatMul", [x((3, 2, 4), seed=1, symbolic=(0,)), x((4, 5), seed=2)])

EINSUM = ["ij,jk->ik", "bij,bjk->bik", "bchw,c->bhw", "ij->ji", "ij->", "i,i->", "ij,jk",
          "...ij,...jk->...ik", "bhqd,bhkd->bhqk", "bi,bj->bij", "nchw->nc"]
EINSUM_SHAPES = {"i": 4, "j": 3, "k": 5, "b": 2, "c": 3, "h": 2, "w": 3, "q": 3, "d": 4, "n": 2}
for equation in EINSUM:
    terms = equation.split("->")[0].split(",")
    args = [x(tuple([2] if "..." in t else []) + tuple(EINSUM_SHAPES[c] for c in t.replace("...", "")), seed=i)
            for i, t in enumerate(terms)]
    case(f"einsum-{equation}", "Einsum", args, dict(equation=equation), opset=13)

case("einsum-ellipsis-dynamic-batch", "Einsum",
     [x((2, 3, 4), seed=1, symbolic={0: "N"}), x((2, 4, 5), seed=2, symbolic={0: "N"})],
     dict(equation="...ij,...jk->...ik"))


# Diagonals: a subscript repeated in one operand (its gradient sits on the diagonal).
for equation in ["ii->i", "bii->b", "ii->", "ii", "iij->ji", "iii->i", "bii,bi->bi", "ij,jj->i",
                 "bij,bjj->bi", "...ii->...i", "jii,jk->ik"]:
    terms = equation.split("->")[0].split(",")
    args = [x(tuple([2] if "..." in t else []) + tuple(EINSUM_SHAPES[c] for c in t.replace("...", "")), seed=i)
            for i, t in enumerate(terms)]
    case(f"einsum-diagonal-{equation}", "Einsum", args, dict(equation=equation))
case("einsum-diagonal-dynamic", "Einsum", [x((2, 3, 3), symbolic=(0, 1, 2))], dict(equation="bii->bi"))
case("einsum-trace-dynamic", "Einsum", [x((4, 4), symbolic=(0, 1))], dict(equation="ii->"))

# Broadcasting through "...": dims 1 of one operand against n of another (per position, both
# ways); the gradient of the broadcast operand sums over them.
for name, equation, shapes, symbolic in [
    ("batch", "...ij,...jk->...ik", [(2, 3, 4), (1, 4, 5)], [(), ()]),
    ("both-ways", "...ij,...jk->...ik", [(2, 1, 3, 4), (1, 3, 4, 5)], [(), ()]),
    ("dot", "...i,...i->...", [(3, 1, 4), (1, 2, 4)], [(), ()]),
    ("trailing", "i...,...->i...", [(4, 1, 3), (2, 3)], [(), ()]),
    ("middle", "b...i,bi->b...", [(2, 1, 3, 4), (2, 4)], [(), ()]),
    ("with-diagonal", "...ii,...i->...i", [(2, 1, 3, 3), (1, 4, 3)], [(), ()]),
    ("sum-over-ellipsis", "...i,i->...", [(2, 1, 4), (4,)], [(), ()]),
    ("dynamic-batch", "...ij,...jk->...ik", [(2, 3, 4), (1, 4, 5)], [{0: "N"}, ()]),
]:
    args = [x(shape, seed=i, symbolic=sym) for i, (shape, sym) in enumerate(zip(shapes, symbolic))]
    case(f"einsum-ellipsis-broadcast-{name}", "Einsum", args, dict(equation=equation))


# -- broadcasting arithmetic ------------------------------------------------------------------

BROADCAST = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 3, 4), (3, 1)), ((1, 3, 1), (2, 1, 4)),
             ((2, 3, 4), ()), ((4,), (2, 3, 4))]
for op in ("Add", "Sub", "Mul", "Div"):
    for lhs, rhs in BROADCAST:
        for dynamic in (False, True):
            rhs_kind = positive if op == "Div" else normal
            lhs_sym = tuple(range(len(lhs))) if dynamic else ()
            rhs_sym = tuple(range(len(rhs))) if dynamic else ()
            case(f"{op.lower()}-{lhs}-{rhs}{'-dynamic' if dynamic else ''}", op,
                 [x(lhs, seed=1, symbolic=lhs_sym), x(rhs, rhs_kind, seed=2, symbolic=rhs_sym)])
    case(f"{op.lower()}-constant-rhs", op, [x((2, 3, 4)), positive((3, 1), seed=5)])
case("mul-same-tensor", "Mul", [x((2, 3))], {}, same_input=True)

for op in ("Sum", "Mean", "Max", "Min"):
    kind = distinct if op in ("Max", "Min") else normal
    case(f"{op.lower()}-one", op, [x((2, 3), kind)])
    case(f"{op.lower()}-two", op, [x((2, 3), kind, seed=1), x((2, 3), kind, seed=2)])
    case(f"{op.lower()}-three-broadcast", op,
         [x((2, 3, 4), kind, seed=1), x((3, 1), kind, seed=2), x((4,), kind, seed=3)])
case("max-ties-constant", "Max", [x((3, 4), distinct), np.zeros((3, 4), np.float32)])

cond = np.random.default_rng(7).random((2, 3, 4)) > 0.5
case("where-same", "Where", [cond, x((2, 3, 4), seed=1), x((2, 3, 4), seed=2)])
case("where-broadcast", "Where", [cond, x((3, 1), seed=1), x((4,), seed=2)])
case("where-scalar-branch", "Where", [cond[0], x((3, 4), seed=1), np.float32(0.0)])

# -- elementwise ------------------------------------------------------------------------------

UNARY = [
    ("Relu", {}, distinct, 13), ("LeakyRelu", {}, distinct, 13), ("LeakyRelu", dict(alpha=0.3), distinct, 13),
    ("Sigmoid", {}, normal, 13), ("Tanh", {}, normal, 13), ("Exp", {}, normal, 13),
    ("Log", {}, positive, 13), ("Sqrt", {}, positive, 13), ("Neg", {}, normal, 13),
    ("Reciprocal", {}, positive, 13), ("Abs", {}, distinct, 13), ("HardSigmoid", {}, distinct, 13),
    ("HardSigmoid", dict(alpha=0.5, beta=0.3), distinct, 13), ("HardSwish", {}, distinct, 14),
    ("Elu", {}, distinct, 13), ("Elu", dict(alpha=0.5), distinct, 13), ("Selu", {}, distinct, 13),
    ("Selu", dict(alpha=1.5, gamma=1.2), distinct, 13), ("Softplus", {}, normal, 13),
    ("Mish", {}, normal, 18), ("Erf", {}, normal, 13), ("Gelu", {}, normal, 20),
    ("Gelu", dict(approximate="tanh"), normal, 20), ("Identity", {}, normal, 13), ("Dropout", {}, normal, 13),
]
for op, attrs, kind, opset in UNARY:
    for shape in [(2, 3, 4, 5), (7,)]:
        tag = "-".join(f"{k}{v}" for k, v in attrs.items())
        spread = dict(step=0.4) if op in ("HardSwish", "HardSigmoid") else {}
        case(f"{op.lower()}{'-' + tag if tag else ''}-{'x'.join(map(str, shape))}", op,
             [x(shape, kind, **spread)], attrs, opset=opset)

f32 = np.float32
for name, args in {"min-max": [f32(-0.3), f32(0.4)], "min-only": [f32(0.1)], "max-only": [None, f32(0.2)],
                   "relu6": [f32(0.0), f32(6.0)], "none": []}.items():
    case(f"clip-{name}", "Clip", [x((3, 4, 5), distinct, step=0.07)] + args)

for slope, shape in [((3, 1, 1), (2, 3, 4, 4)), ((1,), (2, 3, 4)), ((4,), (2, 3, 4))]:
    case(f"prelu-slope{slope}-input", "PRelu", [x(shape, distinct), x(slope, seed=3)])
    case(f"prelu-slope{slope}-constant", "PRelu", [x(shape, distinct), w(slope, seed=3)])

for name, exponent in {"const2": np.float32(2.0), "const3": np.float32(3.0), "const-half": np.float32(0.5),
                       "int64": np.int64(2), "per-channel": np.array([1.0, 2.0, 0.5], np.float32)[:, None]}.items():
    case(f"pow-{name}", "Pow", [x((2, 3, 4), positive), exponent])
case("pow-tensor-exponent", "Pow", [x((2, 3, 4), positive), x((3, 1), seed=3)])
case("cast-float", "Cast", [x((2, 3))], dict(to=onnx.TensorProto.FLOAT))

# -- normalization ----------------------------------------------------------------------------

for shape, opset in [((2, 3, 4, 5), 13), ((1, 4, 3), 15), ((2, 3, 2, 2, 3), 13)]:
    channels = shape[1]
    case(f"batchnorm-{'x'.join(map(str, shape))}-opset{opset}", "BatchNormalization",
         [x(shape), w([channels], 1), w([channels], 2), w([channels], 3), positive([channels], 4)],
         dict(epsilon=1e-3), opset=opset)
for axis, shape in [(-1, (2, 3, 6)), (1, (2, 3, 4)), (2, (2, 3, 4, 5)), (0, (3, 4))]:
    normalized = shape[axis:] if axis >= 0 else shape[axis:]
    case(f"layernorm-axis{axis}-{'x'.join(map(str, shape))}", "LayerNormalization",
         [x(shape), x(normalized, seed=2, shift=1.0), x(normalized, seed=3)], dict(axis=axis), opset=17)
case("layernorm-opset18-axes-input", "LayerNormalization", [x((2, 3, 4)), x((3, 4), seed=2), x((3, 4), seed=3)],
     dict(axis=1), opset=18)
case("instancenorm-opset18", "InstanceNormalization", [x((2, 3, 5)), x((3,), seed=2), x((3,), seed=3)], opset=18)
case("layernorm-constant-affine", "LayerNormalization", [x((2, 5, 6)), w([6], 2), w([6], 3)],
     dict(epsilon=1e-3), opset=17)
for shape in [(2, 3, 4, 5), (1, 2, 7)]:
    channels = shape[1]
    case(f"instancenorm-{'x'.join(map(str, shape))}", "InstanceNormalization",
         [x(shape), x((channels,), seed=2, shift=1.0), x((channels,), seed=3)])
case("instancenorm-constant-affine", "InstanceNormalization", [x((2, 3, 4, 4)), w([3], 2), w([3], 3)],
     dict(epsilon=1e-2))

# -- softmax and reductions -------------------------------------------------------------------

for op in ("Softmax", "LogSoftmax"):
    for axis, shape in [(-1, (3, 5)), (1, (2, 4, 3)), (0, (4, 3))]:
        case(f"{op.lower()}-axis{axis}", op, [x(shape)], dict(axis=axis))

# Before opset 13 softmax flattens to 2-D at ``axis``; the model is upgraded to 13 first.
for op in ("Softmax", "LogSoftmax"):
    case(f"{op.lower()}-axis1-opset11", op, [x((2, 3, 4))], dict(axis=1), opset=11)

REDUCTIONS = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"]
for op in REDUCTIONS:
    kind = distinct if op in ("ReduceMax", "ReduceMin") else normal
    attr_until = 13 if op == "ReduceSum" else 18
    for axes in ([1], [0, 2], [-1], None):
        for keepdims in (0, 1):
            for opset in (13, 18):
                attrs = dict(keepdims=keepdims)
                args = [x((2, 3, 4), kind)]
                if axes is not None:
                    if opset < attr_until:
                        attrs["axes"] = axes
                    else:
                        args.append(np.array(axes, I64))
                case(f"{op.lower()}-axes{axes}-keep{keepdims}-opset{opset}", op, args, attrs, opset=opset)
case("reducesum-noop-empty-axes", "ReduceSum", [x((2, 3))], dict(noop_with_empty_axes=1))
case("reducemean-dynamic", "ReduceMean", [x((3, 4, 5), symbolic=(0, 1))], dict(axes=[1], keepdims=0))

# -- shape and data movement ------------------------------------------------------------------

for axis in (0, 1, 2, -1):
    case(f"flatten-axis{axis}", "Flatten", [x((2, 3, 4))], dict(axis=axis))
case("reshape", "Reshape", [x((2, 3, 4)), ints(4, -1)])
case("reshape-zero-copies-dim", "Reshape", [x((2, 3, 4), symbolic=(0,)), ints(0, 12)])
case("squeeze", "Squeeze", [x((2, 1, 3, 1)), ints(1, 3)])
case("squeeze-all", "Squeeze", [x((1, 3, 1))])
case("unsqueeze", "Unsqueeze", [x((2, 3)), ints(0, 3)])
for perm in ([1, 0, 2], [2, 0, 1], [0, 2, 3, 1], None):
    shape = (2, 3, 4, 5) if perm and len(perm) == 4 else (2, 3, 4)
    case(f"transpose-{perm}", "Transpose", [x(shape)], dict(perm=perm) if perm else {})
for axis in (0, 1, -1):
    case(f"concat-axis{axis}", "Concat", [x((2, 3, 4), seed=seed) for seed in (1, 2, 3)], dict(axis=axis))
case("concat-uneven", "Concat", [x((2, 1, 4), seed=1), x((2, 5, 4), seed=2)], dict(axis=1))
case("concat-dynamic", "Concat", [x((2, 2, 3), seed=1, symbolic=(0, 1)), x((2, 3, 3), seed=2, symbolic=(0, 1))],
     dict(axis=1))
case("concat-with-constant", "Concat", [x((2, 3), seed=1), w([2, 2])], dict(axis=1))

for name, args, attrs in [
    ("steps1", [ints(1, 0), ints(3, 4), ints(1, 2)], {}),
    ("step2", [ints(0), ints(5), ints(2), ints(2)], {}),
    ("step-1", [ints(-1), ints(-100), ints(2), ints(-1)], {}),
    ("step-2-negative-start", [ints(-2, 3), ints(0, 0), ints(1, 2), ints(-1, -2)], {}),
    ("big-end", [ints(1), ints(2 ** 62)], {}),
]:
    for opset in (13, 18):
        case(f"slice-{name}-opset{opset}", "Slice", [x((3, 4, 5))] + args, attrs, opset=opset)
case("slice-dynamic", "Slice", [x((3, 4, 5), symbolic=(0, 1)), ints(1), ints(3), ints(1)])

for name, indices, axis in [("axis0", ints(2, 0), 0), ("dups", ints(1, 1, 3, 1), 1),
                            ("negative", ints(-1, 0), 2), ("scalar", np.array(1, I64), 1),
                            ("2d", np.array([[0, 2], [2, 2]], I64), 1)]:
    case(f"gather-{name}", "Gather", [x((3, 4, 5)), indices], dict(axis=axis))
case("gather-indices-input", "Gather", [x((4, 3)), Input(ints(3, 3, 0), differentiate=False)], dict(axis=0))
case("gatherelements", "GatherElements", [x((3, 4)), np.array([[0, 1, 1], [2, 2, 0], [3, 0, 3]], I64)], dict(axis=1))
case("gatherelements-axis0", "GatherElements", [x((3, 4)), np.array([[0, 1, 1, 2], [2, 2, 0, 0]], I64)], dict(axis=0))
case("reversesequence", "ReverseSequence", [x((4, 2, 3)), ints(4, 2)], dict(batch_axis=1, time_axis=0))
case("castlike", "CastLike", [x((2, 3)), np.zeros(1, np.float32)], opset=15)
case("gathernd", "GatherND", [x((3, 4, 2)), np.array([[0, 1], [2, 3], [0, 1]], I64)])

PAD = [ints(0, 0, 1, 2, 0, 0, 2, 1), ints(0, 1, 2, 0, 0, 0, 1, 2)]
for mode in ("constant", "reflect", "edge"):
    for index, pads in enumerate(PAD):
        for opset in (13, 18):
            if mode == "reflect" and index == 1 and opset == 18:
                continue
            args = [x((2, 3, 4, 5)), pads] + ([np.float32(1.5)] if mode == "constant" else [])
            case(f"pad-{mode}-{index}-opset{opset}", "Pad", args, dict(mode=mode), opset=opset)
case("pad-wrap-opset19", "Pad", [x((2, 3, 4)), ints(0, 1, 2, 0, 2, 1)], dict(mode="wrap"), opset=19)
# (the reference Pad rejects negative pads; Pad is linear: checked against onnxruntime, eps=1)
case("pad-negative-crops", "Pad", [x((2, 3, 5)), ints(0, -1, 1, 0, 2, -2)], reference="ort")
case("pad-axes-opset18", "Pad", [x((2, 3, 4)), ints(1, 2), None, ints(2)], dict(mode="edge"), opset=18)

for mode, extra in [("nearest", {}),
                    ("nearest", dict(coordinate_transformation_mode="asymmetric", nearest_mode="floor")),
                    ("linear", {}), ("linear", dict(coordinate_transformation_mode="align_corners")),
                    ("linear", dict(coordinate_transformation_mode="asymmetric")),
                    ("linear", dict(coordinate_transformation_mode="pytorch_half_pixel")),
                    ("cubic", {}), ("cubic", dict(cubic_coeff_a=-0.5, exclude_outside=1))]:
    tag = mode + "".join(f"-{v}" for v in extra.values())
    case(f"resize-{tag}-scales2", "Resize", [x((1, 2, 3, 4)), None, np.array([1, 1, 2, 2], np.float32)],
         dict(mode=mode, **extra))
    case(f"resize-{tag}-scales1.5x0.6", "Resize", [x((1, 2, 4, 5)), None, np.array([1, 1, 1.5, 0.6], np.float32)],
         dict(mode=mode, **extra))
    case(f"resize-{tag}-sizes", "Resize", [x((2, 1, 4, 3)), None, None, ints(2, 1, 7, 5)],
         dict(mode=mode, **extra))
case("resize-linear-antialias-opset18", "Resize", [x((1, 2, 8, 8)), None, np.array([0.5, 0.5], np.float32)],
     dict(mode="linear", antialias=1, axes=[2, 3]), opset=18)
# Upsample (opset <= 9) reaches the Resize rule through the version converter, as in surgery.
# (the reference has no linear Upsample; it is linear in x: checked against onnxruntime, eps=1)
for mode in ("nearest", "linear"):
    case(f"upsample-{mode}-opset9", "Resize", [x((1, 2, 3, 4)), np.array([1, 1, 2, 3], np.float32)],
         dict(mode=mode), opset=9, nodes=[("Upsample", [0, 1], dict(mode=mode), 1)],
         reference="ort" if mode == "linear" else "float64")
case("resize-nearest-axes-opset18", "Resize", [x((1, 2, 3, 3)), None, np.array([3.0], np.float32)],
     dict(mode="nearest", axes=[3]), opset=18)

# Linear and cubic Resize on sizes known only at run time: the identity basis is built at run
# time (EyeLike); the target is constant scales, constant sizes, or sizes computed in the graph
# (a fixed output size, or the size of a skip connection as in U-Nets and FPNs).
RESIZE_SMOOTH = [("linear", {}), ("linear", dict(coordinate_transformation_mode="align_corners")),
                 ("linear", dict(coordinate_transformation_mode="asymmetric")),
                 ("linear", dict(coordinate_transformation_mode="pytorch_half_pixel")),
                 ("cubic", {}), ("cubic", dict(cubic_coeff_a=-0.5, exclude_outside=1)),
                 ("cubic", dict(coordinate_transformation_mode="align_corners"))]
for mode, extra in RESIZE_SMOOTH:
    tag = mode + "".join(f"-{v}" for v in extra.values())
    attrs = dict(mode=mode, **extra)
    for name, scales in [("scales2", [1, 1, 2, 2]), ("scales1.5x0.6", [1, 1, 1.5, 0.6]), ("scales0.5x3", [1, 1, 0.5, 3])]:
        case(f"resize-{tag}-{name}-dynamic-spatial", "Resize",
             [x((1, 2, 4, 5), symbolic=DYNAMIC), None, np.array(scales, np.float32)], attrs)
    case(f"resize-{tag}-sizes-dynamic-spatial", "Resize", [x((2, 1, 4, 3), symbolic=DYNAMIC), None, None,
                                                           ints(2, 1, 7, 5)], attrs)
    for direction, target in [("up", ints(7, 5)), ("down", ints(3, 2))]:
        case(f"resize-{tag}-computed-sizes-{direction}-dynamic-spatial", "Resize",
             [x((2, 1, 5, 4), symbolic=DYNAMIC), target], opset=18,
             nodes=[("Shape", [0], dict(start=0, end=2), 1), ("Concat", ["n0", 1], dict(axis=0), 1),
                    ("Resize", [0, None, None, "n1"], attrs, 1)])
    case(f"resize-{tag}-to-skip-size-dynamic-spatial", "Resize",
         [x((2, 1, 3, 4), symbolic=DYNAMIC), Input(normal((2, 1, 7, 6)), symbolic=DYNAMIC, differentiate=False)],
         opset=18, nodes=[("Shape", [1], {}, 1), ("Resize", [0, None, None, "n0"], attrs, 1)])
case("resize-linear-antialias-dynamic-spatial-opset18", "Resize",
     [x((1, 2, 8, 7), symbolic=DYNAMIC), None, np.array([0.5, 0.4], np.float32)],
     dict(mode="linear", antialias=1, axes=[2, 3]), opset=18)
case("resize-cubic-axes-sizes-dynamic-spatial-opset18", "Resize",
     [x((1, 2, 3, 4), symbolic=DYNAMIC), None, None, ints(6)], dict(mode="cubic", axes=[3]), opset=18)
# Every axis resized (the basis rides on an axis the op also resizes, held at scale 1 there).
case("resize-linear-every-axis", "Resize", [x((2, 3, 4)), None, np.array([1.5, 2, 0.5], np.float32)],
     dict(mode="linear"))
case("resize-linear-2d-dynamic", "Resize", [x((3, 4), symbolic=(0, 1)), None, np.array([2, 1.5], np.float32)],
     dict(mode="linear", coordinate_transformation_mode="align_corners"))

# Split: outputs used out of order, one unused (its gradient is zeros), by opset signature.
SPLIT_TAIL = [("Concat", ["n0_2", "n0"], dict(axis=1), 1)]
case("split-sizes-unused-output", "Split", [x((2, 6, 3)), ints(1, 2, 3)],
     nodes=[("Split", [0, 1], dict(axis=1), 3)] + SPLIT_TAIL)
case("split-equal-opset13", "Split", [x((2, 6, 3))], nodes=[("Split", [0], dict(axis=1), 3)] + SPLIT_TAIL)
case("split-num-outputs-opset18", "Split", [x((2, 6, 3))], opset=18,
     nodes=[("Split", [0], dict(axis=1, num_outputs=3), 3)] + SPLIT_TAIL)
case("split-all-used-weighted", "Split", [x((4, 3)), w([2, 3], 5)],
     nodes=[("Split", [0], dict(axis=0), 2), ("Mul", ["n0_1", 1], {}, 1), ("Sub", ["n0", "n1"], {}, 1)])

case("expand", "Expand", [x((3, 1)), ints(2, 3, 4)])
case("expand-to-same", "Expand", [x((2, 3)), ints(1, 1)])
case("tile", "Tile", [x((2, 3)), ints(2, 3)])
case("tile-4d", "Tile", [x((1, 2, 2, 3)), ints(2, 1, 3, 1)])
for mode in ("DCR", "CRD"):
    case(f"depthtospace-{mode}", "DepthToSpace", [x((2, 8, 2, 3))], dict(blocksize=2, mode=mode))
case("spacetodepth", "SpaceToDepth", [x((2, 2, 4, 6))], dict(blocksize=2))
# Element movers on shapes known only at run time (numbers from Size(x)).
case("depthtospace-dynamic", "DepthToSpace", [x((2, 8, 2, 3), symbolic=(0, 2, 3))], dict(blocksize=2))
case("pad-reflect-dynamic", "Pad", [x((2, 3, 4, 5), symbolic=(0, 2, 3)), PAD[0]], dict(mode="reflect"))
case("resize-nearest-dynamic", "Resize",
     [x((1, 2, 3, 4), symbolic=(0, 2, 3)), None, np.array([1, 1, 2, 1.5], np.float32)], dict(mode="nearest"))
case("gather-dynamic", "Gather", [x((3, 4, 5), symbolic=(0, 1, 2)), ints(1, 1, 0)], dict(axis=1))


REFUSED = [
    ("AveragePool", [x((2, 3, 7, 8), symbolic=DYNAMIC)],
     dict(kernel_shape=[3, 3], strides=[2, 2], dilations=[2, 2], auto_pad="SAME_UPPER"), 19, "SAME and dilations"),
    ("LpPool", [x((2, 3, 7, 8))], dict(kernel_shape=[3, 3], dilations=[2, 1], auto_pad="SAME_LOWER"), 18,
     "SAME and dilations"),
    ("Resize", [x((1, 2, 4, 5)), None, x((4,), positive, seed=3)], dict(mode="linear"), 13,
     "scales computed at run time"),
    ("Resize", [x((1, 2, 4, 5)), np.array([0, 0, 0.1, 0.2, 1, 1, 0.9, 0.8], np.float32), None, ints(1, 2, 3, 3)],
     dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"), 13, "tf_crop_and_resize"),
]


@pytest.mark.parametrize("op, args, attrs, opset, reason", REFUSED, ids=[r[-1] + "-" + r[0] for r in REFUSED])
def test_what_stays_unsupported_is_refused_with_its_reason(op, args, attrs, opset, reason):
    model, feeds = node_model(op, args, attrs=attrs, opset=opset)
    with pytest.raises(UnsupportedOpError, match=reason):
        engine_gradients(model, feeds, ["x0"], np.ones((1,)))


# -- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("optimization", [ENABLE_ALL, DISABLE_ALL], ids=["opt", "noopt"])
@pytest.mark.parametrize("op, args, attrs, options", CASES)
def test_rule_matches_finite_differences(op, args, attrs, options, optimization):
    """Every case at onnxruntime's full optimization (what onnxcam runs) and with graph
    optimization disabled: fusions and layout changes must not change the gradient."""
    options = dict(options)
    options.setdefault("optimization", optimization)
    opset = options.pop("opset", 13)
    nodes = options.pop("nodes", None)
    if nodes is not None:
        model, feeds = graph_model(nodes, args, opset=opset)
    elif options.pop("same_input", False):
        model, feeds = graph_model([(op, [0, 0], attrs, 1)], args, opset=opset)
    else:
        model, feeds = node_model(op, args, attrs=attrs, opset=opset)
    wrt = [f"x{i}" for i, a in enumerate(args) if isinstance(a, Input) and a.differentiate]
    check_vjp(model, feeds, wrt, **options)


def test_grid_is_large():
    """The grid covers every rule (guards against a refactor silently dropping cases)."""
    from onnxcam.autodiff import RULES
    from onnxcam.autodiff.rules import STRAIGHT_THROUGH  # no derivative to difference: tests/test_hardening_models.py
    covered = {p.values[0] for p in CASES}
    assert set(RULES) - covered - STRAIGHT_THROUGH == set()
    assert len(CASES) >= 300


# -- small multi-op models at both optimization levels ----------------------------------------

def _models():
    """Blocks where onnxruntime's optimizer has something to fuse (Conv+BN+Relu, Gemm,
    MatMul+Add, SE's Mul, LayerNorm, Gelu)."""
    yield "conv-bn-relu-maxpool-gemm", graph_model([
        ("Conv", [0, 1, 2], dict(pads=[1, 1, 1, 1]), 1),
        ("BatchNormalization", ["n0", 3, 4, 5, 6], {}, 1), ("Relu", ["n1"], {}, 1),
        ("MaxPool", ["n2"], dict(kernel_shape=[3, 3], strides=[2, 2]), 1),
        ("Flatten", ["n3"], {}, 1), ("Gemm", ["n4", 7, 8], dict(transB=1), 1)],
        [Input(distinct((2, 3, 7, 7))), w((4, 3, 3, 3), 1), w((4,), 2), positive((4,), 3), w((4,), 4),
         w((4,), 5), positive((4,), 6), w((5, 36), 7), w((5,), 8)])
    yield "mobile-block-squeeze-excite", graph_model([
        ("Conv", [0, 1], dict(group=4, pads=[1, 1, 1, 1]), 1), ("HardSwish", ["n0"], {}, 1),
        ("GlobalAveragePool", ["n1"], {}, 1), ("Conv", ["n2", 2, 3], {}, 1), ("Relu", ["n3"], {}, 1),
        ("Conv", ["n4", 4], {}, 1), ("HardSigmoid", ["n5"], {}, 1), ("Mul", ["n1", "n6"], {}, 1),
        ("Add", ["n7", 0], {}, 1), ("ReduceMean", ["n8"], dict(axes=[2, 3], keepdims=0), 1)],
        [Input(distinct((2, 4, 5, 5), step=0.3)), w((4, 1, 3, 3), 1), w((2, 4, 1, 1), 2), w((2,), 3),
         w((4, 2, 1, 1), 4)], opset=14)
    yield "upsample-concat-pad", graph_model([
        ("Resize", [0, None, 1], dict(mode="linear"), 1), ("Pad", [2, 3], dict(mode="reflect"), 1),
        ("Concat", ["n0", "n1"], dict(axis=1), 1), ("Conv", ["n2", 4], {}, 1), ("Sigmoid", ["n3"], {}, 1)],
        [Input(normal((1, 2, 3, 3))), np.array([1, 1, 2, 2], np.float32), Input(normal((1, 1, 4, 4), seed=5)),
         ints(0, 0, 1, 1, 0, 0, 1, 1), w((2, 3, 3, 3), 6)])
    yield "transformer-block", graph_model([
        ("LayerNormalization", [0, 1, 2], {}, 1), ("MatMul", ["n0", 3], {}, 1), ("Add", ["n1", 4], {}, 1),
        ("Gelu", ["n2"], {}, 1), ("MatMul", ["n3", 5], {}, 1), ("Add", ["n4", 0], {}, 1),
        ("Softmax", ["n5"], dict(axis=-1), 1)],
        [Input(normal((2, 3, 4))), positive((4,), 1), w((4,), 2), w((4, 6), 3), w((6,), 4), w((6, 4), 5)],
        opset=20)


MODELS = {name: built for name, built in _models()}


@pytest.mark.parametrize("name", list(MODELS))
def test_optimization_levels_agree_and_match_finite_differences(name):
    model, feeds = MODELS[name]
    enabled = check_vjp(model, feeds, optimization=ENABLE_ALL)
    disabled = check_vjp(model, feeds, optimization=DISABLE_ALL)
    for key in enabled:
        np.testing.assert_allclose(enabled[key], disabled[key], rtol=1e-5, atol=1e-6)
