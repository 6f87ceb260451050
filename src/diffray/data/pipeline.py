"""The training data pipeline on Ray Data: read a source -> validate every row (bad rows go to a
quarantine report, the job fails only above `data.max_bad_fraction`) -> decode, resize/crop/flip,
normalize, tokenize.

Validation is its own pass that returns only the bad rows to the driver, so the report and the
"N rows used, M quarantined" line exist before training starts; the training pass then skips those
rows by id. Good images are decoded twice (once per pass); the latent cache (`diffray.data.cache`)
does both passes once and training then decodes nothing.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.data

from diffray import storage
from diffray.data.captions import with_trigger
from diffray.data.imagefolder import rows_dataset
from diffray.data.raydata import in_order, raise_original_errors, raw_block
from diffray.data.folder import PathRules
from diffray.data.transforms import BLACK, aspect_buckets, mirror_caption, preprocess_images, tokenize_captions
from diffray.data.validate import Rules, caption_of, check_row
from diffray.errors import DatasetError
from diffray.paths import pipeline_class_of

QUARANTINE_FILE = "quarantine.jsonl"
log = logging.getLogger(__name__)


def source_format(path: str, fmt: str = "auto") -> str:
    """'imagefolder' or 'parquet' for `data.format` (auto: by what `path` holds)."""
    if fmt != "auto":
        return fmt
    from diffray.data.parquet import is_parquet

    return "parquet" if is_parquet(path) else "imagefolder"


def read_source(path: str, data, prompt: str | None = None, id_offset: int = 0) -> tuple[ray.data.Dataset, int]:
    """Raw rows {sample_id, source, caption, image[, conditioning_image]} of `path` and their count.

    `data` is the config's `data` section (format and column names). `prompt` replaces every caption
    (and lets a plain image folder stand without metadata); `id_offset` shifts sample ids.
    """
    if source_format(path, data.format) == "parquet":
        from diffray.data.parquet import read_parquet_rows

        # data.image_column as it is: resolve_columns falls back to HF's 'image' when the file has no such column
        ds, total = read_parquet_rows(path, data.caption_column, data.image_column, data.conditioning_column, id_offset,
                                      PathRules.of(data), data.mask_column, pair_columns(data))
        if prompt is not None:
            ds = ds.map_batches(lambda b: raw_block({**b, "caption": [prompt] * len(b["sample_id"])}),
                                batch_format="numpy")
        return ds, total
    if pair_columns(data) is not None:
        raise DatasetError(f"{path}: preference pairs are read from Parquet (columns {data.caption_column}, "
                           f"{data.image_column}, {data.pair_column}, {data.label_column}), not an image folder")
    from diffray.data.folder import folder_rows

    fs, root, rows = folder_rows(path, data.caption_column, data.image_column, prompt, id_offset,
                                 data.conditioning_column, PathRules.of(data), data.mask_column)
    return rows_dataset(fs, root, rows), len(rows)


def pair_columns(data):
    """The preference-pair columns of a `data` section (`diffray.trainers.diffusion_dpo.PairDataSection`
    has them), else None."""
    pair = getattr(data, "pair_column", None)
    if pair is None:
        return None
    from diffray.data.parquet import PairColumns

    return PairColumns(pair, data.label_column, data.pair_label_column)


def check_batch(batch: dict, rules: Rules) -> dict:
    """map_batches: only the bad rows of a batch, as {sample_id, source, reason}."""
    bad = {"sample_id": [], "source": [], "reason": []}
    for i, (sid, src) in enumerate(zip(batch["sample_id"], batch["source"])):
        reason = check_row(batch, i, rules)
        if reason is not None:
            bad["sample_id"].append(int(sid))
            bad["source"].append(str(src))
            bad["reason"].append(reason)
    return {"sample_id": np.asarray(bad["sample_id"], dtype=np.int64),
            "source": np.array(bad["source"], dtype=object), "reason": np.array(bad["reason"], dtype=object)}


@dataclass
class DataReport:
    """The outcome of validation: rows read, rows quarantined (with reasons), where the report is."""

    source: str
    total: int
    quarantined: list[dict]
    report_path: str | None

    @property
    def used(self) -> int:
        return self.total - len(self.quarantined)

    @property
    def bad_ids(self) -> frozenset[int]:
        return frozenset(r["sample_id"] for r in self.quarantined)

    def summary(self) -> str:
        where = f" (report: {self.report_path})" if self.quarantined and self.report_path else ""
        return f"data {self.source}: {self.used} rows used, {len(self.quarantined)} quarantined{where}"


def write_quarantine(bad: list[dict], report_dir: str | Path) -> str:
    """Write `quarantine.jsonl` (one {sample_id, source, reason} per bad row) into report_dir; its path.
    Training and `diffray data inspect` both write it, so the two reports read the same."""
    path = storage.join(storage.absolute(report_dir), QUARANTINE_FILE)  # a folder or a URI
    return storage.write_text(path, "".join(json.dumps({k: r[k] for k in ("sample_id", "source", "reason")}) + "\n"
                                            for r in bad))


def validate_rows(raw: ray.data.Dataset, total: int, path: str, rules: Rules, max_bad_fraction: float,
                  report_dir: str | Path | None) -> DataReport:
    """Run the validation pass; write `quarantine.jsonl` (source, row id, reason) into report_dir.

    Raises:
        DatasetError: more than `max_bad_fraction` of the rows are bad, or none is usable; the
            message names the limit, the counts, the report and the first reasons.
    """
    bad = raw.map_batches(check_batch, fn_kwargs={"rules": rules}, batch_format="numpy").take_all()
    bad = sorted(({"sample_id": int(r["sample_id"]), "source": str(r["source"]), "reason": str(r["reason"])}
                  for r in bad), key=lambda r: r["sample_id"])
    report_path = None if report_dir is None else write_quarantine(bad, report_dir)
    report = DataReport(path, total, bad, report_path)
    if bad and (len(bad) > max_bad_fraction * total or report.used == 0):
        first = "; ".join(f"{r['source']}: {r['reason']}" for r in bad[:3])
        raise DatasetError(f"{path}: {len(bad)} of {total} rows are bad ({len(bad) / total:.1%}), above "
                           f"data.max_bad_fraction={max_bad_fraction:g}"
                           f"{f' (report: {report_path})' if report_path else ''}: {first}")
    return report


@functools.lru_cache(maxsize=4)
def load_tokenizer(tokenizer_path: str, subfolder: str = "tokenizer"):
    """A tokenizer of a model dir (CLIP; Flux's `tokenizer_2` is T5), loaded once per worker process (never
    shipped from the driver)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    cls = T5TokenizerFast if subfolder == "tokenizer_2" and model_class(tokenizer_path) == "FluxPipeline" \
        else CLIPTokenizer
    return cls.from_pretrained(tokenizer_path, subfolder=subfolder)


@functools.lru_cache(maxsize=4)
def model_class(model_path: str) -> str:
    """The pipeline class of a local model dir ("" for none). SDXL's captions get both tokenizers' ids
    stacked and rows their size/crop conditioning (`micro_cond`); Flux's get CLIP's and T5's ids
    concatenated."""
    return pipeline_class_of(model_path)


def held_out_mask(sample_ids, fraction: float) -> np.ndarray:
    """Bool per row: held out for validation. A hash of the sample id, so the same rows are held out
    whichever batch, shard or format they come from, and about `fraction` of them."""
    ids = np.asarray(sample_ids, dtype=np.uint64)
    h = (ids * np.uint64(2654435761) + np.uint64(40503)) % np.uint64(2**32)
    return h.astype(np.float64) / 2**32 < fraction


def keep_rows(batch: dict, fraction: float, held_out: bool) -> dict:
    """map_batches: the held-out rows (`held_out`) or the others."""
    mask = held_out_mask(batch["sample_id"], fraction)
    keep = mask if held_out else ~mask
    return {k: v[keep] for k, v in batch.items()}


def bucket_sizes(data) -> list[tuple[int, int]] | None:
    """The aspect-ratio buckets of a `data` config section, or None when `data.aspect_buckets` is off."""
    if not data.aspect_buckets:
        return None
    return aspect_buckets(data.resolution, data.bucket_step, data.max_aspect_ratio)


def preprocess_batch(batch: dict, tokenizer_path: str, resolution: int, center_crop: bool, random_flip: bool,
                     seed: int, rules: Rules, skip: frozenset[int] = frozenset(),
                     buckets: list[tuple[int, int]] | None = None, trigger_word: str | None = None) -> dict:
    """One map_batches step: raw rows -> {sample_id, pixel_values, input_ids[, conditioning_pixel_values,
    loss_mask, pair_pixel_values]}. For an SDXL model input_ids are [B, 2, 77] (both tokenizers) and
    `micro_cond` int64 [B, 4] holds each image's original (H, W) and crop top-left (y, x); for Flux they
    are [B, 77 + L] (CLIP's, then T5's).

    Rows whose id is in `skip` (quarantined) are dropped. With `buckets` each image is cropped to the
    bucket nearest its aspect ratio (pixel_values becomes a variable-shaped column). The conditioning
    image gets the same resize, crop and flip as its image (same key, same size); its alpha is
    composited on black (transparent = no control signal). `trigger_word` is prepended to every caption; a
    flipped image's caption has "left" and "right" swapped (`mirror_caption`)."""
    if skip:
        keep = np.array([int(i) not in skip for i in batch["sample_id"]], dtype=bool)
        batch = {k: v[keep] for k, v in batch.items()}
    ids = [int(i) for i in batch["sample_id"]]
    sources = [str(s) for s in batch["source"]]
    tokenizer = load_tokenizer(tokenizer_path)
    kind = model_class(tokenizer_path)
    xl, flux = kind == "StableDiffusionXLPipeline", kind == "FluxPipeline"
    second = load_tokenizer(tokenizer_path, "tokenizer_2") if xl or flux else None
    geometry: list | None = [] if xl else None
    width = tokenizer.model_max_length + (min(second.model_max_length, 512) if flux else 0)
    flips: list[bool] = []
    pixels = preprocess_images(list(batch["image"]), ids, sources, resolution, center_crop, random_flip, seed,
                               rules.max_image_pixels, buckets, geometry=geometry, flips=flips)
    captions = [with_trigger(caption_of(c, rules) or "", trigger_word) for c in batch["caption"]]
    captions = [mirror_caption(c) if flipped else c for c, flipped in zip(captions, flips)]
    out = {"sample_id": np.asarray(ids, dtype=np.int64), "pixel_values": pixels,
           "input_ids": (tokenize_captions(tokenizer, captions, second, concat=flux) if ids
                         else np.empty((0, *((2,) if xl else ()), width), dtype=np.int64))}
    if xl:
        out["micro_cond"] = np.asarray(geometry, dtype=np.int64).reshape(len(ids), 4)
    if "conditioning_image" in batch:
        cond = preprocess_images(list(batch["conditioning_image"]), ids, sources, resolution, center_crop,
                                 random_flip, seed, rules.max_image_pixels, buckets, background=BLACK)
        if buckets is None:
            out["conditioning_pixel_values"] = (cond + 1.0) / 2.0  # ControlNet conditioning is in [0, 1]
        else:
            scaled = np.empty(len(cond), dtype=object)
            scaled[:] = [(c + 1.0) / 2.0 for c in cond]
            out["conditioning_pixel_values"] = scaled
    if "pair_image" in batch:  # the other image of a preference pair: its own pixels, the same crop/flip key
        out["pair_pixel_values"] = preprocess_images(list(batch["pair_image"]), ids, sources, resolution,
                                                     center_crop, random_flip, seed, rules.max_image_pixels, buckets)
    if "mask_image" in batch:
        out["loss_mask"] = loss_masks(list(batch["mask_image"]), ids, sources, resolution, center_crop, random_flip,
                                      seed, rules.max_image_pixels, buckets)
    return out


def loss_masks(masks: list[bytes], ids: list[int], sources: list[str], resolution: int, center_crop: bool,
               random_flip: bool, seed: int, max_pixels: int, buckets: list[tuple[int, int]] | None) -> np.ndarray:
    """Loss masks [B, 1, H, W] in [0, 1] (an object array of [1, H, W] with buckets): each mask image gets its
    image's resize, crop and flip (same key, same size as validated), its channels averaged; transparent
    pixels count as black (not trained)."""
    pixels = preprocess_images(masks, ids, sources, resolution, center_crop, random_flip, seed, max_pixels, buckets,
                               background=BLACK)
    if buckets is None:
        return ((pixels.mean(axis=1, keepdims=True) + 1.0) / 2.0).astype(np.float32)
    out = np.empty(len(pixels), dtype=object)
    out[:] = [((p.mean(axis=0, keepdims=True) + 1.0) / 2.0).astype(np.float32) for p in pixels]
    return out


def prepare_training_dataset(path: str, tokenizer_path: str, data, seed: int, report_dir: str | Path | None = None,
                             prompt: str | None = None, id_offset: int = 0) -> tuple[ray.data.Dataset, DataReport]:
    """The training dataset of `path` (validated, bad rows skipped) and its data report.

    Columns: sample_id int64, pixel_values float32 [3,R,R] in [-1,1] ([3,H,W] of the row's bucket with
    `data.aspect_buckets`), input_ids int64 [77] (and conditioning_pixel_values in [0,1] with
    `data.conditioning_column`; loss_mask float32 [1,R,R] in [0,1] with `data.mask_column`). Preprocessing runs as plain
    Ray tasks (no actor pool), so it never holds CPUs that training workers need.

    Raises:
        DatasetError: a bad source (no metadata, missing column, no files) at once; too many bad rows
            after validation (see `validate_rows`).
    """
    rules = Rules.of(data)
    raw, total = read_source(path, data, prompt, id_offset)
    report = validate_rows(raw, total, path, rules, data.max_bad_fraction, report_dir)
    log.info(report.summary())
    ds = raw.map_batches(preprocess_batch, batch_size=32, batch_format="numpy",
                         fn_kwargs={"tokenizer_path": tokenizer_path, "resolution": data.resolution,
                                    "center_crop": data.center_crop, "random_flip": data.random_flip, "seed": seed,
                                    "rules": rules, "skip": report.bad_ids, "buckets": bucket_sizes(data),
                                    "trigger_word": data.trigger_word})
    return in_order(raise_original_errors(ds)), report
