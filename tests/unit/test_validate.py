"""Row validation without Ray: every bad kind of file gets its reason; awkward but valid images
(CMYK, 16-bit, palette, alpha, EXIF-rotated) decode to sensible RGB."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffray.data.transforms import decode_image
from diffray.data.validate import Rules, caption_of, check_sample
from diffray.errors import DatasetError


def rows_of(root):
    return [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]


def test_every_bad_kind_has_its_reason_and_awkward_images_pass(messy_folder):
    root, bad = messy_folder
    rules = Rules(min_image_size=32)
    seen_bad = {}
    for row in rows_of(root):
        path = root / row["file_name"]
        data = path.read_bytes() if path.exists() else None
        reason = check_sample(data, row["text"], None, str(path), rules)
        if reason is not None:
            seen_bad[row["file_name"]] = reason
    assert set(seen_bad) == set(bad), seen_bad
    for name, expected in bad.items():
        assert expected in seen_bad[name] and "\n" not in seen_bad[name], (name, seen_bad[name])
    assert "40000x40000" in seen_bad["bomb.png"] and "data.max_image_pixels" in seen_bad["bomb.png"]


def test_awkward_images_decode_to_sensible_rgb(messy_folder):
    root, _ = messy_folder
    rotated = decode_image((root / "exif_rotated.jpg").read_bytes(), "x")
    assert rotated.mode == "RGB" and rotated.size == (64, 96), "EXIF orientation 6 is applied (96x64 -> 64x96)"
    gray = np.asarray(decode_image((root / "gray16.png").read_bytes(), "x"))
    assert gray.shape == (64, 64, 3) and gray.min() == 0 and gray.max() == 255, "16-bit scaled, not clipped"
    assert 100 < gray[32, 32, 0] < 160
    rgba = np.asarray(decode_image((root / "rgba.png").read_bytes(), "x"), dtype=float)
    plain = np.asarray(Image.open(root / "0000.png").convert("RGB"), dtype=float)
    assert (rgba >= plain - 1).all() and rgba.mean() > plain.mean() + 10, "alpha composited on white"
    for name in ("cmyk.jpg", "palette.png", "la.png"):
        assert decode_image((root / name).read_bytes(), name).mode == "RGB"


def test_limits_and_captions_are_configurable(messy_folder):
    root, _ = messy_folder
    small = (root / "tiny.png").read_bytes()
    assert check_sample(small, "x", None, "t", Rules(min_image_size=16)) is None
    big = (root / "0000.png").read_bytes()  # 64x64
    assert "exceeds the decompression-bomb limit" in check_sample(big, "x", None, "b", Rules(max_image_pixels=4000))
    assert caption_of("  ", Rules()) is None and caption_of(None, Rules(default_caption="a photo")) == "a photo"
    assert check_sample(big, "", None, "b", Rules(default_caption="a photo")) is None
    with pytest.raises(DatasetError, match="^f.png: empty file"):
        decode_image(b"", "f.png")


def test_conditioning_image_must_exist_and_match_the_size(messy_folder):
    root, _ = messy_folder
    img = (root / "0000.png").read_bytes()
    rules = Rules(conditioning=True)
    assert check_sample(img, "x", img, "s", rules) is None
    assert check_sample(img, "x", None, "s", rules) == "conditioning image not found"
    assert check_sample(img, "x", (root / "tiny.png").read_bytes(), "s", rules) == \
        "conditioning image is 16x16, the image 64x64"
    assert check_sample(img, "x", b"junk", "s", rules).startswith("conditioning image: cannot decode image")
