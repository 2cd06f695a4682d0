"""Vision transformers: token layers, NHWC stages, default layers and attention methods.

The fixtures (``tests/fixtures/transformers``) are small random-weight torchvision ViT, Swin and
MaxViT, timm DeiT (distilled: two prefix tokens), a timm ViT with 4 register tokens and a
mean-pooled timm ViT on a non-square input, each
exported by the TorchScript and the dynamo exporter, with pytorch-grad-cam's maps (its tutorials'
layers and reshape transforms) and rollout / gradient-weighted rollout computed in torch from
the papers' equations: ``tools/make_transformer_fixtures.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxcam import Explainer
from onnxcam.attention import find_attention
from onnxcam.errors import LayerError, OnnxcamError
from onnxcam.export import export_explained
from onnxcam.model import ModelGraph
from onnxcam.tokens import TokenGrid, factor_grids
from tests.tiny_models import build_model

FIXTURES = Path(__file__).parent / "fixtures" / "transformers"
CASES = [(name, exporter) for name in ("vit", "deit", "vitreg", "swin", "vitgap", "maxvit")
         for exporter in ("ts", "dynamo")]
#: (prefix, grid) of the reference layer of each model; Swin's is NHWC
KINDS = {"vit": "tokens (prefix 1, grid 6x6)", "deit": "tokens (prefix 2, grid 6x6)",
         "vitreg": "tokens (prefix 5, grid 6x6)", "swin": "NHWC",
         "vitgap": "tokens (prefix 0, grid 4x6)", "maxvit": "NCHW"}


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64))[0, 1])


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{e}" for n, e in CASES])
def case(request):
    name, exporter = request.param
    refs = np.load(FIXTURES / f"{name}.npz")
    return name, exporter, Explainer(FIXTURES / f"{name}_{exporter}.onnx", cache=False), refs


def test_default_layer_is_the_tutorials_layer(case):
    """ViT / DeiT (CLS-pooled): the last block's first LayerNorm; Swin, ViT-GAP, MaxViT
    (mean-pooled): the last token / spatial tensor before pooling (Swin: the permute of the
    final norm; MaxViT: the map put back together after the last grid attention)."""
    name, exporter, explainer, refs = case
    default = next(l for l in explainer.layers() if l.default)
    expected = str(refs[f"layer:{exporter}"])
    if name == "swin":
        node = explainer.graph.producer[default.name]
        assert (default.name, default.layout) == (expected, "NHWC") or (
            node.op_type == "Transpose" and node.input[0] == expected and default.layout == "NCHW")
    else:
        assert default.name == expected
    layer = explainer.graph.find_layer(expected)
    assert layer.kind == KINDS[name]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_parity_with_pytorch_grad_cam(case, method):
    name, exporter, explainer, refs = case
    at = Explainer(explainer.source, layer=str(refs[f"layer:{exporter}"]), cache=False)
    for which, targets in (("top1", None), ("classes", [int(c) for c in refs["classes"]])):
        result = at.explain(refs["x"], method, targets)
        np.testing.assert_allclose(result.logits, refs["logits"], atol=1e-4, rtol=1e-4)
        assert correlation(result.heatmaps, refs[f"{method}:{which}"]) >= 0.99, (method, which)


@pytest.mark.parametrize("method", ["rollout", "gradient-rollout"])
@pytest.mark.parametrize("name,exporter", [(n, e) for n, e in CASES if n in ("vit", "deit", "vitreg")])
def test_attention_methods_match_the_papers_equations(name, exporter, method):
    """Global-attention models (the references: ViT, DeiT, ViT with registers: rows of the
    tokens the head reads, CLS and distillation, never registers); Swin's window attention is
    refused below."""
    refs = np.load(FIXTURES / f"{name}.npz")
    explainer = Explainer(FIXTURES / f"{name}_{exporter}.onnx", cache=False)
    for which, targets in (("top1", None), ("classes", [int(c) for c in refs["classes"]])):
        result = explainer.explain(refs["x"], method, targets)
        assert correlation(result.heatmaps, refs[f"{method}:{which}"]) >= 0.99, (method, which)
        assert all(explainer.graph.producer[n].op_type == "Softmax" for n in result.layers)
        assert len(result.layers) == 2  # both blocks' attention, read in the same run


def test_gradient_rollout_depends_on_the_class_and_rollout_does_not():
    refs = np.load(FIXTURES / "vit.npz")
    explainer = Explainer(FIXTURES / "vit_ts.onnx", cache=False)
    x = refs["x"][:1]
    chefer = explainer.explain(x, "gradient-rollout", [[3, 5]]).heatmaps[0]
    plain = explainer.explain(x, "rollout", [[3, 5]]).heatmaps[0]
    assert np.abs(chefer[0] - chefer[1]).max() > 1e-3
    np.testing.assert_array_equal(plain[0], plain[1])


def test_swin_stages_are_found_with_run_time_shapes():
    """Swin's window reshapes leave symbolic dims that static inference cannot resolve: the
    later NHWC stages come from a run at the concrete input size."""
    for exporter in ("ts", "dynamo"):
        layers = Explainer(FIXTURES / f"swin_{exporter}.onnx", cache=False).layers()
        sizes = {(l.shape, l.layout) for l in layers}
        assert ((16, 16, 16), "NHWC") in sizes  # stage 1
        assert ((32, 8, 8), "NHWC") in sizes  # stage 2, after patch merging and shifted windows


def test_maxvit_maps_are_found_after_each_partitioned_attention():
    """MaxViT cuts the NCHW map into windows / grid cells (Reshape, Transpose, Reshape to
    [N, cells, P*P, C]), attends, and puts it back: the tensors put back are maps, those in
    between are not (their axes are cells and positions in a cell, not rows and columns)."""
    for exporter, back in (("ts", 4), ("dynamo", 2)):  # dynamo fuses window-back + grid-cut
        explainer = Explainer(FIXTURES / f"maxvit_{exporter}.onnx", cache=False)
        graph, layers = explainer.graph, explainer.layers()
        reshaped = [(l.shape, l.kind) for l in layers if graph.producer[l.name].op_type == "Reshape"]
        assert reshaped == [((16, 16, 16), "NCHW")] * (back // 2) + [((32, 8, 8), "NCHW")] * (back // 2)
        names = {l.name for l in layers}
        for node in graph.model.graph.node:
            if node.op_type in ("LayerNormalization", "Einsum", "Softmax"):
                assert node.output[0] not in names  # inside the partitions
        refs = np.load(FIXTURES / "maxvit.npz")
        assert graph.find_layer(str(refs[f"early:{exporter}"])).shape == (16, 16, 16)


@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
def test_maxvit_gradients_equal_torch_autograd(exporter):
    """At the default layer and at the first block's output, whose gradient comes back through
    the last block's window and grid attention (Einsum, Softmax, the partition reshapes)."""
    refs = np.load(FIXTURES / "maxvit.npz")
    classes = [int(c) for c in refs["classes"]]
    for key, expected in (("layer", refs["gradient:classes"]), ("early", refs["early-gradient:classes"])):
        layer = str(refs[f"{key}:{exporter}"])
        result = Explainer(FIXTURES / f"maxvit_{exporter}.onnx", layer=layer, cache=False).explain(
            refs["x"], "gradcam", classes)
        np.testing.assert_allclose(result.gradients[layer], expected, atol=1e-5 * np.abs(expected).max(), rtol=1e-3)


def test_partitioned_tensors_are_not_maps_even_when_their_shape_is_one():
    """A window partition of a 16x16x16 map into 4x4 windows gives [N, 16 windows, 16 positions,
    16 channels]: the shape of the map itself. Only the places of the elements tell it is not a
    map (and the departition is one)."""
    rng = np.random.default_rng(0)
    c, size, p = 16, 16, 4
    init = {"w": rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3,
            "cut6": np.array([1, c, size // p, p, size // p, p], np.int64),
            "cut4": np.array([1, (size // p) ** 2, p * p, c], np.int64),
            "back6": np.array([1, size // p, size // p, p, p, c], np.int64),
            "back4": np.array([1, c, size, size], np.int64),
            "scale": np.ones(c, np.float32), "bias": np.zeros(c, np.float32),
            "fc": rng.standard_normal((c, c)).astype(np.float32) * 0.3,
            "head": rng.standard_normal((c, 5)).astype(np.float32), "flat": np.array([1, c], np.int64)}
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["conv", "cut6"], ["cells6"]),
        helper.make_node("Transpose", ["cells6"], ["cellsT"], perm=[0, 2, 4, 3, 5, 1]),
        helper.make_node("Reshape", ["cellsT", "cut4"], ["windows"]),
        helper.make_node("LayerNormalization", ["windows", "scale", "bias"], ["norm"], axis=-1),
        helper.make_node("MatMul", ["norm", "fc"], ["linear"]),
        helper.make_node("Add", ["windows", "linear"], ["mixed"]),
        helper.make_node("Reshape", ["mixed", "back6"], ["back6d"]),
        helper.make_node("Transpose", ["back6d"], ["backT"], perm=[0, 5, 1, 3, 2, 4]),
        helper.make_node("Reshape", ["backT", "back4"], ["map"]),
        helper.make_node("GlobalAveragePool", ["map"], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "flat"], ["flatpool"]),
        helper.make_node("MatMul", ["flatpool", "head"], ["logits"]),
    ]
    model = build_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])], init, opset=17)
    layers = {l.name: l for l in Explainer(model, cache=False).layers()}
    assert not {"windows", "norm", "linear", "mixed"} & set(layers)
    assert (layers["map"].shape, layers["map"].kind, layers["map"].default) == ((c, size, size), "NCHW", True)


def test_rollout_refuses_window_attention():
    with pytest.raises(OnnxcamError, match="window attention"):
        Explainer(FIXTURES / "swin_ts.onnx", cache=False).explain(np.zeros((1, 3, 64, 64), np.float32), "rollout")


def test_cls_pooled_last_block_output_carries_no_patch_gradient():
    """Why the default is not the last token tensor: after the last attention, patch tokens
    reach a CLS-pooled head only through the CLS token."""
    refs = np.load(FIXTURES / "vit.npz")
    explainer = Explainer(FIXTURES / "vit_ts.onnx", layer="/encoder/ln/LayerNormalization_output_0", cache=False)
    result = explainer.explain(refs["x"], "gradcam")
    assert not np.any(result.gradients["/encoder/ln/LayerNormalization_output_0"])
    default = Explainer(FIXTURES / "vit_ts.onnx", cache=False)
    assert np.any(default.explain(refs["x"], "gradcam").heatmaps)


def test_cli_lists_kinds_and_explains_with_attention_methods(tmp_path):
    from typer.testing import CliRunner
    from onnxcam.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["layers", str(FIXTURES / "deit_ts.onnx")])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("*"))
    assert "/blocks/blocks.1/norm1/LayerNormalization_output_0" in line and "tokens (prefix 2, grid 6x6)" in line
    swin = runner.invoke(app, ["layers", str(FIXTURES / "swin_dynamo.onnx")])
    assert "NHWC" in swin.output and "NCHW" in swin.output
    image = tmp_path / "x.png"
    import cv2
    cv2.imwrite(str(image), (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    for method in ("gradient-rollout", "rollout", "gradcam"):
        out = runner.invoke(app, ["explain", str(FIXTURES / "deit_dynamo.onnx"), str(image), "-m", method,
                                  "-o", str(tmp_path / "out"), "--npy"])
        assert out.exit_code == 0, out.output
        assert (tmp_path / "out" / f"x.{method}.npy").exists()
    wrong = runner.invoke(app, ["layers", str(FIXTURES / "deit_ts.onnx"), "--prefix", "2"])
    assert wrong.exit_code == 2 and "--prefix needs --grid" in wrong.output


def test_export_of_a_token_layer_equals_the_explainer():
    refs = np.load(FIXTURES / "deit.npz")
    for exporter in ("ts", "dynamo"):
        path = FIXTURES / f"deit_{exporter}.onnx"
        session = ort.InferenceSession(export_explained(path, "gradcam++").SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        heatmap, classes = session.run(["heatmap", "target_class"], {"input": refs["x"], "target": np.array([3, -1])})
        expected = Explainer(path, cache=False).explain(refs["x"], "gradcam++", [3, int(classes[1])]).heatmaps
        np.testing.assert_allclose(heatmap, expected, atol=2e-6)


@pytest.mark.parametrize("method", ["rollout", "gradient-rollout"])
def test_export_of_attention_methods_equals_the_explainer(method):
    """attention.py's recurrences traced into the graph (float32 there, float64 in numpy)."""
    refs = np.load(FIXTURES / "deit.npz")
    for exporter in ("ts", "dynamo"):
        path = FIXTURES / f"deit_{exporter}.onnx"
        session = ort.InferenceSession(export_explained(path, method).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        heatmap, classes = session.run(["heatmap", "target_class"], {"input": refs["x"], "target": np.array([3, -1])})
        expected = Explainer(path, cache=False).explain(refs["x"], method, [3, int(classes[1])]).heatmaps
        np.testing.assert_allclose(heatmap, expected, atol=1e-5)


# -- token grids without a patch-embedding convolution ---------------------------------------------

def _patchify_model(height: int, width: int, patch: int, prefix: int, pool: str = "cls", channels: int = 8,
                    hide_prefix: bool = False, batch: int | str = 1):
    """Patches by Reshape/Transpose (no Conv), a linear embedding, ``prefix`` learned tokens
    concatenated in front, one token-mixing layer, CLS or mean pooling, a linear head.
    ``hide_prefix`` makes the learned tokens depend on the image (times 0), so the graph no
    longer says how many tokens are prefix. A symbolic ``batch`` expands the learned tokens to
    it as dynamic-batch exports do (``Expand`` to ``Shape(input)[0]``)."""
    rng = np.random.default_rng(0)
    h, w = height // patch, width // patch
    init = {
        "shape6": np.array([0, 3, h, patch, w, patch], np.int64),  # 0: the batch, copied
        "shape3": np.array([0, h * w, 3 * patch * patch], np.int64),
        "embed": rng.standard_normal((3 * patch * patch, channels)).astype(np.float32),
        "cls": rng.standard_normal((1, max(prefix, 1), channels)).astype(np.float32),
        "head": rng.standard_normal((channels, 10)).astype(np.float32),
        "zero": np.array([0], np.int64), "one": np.array([1], np.int64),
        "learned": np.array([max(prefix, 1), channels], np.int64),
        "flat": np.array([0, channels], np.int64),
        "nothing": np.zeros((1, 1, 1), np.float32),
    }
    nodes = [
        helper.make_node("Reshape", ["input", "shape6"], ["p6"]),
        helper.make_node("Transpose", ["p6"], ["pt"], perm=[0, 2, 4, 1, 3, 5]),
        helper.make_node("Reshape", ["pt", "shape3"], ["patches"]),
        helper.make_node("MatMul", ["patches", "embed"], ["emb"]),
    ]
    if hide_prefix:
        nodes += [helper.make_node("ReduceMean", ["input"], ["image_mean"], axes=[1, 2, 3], keepdims=0),
                  helper.make_node("Mul", ["image_mean", "nothing"], ["image_zero"]),
                  helper.make_node("Add", ["cls", "image_zero"], ["cls_used"])]
    elif isinstance(batch, str):
        nodes += [helper.make_node("Shape", ["input"], ["input_shape"]),
                  helper.make_node("Slice", ["input_shape", "zero", "one"], ["n"]),
                  helper.make_node("Concat", ["n", "learned"], ["cls_shape"], axis=0),
                  helper.make_node("Expand", ["cls", "cls_shape"], ["cls_used"])]
    nodes += [
        helper.make_node("Concat", ["cls_used" if hide_prefix or isinstance(batch, str) else "cls", "emb"], ["tokens"],
                         axis=1) if prefix else
        helper.make_node("Identity", ["emb"], ["tokens"]),
        helper.make_node("Tanh", ["tokens"], ["act"]),
        helper.make_node("Transpose", ["act"], ["actT"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["act", "actT"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "act"], ["mixed"]),
        helper.make_node("Add", ["mixed", "act"], ["block"]),
        helper.make_node("Gather", ["block", "zero"], ["pooled3"], axis=1) if pool == "cls" else
        helper.make_node("ReduceMean", ["block"], ["pooled3"], axes=[1], keepdims=1),
        helper.make_node("Reshape", ["pooled3", "flat"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "head"], ["logits"]),
    ]
    return build_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, height, width])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], init)


def test_grid_from_the_aspect_ratio_and_prefix_from_the_concat():
    model = _patchify_model(32, 64, 8, prefix=1)
    layers = {l.name: l for l in Explainer(model, cache=False).layers()}
    assert layers["tokens"].kind == "tokens (prefix 1, grid 4x8)"
    default = next(l for l in layers.values() if l.default)
    assert default.name == "act"  # the last token tensor that still feeds the attention
    assert factor_grids(32, (32, 64)) == [(4, 8)]


def test_prefix_expanded_to_a_dynamic_batch_is_still_prefix():
    """The CLS token reaches the Concat through Expand(cls, Shape(input)[0] ...): its values do
    not depend on the image, only its count on the batch, so it still counts as prefix (it did
    not: 33 tokens were read as 33 patches, and no grid fitted)."""
    model = _patchify_model(32, 64, 8, prefix=1, batch="N")
    explainer = Explainer(model, cache=False)
    layers = {l.name: l for l in explainer.layers()}
    assert layers["tokens"].kind == "tokens (prefix 1, grid 4x8)"
    assert next(l for l in layers.values() if l.default).name == "act"
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 64)).astype(np.float32)
    assert explainer.explain(x, "gradcam").heatmaps.shape == (2, 32, 64)


def test_mean_pooled_default_is_the_last_token_tensor():
    layers = Explainer(_patchify_model(32, 32, 8, prefix=0, pool="mean"), cache=False).layers()
    assert next(l for l in layers if l.default).name == "block"


def test_unreadable_grid_is_an_error_that_asks_for_grid_and_prefix():
    """Two prefix tokens the graph does not reveal: 18 tokens fit no grid of square patches for
    a 32x32 image; choosing the tensor says so and asks for --grid/--prefix, which then work."""
    model = _patchify_model(32, 32, 8, prefix=2, hide_prefix=True)
    with pytest.raises(LayerError, match="--grid H W --prefix P"):
        Explainer(model, layer="act", cache=False)
    explainer = Explainer(model, layer="act", grid=(4, 4), prefix=2, cache=False)
    assert explainer.targets_layers[0].kind == "tokens (prefix 2, grid 4x4)"
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert explainer.explain(x, "gradcam").heatmaps.shape == (1, 32, 32)


def _fused_attention_model():
    """The patchify model with its token mixing done by one com.microsoft Attention node."""
    model = _patchify_model(32, 32, 8, prefix=1)
    graph = model.graph
    rng = np.random.default_rng(1)
    graph.initializer.extend([onnx.numpy_helper.from_array(rng.standard_normal((8, 24)).astype(np.float32), "qkv_w"),
                              onnx.numpy_helper.from_array(np.zeros(24, np.float32), "qkv_b")])
    mixing = [n for n in graph.node if n.output[0] in ("actT", "scores", "attn", "mixed")]
    position = list(graph.node).index(mixing[0])
    for node in mixing:
        graph.node.remove(node)
    graph.node.insert(position, helper.make_node("Attention", ["act", "qkv_w", "qkv_b"], ["mixed"],
                                                 domain="com.microsoft", num_heads=2))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_fused_attention_is_refused_with_the_op_and_the_export_to_use():
    model = _fused_attention_model()
    with pytest.raises(OnnxcamError, match=r"com\.microsoft\.Attention.*opset_version"):
        find_attention(ModelGraph(model), "logits")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with pytest.raises(OnnxcamError, match=r"Attention is fused attention.*opset_version"):
        Explainer(model, layer="act", cache=False).explain(x, "gradcam")


def test_several_targets_through_the_head_equal_separate_calls():
    """The head cut at a token layer (the residual stream bypasses it: a frontier input) gives
    the same maps as one call per class."""
    refs = np.load(FIXTURES / "vit.npz")
    explainer = Explainer(FIXTURES / "vit_dynamo.onnx", cache=False)
    together = explainer.explain(refs["x"], "gradcam", [[3, 5]]).heatmaps
    for t, cls in enumerate((3, 5)):
        alone = explainer.explain(refs["x"], "gradcam", cls).heatmaps
        np.testing.assert_allclose(together[:, t], alone, atol=1e-5)


def test_ablationcam_on_tokens_says_why_not():
    explainer = Explainer(FIXTURES / "vit_ts.onnx", cache=False)
    with pytest.raises(OnnxcamError, match="prefix tokens cannot be rebuilt"):
        explainer.explain(np.load(FIXTURES / "vit.npz")["x"], "ablationcam")


@pytest.mark.parametrize("method", ["rollout", "gradient-rollout"])
def test_attention_methods_keep_the_map_contract(method):
    """As every method on the MobileNets: finite maps in [0, 1] on random and constant images,
    several targets in one call equal one call per target."""
    explainer = Explainer(FIXTURES / "deit_ts.onnx", cache=False)
    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 48, 48)).astype(np.float32)
    for batch in (x, np.full((1, 3, 48, 48), -1.0, np.float32)):
        heatmaps = explainer.explain(batch, method).heatmaps
        assert heatmaps.shape == (len(batch), 48, 48)
        assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    grid = [[3, 7, 9], [1, 2, 3]]
    together = explainer.explain(x, method, targets=grid)
    assert together.targets.tolist() == grid
    for t in range(3):
        alone = explainer.explain(x, method, targets=[grid[0][t], grid[1][t]])
        np.testing.assert_allclose(together.heatmaps[:, t], alone.heatmaps, atol=2e-5)


def test_channels_last_blocks_keep_their_layout_through_layernorm_and_linear():
    """ConvNeXt-style: Conv -> permute to NHWC -> LayerNorm -> Linear (MatMul on the last axis)
    -> permute back -> pooling. The NHWC tensors are layers too, with their channel counts."""
    rng = np.random.default_rng(0)
    init = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "scale": np.ones(8, np.float32),
            "bias": np.zeros(8, np.float32), "fc": rng.standard_normal((8, 12)).astype(np.float32),
            "head": rng.standard_normal((12, 5)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["conv"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["nhwc", "scale", "bias"], ["norm"], axis=-1),
        helper.make_node("MatMul", ["norm", "fc"], ["linear"]),
        helper.make_node("Transpose", ["linear"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "head"], ["logits"]),
    ]
    model = build_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])], init, opset=17)
    layers = {l.name: (l.shape, l.kind) for l in Explainer(model, cache=False).layers()}
    assert layers["norm"] == ((8, 8, 8), "NHWC") and layers["linear"] == ((12, 8, 8), "NHWC")
    assert next(l for l in Explainer(model, cache=False).layers() if l.default).name == "nchw"


@pytest.mark.parametrize("method", ["rollout", "gradient-rollout"])
def test_attention_methods_are_one_run(method, monkeypatch):
    """Top-1 targets are chosen from the logits of the same run (in-graph for the gradient)."""
    explainer = Explainer(FIXTURES / "deit_ts.onnx", cache=False)
    x = np.load(FIXTURES / "deit.npz")["x"]
    calls = []
    original = explainer.run_model
    monkeypatch.setattr(explainer, "run_model", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = explainer.explain(x, method)
    assert len(calls) == 1
    np.testing.assert_array_equal(result.targets, result.logits.argmax(axis=1))
