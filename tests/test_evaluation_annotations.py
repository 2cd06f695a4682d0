"""Ground-truth readers: onnxcam JSON (the shared data set's format), VOC/ImageNet XML, COCO
JSON; mask conventions; matching images; the label mapping."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from onnxcam.errors import OnnxcamError
from onnxcam.evaluation.annotations import load_annotations, load_label_map, mask_boxes, match_images, voc_palette
from tests.conftest import shared_file

VOC = """<annotation><folder>VOC2012</folder><filename>{name}</filename>
<size><width>100</width><height>80</height><depth>3</depth></size>
<object><name>dog</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>
<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>
</annotation>"""


def test_shared_annotations_boxes_and_mask_conventions():
    path = shared_file("data/annotated/annotations.json")
    found = {a.image.name: a for a in load_annotations(path)}
    assert len(found) == 15
    voc = found["2011_000003.jpg"]
    assert voc.boxes() == [(191.0, 107.36900369003689, 313.0, 329.36900369003695), (365.0, 83.0, 500.0, 333.0)]
    mask = voc.object_mask()  # VOC class palette: 0 background, 255 void, 5 and 15 objects
    assert mask.sum() == 873 + 32880  # pixels of classes 5 and 15 (PIL reads the indices)
    assert voc_palette()[[0, 15, 255]].tolist() == [[0, 0, 0], [192, 128, 128], [224, 224, 192]]
    # Oxford-IIIT Pet trimap, "0=pet,1=background,2=border": the pet is value 0
    dog = found["dog_segmentation.bmp"]
    raw = cv2.imread(str(dog.mask), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(dog.object_mask(), raw == 0)
    small = found["dog_segmentation_256.bmp"]  # "same, 256x256": the previous entry's convention
    raw = cv2.imread(str(small.mask), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(small.object_mask(), raw == 0)
    assert dog.boxes() == [] and len(mask_boxes(dog.object_mask())) >= 1
    bird = found["bird_segmentation.bmp"]  # "0=background, >0 bird"
    raw = cv2.imread(str(bird.mask), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(bird.object_mask(), raw > 0)
    assert found["000000000034.jpg"].labels == ["zebra"]


def test_voc_and_imagenet_xml(tmp_path):
    (tmp_path / "a.xml").write_text(VOC.format(name="a.jpg"))
    (tmp_path / "n01.xml").write_text(VOC.format(name="n01440764_10026"))  # ImageNet: no extension
    single = load_annotations(tmp_path / "a.xml")[0]
    assert single.image == tmp_path / "a.jpg"
    assert single.boxes() == [(10.0, 20.0, 50.0, 60.0), (0.0, 0.0, 10.0, 10.0)]  # 1-based inclusive
    assert single.boxes(["cat"]) == [(0.0, 0.0, 10.0, 10.0)]
    folder = load_annotations(tmp_path)
    assert [a.image.name for a in folder] == ["a.jpg", "n01440764_10026.JPEG"]


def test_coco(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "x.jpg", "width": 64, "height": 48},
                       {"id": 8, "file_name": "y.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [4, 5, 10, 20]},
                            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 0, 5]}],
            "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    found = load_annotations(tmp_path / "coco.json")
    assert [a.image.name for a in found] == ["x.jpg", "y.jpg"]
    assert found[0].boxes() == [(4.0, 5.0, 14.0, 25.0)] and found[0].labels == ["car"]  # empty box dropped
    assert found[1].objects == []


def test_onnxcam_json_explicit_mask_values_and_errors(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:6] = 7
    mask[6:, 6:] = 9
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    entries = [{"image": "a.png", "objects": [{"label": "x"}], "mask": "m.png", "mask_object": [9]}]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    annotation = load_annotations(tmp_path / "ann.json")[0]
    assert annotation.object_mask().sum() == 4
    assert mask_boxes(mask > 0) == [(2.0, 2.0, 6.0, 4.0), (6.0, 6.0, 8.0, 8.0)]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png", "objects": [{"box_xyxy": [5, 5, 1, 9]}]}]))
    with pytest.raises(OnnxcamError, match="empty"):
        load_annotations(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(OnnxcamError, match="neither"):
        load_annotations(tmp_path / "odd.json")
    with pytest.raises(OnnxcamError, match="no such"):
        load_annotations(tmp_path / "missing.json")


def test_match_images_by_name_and_folder(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "a.png", "objects": []},
                                                   {"image": "b.png", "objects": []}]))
    found = load_annotations(tmp_path / "ann.json")
    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "b.png"), np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(str(images / "c.png"), np.zeros((4, 4, 3), np.uint8))
    assert [a.image for a in match_images(found, [images])] == [images / "b.png"]
    assert match_images(found, [images / "b.png"])[0].image == images / "b.png"
    with pytest.raises(OnnxcamError, match="c.png: no annotation"):
        match_images(found, [images / "c.png"])


def test_label_map(tmp_path):
    labels = ["tench", "Samoyed", "tabby cat"]
    (tmp_path / "map.json").write_text(json.dumps({"dog": ["samoyed", 0], "cat": "tabby cat"}))
    assert load_label_map(tmp_path / "map.json", labels) == {"dog": [1, 0], "cat": [2]}
    (tmp_path / "bad.json").write_text(json.dumps({"dog": "wolf"}))
    with pytest.raises(OnnxcamError, match="neither a class index"):
        load_label_map(tmp_path / "bad.json", labels)
