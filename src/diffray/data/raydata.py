"""Small Ray Data helpers shared by the dataset readers and the pipeline."""

from __future__ import annotations

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
