"""Every benchmark script runs end to end at a toy size (slow suite), so `make bench` cannot rot. The
figures are not asserted here: speed is measured in `make bench` and recorded in BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]

TOY = {
    "train_overhead": ["--steps", "3", "--warmup", "1", "--rounds", "1", "--batch-sizes", "4", "--num-images", "16"],
    # a Ray run and the plain loops (torch, and the same engine in-process) taking turns through paired_hooks.py;
    # then one with the same engine alone as its plain loop
    "train_overhead --paired": ["--paired", "--engine-loop", "--variants", "zero2", "--steps", "3", "--warmup", "1",
                                "--rounds", "1", "--batch-sizes", "4", "--num-images", "16"],
    "train_overhead --engine-only": ["--paired", "--engine-only", "--variants", "ddp", "--steps", "3", "--warmup",
                                     "1", "--rounds", "1", "--batch-sizes", "4", "--num-images", "16"],
    "zero_step": ["--steps", "2", "--rounds", "1", "--num-images", "8", "--in-ray-task"],  # the task runs `measure`
    "gpu": ["--dry"],  # CPU, tiny random model: every section, compile with the aot_eager backend
    "hotswap": ["--backend", "aot_eager", "--loras", "2", "--repeats", "1", "--steps", "2"],
    "memory": [],  # parameter counts on the meta device: the whole script, a few seconds
    "latent_cache": ["--num-images", "8", "--batch", "4", "--steps", "3", "--warmup", "1", "--rounds", "1"],
    "ddpo_overlap": ["--epochs", "2", "--rounds", "1", "--samples", "16", "--batch", "8"],
    "serve": ["--requests", "2", "--rounds", "1", "--steps", "2", "--concurrency", "2", "--throughput-requests", "4",
              "--adapters", "2"],
    "serve_edge": ["--requests", "3", "--rounds", "1"],
    # the grid search alone, of one trial: each search is the same `run` (~90 s of Tune start-up here); the
    # schedulers' stopping is for tests/integration/test_tune*.py to show
    "tune_schedulers": ["--steps", "4", "--validate-every", "2", "--grace", "2", "--schedulers", "", "--set",
                        "tune.space={lora.rank: {grid: [4]}}"],
}


# Each script joins the cluster in RAY_ADDRESS (benchmarks/common.py) as `diffray` commands do, so these runs
# share the session's cluster instead of starting one each (15-20 s apiece here). serve.py and serve_edge.py start
# and shut down Serve themselves on a port of their own: each keeps a cluster of its own, away from the session's
# Serve apps.
OWN_CLUSTER = {"serve", "serve_edge"}


@pytest.mark.parametrize("name", sorted(TOY))
def test_benchmark_runs_at_toy_size(name, tmp_path, request):
    address = ""
    if name not in OWN_CLUSTER:
        import ray

        request.getfixturevalue("ray_cluster")
        address = ray.get_runtime_context().gcs_address
    script = name.split()[0]
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *TOY[name], "--out", str(out)],
                          cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(out.read_text())
    assert written, "the script wrote its results"
    if name.startswith("train_overhead --"):  # the runs asked for, against the plain loop asked for
        variant = TOY[name][TOY[name].index("--variants") + 1]
        assert list(written["results"]["batch4"]) == [f"ray_{variant}"]
        assert written["plain"] == ("engine" if "--engine-only" in TOY[name] else "torch")
