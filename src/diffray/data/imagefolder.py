"""Read an HF-style imagefolder (`metadata.jsonl` + image files) into a Ray Dataset and prepare it
for training (decode, resize/crop/flip, normalize, tokenize) with `map_batches`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import ray.data

from diffray.data.transforms import preprocess_images, tokenize_captions
from diffray.errors import DatasetError


def read_metadata(root: Path, caption_column: str, image_column: str) -> list[dict]:
    """Rows of metadata.jsonl with the two columns checked; files referenced must exist."""
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise DatasetError(f"{root}: no metadata.jsonl (expected an imagefolder with file_name/text lines)")
    rows = []
    for n, line in enumerate(meta.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{meta}:{n}: invalid JSON ({exc.msg})") from None
        for col in (image_column, caption_column):
            if col not in rec:
                raise DatasetError(f"{meta}:{n}: missing column {col!r} (has: {', '.join(sorted(rec))})")
        if not (root / rec[image_column]).is_file():
            raise DatasetError(f"{meta}:{n}: image file not found: {root / rec[image_column]}")
        rows.append({"sample_id": len(rows), "source": str(rec[image_column]), "caption": str(rec[caption_column])})
    if not rows:
        raise DatasetError(f"{meta}: no rows")
    return rows


def read_imagefolder(path: str, caption_column: str = "text", image_column: str = "file_name") -> ray.data.Dataset:
    """Rows {sample_id, image (bytes), caption, source}; sample_id is the metadata line order."""
    root = Path(path)
    rows = read_metadata(root, caption_column, image_column)

    def load_bytes(batch: dict) -> dict:
        batch["image"] = np.array([(root / s).read_bytes() for s in batch["source"]], dtype=object)
        return batch

    return ray.data.from_items(rows).map_batches(load_bytes, batch_format="numpy")


class _Preprocess:
    """Callable class for map_batches: loads the tokenizer once per actor/task from the model dir."""

    def __init__(self, tokenizer_path: str, resolution: int, center_crop: bool, random_flip: bool, seed: int):
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path, subfolder="tokenizer")
        self.args = (resolution, center_crop, random_flip, seed)

    def __call__(self, batch: dict) -> dict:
        ids = [int(i) for i in batch["sample_id"]]
        pixels = preprocess_images(list(batch["image"]), ids, list(batch["source"]), *self.args)
        return {"sample_id": np.asarray(ids, dtype=np.int64), "pixel_values": pixels,
                "input_ids": tokenize_captions(self.tokenizer, list(batch["caption"]))}


def prepare_training_dataset(path: str, tokenizer_path: str, resolution: int, center_crop: bool, random_flip: bool,
                             seed: int, caption_column: str = "text", image_column: str = "file_name") -> ray.data.Dataset:
    """Columns: sample_id int64, pixel_values float32 [3,R,R] in [-1,1], input_ids int64 [77]."""
    ds = read_imagefolder(path, caption_column, image_column)
    return ds.map_batches(_Preprocess, fn_constructor_args=(tokenizer_path, resolution, center_crop, random_flip, seed),
                          batch_size=32, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))
