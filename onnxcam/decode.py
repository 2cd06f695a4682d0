"""Image files in: any file OpenCV decodes, as RGB float32 in [0, 255], shown as a viewer shows it.

* Orientation: the EXIF orientation of JPEG, PNG (eXIf), WebP and TIFF files is applied
  (OpenCV's ``IMREAD_COLOR`` does it), so a portrait photo is explained upright.
* Colour: gray, gray+alpha, palette, CMYK/YCCK JPEG and RGBA all become RGB (alpha dropped,
  as PIL's ``convert("RGB")``); 16-bit is scaled by 1/257, float images in [0, 1] by 255.
* Animated GIFs and multi-page TIFFs: the first frame.
* Size: the width and height are read from the file's header before decoding (PNG, JPEG, GIF,
  BMP, WebP, TIFF, PNM). An image over :data:`MAX_PIXELS` is decoded at 1/2, 1/4 or 1/8 of
  its size when it is a JPEG (libjpeg scales while decoding, so the full size is never held in
  memory), with an :class:`~onnxcam.errors.OnnxcamWarning`; any other format over the limit is
  refused, naming it. (Formats whose header is not read here are bounded by OpenCV's own limit,
  2^30 pixels, and checked after decoding.)
* Broken files: empty, truncated (a JPEG without its end-of-image marker is refused even where
  libjpeg would fill the missing part with gray) or undecodable files are one
  :class:`~onnxcam.errors.ImageError` line; the decoders' own messages are silenced.
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageError, OnnxcamWarning

#: The most pixels an image may have once decoded (8192 x 8192); a larger JPEG is decoded
#: reduced, a larger image of another format is refused.
MAX_PIXELS = 8192 * 8192

_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def load_image(path: str | os.PathLike) -> np.ndarray:
    """RGB float32 (H, W, 3) in [0, 255] from any image file OpenCV decodes (see the module
    docstring for orientation, colour, frames and size)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    raw = np.fromfile(str(path), dtype=np.uint8)  # imdecode also handles non-ASCII paths
    if not raw.size:
        raise ImageError(f"{path}: cannot be decoded: the file is empty (0 bytes)")
    header = raw[:65536].tobytes()
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH  # not IMREAD_UNCHANGED: that ignores EXIF orientation
    size = image_size(header)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        factor = next((f for f in _REDUCED if -(-size[0] // f) * -(-size[1] // f) <= MAX_PIXELS), None)
        if not header.startswith(b"\xff\xd8") or factor is None:
            raise ImageError(f"{path}: {size[0]}x{size[1]} pixels, over onnxcam's limit of {MAX_PIXELS:,} "
                             f"(8192x8192){'' if factor else ' even at 1/8'}: shrink the image first")
        flags = _REDUCED[factor]
        warnings.warn(f"{path}: {size[0]}x{size[1]} pixels, over onnxcam's limit of {MAX_PIXELS:,}: "
                      f"decoded at 1/{factor} of its size", OnnxcamWarning, stacklevel=2)
    if header.startswith(b"\xff\xd8") and not _jpeg_complete(raw):
        raise ImageError(f"{path}: cannot be decoded: a truncated JPEG (no end-of-image marker after the data): "
                         "the file was cut short; copy or download it again")
    image = _quiet_decode(raw, flags)
    if image is None:
        raise ImageError(f"{path}: cannot be decoded as an image (jpg, png, bmp, tiff, webp, ...): "
                         "empty, truncated or not an image file")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageError(f"{path}: {image.shape[1]}x{image.shape[0]} pixels, over onnxcam's limit of "
                         f"{MAX_PIXELS:,} (8192x8192): shrink the image first")
    return to_rgb(image)


def _quiet_decode(raw: np.ndarray, flags: int = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) -> np.ndarray | None:
    """``cv2.imdecode`` without the decoders' own lines on a bad file (OpenCV's log, and
    libpng's messages, which go straight to the C-level stderr): the caller reports the file
    in one line. stderr is muted only for the duration of the call."""
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        with _muted_stderr():
            return cv2.imdecode(raw, flags)
    except cv2.error:
        return None
    finally:
        logging.setLogLevel(level)


#: Decoding threads (the runner's pool) mute fd 2 at overlapping times: the first one in saves
#: the real stderr and mutes it, the last one out restores it. Without the count, a thread that
#: saved the already-muted fd would restore /dev/null for good, and every later error line and
#: warning of the process would be lost.
_MUTE_LOCK = threading.Lock()
_mute_state: dict[str, int | None] = {"depth": 0, "saved": None}


@contextmanager
def _muted_stderr() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null within the block (left alone where it cannot be)."""
    with _MUTE_LOCK:
        if _mute_state["depth"] == 0:
            try:
                saved = os.dup(2)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
                _mute_state["saved"] = saved
            except OSError:
                _mute_state["saved"] = None
        _mute_state["depth"] += 1
    try:
        yield
    finally:
        with _MUTE_LOCK:
            _mute_state["depth"] -= 1
            saved = _mute_state["saved"]
            if _mute_state["depth"] == 0 and saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
                _mute_state["saved"] = None


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Decoded OpenCV image (any depth, 1/3/4 channels, BGR) -> RGB float32 in [0, 255].

    Channels are arranged at the decoded depth and converted to float32 once (one float
    copy of the image: a 8192 x 8192 one is 768 MiB as float32)."""
    if image.ndim == 2:
        image = image[..., None]
    channels = image.shape[2]
    if channels == 1:
        rgb = np.repeat(image, 3, axis=2)
    elif channels in (3, 4) and image.dtype in (np.uint8, np.uint16, np.float32):
        # alpha is dropped, as torchvision/PIL convert("RGB") does; cvtColor is ~20x faster
        # than numpy's reversed-slice copy
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGRA2RGB)
    elif channels in (3, 4):
        rgb = np.ascontiguousarray(image[..., 2::-1])
    else:
        raise ImageError(f"unsupported image with {channels} channels")
    pixels = rgb.astype(np.float32)
    del rgb
    if image.dtype == np.uint16:
        pixels /= 257.0
    elif image.dtype.kind == "f":
        finite = np.isfinite(pixels)
        if finite.any() and pixels[finite].max() <= 1.0:
            pixels *= 255.0
        np.nan_to_num(np.clip(pixels, 0.0, 255.0, out=pixels), copy=False)
    return pixels


# -- headers ----------------------------------------------------------------------------------

def image_size(header: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, JPEG, GIF, BMP, WebP, TIFF or PNM file;
    None for other formats or a header too short or malformed to tell."""
    try:
        if header.startswith(b"\x89PNG\r\n\x1a\n") and header[12:16] == b"IHDR":
            return struct.unpack(">II", header[16:24])
        if header.startswith(b"\xff\xd8"):
            return _jpeg_size(header)
        if header[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", header[6:10])
        if header.startswith(b"BM"):
            if struct.unpack("<I", header[14:18])[0] == 12:
                return struct.unpack("<HH", header[18:22])
            width, height = struct.unpack("<ii", header[18:26])
            return abs(width), abs(height)
        if header.startswith(b"RIFF") and header[8:12] == b"WEBP":
            return _webp_size(header)
        if header[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(header)
        if header[:1] == b"P" and header[1:2] in b"123456" and header[1:2]:
            return _pnm_size(header)
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The frame size from the first SOFn segment (markers C0-CF but DHT C4, JPG C8, DAC CC)."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            at += 2
            continue
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        at += 2 + length
    return None


def _jpeg_complete(raw: np.ndarray) -> bool:
    """An end-of-image marker follows the last start-of-scan (the entropy-coded data stuffs
    every 0xFF byte, so FFD9 there is the real marker; an EXIF thumbnail's own scan comes
    before the image's)."""
    data = raw.tobytes()
    return data.find(b"\xff\xd9", max(data.rfind(b"\xff\xda"), 0)) >= 0


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = struct.unpack("<I", data[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first IFD."""
    order = "<" if data[:2] == b"II" else ">"
    offset = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[offset:offset + 2])[0]
    found = {}
    for index in range(count):
        entry = data[offset + 2 + 12 * index:offset + 14 + 12 * index]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), entry[8:10 if kind == 3 else 12])[0]
    return (found[256], found[257]) if len(found) == 2 else None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    tokens: list[int] = []
    for line in data[2:2048].split(b"\n"):
        for token in line.split(b"#")[0].split():
            tokens.append(int(token))
            if len(tokens) == 2:
                return tokens[0], tokens[1]
    return None
