"""Sample dataset and transforms (no Ray): deterministic, robust to odd images."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffray.data.sample import INSTANCE_PROMPT, resolve_data_path, write_sample_dataset
from diffray.data.transforms import decode_image, preprocess_images, tokenize_captions
from diffray.errors import DatasetError


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_sample_set_is_deterministic_and_complete(tmp_path):
    a = write_sample_dataset(tmp_path / "a", num_images=8, subject_images=3)
    b = write_sample_dataset(tmp_path / "b", num_images=8, subject_images=3)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(write_sample_dataset(tmp_path / "c", num_images=8, seed=1)) != tree_digest(a)
    rows = [json.loads(x) for x in (a / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["text"].startswith("a ") and (a / "train" / r["file_name"]).is_file() for r in rows)
    assert len({r["text"] for r in rows}) > 4, "captions vary"
    subject = [json.loads(x) for x in (a / "subject" / "metadata.jsonl").read_text().splitlines()]
    assert len(subject) == 3 and {r["text"] for r in subject} == {INSTANCE_PROMPT}
    with Image.open(a / "train" / rows[0]["file_name"]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    info = json.loads((a / "dataset.json").read_text())
    assert info["seed"] == 0 and info["train_images"] == 8 and info["class_prompt"] == "a photo of a widget"
    assert "sks widget" in (a / "README.txt").read_text()


def test_builtin_sample_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRAY_CACHE", str(tmp_path))
    train = Path(resolve_data_path("builtin:sample"))
    assert (train / "metadata.jsonl").is_file() and train.name == "train"
    assert Path(resolve_data_path("builtin:sample/subject")).name == "subject"
    with pytest.raises(DatasetError, match="allowed: builtin:sample"):
        resolve_data_path("builtin:laion")
    with pytest.raises(DatasetError, match="dataset not found: .*nope"):
        resolve_data_path(str(tmp_path / "nope"))


def test_preprocess_shape_range_and_per_sample_determinism():
    imgs = [png(Image.new("RGB", (80, 64), (255, 0, 0))), png(Image.linear_gradient("L").convert("RGB"))]
    out = preprocess_images(imgs, [0, 1], ["a", "b"], 32, center_crop=False, random_flip=True, seed=0)
    assert out.shape == (2, 3, 32, 32) and out.dtype == np.float32 and out.min() >= -1 and out.max() <= 1
    np.testing.assert_allclose(out[0, 0], 1.0, atol=1e-2)  # pure red -> R channel at +1
    alone = preprocess_images(imgs[1:], [1], ["b"], 32, center_crop=False, random_flip=True, seed=0)
    np.testing.assert_array_equal(alone[0], out[1])  # independent of batch composition...
    swapped = preprocess_images(imgs[::-1], [1, 0], ["b", "a"], 32, center_crop=False, random_flip=True, seed=0)
    np.testing.assert_array_equal(swapped[::-1], out)  # ...and of order within the batch


def test_random_flip_flips_some_samples():
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, :8] = 255  # left half white
    data = png(Image.fromarray(arr))
    out = preprocess_images([data] * 16, list(range(16)), ["x"] * 16, 16, True, True, seed=0)
    left_white = out[:, 0, :, 0].mean(axis=1) > 0
    assert 0 < left_white.sum() < 16


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_odd_modes_decode_to_rgb(mode):
    img = Image.new("RGB", (20, 10), (10, 200, 30)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(png(img, fmt), "x.img")
    assert out.mode == "RGB" and out.size == (20, 10)


def test_a_float_image_in_0_to_1_is_scaled_as_such_not_decoded_black():
    ramp = np.tile(np.linspace(0.0, 1.0, 16, dtype=np.float32), (4, 1))
    out = np.asarray(decode_image(png(Image.fromarray(ramp, mode="F"), "TIFF"), "ramp.tif"))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and abs(int(out[0, 8, 0]) - 136) <= 1
    wide = np.tile(np.linspace(0.0, 200.0, 16, dtype=np.float32), (4, 1))  # floats past 1: 8-bit values
    assert np.asarray(decode_image(png(Image.fromarray(wide, mode="F"), "TIFF"), "wide.tif"))[0, -1, 0] == 200


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    out = decode_image(png(img, "JPEG", exif=exif.tobytes()), "rot.jpg")
    assert out.size == (20, 40)


def test_garbage_names_the_source():
    with pytest.raises(DatasetError, match="broken.png: cannot decode image") as err:
        decode_image(b"this is text, not a png", "broken.png")
    assert str(err.value) == ("broken.png: cannot decode image (no image format PIL reads; the file starts with "
                              "b'this is ')")  # not PIL's "<_io.BytesIO object at 0x7f...>"
    with pytest.raises(DatasetError, match="trunc.png"):
        decode_image(png(Image.new("RGB", (64, 64)))[:40], "trunc.png")


def byte_level_clip_tokenizer(out: Path):
    """A real CLIPTokenizer with a byte-level vocab and no merges (every char is its own token)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)


def test_tokenize_captions_pads_and_truncates(tmp_path):
    tok = byte_level_clip_tokenizer(tmp_path)
    ids = tokenize_captions(tok, ["a red circle", "x" * 200])
    assert ids.shape == (2, 77) and ids.dtype == np.int64
    words = tok.convert_tokens_to_ids(tok.tokenize("a red circle"))  # 10 byte-level tokens
    assert list(ids[0, :12]) == [tok.bos_token_id, *words, tok.eos_token_id]
    assert (ids[0, 12:] == tok.pad_token_id).all()
    assert ids[1, 0] == tok.bos_token_id and ids[1, -1] == tok.eos_token_id  # truncated to 77


def test_data_package_does_not_import_ray():
    code = "import sys, diffray.data; sys.exit('ray' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_held_out_rows_are_a_stable_hash_of_the_sample_id():
    from diffray.data.pipeline import held_out_mask, keep_rows

    ids = np.arange(10_000)
    mask = held_out_mask(ids, 0.1)
    assert 0.09 < mask.mean() < 0.11
    np.testing.assert_array_equal(held_out_mask(ids[::-1], 0.1), mask[::-1])  # per id, not per position
    assert not held_out_mask(ids, 0.0).any() and held_out_mask(ids, 0.2)[mask].all()  # nested as it grows
    batch = {"sample_id": ids[:100], "x": ids[:100] * 2}
    held, kept = keep_rows(batch, 0.1, True), keep_rows(batch, 0.1, False)
    assert sorted(held["sample_id"].tolist() + kept["sample_id"].tolist()) == list(range(100))
    np.testing.assert_array_equal(held["x"], held["sample_id"] * 2)
