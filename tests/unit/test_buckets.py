"""Aspect-ratio buckets (no Ray cluster): bucket sizes, assignment, bucketed crops and grouping rows
into one-shape micro-batches."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from diffray.config import DataSection
from diffray.methods import validate_config
from diffray.errors import ConfigError
from diffray.data.transforms import aspect_buckets, nearest_bucket, preprocess_images
from diffray.trainers.session import group_by_shape


def png(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("resolution,step,max_ar", [(64, 16, 2.0), (512, 64, 2.0), (1024, 64, 4.0), (768, 64, 1.5)])
def test_bucket_sizes_are_on_the_grid_within_area_and_ratio(resolution, step, max_ar):
    buckets = aspect_buckets(resolution, step, max_ar)
    assert (resolution, resolution) in buckets and len(set(buckets)) == len(buckets) > 1
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution**2 and max(w, h) <= max_ar * min(w, h)
        assert (h, w) in buckets  # symmetric: portrait and landscape
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_sd15_buckets_and_assignment():
    buckets = aspect_buckets(512, 64, 2.0)
    assert buckets == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert nearest_bucket(1920, 1080, buckets) == (640, 384)  # 16:9 -> the widest
    assert nearest_bucket(1080, 1920, buckets) == (384, 640)
    assert nearest_bucket(800, 600, buckets) == (576, 448)  # 4:3 (1.33) -> 1.29
    assert nearest_bucket(333, 333, buckets) == (512, 512)
    with pytest.raises(ValueError, match="not a multiple of the bucket step 64"):
        aspect_buckets(520, 64, 2.0)


def test_bucketed_preprocessing_crops_each_image_to_its_bucket():
    buckets = aspect_buckets(64, 16, 2.0)  # (48, 80), (64, 64), (80, 48)
    images = [png(120, 70, 1), png(70, 120, 2), png(90, 90, 3)]
    out = preprocess_images(images, [0, 1, 2], ["wide", "tall", "square"], 64, center_crop=False, random_flip=True,
                            seed=5, buckets=buckets)
    assert out.dtype == object and [o.shape for o in out] == [(3, 48, 80), (3, 80, 48), (3, 64, 64)]
    for o in out:
        assert o.dtype == np.float32 and -1.0 <= o.min() and o.max() <= 1.0
    # The random crop/flip is keyed by (seed, sample_id), not by the batch.
    alone = preprocess_images(images[1:2], [1], ["tall"], 64, False, True, seed=5, buckets=buckets)
    np.testing.assert_array_equal(alone[0], out[1])
    # A square-only bucket list is exactly the square pipeline.
    square = preprocess_images(images, [0, 1, 2], ["a", "b", "c"], 64, False, True, seed=5)
    one = preprocess_images(images, [0, 1, 2], ["a", "b", "c"], 64, False, True, seed=5, buckets=[(64, 64)])
    np.testing.assert_array_equal(np.stack(list(one)), square)


def rows(ids: list[int], shapes: list[tuple]) -> dict[str, np.ndarray]:
    px = np.empty(len(ids), dtype=object)
    px[:] = [np.full(s, float(i), dtype=np.float32) for i, s in zip(ids, shapes)]
    return {"sample_id": np.asarray(ids, dtype=np.int64), "pixel_values": px,
            "input_ids": np.asarray([[i] * 3 for i in ids], dtype=np.int64)}


def test_group_by_shape_yields_full_one_shape_batches_and_carries_partials_over():
    wide, tall = (3, 8, 16), (3, 16, 8)
    epoch = [rows([0, 1, 2], [wide, tall, wide]), rows([3, 4, 5], [wide, tall, tall]), rows([6], [tall])]
    buffers: dict = {}
    first = list(group_by_shape(epoch, 3, buffers))
    assert [b["sample_id"].tolist() for b in first] == [[0, 2, 3], [1, 4, 5]]
    for b in first:
        assert b["pixel_values"].shape[0] == 3 and b["pixel_values"].dtype == np.float32
        np.testing.assert_array_equal(b["pixel_values"][:, 0, 0, 0], b["sample_id"].astype(np.float32))
        np.testing.assert_array_equal(b["input_ids"][:, 0], b["sample_id"])
    assert {k: [int(r["sample_id"]) for r in v] for k, v in buffers.items()} == {tall: [6]}
    second = list(group_by_shape(epoch, 3, buffers))  # row 6 opens the next epoch's tall batch
    assert [b["sample_id"].tolist() for b in second] == [[0, 2, 3], [6, 1, 4]]
    # Cached rows are grouped by their latent shape; a plain [B, ...] array works too.
    cached = {"sample_id": np.arange(4), "latent_mean": np.zeros((4, 4, 2, 3), np.float32)}
    assert [b["latent_mean"].shape for b in group_by_shape([cached], 2, {})] == [(2, 4, 2, 3)] * 2


def test_bucket_config_errors_name_the_fields():
    assert DataSection(aspect_buckets=True, resolution=512, bucket_step=64).bucket_step == 64
    with pytest.raises(ConfigError, match=r"data\.resolution=520 must be a multiple of data\.bucket_step=64"):
        validate_config({"method": "lora", "data": {"aspect_buckets": True, "resolution": 520}})
    with pytest.raises(ConfigError, match=r"data\.bucket_step.*multiple of 8"):
        validate_config({"method": "lora", "data": {"bucket_step": 12}})
    with pytest.raises(ConfigError, match=r"aspect_buckets.*with_prior_preservation"):
        validate_config({"method": "dreambooth", "data": {"aspect_buckets": True}})
    cfg = validate_config({"method": "dreambooth", "data": {"aspect_buckets": True},
                            "dreambooth": {"with_prior_preservation": False}})
    assert cfg.data.aspect_buckets and math.isclose(cfg.data.max_aspect_ratio, 2.0)
