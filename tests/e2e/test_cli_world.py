"""`diffray data world` and `diffray eval` as a user runs them (the README's world commands), bad input
included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
DIFFRAY = str(Path(sys.executable).parent / "diffray")


def run(args: list[str], ray_address: str = "", timeout=600) -> subprocess.CompletedProcess:
    """The command as a user runs it: on the cluster in `ray_address` (as under `ray job submit`), or with none
    the CLI starts (and stops) a local cluster of its own where it needs one."""
    return subprocess.run([DIFFRAY, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "RAY_ADDRESS": ray_address})


def test_data_world_writes_both_formats(tmp_path):
    proc = run(["data", "world", str(tmp_path / "star"), "--split", "star", "--num-images", "40", "--seed", "3"])
    assert proc.returncode == 0 and "wrote 40 star images" in proc.stdout and "images/s" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "star" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {r["shape"] for r in rows} == {"star"}
    proc = run(["data", "world", str(tmp_path / "pq"), "--num-images", "25", "--format", "parquet"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert pq.read_table(tmp_path / "pq" / "part-00000.parquet").num_rows == 25
    bad = run(["data", "world", str(tmp_path / "x"), "--split", "stars"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("diffray: error: split: unknown")


def test_eval_prints_table_and_writes_report(ray_cluster, tmp_path):
    # On the session's cluster: the CLI's own local cluster (`connect_ray` without RAY_ADDRESS) is started by the
    # README's `diffray serve` block (tests/e2e/test_readme.py); test_cluster_ports.py checks such a cluster's ports.
    import ray

    proc = run(["eval", "--model", "builtin:tiny-random", "--suite", "heldout", "--num", "2", "--steps", "2",
                "--out", str(tmp_path)], ray_address=ray.get_runtime_context().gcs_address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "suite heldout" in proc.stdout and "\nbg " in proc.stdout and "jpeg_kb" in proc.stdout
    report = tmp_path / "heldout"
    assert {p.name for p in report.iterdir()} == {"results.json", "results.md", "grid.png"}
    assert json.loads((report / "results.json").read_text())["settings"]["num"] == 2
    bad = run(["eval", "--suite", "prompts", "--token", "<star>"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("diffray: error: token: ")

    # A card-less LoRA of a wider model is found only as the renderers load it: one line, not Ray Data's 80-line
    # trace of an actor that died starting (printed as a bug of Ray's own) above it.
    import numpy as np
    from safetensors.numpy import save

    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "pytorch_lora_weights.safetensors").write_bytes(save({
        key: np.ones((4, 1024), np.float32), key.replace("lora_A", "lora_B"): np.zeros((32, 4), np.float32)}))
    bad = run(["eval", "--model", "builtin:tiny-random", "--adapter", str(wide), "--suite", "prompts", "--num", "2",
               "--steps", "2"], ray_address=ray.get_runtime_context().gcs_address)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1].startswith(f"diffray: error: adapter: {wide}: cannot load LoRA into "
                                                          "this base model: size mismatch"), bad.stderr[-3000:]
