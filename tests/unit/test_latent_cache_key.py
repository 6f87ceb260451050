"""The latent cache's key (no Ray): a changed source image or a changed VAE/text-encoder/tokenizer file
is a new key (the cache is rebuilt, never read stale); an unchanged dataset and model keep the key (the
cache is reused), and so does a changed UNet, which the cached latents and text states do not depend on."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from diffray.data.cache import cache_key
from diffray.data.sample import write_sample_dataset
from diffray.methods import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def setup(tmp_path, tiny_model_path):
    """(key of the current files, a dataset folder, a model folder), all private copies."""
    data = write_sample_dataset(tmp_path / "sample", num_images=2) / "train"
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    cfg = load_config(REPO / "configs" / "lora.yaml", [f"data.path={data}", f"data.cache={tmp_path / 'latents'}"])
    return (lambda: cache_key(cfg, str(model), str(data))), data, model


def touch_later(path: Path) -> None:
    """Move a file's mtime one second on, content unchanged (an edit that kept the size)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_unchanged_files_keep_the_key(setup):
    key, _, _ = setup
    assert key() == key()


def test_a_changed_source_image_is_a_new_key(setup):
    key, data, _ = setup
    before = key()
    image = min(data.glob("*.png"))
    touch_later(image)
    touched = key()
    assert touched != before
    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)  # new content (and size)
    assert key() not in (before, touched)
    (data / "extra.png").write_bytes(image.read_bytes())  # a new file in the folder
    assert key() != touched


@pytest.mark.parametrize("part", ["vae", "text_encoder", "tokenizer"])
def test_a_changed_encoder_file_is_a_new_key(setup, part):
    key, _, model = setup
    before = key()
    files = sorted(p for p in (model / part).rglob("*") if p.is_file())
    assert files, f"the tiny model has no {part} files"
    touch_later(files[0])
    assert key() != before, f"a changed {files[0].relative_to(model)} must invalidate the cache"


def test_a_changed_unet_keeps_the_key(setup):
    key, _, model = setup
    before = key()
    for f in (p for p in (model / "unet").rglob("*") if p.is_file()):
        touch_later(f)
    assert key() == before  # latents and text states do not depend on the UNet: the cache is reused


def test_mask_column_and_trigger_word_are_new_keys_shuffle_is_not(tmp_path, tiny_model_path):
    """The cache holds the loss masks and the trigger-prefixed token ids, so both settings change the key;
    the tag shuffle happens per step on the cached ids, so it reuses the cache."""
    data = write_sample_dataset(tmp_path / "sample", num_images=2) / "train"
    base = [f"data.path={data}", f"data.cache={tmp_path / 'latents'}"]

    def key(*overrides: str) -> str:
        return cache_key(load_config(REPO / "configs" / "lora.yaml", base + list(overrides)), tiny_model_path,
                         str(data))

    plain = key()
    assert len({plain, key("data.mask_column=mask"), key("data.mask_column=other"), key("data.trigger_word=sks")}) == 4
    assert key("data.shuffle_tags=true", "data.keep_tokens=2") == plain


def test_the_encoder_stores_loss_masks_beside_the_latents(tiny_model_path):
    import numpy as np

    from diffray.data.cache import Encoder

    mask = np.zeros((2, 1, 64, 64), dtype=np.float32)
    mask[0, :, :, :32] = 1.0
    batch = {"sample_id": np.array([0, 1]), "pixel_values": np.zeros((2, 3, 64, 64), dtype=np.float32),
             "input_ids": np.zeros((2, 77), dtype=np.int64), "loss_mask": mask}
    out = Encoder(tiny_model_path, use_gpu=False)(batch)
    np.testing.assert_array_equal(out["loss_mask"], mask)
    assert out["latent_mean"].shape == (2, 4, 8, 8)


def test_a_cache_root_inside_the_dataset_a_file_or_not_creatable_is_refused_before_any_work(tmp_path, tiny_model_path):
    """`data.cache` inside `data.path` would put the cache's files into the dataset: a new key on every run (never
    reused) and, for Parquet, shards read as rows. A file, or a folder below a file, cannot hold it. Each is one
    line naming the field or path, before the key is computed or Ray is used."""
    from diffray.data.cache import build_cache
    from diffray.errors import ConfigError, StorageError

    data = write_sample_dataset(tmp_path / "sample", num_images=2) / "train"
    (tmp_path / "afile").write_text("keep")

    def build(cache: Path) -> None:
        cfg = load_config(REPO / "configs" / "lora.yaml", [f"data.path={data}", f"data.cache={cache}"])
        build_cache(cfg, tiny_model_path, str(data))

    for inside in (data / "latents", data):
        with pytest.raises(ConfigError, match=rf"data\.cache: {inside} is inside the dataset {data}"):
            build(inside)
    assert not (data / "latents").exists()
    with pytest.raises(ConfigError, match=r"data\.cache: .*afile is a file; give a folder"):
        build(tmp_path / "afile")
    with pytest.raises(StorageError, match=r"afile/sub: cannot create the latent cache folder \(Not a directory\)"):
        build(tmp_path / "afile" / "sub")
    assert (tmp_path / "afile").read_text() == "keep"
