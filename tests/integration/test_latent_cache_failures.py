"""`diffray data prepare` when the latent cache build fails (Ray Data job on a local cluster): nothing half-built
is left behind, and the next build succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffray.data.sample import write_sample_dataset
from diffray.methods import load_config
from diffray.trainers.datasets import prepare_data
from testkit.models import TINY_RANDOM

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_a_latent_cache_build_that_fails_while_encoding_leaves_no_partial_folder(ray_cluster, tmp_path, monkeypatch):
    """A build that fails (or is interrupted) after validation passed keeps nothing of its temporary folder (its
    partial shards are never read and nothing else would ever remove them); the next build succeeds."""
    from diffray.data import cache

    data = write_sample_dataset(tmp_path / "s", num_images=8) / "train"
    root = tmp_path / "c"
    cfg = load_config(REPO / "configs" / "lora.yaml", [TINY_RANDOM, f"data.path={data}", "scaling.num_workers=1",
                                                       f"data.cache={root}"])

    class FullDisk(cache.Encoder):
        def __call__(self, batch):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "Encoder", FullDisk)
    with pytest.raises(Exception, match="No space left on device"):
        prepare_data(cfg)
    assert list(root.iterdir()) == [], [p.name for p in root.iterdir()]
    monkeypatch.undo()
    (folder,) = prepare_data(cfg).values()
    assert [p.name for p in root.iterdir()] == [Path(folder).name]
