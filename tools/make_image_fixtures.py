"""Writes the small image fixtures of tests/test_hardening_images.py with PIL, a writer
independent of OpenCV, and what PIL shows for each (``ImageOps.exif_transpose`` then
``convert("RGB")``, i.e. as a viewer shows it) into ``tests/data/images/expected.npz``.

Only the kinds OpenCV cannot write are made here (CMYK JPEG, palette PNGs, gray+alpha PNG,
animated GIF, EXIF orientation written by another library); the tests make the rest
themselves. Run once: ``python tools/make_image_fixtures.py`` (needs pillow).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.test_hardening_images import quadrants  # noqa: E402 - the pattern the tests check

OUT = ROOT / "tests" / "data" / "images"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(quadrants())
    written = {}

    def save(name: str, image: Image.Image, **options) -> None:
        image.save(OUT / name, **options)
        written[name] = np.asarray(ImageOps.exif_transpose(Image.open(OUT / name)).convert("RGB"))

    save("cmyk.jpg", picture.convert("CMYK"), quality=95)
    save("palette.png", picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=4))
    save("palette_transparent.png", picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=4),
         transparency=0)
    save("gray_alpha.png", picture.convert("LA"))
    frames = [Image.fromarray(quadrants()), Image.fromarray(quadrants()[::-1].copy())]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(f"exif{orientation}.jpg", picture, exif=exif.tobytes(), quality=95)
    np.savez_compressed(OUT / "expected.npz", **{k.replace(".", "_"): v for k, v in written.items()})
    print(f"wrote {len(written)} fixtures to {OUT}")


if __name__ == "__main__":
    main()
