"""Small Ray Data helpers shared by the dataset readers and the pipeline."""

from __future__ import annotations

import pyarrow as pa
import ray.data


def raise_original_errors(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Make an error raised in our map functions reach the consumer as `RayTaskError(<original type>)`.

    By default Ray Data wraps it in a `UserCodeException` and drops the original (its `__cause__` does
    not survive pickling), so `except DatasetError` would never match. This changes only this
    dataset's context, not the process-wide one; `.cause` of the raised error is the original.
    """
    ds.context.raise_original_map_exception = True
    return ds


def in_order(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Make this dataset's blocks come out in input order (Ray Data's `preserve_order`), not in the
    order its tasks finish: a training dataset, its latent cache and its materialized blocks then hold
    the same rows in the same order on every run, so a run's seed reproduces its losses (the local
    shuffle buffer is seeded per epoch). Changes only this dataset's context."""
    ds.context.execution_options.preserve_order = True
    return ds


def raw_block(columns: dict) -> pa.Table:
    """A block of raw rows (a reader's map function returns it) with fixed Arrow types: `sample_id` int64,
    the `*image` columns binary, every other column string; a cell of another type (NaN) becomes null.

    Returned as numpy, a column that is None in every row of a block becomes float NaN in Ray Data, and that
    block then cannot be concatenated with the next one's strings or bytes: a row without a caption or image
    (quarantined, or captioned by data.default_caption) alone in its block would crash the training pass.
    """
    def cell(value, binary: bool):
        if binary:
            return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None
        return value if isinstance(value, str) else None

    out = {}
    for name, values in columns.items():
        if name == "sample_id":
            out[name] = pa.array([int(v) for v in values], pa.int64())
        else:
            binary = name.endswith("image")
            out[name] = pa.array([cell(v, binary) for v in values], pa.binary() if binary else pa.string())
    return pa.table(out)
