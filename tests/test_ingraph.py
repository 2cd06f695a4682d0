"""Maps computed inside the rewritten graph (onnxcam/ingraph.py) equal the numpy path's.

The numpy path (``Explainer.in_graph_maps = False``: methods.py's formulas and scale_maps with
cv2 after the run) is the reference: it is what the pytorch-grad-cam and torch fixtures check.
Both compute in float32 from the same A and G; the order of the sums and cv2's vs
onnxruntime's resize coordinates differ, measured <= 1.7e-6 on maps in [0, 1].
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxcam import Explainer
from onnxcam.ingraph import in_graph
from onnxcam.methods import METHODS
from tests.conftest import shared_file
from tests.tiny_models import conv_classifier, nhwc_classifier

TOLERANCE = 1e-5
IN_GRAPH = [name for name, spec in METHODS.items() if in_graph(spec)]


def _pair(model, **kwargs) -> tuple[Explainer, Explainer]:
    fast, reference = Explainer(model, **kwargs), Explainer(model, **kwargs)
    reference.in_graph_maps = False
    return fast, reference


def _inputs(explainer: Explainer, batch: int, seed: int = 0, scale: float = 1.5) -> np.ndarray:
    h, w = explainer.input_size
    shape = (batch, 3, h, w) if explainer.input_layout == "NCHW" else (batch, h, w, 3)
    return np.random.default_rng(seed).uniform(-scale, scale, shape).astype(np.float32)


def _maps_session_used(explainer: Explainer) -> bool:
    return any(request.maps is not None for request in explainer._sessions)


def _same(fast, reference) -> None:
    assert fast.heatmaps.shape == reference.heatmaps.shape and fast.heatmaps.dtype == np.float32
    assert np.abs(fast.heatmaps - reference.heatmaps).max() <= TOLERANCE
    np.testing.assert_array_equal(fast.targets, reference.targets)
    np.testing.assert_array_equal(fast.logits, reference.logits)
    assert fast.weights.keys() == reference.weights.keys()
    for name in reference.weights:
        assert fast.weights[name].shape == reference.weights[name].shape
        np.testing.assert_allclose(fast.weights[name], reference.weights[name], rtol=1e-5, atol=1e-7)
    for name in reference.gradients:
        np.testing.assert_array_equal(fast.gradients[name], reference.gradients[name])
        np.testing.assert_array_equal(fast.activations[name], reference.activations[name])


@pytest.mark.parametrize("method", IN_GRAPH)
@pytest.mark.parametrize("factory,layer", [(conv_classifier, None), (nhwc_classifier, None),
                                           (nhwc_classifier, "act_nhwc"),
                                           (conv_classifier, ["r1", "features"])])
def test_in_graph_maps_equal_the_numpy_path(factory, layer, method):
    fast, reference = _pair(factory(), layer=layer)
    x = _inputs(fast, 3)
    peaks = []
    for targets in (None, [1, 0, 2]):
        result = fast.explain(x, method, targets)
        _same(result, reference.explain(x, method, targets))
        peaks.append(result.heatmaps.max())
    assert _maps_session_used(fast) and not _maps_session_used(reference)
    assert max(peaks) > 0.5, "a trivial map proves nothing"


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
@pytest.mark.parametrize("factory,layer", [(conv_classifier, None), (nhwc_classifier, None),
                                           (nhwc_classifier, "act_nhwc")])
def test_several_targets_through_the_head_with_in_graph_maps(factory, layer, method):
    fast, reference = _pair(factory(), layer=layer)
    x = _inputs(fast, 3)
    for options in ({"topk": 3}, {"targets": [[0, 1], [2, 0], [1, 2]]}):
        ours, theirs = fast.explain(x, method, **options), reference.explain(x, method, **options)
        _same(ours, theirs)
        assert ours.heatmaps.ndim == 4
    assert any(request.head and request.maps for request in fast._sessions)


def test_in_graph_maps_on_a_mobilenet_batch_and_a_dynamic_size():
    path = shared_file("models/mobilenet/mobilenet_v1_0.25_128.onnx")
    fast, reference = _pair(path)
    x = _inputs(fast, 4, scale=1.0)
    for method in ("gradcam", "gradcam++", "layercam"):
        _same(fast.explain(x, method), reference.explain(x, method))
    dynamic = conv_classifier(batch="N")
    dynamic.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    dynamic.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    fast, reference = _pair(dynamic, input_size=(20, 24))
    x = _inputs(fast, 2)
    _same(fast.explain(x), reference.explain(x))
    assert fast.explain(x).heatmaps.shape == (2, 20, 24)


def test_what_the_graph_does_not_compute_takes_the_numpy_path():
    fast, reference = _pair(conv_classifier())
    x = _inputs(fast, 2)
    _same(fast.explain(x, "gradcam", eigen_smooth=True), reference.explain(x, "gradcam", eigen_smooth=True))
    _same(fast.explain(x, "eigengradcam"), reference.explain(x, "eigengradcam"))
    assert not _maps_session_used(fast)
    top = fast.explain(x, "gradcam", topk=2)
    assert top.heatmaps.shape == (2, 2, 16, 16)
    np.testing.assert_allclose(top.heatmaps[:, 0], fast.explain(x, "gradcam").heatmaps, atol=TOLERANCE)


# -- Score-CAM: masked images built in the graph ---------------------------------------------------

def _masks_session_used(explainer: Explainer) -> bool:
    return any(request.masks is not None for request in explainer._sessions)


@pytest.mark.parametrize("factory,layer", [(conv_classifier, None), (nhwc_classifier, None),
                                           (nhwc_classifier, "act_nhwc"), (conv_classifier, ["r1", "features"])])
def test_scorecam_masks_in_the_graph_give_the_numpy_weights_and_maps(factory, layer):
    fast, reference = _pair(factory(), layer=layer)
    x = _inputs(fast, 2)
    for options in ({}, {"max_channels": 5, "batch_size": 3}, {"targets": [[0, 1], [2, 0]]}):
        ours, theirs = fast.explain(x, "scorecam", **options), reference.explain(x, "scorecam", **options)
        np.testing.assert_array_equal(ours.targets, theirs.targets)
        for name in theirs.weights:
            np.testing.assert_allclose(ours.weights[name], theirs.weights[name], rtol=1e-4, atol=1e-6)
        assert np.abs(ours.heatmaps - theirs.heatmaps).max() <= 1e-4
    assert _masks_session_used(fast) and not _masks_session_used(reference)


def test_scorecam_masks_in_the_graph_on_a_mobilenet():
    fast, reference = _pair(shared_file("models/mobilenet/mobilenet_v1_0.25_128.onnx"))
    x = _inputs(fast, 1, scale=1.0)
    ours, theirs = fast.explain(x, "scorecam", batch_size=64), reference.explain(x, "scorecam", batch_size=64)
    name = ours.layers[0]
    np.testing.assert_allclose(ours.weights[name], theirs.weights[name], rtol=1e-4, atol=1e-6)
    assert np.abs(ours.heatmaps - theirs.heatmaps).max() <= 1e-4
    assert ours.heatmaps.max() > 0.5 and _masks_session_used(fast)


@pytest.mark.parametrize("size_out, size_in", [((224, 224), (7, 7)), ((64, 96), (8, 12)), ((13, 50), (5, 3)),
                                               ((7, 7), (7, 7)), ((100, 31), (3, 31))])
def test_the_upsampling_matrices_are_cv2_inter_linear(size_out, size_in):
    """R_H m R_W^T (the in-graph resize between fixed sizes) against cv2.resize itself."""
    import cv2

    from onnxcam.ingraph import upsampling_matrix

    m = np.random.default_rng(0).random(size_in).astype(np.float32)
    rows, cols = upsampling_matrix(size_out[0], size_in[0]), upsampling_matrix(size_out[1], size_in[1])
    expected = cv2.resize(m, size_out[::-1], interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(rows @ m @ cols.T, expected, atol=3e-7)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-6)  # weights of each output pixel


def test_the_in_graph_run_checks_the_input_and_the_maps_peaks():
    """Once the maps session exists, explain() leaves the Python pass over the input out: the
    run's own input sum catches NaN / Inf (the same error, naming the image), a sum that only
    overflows passes; its logits sums, map peaks, top-1 classes and seeds are numpy's."""
    import onnx

    from onnxcam.errors import OnnxcamError
    from onnxcam.explainer import Options
    from onnxcam.ingraph import CHECKS_OUTPUT, SEED_USED_OUTPUT, TOP1_OUTPUT
    from onnxcam.targets import one_hot

    explainer = Explainer(conv_classifier(), provider="cpu")
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    first = explainer.explain(x)
    spec, wanted = explainer.method("gradcam"), explainer.resolve_targets(None, 3)
    assert explainer._run_checks_input(spec, wanted, Options(False, None, None, 25, 0.15, 50, 0.0, 0))
    rewritten, session = explainer._sessions[explainer._map_request(spec)]
    model = onnx.load(str(rewritten.path)) if rewritten.path else rewritten.model
    first_node = model.graph.node[0]  # read while the input is in the caches for the first layer
    assert first_node.op_type == "ReduceSum" and first_node.input[0] == rewritten.input
    outputs = session.run({rewritten.input: x, "onnxcam_seed": np.zeros((3, 5), np.float32)},
                          [CHECKS_OUTPUT, TOP1_OUTPUT, SEED_USED_OUTPUT, rewritten.logits])
    checks, logits = outputs[CHECKS_OUTPUT], outputs[rewritten.logits]
    np.testing.assert_allclose(checks[:, 0], x.reshape(3, -1).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(checks[:, 1], logits.sum(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(checks[:, 2], first.heatmaps.reshape(3, -1).max(axis=1))
    np.testing.assert_array_equal(outputs[TOP1_OUTPUT], np.argmax(logits, axis=1)[:, None])
    np.testing.assert_array_equal(outputs[SEED_USED_OUTPUT], one_hot(np.argmax(logits, axis=1), 5))
    np.testing.assert_array_equal(first.targets, np.argmax(logits, axis=1))
    np.testing.assert_array_equal(first.seeds, one_hot(np.argmax(logits, axis=1)[:, None], 5))

    for bad in (np.nan, np.inf, -np.inf):
        broken = x.copy()
        broken[1, 2, 3, 4] = bad
        with pytest.raises(OnnxcamError, match=r"the input holds NaN or Inf \(image 1\)"):
            explainer.explain(broken)
    huge = np.full_like(x, 3e38)  # finite, but its sum is not: the exact check lets it through
    with pytest.warns(Warning):  # what the model makes of it is non-finite: a warning, not the input error
        assert explainer.explain(huge).heatmaps.shape == (3, 16, 16)


def test_the_graphs_top1_is_numpys_argmax_ties_included():
    """The targets explain() takes from the graph (ArgMax, its one-hot seed) are numpy's: two
    classes share the highest logit (rows 1 and 3 of the classifier equal), the first wins;
    the maps equal those of the class given by hand."""
    from onnx import numpy_helper

    model = conv_classifier()
    weights = {t.name: t for t in model.graph.initializer}
    for name in ("fc_w", "fc_b"):
        value = numpy_helper.to_array(weights[name]).copy()
        value[3] = value[1]
        value[1] += 100.0 if name == "fc_b" else 0.0  # class 1 (and its twin 3) always on top
        value[3] = value[1]
        weights[name].CopyFrom(numpy_helper.from_array(value, name))
    explainer = Explainer(model, provider="cpu")
    x = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    explainer.explain(x)  # builds the maps session
    result = explainer.explain(x)
    assert explainer._maps_runs["gradcam"].checks  # the graph's targets were read
    assert result.logits[:, 1].tolist() == result.logits[:, 3].tolist()
    np.testing.assert_array_equal(result.targets, [1, 1])
    np.testing.assert_array_equal(result.targets, np.argmax(result.logits, axis=1))
    np.testing.assert_array_equal(result.seeds[:, 0].argmax(axis=1), [1, 1])
    assert result.seeds.sum() == 2.0
    np.testing.assert_array_equal(result.heatmaps, explainer.explain(x, targets=1).heatmaps)


def _identical(ours, theirs) -> None:
    """Every field of two Explanations equal, to the bit, shapes and dtypes included."""
    for field in ("heatmaps", "logits", "targets", "seeds"):
        a, b = getattr(ours, field), getattr(theirs, field)
        assert a.shape == b.shape and a.dtype == b.dtype, field
        np.testing.assert_array_equal(a, b, err_msg=field)
    assert (ours.layers, ours.method, ours.provider) == (theirs.layers, theirs.method, theirs.provider)
    for field in ("activations", "gradients", "weights"):
        a, b = getattr(ours, field), getattr(theirs, field)
        assert a.keys() == b.keys(), field
        for name in b:
            assert a[name].shape == b[name].shape, (field, name)
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{field} {name}")


@pytest.mark.parametrize("method", IN_GRAPH)
@pytest.mark.parametrize("factory,layer", [(conv_classifier, None), (nhwc_classifier, "act_nhwc"),
                                           (conv_classifier, ["r1", "features"])])
def test_the_usual_call_is_assembled_as_the_general_path_would(factory, layer, method, monkeypatch):
    """explain(x) with the defaults, once the maps session exists, builds its Explanation
    straight from the run's outputs (Explainer._explain_top1); the general path (taken here
    with a non-default option no gradient method reads) gives the same, field by field."""
    explainer = Explainer(factory(), layer=layer, provider="cpu")
    x = _inputs(explainer, 3)
    general = explainer.explain(x, method)  # builds the session (the general path)
    assert explainer._maps_runs[method].checks
    again = explainer.explain(x, method, samples=24)  # the same session, the general assembly
    with monkeypatch.context() as patch:
        patch.setattr(explainer, "_explain", lambda *a, **k: pytest.fail("the usual call took the general path"))
        usual = explainer.explain(x, method)
    _identical(usual, general)
    _identical(usual, again)
    if method != "counterfactual":  # its top-1 maps are empty on these inputs: the next test's case
        assert usual.heatmaps.max() > 0.5


def test_the_usual_call_hands_empty_maps_to_the_general_assembly():
    """Maps the graph finds all zero (peak 0; the counterfactual of the top class here): the
    usual call warns as the general path does, with the same Explanation, from one run."""
    from onnxcam.errors import OnnxcamWarning

    explainer = Explainer(conv_classifier(), provider="cpu")
    x = _inputs(explainer, 2)
    with pytest.warns(OnnxcamWarning):
        explainer.explain(x, "counterfactual")  # builds the session
    runs = []
    original = explainer.run_model
    explainer.run_model = lambda *a, **k: runs.append(1) or original(*a, **k)
    with pytest.warns(OnnxcamWarning, match="counterfactual map of image 0 is all zero") as caught:
        usual = explainer.explain(x, "counterfactual")
    assert len(runs) == 1
    with pytest.warns(OnnxcamWarning) as again:
        general = explainer.explain(x, "counterfactual", samples=24)
    assert [str(w.message) for w in caught] == [str(w.message) for w in again]
    _identical(usual, general)
    assert usual.heatmaps[0].max() == 0
