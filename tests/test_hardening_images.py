"""Hostile and unusual image files: each decodes as a viewer shows it, or is one ImageError line
naming the file (no decoder chatter on stderr, no memory blow-up on huge headers)."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from onnxcam import decode
from onnxcam.decode import image_size, load_image
from onnxcam.errors import ImageError, OnnxcamWarning

DATA = Path(__file__).parent / "data" / "images"


def quadrants(height: int = 12, width: int = 16) -> np.ndarray:
    """RGB, four colours, one per quadrant, so any flip or rotation shows (as the fixtures)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:height // 2, :width // 2] = (220, 40, 40)
    image[:height // 2, width // 2:] = (40, 200, 40)
    image[height // 2:, :width // 2] = (40, 40, 230)
    image[height // 2:, width // 2:] = (240, 230, 60)
    return image


def encoded(suffix: str, rgb: np.ndarray, *params) -> bytes:
    ok, buffer = cv2.imencode(suffix, np.ascontiguousarray(rgb[..., ::-1]), list(params))
    assert ok
    return buffer.tobytes()


def write(tmp_path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- what PIL (an independent decoder) shows --------------------------------------------------

FIXTURES = ["cmyk.jpg", "palette.png", "palette_transparent.png", "gray_alpha.png", "animated.gif",
            "exif3.jpg", "exif6.jpg", "exif8.jpg"]


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_files_decode_as_pil_shows_them(name):
    """tools/make_image_fixtures.py wrote these with PIL and stored what PIL shows
    (exif_transpose, convert("RGB"); an animated GIF's first frame)."""
    if name.endswith(".gif") and not cv2.haveImageReader(str(DATA / name)):
        pytest.skip("this OpenCV build reads no GIF")
    expected = np.load(DATA / "expected.npz")[name.replace(".", "_")].astype(np.float32)
    image = load_image(DATA / name)
    assert image.shape == expected.shape
    lossy = name.endswith(".jpg")
    np.testing.assert_allclose(image, expected, atol=6 if lossy else 0)
    if name.endswith(".gif"):  # the second frame is the first upside down: the first was taken
        assert np.abs(image - expected[::-1]).mean() > 50


# -- EXIF orientation, as the EXIF 2.3 spec defines it ----------------------------------------

#: What a viewer does to the stored pixels for each EXIF orientation (EXIF 2.3, tag 0x0112).
SHOWN = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
         5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
         8: lambda a: np.rot90(a, 1)}


def exif(orientation: int) -> bytes:
    """A little-endian TIFF structure with one IFD entry: Orientation (SHORT)."""
    return (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
            + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0))


def with_exif(data: bytes, orientation: int) -> bytes:
    """A JPEG with an APP1 Exif segment, or a PNG with an eXIf chunk, added."""
    tiff = exif(orientation)
    if data.startswith(b"\xff\xd8"):
        return data[:2] + b"\xff\xe1" + struct.pack(">H", 8 + len(tiff)) + b"Exif\x00\x00" + tiff + data[2:]
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    end_of_ihdr = 8 + 25
    return data[:end_of_ihdr] + chunk + data[end_of_ihdr:]


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_a_viewer_shows_it(tmp_path, suffix, orientation):
    stored = quadrants()
    params = (cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444) if suffix == ".jpg" else ()
    path = write(tmp_path, f"o{orientation}{suffix}", with_exif(encoded(suffix, stored, *params), orientation))
    image = load_image(path)
    expected = SHOWN[orientation](stored).astype(np.float32)
    assert image.shape == expected.shape
    np.testing.assert_allclose(image, expected, atol=8 if suffix == ".jpg" else 0)


# -- depth, channels --------------------------------------------------------------------------

def test_gray16_rgba16_and_float_files(tmp_path):
    gray = np.full((4, 5), 65535 // 3, np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray)
    np.testing.assert_allclose(load_image(tmp_path / "g16.png")[0, 0], [85, 85, 85], atol=0.01)
    bgra = np.zeros((4, 5, 4), np.uint16)
    bgra[..., 0], bgra[..., 3] = 65535, 1000  # blue, nearly transparent: alpha is dropped
    cv2.imwrite(str(tmp_path / "a16.png"), bgra)
    np.testing.assert_allclose(load_image(tmp_path / "a16.png")[0, 0], [0, 0, 255])
    floats = np.full((4, 5, 3), 0.5, np.float32)
    cv2.imwrite(str(tmp_path / "f.tiff"), floats)
    np.testing.assert_allclose(load_image(tmp_path / "f.tiff")[0, 0], [127.5] * 3)


# -- broken files -----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".bmp", ".tiff", ".gif"])
def test_truncated_files_are_one_image_error_and_silent(tmp_path, suffix, capfd):
    if not cv2.haveImageWriter(f"x{suffix}"):
        pytest.skip(f"this OpenCV build writes no {suffix}")
    rng = np.random.default_rng(0)
    data = encoded(suffix, cv2.GaussianBlur(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), (5, 5), 2))
    assert load_image(write(tmp_path, f"whole{suffix}", data)).shape == (40, 50, 3)
    capfd.readouterr()
    for cut in sorted({3, 12, len(data) // 3, len(data) // 2, len(data) - 12, len(data) - 2, len(data) - 1}):
        path = write(tmp_path, f"cut{cut}{suffix}", data[:cut])
        with pytest.raises(ImageError, match=f"cut{cut}\\{suffix}: .*(cannot be decoded|truncated)"):
            load_image(path)
    assert capfd.readouterr().err == ""  # libpng's and OpenCV's own lines are silenced


def test_a_jpeg_without_its_end_marker_is_refused_even_where_libjpeg_would_fill_it(tmp_path):
    data = encoded(".jpg", quadrants(64, 64))
    assert data.endswith(b"\xff\xd9")
    with pytest.raises(ImageError, match="a truncated JPEG"):
        load_image(write(tmp_path, "cut.jpg", data[:-2]))
    assert load_image(write(tmp_path, "trailing.jpg", data + b"camera junk")).shape == (64, 64, 3)


def test_zero_bytes_and_garbage(tmp_path):
    with pytest.raises(ImageError, match="empty.png: cannot be decoded: the file is empty"):
        load_image(write(tmp_path, "empty.png", b""))
    with pytest.raises(ImageError, match="noise.jpg: cannot be decoded"):
        load_image(write(tmp_path, "noise.jpg", b"\xff\xd8\xff" + np.random.default_rng(1).bytes(3000) + b"\xff\xd9"))


# -- size -------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, params", [(".png", ()), (".jpg", ()), (".bmp", ()), (".tiff", ()),
                                            (".webp", (cv2.IMWRITE_WEBP_QUALITY, 80)),
                                            (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)), (".ppm", ()),
                                            (".pgm", ()), (".gif", ())])
def test_header_sizes_are_read_without_decoding(suffix, params):
    if not cv2.haveImageWriter(f"x{suffix}"):
        pytest.skip(f"this OpenCV build writes no {suffix}")
    image = quadrants(30, 70) if suffix != ".pgm" else quadrants(30, 70)[..., 0]
    data = encoded(suffix, image if image.ndim == 3 else np.dstack([image] * 3), *params) \
        if suffix != ".pgm" else cv2.imencode(".pgm", image)[1].tobytes()
    assert image_size(data[:65536]) == (70, 30)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (the pixel data is a tiny image's)."""
    data = bytearray(encoded(".png", quadrants(8, 8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_a_20000_square_png_is_refused_from_its_header(tmp_path):
    path = write(tmp_path, "huge.png", _png_header(20000, 20000))
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"huge.png: 20000x20000 pixels, over onnxcam's limit of 67,108,864 \(8192x8192\)"):
        load_image(path)
    assert time.perf_counter() - started < 1.0  # nothing was decoded


def test_a_jpeg_over_the_limit_is_decoded_reduced_with_a_warning(tmp_path, monkeypatch):
    """The mechanism at a small scale (the limit lowered): 1/2 is too big, 1/4 fits."""
    monkeypatch.setattr(decode, "MAX_PIXELS", 40 * 40)
    stored = quadrants(120, 160)
    path = write(tmp_path, "big.jpg", encoded(".jpg", stored, cv2.IMWRITE_JPEG_QUALITY, 100))
    with pytest.warns(OnnxcamWarning, match=r"big.jpg: 160x120 pixels, over .* decoded at 1/4 of its size"):
        image = load_image(path)
    assert image.shape == (30, 40, 3)
    np.testing.assert_allclose(image, cv2.resize(stored, (40, 30), interpolation=cv2.INTER_AREA), atol=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(decode, "MAX_PIXELS", 8 * 8)
        with pytest.raises(ImageError, match=r"160x120 pixels, over onnxcam's limit of 64 \(8192x8192\) even at 1/8"):
            load_image(path)


def test_huge_headers_cost_no_memory(tmp_path):
    """A PNG and a JPEG whose headers claim 20000 x 20000 (1.2 GB as RGB, 4.8 GB as float32):
    the peak memory of loading them in a fresh process stays small."""
    jpeg = bytearray(encoded(".jpg", quadrants(64, 64)))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)
    paths = [write(tmp_path, "huge.png", _png_header(20000, 20000)), write(tmp_path, "huge.jpg", bytes(jpeg))]
    script = (
        "import sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from onnxcam.decode import load_image\n"
        "from onnxcam.errors import ImageError\n"
        "def high_water():  # MiB; ru_maxrss would include pytest's own peak (inherited across exec)\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024\n"
        "base = high_water()\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        print(path, load_image(path).shape)\n"
        "    except ImageError as exc:\n"
        "        print(exc)\n"
        "print(high_water() - base)\n")
    done = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stderr
    assert "over onnxcam's limit" in lines[0]
    assert lines[1].endswith("(5000, 5000, 3)")  # the JPEG decoded at 1/4 (its data fills a corner)
    # MiB over the interpreter's own: the 1/4 decode is 286 MiB as float32 (~440 in all, measured);
    # a full decode would be 1.1 GiB as uint8 before any float copy
    assert int(lines[-1]) < 600, lines


def test_decoding_in_threads_leaves_stderr_working(tmp_path, capfd):
    """The runner decodes in a thread pool: overlapping fd-2 mutes must restore the real stderr
    (a thread that saved the already-muted fd used to leave /dev/null there for good)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np

    from onnxcam.decode import load_image
    paths = []
    for i in range(16):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.full((300, 400, 3), i, np.uint8))
        paths.append(path)
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            list(pool.map(load_image, paths))
    os.write(2, b"still-here\n")
    assert "still-here" in capfd.readouterr().err
