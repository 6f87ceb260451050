"""The Ray Data imagefolder reader and training preprocessing on a local cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffray.data.imagefolder import prepare_training_dataset, read_imagefolder
from diffray.data.sample import write_sample_dataset
from diffray.errors import DatasetError

pytestmark = pytest.mark.integration


def test_reader_and_preprocessing(ray_cluster, tmp_path, tiny_model_path):
    root = write_sample_dataset(tmp_path / "s", num_images=6) / "train"
    rows = sorted(read_imagefolder(str(root)).take_all(), key=lambda r: r["sample_id"])
    assert [r["sample_id"] for r in rows] == list(range(6)) and all(r["caption"] and r["image"] for r in rows)
    ds = prepare_training_dataset(str(root), tiny_model_path, 32, True, True, seed=0)
    batch = ds.sort("sample_id").take_batch(6, batch_format="numpy")
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["input_ids"].shape == (6, 77)
    again = prepare_training_dataset(str(root), tiny_model_path, 32, True, True, seed=0).sort("sample_id")
    np.testing.assert_array_equal(again.take_batch(6, batch_format="numpy")["pixel_values"], batch["pixel_values"])


def test_reader_errors_name_the_file(ray_cluster, tmp_path):
    root = write_sample_dataset(tmp_path / "s", num_images=3) / "train"
    (root / "0001.png").unlink()
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2: image file not found: .*0001.png"):
        read_imagefolder(str(root))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0000.png", "caption": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"missing column 'text' \(has: caption, file_name\)"):
        read_imagefolder(str(root))
