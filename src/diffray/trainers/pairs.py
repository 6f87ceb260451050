"""The `data` section of the methods that train on preference pairs (`diffusion_dpo`, `reward_model`):
Parquet with Pick-a-Pic's columns, read by `diffray.data.parquet` (the preferred image first, the other
one in `pair_pixel_values`). Light: pydantic only, so job configs validate without importing a trainer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffray.config import DataSection


class PairDataSection(DataSection):
    """`data` of preference pairs: the shared data fields, Pick-a-Pic's column names as defaults, and
    the second image and label columns."""

    path: str = Field("builtin:sample/pairs", description="Parquet file or dir (or a pyarrow URI) of preference "
                      "pairs, e.g. `diffray data export-feedback`'s output or Pick-a-Pic's shards; "
                      "builtin:sample/pairs: the world's colour pairs.")
    format: Literal["auto", "parquet"] = Field("parquet", description="Preference pairs are read from Parquet.")
    caption_column: str = Field("caption", description="Prompt column of the pairs.")
    image_column: str = Field("jpg_0", description="The pair's first image (bytes or an HF Image struct).")
    pair_column: str = Field("jpg_1", description="The pair's second image.")
    label_column: str = Field("label_0", description="The first image's label: alone, > 0.5 prefers it, < 0.5 the "
                              "second image, 0.5 is a tie (skipped).")
    pair_label_column: str = Field("label_1", description="The second image's label, used when the file has the "
                                   "column: the larger label wins; equal labels (a tie, both bad) are skipped.")

    @model_validator(mode="after")
    def _pairs_only(self) -> PairDataSection:
        refused = {"cache": self.cache != "off", "aspect_buckets": self.aspect_buckets,
                   "conditioning_column": self.conditioning_column is not None,
                   "mask_column": self.mask_column is not None, "shuffle_tags": self.shuffle_tags}
        bad = [k for k, on in refused.items() if on]
        if bad:
            raise ValueError(f"data.{bad[0]}: not supported for preference pairs (diffusion_dpo and reward_model read "
                             "both images of a pair from pixels, one square size, every pixel)")
        return self
