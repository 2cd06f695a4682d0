"""Images in: decoding of every common kind, normalization presets, layouts."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from onnxcam.errors import ImageError, OnnxcamError
from onnxcam.images import PRESETS, load_image, load_labels, make_preprocess

RGB = np.array([200, 100, 50], np.uint8)  # a colour whose channel order is unambiguous


def _write(path, array) -> str:
    assert cv2.imwrite(str(path), array)
    return str(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tiff"])
def test_colour_files_come_back_rgb(tmp_path, suffix):
    bgr = np.full((10, 12, 3), RGB[::-1], np.uint8)
    image = load_image(_write(tmp_path / f"c{suffix}", bgr))
    assert image.shape == (10, 12, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image[5, 5], RGB, atol=3)  # jpeg is lossy


def test_gray_rgba_and_16bit(tmp_path):
    gray = load_image(_write(tmp_path / "g.png", np.full((4, 4), 77, np.uint8)))
    np.testing.assert_array_equal(gray[0, 0], [77, 77, 77])
    bgra = np.dstack([np.full((4, 4, 3), RGB[::-1], np.uint8), np.full((4, 4), 10, np.uint8)])
    np.testing.assert_array_equal(load_image(_write(tmp_path / "a.png", bgra))[0, 0], RGB)
    deep = np.full((4, 4, 3), 65535, np.uint16)
    deep[..., 2] = 0  # red channel (BGR order on disk) off
    np.testing.assert_allclose(load_image(_write(tmp_path / "d.png", deep))[0, 0], [0, 255, 255])


def test_unreadable_files_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "absent.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageError, match="text.png: cannot be decoded"):
        load_image(tmp_path / "text.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="cannot be decoded"):
        load_image(tmp_path / "empty.jpg")


def test_a_truncated_image_is_one_error_and_no_opencv_log(tmp_path, capfd):
    """OpenCV logs its own line (to the C-level stderr) on a broken header; onnxcam reports
    the file itself, so that line is silenced."""
    (tmp_path / "cut.gif").write_bytes(b"GIF89a")
    with pytest.raises(ImageError, match="cut.gif: cannot be decoded"):
        load_image(tmp_path / "cut.gif")
    assert capfd.readouterr().err == ""


def test_presets_follow_their_definitions():
    image = np.full((2, 2, 3), RGB, np.float32)
    inception = make_preprocess("inception", "NCHW", (2, 2))([image])
    np.testing.assert_allclose(inception[0, :, 0, 0], RGB / 127.5 - 1, rtol=1e-6)
    imagenet = make_preprocess("imagenet", "NCHW", (2, 2))([image])
    expected = (RGB / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(imagenet[0, :, 0, 0], expected, rtol=1e-5)
    caffe = make_preprocess("caffe", "NHWC", (2, 2))([image])
    np.testing.assert_allclose(caffe[0, 0, 0], RGB[::-1] - np.array([103.939, 116.779, 123.68]), rtol=1e-5)
    raw = make_preprocess("raw", "NCHW", (3, 5))([image])
    assert raw.shape == (1, 3, 3, 5) and np.allclose(raw[0, :, 1, 1], RGB / 255.0)
    assert set(PRESETS) == {"imagenet", "inception", "caffe", "raw"}


def test_explicit_mean_std_scale_override_the_preset():
    image = np.full((2, 2, 3), 100, np.float32)
    custom = make_preprocess("imagenet", "NCHW", (2, 2), mean=[0.5], std=[2, 2, 2], scale=100.0)([image])
    np.testing.assert_allclose(custom, (1.0 - 0.5) / 2)
    with pytest.raises(OnnxcamError, match=r"mean \(CLI: --mean\) takes 1 or 3 values"):
        make_preprocess(None, "NCHW", (2, 2), mean=[1, 2])
    with pytest.raises(OnnxcamError, match="unknown preprocessing preset"):
        make_preprocess("vgg", "NCHW", (2, 2))
    with pytest.raises(OnnxcamError, match="--size"):
        make_preprocess(None, "NCHW", None)([image])


def test_labels_file_formats(tmp_path):
    (tmp_path / "l.txt").write_text("a\nb\n\nc\n")
    assert load_labels(tmp_path / "l.txt") == ["a", "b", "", "c"]  # indices never shift
    (tmp_path / "l.json").write_text('["x", "y"]')
    assert load_labels(tmp_path / "l.json") == ["x", "y"]
