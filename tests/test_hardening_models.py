"""Hostile and unusual models: every fault is one ModelError line naming the node, op or tensor
(CLI: exit 2, no output); float16/float64 and QDQ-quantized models are explained."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnxcam import Explainer
from onnxcam.cli import app
from onnxcam.errors import LayerError, ModelError, OnnxcamError
from onnxcam.model import load_model
from onnxcam.validate_model import ort_max_opset
from tests.tiny_models import build_model, conv_classifier

X = np.random.default_rng(7).random((2, 3, 16, 16)).astype(np.float32)


def _save(tmp_path, model: onnx.ModelProto | bytes, name: str = "model.onnx"):
    path = tmp_path / name
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def _edited(edit) -> onnx.ModelProto:
    model = conv_classifier()
    edit(model)
    return model


def _rename_op(model, index, op_type, domain=""):
    model.graph.node[index].op_type = op_type
    model.graph.node[index].domain = domain


def _insert_before_pool(model, node):
    """``node`` (reading 'features', writing 't') between the ReLU6 and the pooling."""
    model.graph.node.insert(4, node)
    model.graph.node[5].input[0] = "t"


CASES = {
    "a cycle": (lambda m: m.graph.node[0].input.__setitem__(0, "features"),
                r"cycle \('relu1' -> 'conv2' -> 'relu6' -> 'conv1' -> 'relu1'\)"),
    "a dangling input": (lambda m: m.graph.node[1].input.__setitem__(0, "ghost"),
                         r"node 'relu1' \(Relu\) reads 'ghost', which no node"),
    "an output nothing makes": (lambda m: setattr(m.graph.output[0], "name", "nowhere"),
                                r"graph output 'nowhere' is produced by no node"),
    "a tensor made twice": (lambda m: m.graph.node[1].output.__setitem__(0, "c1"),
                            r"tensor 'c1' is produced twice \(node 'relu1'"),
    "an unknown op": (lambda m: _rename_op(m, 1, "Frobnicate"),
                      r"node 'relu1' \(Frobnicate\): 'Frobnicate' is not an op"),
    "an op newer than the opset": (lambda m: _rename_op(m, 1, "Gelu"),
                                   r"node 'relu1' \(Gelu\): Gelu exists from opset 20 on, but the model declares opset 13"),
    "a custom-domain op": (lambda m: (_rename_op(m, 1, "MyRelu", "com.example"),
                                      m.opset_import.append(helper.make_opsetid("com.example", 1))),
                           r"node 'relu1' \(MyRelu\) is a custom op of domain 'com.example'.*standard ONNX ops"),
    "a domain without opset": (lambda m: _rename_op(m, 1, "LinearClassifier", "ai.onnx.ml"),
                               r"uses domain 'ai.onnx.ml' but the model declares no opset for it"),
    "an unreleased opset": (lambda m: setattr(m.opset_import[0], "version", 99),
                            r"declares opset 99 of the ONNX domain; onnx .* knows opsets 1 to \d+"),
    "a node off its opset's schema": (lambda m: setattr(m.opset_import[0], "version", 5),
                                      r"node 'relu6' \(Clip\) does not match the Clip of opset 5"),
    "a huge input": (lambda m: [m.graph.input[0].type.tensor_type.shape.dim[i].__setattr__("dim_value", 100000)
                                for i in (2, 3)],
                     r"tensor 'input' has shape \['N', 3, 100000, 100000\], 30,000,000,000 values, over "
                     r"onnxcam's limit of 268,435,456 per tensor: export the model for a smaller input size"),
    "a huge output": (lambda m: setattr(m.graph.output[0].type.tensor_type.shape.dim[1], "dim_value", 10 ** 12),
                      r"tensor 'probs' has shape \['N', 1000000000000\].*the file is corrupt"),
    # found by the fuzz campaign (tools/fuzz_campaign.py), each failing deep inside onnx or numpy before:
    "an undefined element type": (lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", 99),
                                  r"tensor 'input' declares element type 99, which ONNX does not define"),
    "an initializer short of values": (lambda m: setattr(m.graph.initializer[0], "raw_data",
                                                         m.graph.initializer[0].raw_data[:-4]),
                                       r"tensor 'w1' has dims \[8, 3, 3, 3\] \(216 values\) but holds 215"),
    "a weight typed as strings": (lambda m: setattr(m.graph.initializer[0], "data_type", TensorProto.STRING),
                                  r"tensor 'w1' is a string tensor with raw data"),
    "a Transpose perm that is no permutation": (
        lambda m: _insert_before_pool(m, helper.make_node("Transpose", ["features"], ["t"], name="odd", perm=[0, 3, 1, 1])),
        r"node 'odd' \(Transpose\) has perm \[0, 3, 1, 1\], not a permutation"),
    "a negative dim": (lambda m: setattr(m.graph.input[0].type.tensor_type.shape.dim[1], "dim_value", -3),
                       r"tensor 'input' declares a negative dimension"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_models_are_one_model_error(tmp_path, case):
    edit, message = CASES[case]
    path = _save(tmp_path, _edited(edit))
    with pytest.raises(ModelError, match=message) as info:
        Explainer(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelError, match=message):  # a ModelProto is checked alike
        Explainer(onnx.load(str(path)))


def test_names_that_are_not_text_are_refused(tmp_path):
    data = conv_classifier().SerializeToString()
    assert data.count(b"Relu") == 1
    path = _save(tmp_path, data.replace(b"Relu", b"R\xffl\xfe"))
    with pytest.raises(ModelError, match=r"a name or op type is not valid text \(b'R\\xffl\\xfe'\)"):
        Explainer(path)


def test_an_opset_newer_than_onnxruntime_names_the_supported_one(tmp_path):
    newest = ort_max_opset()
    if newest is None or newest >= onnx.defs.onnx_opset_version():
        pytest.skip("this onnxruntime loads every opset onnx knows")
    model = _edited(lambda m: setattr(m.opset_import[0], "version", newest + 1))
    with pytest.raises(ModelError, match=f"declares opset {newest + 1}; onnxruntime supports opsets up to {newest}"):
        Explainer(_save(tmp_path, model))


def test_truncated_files_and_random_bytes_are_model_errors(tmp_path):
    data = conv_classifier().SerializeToString()
    rng = np.random.default_rng(0)
    cuts = sorted(set(np.linspace(1, len(data) - 1, 60).astype(int)))
    blobs = [data[:cut] for cut in cuts] + [rng.bytes(n) for n in (1, 10, 100, 5000)]
    for blob in blobs:
        path = _save(tmp_path, blob)
        with pytest.raises(ModelError) as info:
            load_model(path)
        assert str(path) in str(info.value)


def test_nodes_out_of_order_are_sorted_not_refused():
    model = conv_classifier()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes[::-1])
    np.testing.assert_array_equal(Explainer(model, cache=False).explain(X).heatmaps,
                                  Explainer(conv_classifier(), cache=False).explain(X).heatmaps)
    assert model.graph.node[0].name == "softmax"  # the caller's model is left as it was


def test_broken_model_on_the_command_line_is_exit_2_and_one_line(tmp_path):
    path = _save(tmp_path, _edited(CASES["a dangling input"][0]))
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    result = CliRunner().invoke(app, ["explain", str(path), str(image), "-o", str(tmp_path / "out")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "reads 'ghost'" in lines[0]
    assert not (tmp_path / "out").exists()


# -- float16, float64 -------------------------------------------------------------------------

def _with_float_type(model: onnx.ModelProto, kind: int, keep_io_types: bool) -> onnx.ModelProto:
    """The model computing in ``kind`` (what onnxconverter-common's float16 conversion makes):
    weights converted, with ``keep_io_types`` a Cast after the float32 input and a Cast back
    after the last node, else input and output of that type."""
    dtype = helper.tensor_dtype_to_np_dtype(kind)
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    for tensor in graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(dtype), tensor.name))
    if keep_io_types:
        inner_in, inner_out = "input_narrow", "probs_narrow"
        nodes = list(graph.node)
        for node in nodes:
            node.input[:] = [inner_in if n == "input" else n for n in node.input]
            node.output[:] = [inner_out if n == "probs" else n for n in node.output]
        del graph.node[:]
        graph.node.extend([helper.make_node("Cast", ["input"], [inner_in], to=kind, name="cast_in"), *nodes,
                           helper.make_node("Cast", [inner_out], ["probs"], to=TensorProto.FLOAT, name="cast_out")])
    else:
        graph.input[0].type.tensor_type.elem_type = kind
        graph.output[0].type.tensor_type.elem_type = kind
    onnx.checker.check_model(converted)
    return converted


def _rounded_weights(model: onnx.ModelProto, dtype) -> onnx.ModelProto:
    """The float32 model with its weights rounded through ``dtype``: what a float16 model
    computes when computed in float32."""
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for tensor in rounded.graph.initializer:
        value = numpy_helper.to_array(tensor).astype(dtype).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return rounded


@pytest.mark.parametrize("kind, keep_io_types", [(TensorProto.FLOAT16, True), (TensorProto.FLOAT16, False),
                                                 (TensorProto.DOUBLE, True)])
def test_float16_and_float64_models_are_explained_in_float32(kind, keep_io_types):
    model = conv_classifier()
    narrow = _with_float_type(model, kind, keep_io_types)
    dtype = helper.tensor_dtype_to_np_dtype(kind)
    result = Explainer(narrow, cache=False).explain(X, "gradcam", targets=[1, 3])
    reference = Explainer(_rounded_weights(model, dtype), cache=False).explain(X, "gradcam", targets=[1, 3])
    # the same function of the same (rounded) weights in float32: the same maps, logits, gradients
    np.testing.assert_allclose(result.heatmaps, reference.heatmaps, atol=1e-6)
    np.testing.assert_allclose(result.logits, reference.logits, rtol=1e-6)
    if kind == TensorProto.FLOAT16:  # and the logits agree with onnxruntime running the float16 model
        session = ort.InferenceSession(narrow.SerializeToString(), providers=["CPUExecutionProvider"])
        probabilities = session.run(None, {"input": X if keep_io_types else X.astype(np.float16)})[0]
        np.testing.assert_allclose(result.probabilities, probabilities, atol=2e-3)


def test_the_float16_softmax_output_is_looked_through_to_the_logits():
    """keep_io_types ends in Softmax -> Cast: the Cast is dropped, so the logits are explained."""
    explainer = Explainer(_with_float_type(conv_classifier(), TensorProto.FLOAT16, True), cache=False)
    assert explainer.logits_name == "logits"


# -- quantized models -------------------------------------------------------------------------

def _qdq_classifier(scales: np.ndarray, zero: int = 0) -> onnx.ModelProto:
    """input -> Conv -> 'features' -> QuantizeLinear (uint8, per-channel ``scales`` on axis 1)
    -> DequantizeLinear -> 'dq' -> GlobalAveragePool -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(3)
    channels = len(scales)
    init = {"w": rng.normal(0, 0.6, (channels, 3, 3, 3)).astype(np.float32),
            "s": scales.astype(np.float32), "z": np.full(channels, zero, np.uint8),
            "fc": rng.normal(0, 1, (4, channels)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w"], ["features"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["features", "s", "z"], ["q"], name="quant", axis=1),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dequant", axis=1),
             helper.make_node("GlobalAveragePool", ["dq"], ["pooled"], name="gap"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="fc", transB=1)]
    return build_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], init)


def test_the_gradient_passes_a_qdq_pair_straight_through():
    """d logit_t / d features = fc[t, c] / (h w) where the value is inside uint8's range after
    quantization (round(A/s) + z in [0, 255]), else 0: the straight-through estimator. The
    scales make some channels saturate and negative values fall out of range."""
    scales = np.array([0.002, 0.01, 0.05, 0.2])
    model = _qdq_classifier(scales, zero=10)
    explainer = Explainer(model, layer=["features", "dq"], cache=False)
    targets = [2, 0]
    result = explainer.explain(X, "gradcam", targets=targets)
    A = result.activations["features"]
    fc = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc"))
    level = np.round(A / scales[None, :, None, None]) + 10
    inside = (level >= 0) & (level <= 255)
    assert 0.05 < inside.mean() < 0.95  # the mask matters in this case
    for n, t in enumerate(targets):
        through = np.broadcast_to(fc[t][:, None, None] / 256, A.shape[1:])
        np.testing.assert_allclose(result.gradients["dq"][n], through, rtol=1e-6)
        np.testing.assert_allclose(result.gradients["features"][n], through * inside[n], rtol=1e-6)
    # the forward is the quantized model's own: logits equal onnxruntime's on the original
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(result.logits, session.run(None, {"input": X})[0], rtol=1e-5, atol=1e-6)


def _quantized(tmp_path, quant_format):
    quantization = pytest.importorskip("onnxruntime.quantization")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": X[i:i + 1]} for i in range(2)])

        def get_next(self):
            return next(self.batches, None)

    source, target = tmp_path / "float.onnx", tmp_path / "quantized.onnx"
    onnx.save(conv_classifier(batch=1), source)
    quantization.quantize_static(str(source), str(target), Reader(), quant_format=quant_format,
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8)
    return target


def test_an_onnxruntime_qdq_model_is_explained_like_its_float_model(tmp_path):
    quantization = pytest.importorskip("onnxruntime.quantization")
    path = _quantized(tmp_path, quantization.QuantFormat.QDQ)
    explainer = Explainer(path, cache=False)
    # the output is Softmax -> QuantizeLinear -> DequantizeLinear: the Softmax's input is explained
    assert explainer.graph.consumers[explainer.logits_name][0].op_type == "Softmax"
    layer = next(l for l in explainer.layers() if l.default)
    assert layer.op == "DequantizeLinear"  # the last spatial activation: after the last DequantizeLinear
    # the quantizer folded the ReLU6 into the range of the QuantizeLinear after 'features': the
    # DequantizeLinear output is the float model's 'features', quantized
    x = X[:1]
    quantized = explainer.explain(x, "gradcam", targets=2)
    original = Explainer(conv_classifier(batch=1), cache=False).explain(x, "gradcam", targets=2)
    assert np.isfinite(quantized.heatmaps).all() and quantized.heatmaps.max() > 0.99
    assert np.corrcoef(quantized.heatmaps.ravel(), original.heatmaps.ravel())[0, 1] > 0.99  # 0.9997 here


def test_a_qoperator_model_says_what_to_do(tmp_path):
    quantization = pytest.importorskip("onnxruntime.quantization")
    path = _quantized(tmp_path, quantization.QuantFormat.QOperator)
    with pytest.raises(LayerError, match=r"QLinearConv '.*' computes on quantized integers.*QuantFormat.QDQ"):
        Explainer(path).layers()



def test_a_model_whose_outputs_ignore_the_input_is_refused(tmp_path):
    """Found by the fuzz campaign: relu1 rewired to read the weight w2 made the logits a
    function of the weights only (batch 12 whatever the input's), failing deep in the maps."""
    path = _save(tmp_path, _edited(lambda m: m.graph.node[1].input.__setitem__(0, "w2")))
    with pytest.raises(ModelError, match=r"no output of the model depends on its input 'input'"):
        Explainer(path)


def test_a_model_that_moves_the_batch_axis_is_refused():
    """Found by the fuzz campaign: a Transpose over the batch axis (relu1 turned into a plain
    Transpose) runs, but gives 8 rows of logits for 1 image; the maps failed to reshape."""
    model = conv_classifier(size=8, batch=1)
    model.graph.node[1].op_type = "Transpose"
    explainer = Explainer(model, layer="c1", cache=False)
    with pytest.raises(ModelError, match=r"has shape \[8, 5\] for a batch of 1: the model moves the batch axis"):
        explainer.explain(X[:1, :, :8, :8], "eigencam")
    with pytest.raises(OnnxcamError):  # the gradient model already disagrees with its seed's shape
        explainer.explain(X[:1, :, :8, :8], "gradcam")
