"""Shared fixtures: an isolated cache for built-in models/data, and one local Ray cluster per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One cache for the whole test session (the tiny model and sample set are built once).
os.environ.setdefault("DIFFRAY_CACHE", str(REPO / ".cache" / "diffray-test"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for integration tests (started once, shut down at the end)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from diffray.models.loading import resolve_model_path

    return resolve_model_path("builtin:tiny")
