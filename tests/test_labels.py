"""Labels files and class names: formats, counts that do not fit the model, names -> classes."""

from __future__ import annotations

import json

import onnx
import pytest

from onnxcam import Explainer, OnnxcamWarning, TargetError
from onnxcam.labels import LabelsError, check_labels, load_labels, match_label, split_names
from tests.conftest import shared_file
from tests.test_cli import photo, run, tiny  # noqa: F401 - fixtures
from tests.tiny_models import conv_classifier


@pytest.fixture(scope="module")
def imagenet() -> list[str]:
    """The 1001-line list of the shared MobileNets ('background' first, 'crane' twice)."""
    return load_labels(shared_file("models/mobilenet/imagenet_labels.txt"))


# -- formats -----------------------------------------------------------------------------------

def test_keras_json_dict_plain_json_and_hugging_face_configs(tmp_path):
    keras = {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"], "2": ["n01484850", "great white shark"]}
    (tmp_path / "keras.json").write_text(json.dumps(keras))
    assert load_labels(tmp_path / "keras.json") == ["tench", "goldfish", "great white shark"]
    (tmp_path / "names.json").write_text(json.dumps({"1": "b", "0": "a"}))
    assert load_labels(tmp_path / "names.json") == ["a", "b"]
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "cat", "1": "dog"}, "hidden": 3}))
    assert load_labels(tmp_path / "config.json") == ["cat", "dog"]
    (tmp_path / "label2id.json").write_text(json.dumps({"dog": 1, "cat": 0}))
    assert load_labels(tmp_path / "label2id.json") == ["cat", "dog"]
    (tmp_path / "list.json").write_text('["x", "y"]')
    assert load_labels(tmp_path / "list.json") == ["x", "y"]
    (tmp_path / "bom.txt").write_bytes("\ufeffé\nü\n".encode("utf-8"))
    assert load_labels(tmp_path / "bom.txt") == ["é", "ü"]
    (tmp_path / "bert.txt").write_text("[PAD]\n[unused0]\n")  # a text file that starts like JSON
    assert load_labels(tmp_path / "bert.txt") == ["[PAD]", "[unused0]"]


@pytest.mark.parametrize("content, message", [
    ('{"a": {"b": 1}}', "format not understood"),
    ('{"0": 3}', "format not understood"),
    ('[1, 2]', "format not understood"),
    ('{"0": "a",', "does not parse"),
    ("", "empty"),
])
def test_a_format_not_understood_is_named(tmp_path, content, message):
    (tmp_path / "l.json").write_text(content)
    with pytest.raises(LabelsError, match=message):
        load_labels(tmp_path / "l.json")


def test_binary_and_non_utf8_files_are_one_line_errors(tmp_path, tiny, photo):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(LabelsError, match=r"not UTF-8 text \(byte 0xe9 at offset 3\)"):
        load_labels(tmp_path / "latin1.txt")
    with pytest.raises(LabelsError, match="looks like a PNG image"):
        load_labels(photo)
    for labels, message in ((photo, "looks like a PNG image"), (tmp_path / "latin1.txt", "not UTF-8"),
                            (tiny, "not a labels file")):
        code, output = run("explain", tiny, photo, "-o", tmp_path / "out", "--labels", labels)
        assert code == 2 and output.startswith("error: ") and message in output, output
        assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert not (tmp_path / "out").exists()


# -- counts ------------------------------------------------------------------------------------

def test_a_count_that_does_not_fit_is_refused_when_given_and_warned_otherwise(tmp_path, tiny, photo):
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    code, output = run("explain", tiny, photo, "-o", tmp_path / "out", "--labels", tmp_path / "four.txt")
    assert code == 2 and "4 labels for a model with 5 classes" in output and "add it as the first" in output
    assert not (tmp_path / "out").exists()
    with pytest.warns(OnnxcamWarning, match="4 labels for a model with 5 classes"):
        assert load_labels(tmp_path / "four.txt", classes=5) == ["a", "b", "c", "d"]
    with pytest.raises(LabelsError, match="remove it"):
        check_labels(["background", "a", "b"], 2, "l.txt", explicit=True)
    # labels a model carries in its metadata: a warning, and no (possibly shifted) names
    model = conv_classifier(classes=5)
    model.metadata_props.add(key="onnxcam.labels", value=json.dumps(["a", "b", "c"]))
    onnx.save(model, tmp_path / "meta.onnx")
    with pytest.warns(OnnxcamWarning, match="3 labels for a model with 5 classes"):
        assert Explainer(tmp_path / "meta.onnx").labels() is None
    code, output = run("explain", tmp_path / "meta.onnx", photo, "-o", tmp_path / "m")
    assert code == 0 and "warning: " in output and "3 labels for a model with 5 classes" in output
    assert json.loads((tmp_path / "m" / "results.json").read_text())[0]["label"] is None


# -- names -------------------------------------------------------------------------------------

def test_every_synonym_of_a_line_matches(imagenet):
    tabby = imagenet.index("tabby, tabby cat")
    assert match_label("tabby cat", imagenet).index == tabby
    assert match_label("Tabby Cat", imagenet).index == tabby
    assert match_label("tabby", imagenet).index == tabby
    assert match_label("tabby, tabby cat", imagenet).index == tabby
    assert match_label("hot dog", imagenet).index == imagenet.index("hotdog, hot dog, red hot")
    assert match_label("Egyptian cat", imagenet) == match_label("egyptian cat", imagenet)
    assert match_label("Egyptian cat", imagenet).note is None


def test_a_name_of_several_classes_lists_them(imagenet):
    cranes = [i for i, label in enumerate(imagenet) if label == "crane"]
    assert len(cranes) == 2
    with pytest.raises(TargetError, match=f"names 2 classes: {cranes[0]} \\(crane\\), {cranes[1]} \\(crane\\)"):
        match_label("crane", imagenet)


def test_partial_names_are_taken_only_when_unique_and_always_reported(imagenet):
    with pytest.raises(TargetError) as caught:
        match_label("cat", imagenet)  # never silently the catamaran
    tabby = imagenet.index("tabby, tabby cat")
    assert f"is no label but part of 16: {tabby} (tabby, tabby cat), " in str(caught.value)  # whole words first
    match = match_label("catamar", imagenet)
    assert match.index == imagenet.index("catamaran") and "catamar" in match.note and "catamaran" in match.note
    with pytest.raises(TargetError, match="matches no label"):
        match_label("xyzzy", imagenet)


def test_split_keeps_whole_label_lines(imagenet):
    assert split_names(["3,7", "9"], imagenet) == ["3", "7", "9"]
    assert split_names(["tabby, tabby cat"], imagenet) == ["tabby, tabby cat"]
    assert split_names(["tabby cat,hot dog"], imagenet) == ["tabby cat", "hot dog"]


def test_cli_targets_by_synonym_and_ambiguity(tmp_path, photo):
    model = shared_file("models/mobilenet/mobilenet_v1_0.25_128.onnx")
    labels = shared_file("models/mobilenet/imagenet_labels.txt")
    args = ["explain", model, photo, "--preset", "inception", "--labels", labels]
    code, output = run(*args, "-o", tmp_path / "a", "-t", "tabby cat", "-t", "hot dog")
    assert code == 0, output
    record = json.loads((tmp_path / "a" / "results.json").read_text())[0]
    assert [t["label"] for t in record["targets"]] == ["tabby, tabby cat", "hotdog, hot dog, red hot"]
    code, output = run(*args, "-o", tmp_path / "b", "-t", "crane")
    assert code == 2 and "crane" in output and "give the class index" in output
    code, output = run(*args, "-o", tmp_path / "c", "-t", "cat")
    assert code == 2 and "tabby cat" in output and not (tmp_path / "c").exists()
    code, output = run(*args, "-o", tmp_path / "d", "-t", "catamar")
    assert code == 0 and "warning: target 'catamar' is part of one label only" in output
    assert json.loads((tmp_path / "d" / "results.json").read_text())[0]["label"] == "catamaran"
