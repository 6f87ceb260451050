"""The data layer on a local Ray cluster: quarantine of bad rows during a real training run, Parquet
(ours and HF `datasets`') read as the same samples as an imagefolder, the latent cache reproducing
uncached training with zero encoder calls, and `inspect`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffray.methods import load_config
from diffray.data.pipeline import QUARANTINE_FILE, prepare_training_dataset
from diffray.data.sample import write_sample_dataset
from diffray.errors import DatasetError
from diffray.trainers.datasets import prepare_data
from diffray.trainers.runner import run_training
from testkit.models import TINY_RANDOM

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def lora_cfg(tmp_path, name: str, *overrides: str):
    base = [f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}", "train.progress_bar=false",
            "train.validate_every=null"]
    return load_config(REPO / "configs" / "lora.yaml", [TINY_RANDOM] + base + list(overrides))


def sorted_batch(ds) -> dict[str, np.ndarray]:
    batch = ds.take_batch(10_000, batch_format="numpy")
    order = np.argsort(batch["sample_id"])
    return {k: v[order] for k, v in batch.items()}


def step_metrics(run_dir: str) -> list[dict]:
    lines = (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "loss" in e and "event" not in e]


def add_masks(root: Path) -> str:
    """A `mask` column for every row of an imagefolder: a left-half mask of the image's displayed size
    (masks/<name>.png), all black (nothing trains) for the second row, a text file for the first row.
    Returns the first row's image name (its row must be quarantined for its mask)."""
    from PIL import Image, ImageOps

    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    (root / "masks").mkdir()
    for i, row in enumerate(rows):
        row["mask"] = f"masks/{Path(row['file_name']).stem}.png"
        try:
            w, h = ImageOps.exif_transpose(Image.open(root / row["file_name"])).size
        except Exception:  # a broken or missing image: its row is quarantined for the image first
            w, h = 64, 64
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[:, : w // 2] = 0 if i == 1 else 255
        Image.fromarray(mask).save(root / row["mask"])
    (root / rows[0]["mask"]).write_text("not a mask\n")
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows[0]["file_name"]


def consume_concurrently(shards, consume) -> dict:
    """{rank: consume(rank, shard)} with every shard read in its own thread at the same time, as Ray
    Train's workers read their streaming splits."""
    import threading

    out: dict = {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, consume(r, shards[r])))
               for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_messy_masked_dataset_trains_and_quarantines_exactly_the_bad_rows(ray_cluster, tmp_path, messy_folder):
    root, bad = messy_folder
    total = len((root / "metadata.jsonl").read_text().splitlines())
    # Masked training end to end (data.mask_column): a broken mask file is quarantined by its row's name,
    # a row with an empty mask trains (no NaN); captions get the trigger word and shuffled tags.
    masked_bad = {**bad, add_masks(root): "mask image: cannot decode image"}
    cfg = lora_cfg(tmp_path, "messy", f"data.path={root}", "data.max_bad_fraction=0.4", "train.max_steps=4",
                   "train.checkpoint_every=4", "train.log_every=1", "data.mask_column=mask",
                   # and the caption options in the same run: a trigger word kept first, tags shuffled per step
                   "data.trigger_word=sks", "data.shuffle_tags=true", "data.keep_tokens=1")
    result = run_training(cfg)
    assert result.steps == 4 and np.isfinite(result.loss_last_mean) and result.loss_last_mean > 0
    report = [json.loads(x) for x in (Path(result.run_dir) / "logs" / QUARANTINE_FILE).read_text().splitlines()]
    assert {Path(r["source"]).name: r["reason"] for r in report}.keys() == masked_bad.keys()
    for r in report:
        assert masked_bad[Path(r["source"]).name] in r["reason"] and isinstance(r["sample_id"], int)

    # Above the limit: one line with the counts, the limit and the report, before any training.
    with pytest.raises(DatasetError) as err:
        run_training(lora_cfg(tmp_path, "messy-strict", f"data.path={root}", "data.max_bad_fraction=0.2"))
    msg = str(err.value)
    assert f"{len(bad)} of {total} rows are bad" in msg and "data.max_bad_fraction=0.2" in msg
    assert QUARANTINE_FILE in msg and "\n" not in msg
    assert not list((tmp_path / "runs" / "messy-strict").glob("checkpoint_*"))


def write_parquet(root: Path, out: Path, files: int = 2, row_group_size: int = 3) -> None:
    """Our own LAION-style shards: image bytes + caption, split over files and small row groups."""
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    out.mkdir(parents=True)
    per = -(-len(rows) // files)
    for i in range(files):
        part = rows[i * per:(i + 1) * per]
        table = pa.table({"jpg": [(root / r["file_name"]).read_bytes() for r in part],
                          "caption": [r["text"] for r in part]})
        pq.write_table(table, out / f"part-{i:05d}.parquet", row_group_size=row_group_size)


def test_parquet_and_hf_datasets_yield_the_same_batches_as_the_imagefolder(ray_cluster, tmp_path, tiny_model_path):
    import datasets

    root = write_sample_dataset(tmp_path / "s", num_images=10) / "train"
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    cfg = lora_cfg(tmp_path, "x", "data.random_flip=true", "data.center_crop=false")
    folder_ds, report = prepare_training_dataset(str(root), tiny_model_path, cfg.data, 3)
    assert report.used == 10 and not report.quarantined
    expected = sorted_batch(folder_ds)

    write_parquet(root, tmp_path / "shards")
    d = cfg.data.model_copy(update={"image_column": "jpg", "caption_column": "caption"})
    # The same shards by path and by a pyarrow URI (s3://... on a cluster; file:// here).
    for source in (str(tmp_path / "shards"), f"file://{tmp_path / 'shards'}"):
        got = sorted_batch(prepare_training_dataset(source, tiny_model_path, d, 3)[0])
        for key in ("sample_id", "pixel_values", "input_ids"):
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{source}: {key}")
    # A Parquet file of relative image paths under the default column names (file_name, text).
    pq.write_table(pa.table({"file_name": [r["file_name"] for r in rows], "text": [r["text"] for r in rows]}),
                   root / "paths.parquet")
    got = sorted_batch(prepare_training_dataset(str(root / "paths.parquet"), tiny_model_path, cfg.data, 3)[0])
    for key in ("sample_id", "pixel_values", "input_ids"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"paths.parquet: {key}")

    # What HF `datasets` writes for an Image feature: a struct {bytes, path} column named "image".
    hf = datasets.Dataset.from_dict({"image": [str(root / r["file_name"]) for r in rows],
                                     "text": [r["text"] for r in rows],
                                     "mask": [str(root / r["file_name"]) for r in rows]})
    hf = hf.cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    hf.to_parquet(str(tmp_path / "hf.parquet"))
    assert pq.read_schema(tmp_path / "hf.parquet").field("image").type.num_fields == 2
    # Its absolute image paths are outside the Parquet file's folder: refused unless data.image_roots names them.
    with pytest.raises(DatasetError, match=r"10 of 10 rows are bad .* is not a file inside the dataset folder "
                                           r"\(data\.image_roots lists"):
        prepare_training_dataset(str(tmp_path / "hf.parquet"), tiny_model_path, cfg.data, 3)
    hf_data = cfg.data.model_copy(update={"image_roots": (str(root),)})
    got = sorted_batch(prepare_training_dataset(str(tmp_path / "hf.parquet"), tiny_model_path, hf_data, 3)[0])
    for key in ("sample_id", "pixel_values", "input_ids"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # A mask column of image structs (each row its own image as the mask): cropped and flipped as the image.
    masked = sorted_batch(prepare_training_dataset(str(tmp_path / "hf.parquet"), tiny_model_path,
                                                   hf_data.model_copy(update={"mask_column": "mask"}), 3)[0])
    np.testing.assert_allclose(masked["loss_mask"][:, 0], (expected["pixel_values"].mean(axis=1) + 1) / 2, atol=1e-5)

    with pytest.raises(DatasetError, match=r"hf\.parquet: missing column 'caption' \(has: image, text, mask\)"):
        prepare_training_dataset(str(tmp_path / "hf.parquet"), tiny_model_path, d, 3)


@pytest.mark.slow
@pytest.mark.eval  # CI: the aspect-bucket test below makes the same checks (equal losses, no encoder calls, reuse)
def test_latent_cache_reproduces_uncached_training_without_encoder_calls(ray_cluster, tmp_path):
    data = write_sample_dataset(tmp_path / "s", num_images=8) / "train"
    # One worker, the whole set in every batch: the loss of a step does not depend on row order.
    common = [f"data.path={data}", "scaling.num_workers=1", "strategy.name=ddp", "train.micro_batch_size=8",
              "train.max_steps=3", "train.checkpoint_every=3", "train.log_every=1", "data.random_flip=true",
              "data.caption_dropout=0.3"]
    plain = run_training(lora_cfg(tmp_path, "uncached", *common))
    cache_root = tmp_path / "latents"
    cfg = lora_cfg(tmp_path, "cached", *common, f"data.cache={cache_root}")
    folders = prepare_data(cfg)
    (folder,) = folders.values()
    info = json.loads((Path(folder) / "cache.json").read_text())
    assert info["rows"] == 8 and info["quarantined"] == 0
    built_at = (Path(folder) / "cache.json").stat().st_mtime_ns
    cached = run_training(cfg)  # finds the prepared cache: no rebuild
    assert (Path(folder) / "cache.json").stat().st_mtime_ns == built_at and len(list(cache_root.iterdir())) == 1

    a, b = step_metrics(plain.run_dir), step_metrics(cached.run_dir)
    assert [e["step"] for e in a] == [e["step"] for e in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5 * max(1.0, abs(x["loss"])), (x["loss"], y["loss"])
        assert x["vae_encode_calls"] > 0 and x["text_encoder_calls"] > 0
        assert y["vae_encode_calls"] == 0 and y["text_encoder_calls"] == 0

    # Another setting is another cache: a stale one is never read.
    other = prepare_data(lora_cfg(tmp_path, "cached", *common, f"data.cache={cache_root}", "data.resolution=32"))
    assert set(other.values()).isdisjoint(folders.values()) and len(list(cache_root.iterdir())) == 2


def test_latent_cache_on_object_storage_is_built_once_reused_and_equal_to_a_local_one(ray_cluster, s3, tmp_path):
    """`data.cache: s3://...` (a real S3 endpoint on 127.0.0.1): the Ray Data job writes its shards there,
    cache.json last; an interrupted build's leftovers are cleared, a finished cache is reused, and it holds
    the same rows as the same cache on local disk."""
    from diffray.data.cache import read_cache

    data = write_sample_dataset(tmp_path / "s", num_images=8) / "train"
    common = [f"data.path={data}", "scaling.num_workers=1"]
    root = f"{s3.bucket('latents')}/cache"
    cfg = lora_cfg(tmp_path, "s3", *common, f"data.cache={root}")
    (local,) = prepare_data(lora_cfg(tmp_path, "local", *common, f"data.cache={tmp_path / 'c'}")).values()
    key = Path(local).name
    leftover = f"{root}/{key}/shards/from-an-interrupted-build.parquet"
    pq.write_table(pa.table({"sample_id": [99]}), leftover.removeprefix("s3://"), filesystem=s3.fs)

    (folder,) = prepare_data(cfg).values()
    assert folder == f"{root}/{key}", "the same key as on local disk"
    keys = s3.keys(folder)
    assert f"{folder[5:]}/cache.json" in keys and leftover[5:] not in keys, keys
    info = json.loads(s3.fs.open_input_stream(f"{folder[5:]}/cache.json").read())
    assert info["rows"] == 8 and info["quarantined"] == 0
    assert prepare_data(cfg) == {"train": folder} and s3.keys(folder) == keys, "reused, not rebuilt"

    remote, here = read_cache(folder).to_pandas(), read_cache(local).to_pandas()
    assert remote["sample_id"].tolist() == here["sample_id"].tolist() == list(range(8))
    for col in ("latent_mean", "latent_std", "prompt_embeds"):
        np.testing.assert_allclose(np.stack(remote[col].map(np.stack)), np.stack(here[col].map(np.stack)),
                                   rtol=1e-5, atol=1e-6)


def test_cache_and_worker_splits_hold_the_same_rows_in_the_same_order_on_every_run(ray_cluster, tmp_path):
    """A seed reproduces a run only if the rows reach the workers in the same order: the latent cache is
    read back in sample-id order (whatever order its encoder batches were written in) and Ray Train's
    splits keep it."""
    import random
    import time

    import ray

    from diffray.data.cache import read_cache
    from diffray.data.raydata import in_order
    from diffray.trainers.runner import ingest_options
    from diffray.world.writers import write_world_dataset

    data = write_world_dataset(tmp_path / "w", "pretrain", 48, 3, fmt="parquet")
    (folder,) = prepare_data(lora_cfg(tmp_path, "c", f"data.path={data}", f"data.cache={tmp_path / 'c'}",
                                      "data.resolution=64")).values()  # three encoder batches, in any order
    assert read_cache(Path(folder)).to_pandas()["sample_id"].tolist() == list(range(48))
    shard = next((Path(folder) / "shards").glob("*.parquet"))  # rows stored out of order are read back in order
    pq.write_table(pq.read_table(shard).take(list(range(47, -1, -1))), shard)
    assert read_cache(Path(folder)).to_pandas()["sample_id"].tolist() == list(range(48))

    def jitter(batch):
        time.sleep(random.random() * 0.05)  # tasks finish out of order
        return batch

    def two_workers() -> dict[int, list[int]]:
        ds = in_order(ray.data.range(64, override_num_blocks=16).map_batches(jitter))
        ds.context.execution_options = ingest_options()  # what our DataConfig hands Ray Train
        return consume_concurrently(ds.streaming_split(2, equal=True),
                                    lambda rank, shard: [int(r["id"]) for r in shard.iter_rows()])

    first = two_workers()
    assert sorted(first[0] + first[1]) == list(range(64))
    assert two_workers() == first


def test_inspect_reports_counts_sizes_captions_and_a_contact_sheet(ray_cluster, tmp_path, messy_folder):
    from PIL import Image

    from diffray.config import DataSection
    from diffray.data.inspect import format_summary, inspect_dataset

    root, bad = messy_folder
    total = len((root / "metadata.jsonl").read_text().splitlines())
    summary = inspect_dataset(str(root), DataSection(path=str(root)), tmp_path / "sheet.png", sample=8,
                              report_dir=tmp_path / "report").summary()
    assert summary["rows"] == total and summary["quarantined"] == len(bad) and summary["usable"] == total - len(bad)
    assert sum(summary["shorter_side_histogram"].values()) == total - len(bad)
    assert summary["shorter_side_histogram"] == {"64-127": total - len(bad)} and summary["modes"]["CMYK"] == 1
    assert summary["caption_words"]["min"] >= 1 and sum(summary["quarantine_reasons"].values()) == len(bad)
    sheet = Image.open(summary["contact_sheet"])
    assert sheet.size == (4 * 128, 2 * 144)
    text = format_summary(summary)
    assert f"{total} rows, {total - len(bad)} usable, {len(bad)} would be quarantined" in text
    # Every bad file by name with its reason (a truncated PNG, a text file, a missing file among them),
    # in the text, the JSON and the same quarantine.jsonl training writes.
    named = {Path(r["source"]).name: r["reason"] for r in summary["quarantined_rows"]}
    assert named.keys() == bad.keys() and all(bad[n] in why for n, why in named.items())
    for name in ("truncated.png", "text.png", "missing.png"):
        line = next(x for x in text.splitlines() if x.strip().startswith("quarantined:") and name in x)
        assert bad[name] in line
    assert json.loads(json.dumps(summary))["quarantined_rows"] == summary["quarantined_rows"]
    written = [json.loads(x) for x in (tmp_path / "report" / QUARANTINE_FILE).read_text().splitlines()]
    assert written == summary["quarantined_rows"] and summary["quarantine_report"] in text


def write_mixed_aspect_folder(root: Path, per_shape: int = 4) -> Path:
    """Landscape, portrait and square images (`per_shape` each, interleaved) with captions."""
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    meta = []
    for i in range(3 * per_shape):
        w, h = [(96, 56), (56, 96), (72, 72)][i % 3]
        img = np.zeros((h, w, 3), dtype=np.uint8) + rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)
        img[: h // 2, : w // 2] = 255 - img[0, 0]  # a bright or dark quadrant
        Image.fromarray(img).save(root / f"{i:03d}.png")
        meta.append({"file_name": f"{i:03d}.png", "text": f"a {['wide', 'tall', 'square'][i % 3]} toy {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return root


@pytest.mark.slow
@pytest.mark.eval  # CI: unit/test_buckets.py and unit/test_families.py (bucketed SDXL rows)
def test_aspect_buckets_stream_one_shape_batches_and_cache_reproduces_training(ray_cluster, tmp_path, tiny_model_path):
    """Buckets stream one-shape batches; the latent cache (flips and caption dropout included) reproduces
    uncached training with no encoder call, is found again instead of rebuilt, and another setting is
    another cache."""
    from diffray.trainers.session import batch_stream

    data = write_mixed_aspect_folder(tmp_path / "mixed")
    buckets = ["data.aspect_buckets=true", "data.bucket_step=16", "data.center_crop=false", "data.random_flip=true"]
    cfg = lora_cfg(tmp_path, "b", f"data.path={data}", *buckets)
    ds, report = prepare_training_dataset(str(data), tiny_model_path, cfg.data, 0)
    assert report.used == 12
    from diffray.data.inspect import inspect_dataset

    assert inspect_dataset(str(data), cfg.data, None).summary()["aspect_buckets"] == {
        "48x80": 4, "64x64": 4, "80x48": 4}
    # What a worker's stream yields (a Dataset has the shard's iterator API): full one-shape batches;
    # the first epoch holds every row exactly once, across all three buckets.
    batches = list(itertools.islice(batch_stream(ds.materialize(), 4, shuffle_buffer=8, seed=1, buckets=True), 3))
    shapes = sorted(tuple(b["pixel_values"].shape) for b in batches)
    assert shapes == [(4, 3, 48, 80), (4, 3, 64, 64), (4, 3, 80, 48)]
    assert sorted(i for b in batches for i in b["sample_id"].tolist()) == list(range(12))
    for b in batches:  # landscape sources went to the landscape bucket, and so on
        kinds = {int(i) % 3 for i in b["sample_id"]}
        assert len(kinds) == 1 and b["pixel_values"].shape[-1] == {0: 80, 1: 48, 2: 64}[kinds.pop()]

    common = [f"data.path={data}", *buckets, "scaling.num_workers=1", "strategy.name=ddp", "data.caption_dropout=0.3",
              "train.micro_batch_size=4", "train.max_steps=4", "train.checkpoint_every=4", "train.log_every=1"]
    plain = run_training(lora_cfg(tmp_path, "b-uncached", *common))
    cache_root = tmp_path / "latents"
    cached_cfg = lora_cfg(tmp_path, "b-cached", *common, f"data.cache={cache_root}")
    (folder,) = prepare_data(cached_cfg).values()
    built_at = (Path(folder) / "cache.json").stat().st_mtime_ns
    cached = run_training(cached_cfg)  # finds the prepared cache: no rebuild
    assert (Path(folder) / "cache.json").stat().st_mtime_ns == built_at and len(list(cache_root.iterdir())) == 1
    a, b = step_metrics(plain.run_dir), step_metrics(cached.run_dir)
    assert [e["step"] for e in a] == [e["step"] for e in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert np.isfinite(x["loss"]) and abs(x["loss"] - y["loss"]) < 1e-5 * max(1.0, abs(x["loss"]))
        assert x["vae_encode_calls"] > 0 and x["text_encoder_calls"] > 0
        assert y["vae_encode_calls"] == 0 and y["text_encoder_calls"] == 0
    # Another setting is another cache: a stale one is never read.
    other = prepare_data(lora_cfg(tmp_path, "b-cached", *common, f"data.cache={cache_root}", "data.resolution=32"))
    assert folder not in other.values() and len(list(cache_root.iterdir())) == 2
    # The cache stores each row's latents at its bucket's size (latent = pixels / 8).
    rows = read_cache_rows(folder)
    assert len(rows) == 12 and {tuple(r.shape) for r in rows} == {(4, 6, 10), (4, 10, 6), (4, 8, 8)}


def read_cache_rows(folder) -> list[np.ndarray]:
    from diffray.data.cache import read_cache

    return list(read_cache(Path(folder)).take_batch(100, batch_format="numpy")["latent_mean"])


@pytest.mark.slow
@pytest.mark.eval  # CI: the buckets' one-shape batches and cache in the test above, ZeRO-2 on two workers everywhere
def test_aspect_buckets_train_on_two_zero2_workers(ray_cluster, tmp_path):
    # Ranks may hold different buckets (tensor shapes) at the same step; gradients still reduce.
    data = write_mixed_aspect_folder(tmp_path / "mixed", per_shape=6)
    result = run_training(lora_cfg(tmp_path, "b-zero2", f"data.path={data}", "data.aspect_buckets=true",
                                   "data.bucket_step=16", "scaling.num_workers=2", "strategy.name=deepspeed",
                                   "strategy.zero_stage=2", "train.micro_batch_size=2", "train.max_steps=6",
                                   "train.checkpoint_every=6", "train.log_every=1"))
    losses = [e["loss"] for e in step_metrics(result.run_dir)]
    assert result.steps == 6 and len(losses) == 6 and all(np.isfinite(losses))


def test_worker_streams_are_disjoint_reshuffled_per_epoch_and_reproducible(ray_cluster):
    import ray

    from diffray.trainers.session import batch_stream

    def two_workers(seed: int) -> dict[int, list[list[int]]]:
        # What Ray Train hands two workers: streaming_split iterators, consumed concurrently.
        ds = ray.data.from_items([{"sample_id": i, "x": float(i)} for i in range(32)], override_num_blocks=8)
        shards = ds.materialize().streaming_split(2, equal=True)

        def consume(rank: int, shard) -> list[list[int]]:
            stream = batch_stream(shard, 4, shuffle_buffer=8, seed=seed + rank)
            return [b["sample_id"].tolist() for b in itertools.islice(stream, 8)]  # 2 epochs of 4 batches

        return consume_concurrently(shards, consume)

    run = two_workers(100)
    epochs = {r: [sum(run[r][:4], []), sum(run[r][4:], [])] for r in run}
    for e in range(2):  # each epoch: the ranks' rows are disjoint and together the whole dataset
        assert not set(epochs[0][e]) & set(epochs[1][e])
        assert sorted(epochs[0][e] + epochs[1][e]) == list(range(32))
    for r in run:  # the same shard, in a new order each epoch
        assert sorted(epochs[r][0]) == sorted(epochs[r][1]) and epochs[r][0] != epochs[r][1]
    assert two_workers(100) == run  # same seed, same order
    assert two_workers(7) != run


def test_hostile_rows_are_quarantined_one_by_one_without_being_opened(ray_cluster, tmp_path):
    """Rows naming files outside the folder (../, absolute, a symlink out), of the wrong JSON shape or with
    a non-text caption: each is quarantined with its reason by the same validation pass training uses;
    the good rows all stay, and the Arrow schema holds although the first rows are the bad ones."""
    import os

    from diffray.config import DataSection
    from diffray.data.pipeline import read_source, validate_rows
    from diffray.data.validate import Rules

    root = write_sample_dataset(tmp_path / "ds", num_images=8) / "train"
    good = (root / "metadata.jsonl").read_text()
    secret = tmp_path / "secret.png"
    secret.write_bytes(next(root.glob("*.png")).read_bytes())
    os.symlink(secret, root / "link_out.png")
    hostile = [json.dumps({"file_name": "../secret.png", "text": "x"}), json.dumps({"file_name": str(secret), "text": "x"}),
               json.dumps({"file_name": "link_out.png", "text": "x"}), json.dumps({"file_name": "a.png", "text": 3}),
               "[1, 2]", "{not json"]
    (root / "metadata.jsonl").write_text("\n".join(hostile) + "\n" + good)
    data = DataSection(path=str(root))
    raw, total = read_source(str(root), data)
    report = validate_rows(raw, total, str(root), Rules.of(data), max_bad_fraction=0.5, report_dir=tmp_path / "r")
    assert total == 14 and report.used == 8 and report.bad_ids == frozenset(range(6))
    reasons = {Path(r["source"]).name: r["reason"] for r in report.quarantined}
    assert set(reasons) == {f"metadata.jsonl:{n}" for n in range(1, 7)}
    assert "is not a file inside the dataset folder" in reasons["metadata.jsonl:1"] + reasons["metadata.jsonl:2"]
    assert "link to a file outside the dataset folder" in reasons["metadata.jsonl:3"]
    assert "text is a JSON int" in reasons["metadata.jsonl:4"] and "not an object" in reasons["metadata.jsonl:5"]
    assert "invalid JSON" in reasons["metadata.jsonl:6"]
    followed = validate_rows(*read_source(str(root), DataSection(path=str(root), follow_symlinks=True)), str(root),
                             Rules.of(data), max_bad_fraction=0.5, report_dir=None)
    assert followed.bad_ids == frozenset({0, 1, 3, 4, 5})  # the link is read now; '..' and absolute never
