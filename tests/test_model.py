"""Model inspection: which output is explained, which layers exist, in which layout."""

from __future__ import annotations

import onnx
import pytest

from onnxcam.errors import LayerError, ModelError
from onnxcam.model import ModelGraph, load_model
from tests.tiny_models import conv_classifier, mlp_classifier, nhwc_classifier


def test_mobilenet_v2_default_layer_is_last_spatial_activation(mobilenet_v2):
    graph = ModelGraph(load_model(mobilenet_v2))
    layers = graph.layers()
    default = [layer for layer in layers if layer.default]
    assert len(default) == 1 and default[0] is layers[-1]
    assert default[0].name == "MobilenetV2/Conv_1/Relu6"
    assert default[0].shape == (1280, 7, 7) and default[0].layout == "NCHW"
    assert all(layer.shape[1] * layer.shape[2] > 1 for layer in layers)


def test_softmax_output_is_looked_through(mobilenet_v2):
    graph = ModelGraph(load_model(mobilenet_v2))
    assert graph.logits() == "logits"
    assert graph.logits("probs") == "logits"


def test_torch_like_export_logits_before_softmax():
    graph = ModelGraph(conv_classifier())
    assert graph.logits() == "logits"
    assert [l.name for l in graph.layers()] == ["c1", "r1", "c2", "features"]
    assert graph.layers()[-1].default


def test_nhwc_export_layouts_are_propagated_through_transposes():
    graph = ModelGraph(nhwc_classifier())
    assert graph.input_layout() == "NHWC"
    layers = {layer.name: layer for layer in graph.layers()}
    assert layers["act_nhwc"].layout == "NHWC" and layers["act_nhwc"].shape == (6, 12, 12)
    assert layers["conv"].layout == "NCHW" and layers["conv"].shape == (6, 12, 12)
    assert layers["act_nchw"].default


def test_model_without_spatial_activation_is_a_clear_error():
    with pytest.raises(LayerError, match="no spatial activation"):
        ModelGraph(mlp_classifier()).layers()


def test_unknown_layer_names_candidates():
    with pytest.raises(LayerError, match="no tensor or node named 'nope'.*features"):
        ModelGraph(conv_classifier()).find_layer("nope")
    with pytest.raises(LayerError, match="not a spatial activation"):
        ModelGraph(conv_classifier()).find_layer("flat")


def test_layer_can_be_named_by_its_node():
    assert ModelGraph(conv_classifier()).find_layer("relu6").name == "features"


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"this is not a protobuf at all \xff\xfe", "not an ONNX model"),
    (b"", "not an ONNX model"),
])
def test_load_model_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_models_with_several_inputs_are_refused_by_name():
    model = conv_classifier()
    model.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1, 5]))
    with pytest.raises(ModelError, match=r"needs 2 inputs \('input', 'extra'\)"):
        ModelGraph(model, "two.onnx")


def test_a_non_float_image_input_is_refused_with_what_to_do():
    model = conv_classifier()
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    with pytest.raises(ModelError, match="input 'input' is uint8; onnxcam feeds float32"):
        ModelGraph(model, "u8.onnx")
