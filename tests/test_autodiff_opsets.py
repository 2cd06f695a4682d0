"""One small CNN written in each opset from 11 to 21, in the form that opset defines (Split
sizes as an attribute before 13, Squeeze/Unsqueeze axes as inputs from 13, ReduceMean axes as
an input from 18, Softmax flattening before 13, ...), differentiated with respect to its
input and checked against float64 central finite differences of the model as written.

The rules emit opset >= 13 vocabulary and MaxPool's needs 16, so the older models also
exercise the upgrade (:func:`onnxcam.autodiff.upgrade`): a converter that changed the
model's meaning would show here as a gradient of a different function.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.autodiff_reference import DISABLE_ALL, ENABLE_ALL, Input, check_vjp, distinct, graph_model, normal

I64 = np.int64


def cnn_in_opset(opset: int):
    """x [1,4,8,8] -> Conv -> BatchNorm -> Clip -> Pad(reflect) -> MaxPool -> Resize(linear)
    -> Split(2,2) -> Concat(swapped) -> ReduceMean(H) -> Unsqueeze/Squeeze -> Softmax."""
    rng = np.random.default_rng(opset)
    args = [
        Input(distinct((1, 4, 8, 8), seed=opset, step=0.01)),          # 0 x
        normal((4, 4, 3, 3), seed=1, scale=0.4),                        # 1 conv weight
        normal((4,), seed=2, scale=0.1),                                # 2 conv bias
        rng.uniform(0.5, 1.5, 4).astype(np.float32),                    # 3 bn scale
        normal((4,), seed=3, scale=0.1),                                # 4 bn bias
        normal((4,), seed=4, scale=0.1),                                # 5 bn mean
        rng.uniform(0.5, 1.5, 4).astype(np.float32),                    # 6 bn var
        np.array(-4.0, np.float32), np.array(4.0, np.float32),          # 7, 8 clip bounds (not reached)
        np.array([0, 0, 1, 2, 0, 0, 2, 1], I64),                        # 9 pads
        np.zeros(0, np.float32),                                        # 10 roi (unused)
        np.array([1, 1, 1.5, 2], np.float32),                           # 11 scales
        np.array([2, 2], I64),                                          # 12 split sizes
        np.array([2], I64),                                             # 13 reduce / (un)squeeze axes
    ]
    split = ("Split", ["n5"], {"axis": 1} | ({"split": [2, 2]} if opset < 13 else {}), 2) if opset < 13 \
        else ("Split", ["n5", 12], {"axis": 1}, 2)
    reduce = ("ReduceMean", ["n7", 13] if opset >= 18 else ["n7"], {"keepdims": 1} | ({} if opset >= 18 else {"axes": [2]}), 1)
    unsqueeze = ("Unsqueeze", ["n8", 13], {}, 1) if opset >= 13 else ("Unsqueeze", ["n8"], {"axes": [2]}, 1)
    squeeze = ("Squeeze", ["n9", 13], {}, 1) if opset >= 13 else ("Squeeze", ["n9"], {"axes": [2]}, 1)
    nodes = [
        ("Conv", [0, 1, 2], {"pads": [1, 1, 1, 1]}, 1),                                    # n0
        ("BatchNormalization", ["n0", 3, 4, 5, 6], {"epsilon": 1e-3}, 1),                  # n1
        ("Clip", ["n1", 7, 8], {}, 1),                                                      # n2
        ("Pad", ["n2", 9], {"mode": "reflect"}, 1),                                         # n3
        ("MaxPool", ["n3"], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, 1),  # n4
        ("Resize", ["n4", 10, 11], {"mode": "linear"}, 1),                                  # n5
        split,                                                                              # n6, n6_1
        ("Concat", ["n6_1", "n6"], {"axis": 1}, 1),                                         # n7
        reduce,                                                                             # n8
        unsqueeze,                                                                          # n9
        squeeze,                                                                            # n10
        ("Softmax", ["n10"], {"axis": 1}, 1),                                               # y
    ]
    return graph_model(nodes, args, opset=opset)


@pytest.mark.parametrize("opset", range(11, 22))
@pytest.mark.parametrize("optimization", [ENABLE_ALL, DISABLE_ALL], ids=["ENABLE_ALL", "DISABLE_ALL"])
def test_cnn_in_every_opset_matches_finite_differences(opset, optimization):
    model, feeds = cnn_in_opset(opset)
    gradient = check_vjp(model, feeds, ["x0"], optimization=optimization)["x0"]
    assert np.abs(gradient).max() > 1e-2  # a real signal, not a gradient blocked to zero
