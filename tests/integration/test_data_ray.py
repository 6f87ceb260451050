"""The Ray Data imagefolder reader and training preprocessing on a small local cluster."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffray.config import DataSection
from diffray.data.imagefolder import read_imagefolder
from diffray.data.pipeline import prepare_training_dataset
from diffray.data.sample import write_sample_dataset
from diffray.data.transforms import preprocess_images
from diffray.errors import DatasetError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_2cpu():
    """A 2-CPU local cluster for this module; reuses (and leaves running) one that is already up."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A model dir holding only `tokenizer/`: a byte-level CLIPTokenizer (no merges, 77 tokens)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out = tmp_path_factory.mktemp("model")
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77).save_pretrained(out / "tokenizer")
    return str(out)


def test_reader_and_preprocessing(ray_2cpu, model_dir, tmp_path):
    root = write_sample_dataset(tmp_path / "s", num_images=6) / "train"
    meta = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    rows = sorted(read_imagefolder(str(root)).take_all(), key=lambda r: r["sample_id"])
    assert [r["sample_id"] for r in rows] == list(range(6))
    assert [(r["source"], r["caption"]) for r in rows] == [(str(root / m["file_name"]), m["text"]) for m in meta]
    assert all(r["image"] == (root / m["file_name"]).read_bytes() for r, m in zip(rows, meta))

    data = DataSection(path=str(root), resolution=32, center_crop=False, random_flip=True)
    ds, report = prepare_training_dataset(str(root), model_dir, data, seed=3)
    assert (report.total, report.used, report.quarantined) == (6, 6, [])
    batch = ds.take_batch(6, batch_format="numpy")
    batch = {k: v[np.argsort(batch["sample_id"])] for k, v in batch.items()}  # cheaper than ds.sort
    assert batch["sample_id"].dtype == np.int64 and list(batch["sample_id"]) == list(range(6))
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["pixel_values"].dtype == np.float32
    assert batch["input_ids"].shape == (6, 77) and batch["input_ids"].dtype == np.int64
    # Same numbers as the pure transform on the driver: per-sample randomness, not per-worker.
    expected = preprocess_images([r["image"] for r in rows], list(range(6)), [r["source"] for r in rows],
                                 32, False, True, seed=3)
    np.testing.assert_array_equal(batch["pixel_values"], expected)
    torch_batch = next(iter(ds.iter_torch_batches(batch_size=4)))  # what training consumes
    assert tuple(torch_batch["pixel_values"].shape) == (4, 3, 32, 32) and str(torch_batch["input_ids"].dtype) == "torch.int64"


def test_bad_rows_are_quarantined_and_bad_folders_raise(ray_2cpu, model_dir, tmp_path):
    root = write_sample_dataset(tmp_path / "s", num_images=3) / "train"
    (root / "0001.png").write_bytes(b"not a png")
    strict = DataSection(path=str(root), resolution=32)
    with pytest.raises(DatasetError, match=r"1 of 3 rows are bad \(33.3%\), above data.max_bad_fraction=0.05 "
                                           r"\(report: .*quarantine.jsonl\): .*train/0001.png: cannot decode image"):
        prepare_training_dataset(str(root), model_dir, strict, 0, tmp_path / "reports")
    lenient = strict.model_copy(update={"max_bad_fraction": 0.5})
    ds, report = prepare_training_dataset(str(root), model_dir, lenient, 0, tmp_path / "reports")
    assert report.used == 2 and [r["sample_id"] for r in report.quarantined] == [1]
    assert sorted(ds.materialize().to_pandas()["sample_id"]) == [0, 2], "the bad row never reaches training"
    (root / "0001.png").unlink()
    _, report = prepare_training_dataset(str(root), model_dir, lenient, 0)
    assert [r["reason"] for r in report.quarantined] == ["image file not found"]
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0000.png", "caption": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"missing column 'text' \(has: caption, file_name\)"):
        read_imagefolder(str(root))
    (root / "metadata.jsonl").unlink()
    with pytest.raises(DatasetError, match=r"train: no metadata.jsonl or metadata.csv"):
        read_imagefolder(str(root))
    (root / "metadata.csv").write_text("file_name,caption\n0000.png,a red circle\n0002.png,a blue square\n")
    rows = read_imagefolder(f"file://{root}", caption_column="caption").take_all()
    assert sorted((r["sample_id"], r["caption"]) for r in rows) == [(0, "a red circle"), (1, "a blue square")]


@pytest.mark.parametrize("fmt", ["imagefolder", "parquet"])
def test_a_row_without_caption_or_image_alone_in_its_block_neither_crashes_nor_drops_its_neighbours(
        ray_2cpu, model_dir, tmp_path, fmt):
    # Ray Data turns a block's all-None column into float NaN, which did not concatenate with the next block's
    # strings or bytes: one uncaptioned row (data.default_caption) or missing image crashed the training pass.
    root = write_sample_dataset(tmp_path / "s", num_images=6) / "train"
    meta = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    del meta[2]["text"]
    meta.append({"file_name": "gone.png", "text": "a missing file"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    path = root
    if fmt == "parquet":  # one row per row group: a Ray task (and block) per row
        path = tmp_path / "data.parquet"
        images = [(root / m["file_name"]).read_bytes() if (root / m["file_name"]).exists() else None for m in meta]
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "text": [m.get("text") for m in meta]}),
                       path, row_group_size=1)
    data = DataSection(path=str(path), resolution=32, default_caption="a shape", max_bad_fraction=0.2)
    ds, report = prepare_training_dataset(str(path), model_dir, data, seed=0)
    assert [(r["sample_id"], r["reason"]) for r in report.quarantined] == [(6, "image file not found")]
    assert sorted(ds.materialize().to_pandas()["sample_id"]) == [0, 1, 2, 3, 4, 5]
