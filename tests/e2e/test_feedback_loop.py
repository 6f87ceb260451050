"""The feedback loop end to end against a real Serve app (issue 19 part 5): serve -> collect (the world
reader as the person, posting through /v1/feedback) -> `diffray feedback train` (export, Diffusion-DPO on Ray
Train, publish into the app's registry) -> the running app lists and serves the new adapter without a
redeploy -> compared against the previous model on the endpoint, the comparison stored as feedback too.
The playground's `/?left=&right=` preselection is checked in test_playground.py's browser test."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import KEY, serve_feedback_app

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DIFFRAY = str(Path(sys.executable).parent / "diffray")
APP = "diffray-loop"


@pytest.fixture(scope="module")
def site(ray_cluster, tmp_path_factory):
    limits = {"max_side": 128, "max_n": 2, "max_steps": 25, "max_body_bytes": 300_000, "request_timeout_s": 120}
    yield from serve_feedback_app(APP, tmp_path_factory.mktemp("loop-adapters"), model="builtin:tiny", limits=limits)


def diffray(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "DIFFRAY_API_KEY": KEY}
    return subprocess.run([DIFFRAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def export_rows(site, out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    proc = diffray("feedback", "export", str(out), "--db", str(site.db), "--format", "png")
    assert proc.returncode == 0, proc.stderr
    return pq.read_table(out).to_pylist()


def simulate(site, left: str, right: str, num: int, seed: int, post: bool = True) -> dict:
    proc = diffray("feedback", "simulate", "--url", site.url, "--left", left, "--right", right, "--num", str(num),
                   "--seed", str(seed), "--steps", "10", "--json", *([] if post else ["--no-post"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_serve_collect_train_publish_serve_compare(site, tmp_path):
    from diffray.world.report import score_image
    from diffray.world.suites import build_suite

    # collect: base against itself (two seeds per prompt), every verdict posted as a preference
    first = simulate(site, "base", "base", num=24, seed=5)
    assert first["left_wins"] + first["right_wins"] + first["ties"] + first["both_bad"] == 24
    rows = export_rows(site, tmp_path / "round1.parquet")
    assert len(rows) == 24 and {(r["model_0"], r["model_1"]) for r in rows} == {("base", "base")}
    items = {it.prompt: it for it in build_suite("prompts", 24, 5, 64)}
    for r in rows:  # each stored choice is the reader's verdict on the stored images
        right = [score_image("prompts", items[r["caption"]], Image.open(io.BytesIO(r[k])).convert("RGB"))["right"]
                 for k in ("jpg_0", "jpg_1")]
        expect = {(True, False): "left", (False, True): "right", (True, True): "tie", (False, False): "both_bad"}
        assert r["choice"] == expect[tuple(right)], r["caption"]
    decided = first["left_wins"] + first["right_wins"]
    assert decided >= 2, f"too few informative pairs to train on: {first}"

    # train on it and publish into the running app's registry
    proc = diffray("feedback", "train", "configs/diffusion_dpo.yaml", "--publish", "aligned-v1", "--db", str(site.db),
                   "--adapters-dir", str(site.registry), "--export", str(tmp_path / "train.parquet"),
                   f"run.storage_path={tmp_path / 'runs'}", "train.max_steps=6", "train.validate_every=null",
                   "train.checkpoint_every=6", "data.validation_fraction=0", "scaling.cpus_per_worker=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"24 preference pairs exported to {tmp_path / 'train.parquet'}: {decided} prefer one image" in proc.stdout
    assert "published aligned-v1" in proc.stdout and "?left=PREVIOUS&right=aligned-v1" in proc.stdout
    assert sorted(p.name for p in site.registry.iterdir()) == ["aligned-v1"]

    # the running app serves it at once, and it draws something else than the base
    status, models, _ = site.call("GET", "/v1/models")
    entry = next(m for m in models["data"] if m["id"] == "aligned-v1")
    assert status == 200 and entry["kind"] == "lora" and entry.get("available", True) and \
        entry["method"] == "diffusion_dpo"
    card = json.loads((site.registry / "aligned-v1" / "diffray_card.json").read_text())
    assert card["feedback"]["pairs"] == 24 and card["feedback"]["preferred"] == decided
    base_img, _ = site.generate(prompt="a red circle on a blue background", steps=6, seed=3)
    new_img, _ = site.generate(prompt="a red circle on a blue background", steps=6, seed=3, adapter="aligned-v1")
    assert base_img[0].shape == new_img[0].shape and (base_img[0] != new_img[0]).any()

    # compare the new adapter against the previous model, on the endpoint; the comparison is feedback too
    second = simulate(site, "base", "aligned-v1", num=8, seed=6)
    assert second["left_wins"] + second["right_wins"] + second["ties"] + second["both_bad"] == 8
    rows = export_rows(site, tmp_path / "round2.parquet")
    assert len(rows) == 32 and sum(r["model_1"] == "aligned-v1" for r in rows) == 8
    again = simulate(site, "base", "aligned-v1", num=8, seed=6, post=False)  # only compare: nothing stored
    assert again["posted"] is False and len(export_rows(site, tmp_path / "round3.parquet")) == 32

    # publishing over it needs --replace; the refusal comes before any training and changes nothing
    proc = diffray("feedback", "train", "configs/diffusion_dpo.yaml", "--publish", "aligned-v1", "--db", str(site.db),
                   "--adapters-dir", str(site.registry))
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert base64.b64encode((site.registry / "aligned-v1" / "pytorch_lora_weights.safetensors").read_bytes())
