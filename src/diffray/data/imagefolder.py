"""Read an HF-style imagefolder (see `diffray.data.folder` for the layout) into raw Ray Dataset rows;
`diffray.data.pipeline` validates and preprocesses them. Local paths and pyarrow URIs alike.
"""

from __future__ import annotations

import numpy as np
import ray.data

from diffray import storage
from diffray.data.folder import LOCAL_ONLY, PathRules, folder_rows, open_path
from diffray.data.raydata import raise_original_errors, raw_block

def read_imagefolder(path: str, caption_column: str = "text", image_column: str = "file_name",
                     prompt: str | None = None, id_offset: int = 0,
                     conditioning_column: str | None = None, paths: PathRules = LOCAL_ONLY) -> ray.data.Dataset:
    """Rows {sample_id int, source str, caption str|None, error str, image bytes|None[, conditioning_image]};
    sample_id is the metadata row order; a missing file reads as None and a row with an `error` (a file
    outside the folder, a wrong JSON type) is never read: validation quarantines both.

    Raises:
        DatasetError: no metadata file, no rows, or a column absent from every row.
    """
    return rows_dataset(*folder_rows(path, caption_column, image_column, prompt, id_offset, conditioning_column,
                                     paths))


def rows_dataset(fs, root: str, rows: list[dict]) -> ray.data.Dataset:
    """The Ray Dataset of `folder_rows`' result: each row's image bytes read by the workers."""

    def read(sources, errors) -> np.ndarray:
        return np.array([storage.read_or_none(fs, open_path(root, s)) if s and not e else None
                         for s, e in zip(sources, errors)], dtype=object)

    def load_bytes(batch: dict):
        batch["image"] = read(batch["source"], batch["error"])
        if "conditioning_source" in batch:
            batch["conditioning_image"] = read(batch["conditioning_source"], batch["error"])
        if "mask_source" in batch:
            batch["mask_image"] = read(batch["mask_source"], batch["error"])
        batch["source"] = np.array([open_path(root, s) for s in batch["source"]], dtype=object)
        return raw_block(batch)

    return raise_original_errors(ray.data.from_items(rows).map_batches(load_bytes, batch_format="numpy"))
