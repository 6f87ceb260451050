"""GPU checks (skipped without CUDA; `pytest -m gpu` on a GPU machine):

- bf16 LoRA on one GPU worker through Ray Train, for DDP and for DeepSpeed ZeRO-2 (with `use_gpu` Ray
  Train's process group is NCCL);
- a served LoRA: a Serve app whose Generator replica holds the GPU answers `/v1/generate` over HTTP with
  the pixels an in-process `ImageEngine` on the same GPU draws, and they differ from the base model's;
  also with the UNet compiled (inductor) and `generator.hotswap`, where two LoRAs and their combination
  after the base compile nothing more.

The module starts its own local cluster with the GPU and without the dashboard or the S3 endpoint the
other integration tests share: neither is what these check, and a bare GPU node need not carry their
dependencies. On a cluster that is already up (the whole suite on a GPU machine) it uses that one.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from diffray.methods import load_config
from diffray.trainers.runner import run_training
from testkit.models import TINY_RANDOM

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
REPO = Path(__file__).resolve().parents[2]
KEY = "gpu-test-key"


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_bf16_lora_on_one_gpu(gpu_ray, tmp_path, strategy):
    cfg = load_config(REPO / "configs" / "lora.yaml", [TINY_RANDOM,
        f"run.storage_path={tmp_path}", f"run.name=gpu-{strategy}", f"strategy.name={strategy}",
        "scaling.use_gpu=true", "scaling.num_workers=1", "train.mixed_precision=bf16", "train.max_steps=20",
        "train.checkpoint_every=20", "train.validate_every=20"])
    result = run_training(cfg)
    print(f"{strategy}: {result.summary_line()}")
    assert result.steps == 20 and result.loss_last_mean < result.loss_first_mean
    assert list(Path(result.artifact_dir).glob("*.safetensors"))


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("speed", [{}, {"compile": True, "hotswap": {"rank": 8}}], ids=["eager", "hotswap"])
def test_a_served_lora_on_the_gpu_draws_what_the_engine_draws(gpu_ray, tmp_path, speed):
    from ray import serve

    from diffray.models.loading import resolve_model_path
    from diffray.serve.app import build_app
    from diffray.serve.config import parse_args
    from diffray.serve.engine import ImageEngine
    from diffray.serve.schemas import Job
    from testkit.adapters import random_lora
    from testkit.net import free_port

    model = resolve_model_path("builtin:tiny-random")
    reg = tmp_path / "adapters"
    random_lora(model, reg / "lora-a", seed=1)
    random_lora(model, reg / "lora-b", seed=2)
    args = {"model": "builtin:tiny-random", "adapters_dir": str(reg), "auth": {"api_keys": [KEY]},
            "generator": {"num_replicas": 1, "num_cpus": 1, "num_gpus": 1, "dtype": "bfloat16", **speed},
            "ingress": {"num_cpus": 0.5}, "feedback": {"path": str(tmp_path / "feedback.db")}}
    body = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 8, "guidance": 7.5, "seed": 7}

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="gpu", route_prefix="/")

        def post(**extra) -> np.ndarray:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", method="POST",
                                         data=json.dumps({**body, **extra}).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=300) as r:
                return _png(json.loads(r.read())["images"][0]["b64_json"])

        generator = serve.get_deployment_handle("Generator", app_name="gpu")
        served_base = post()
        graphs = generator.info.remote().result()["graphs"]
        served_lora = post(adapter="lora-a")
        post(adapter="lora-b")
        post(adapters=[{"id": "lora-a", "weight": 0.5}, {"id": "lora-b", "weight": 1.0}])
        info = generator.info.remote().result()
    finally:
        serve.shutdown()

    engine = ImageEngine(parse_args(args), device="cuda")  # the same settings, compile included
    engine.acquire(["lora-a"])
    jobs = [Job(prompt=body["prompt"], n=1, width=64, height=64, steps=8, guidance=7.5, seed=7, adapters=a)
            for a in ((), (("lora-a", 1.0),))]
    direct_base, direct_lora = (_png(base64.b64encode(engine.run([j])[0][0]).decode()) for j in jobs)

    lora_gap = np.abs(served_lora - served_base).mean()
    diffs = [np.abs(a - b).max() for a, b in ((served_base, direct_base), (served_lora, direct_lora))]
    print(f"served vs direct max |diff| base {diffs[0]} lora {diffs[1]}; lora vs base mean |diff| {lora_gap:.2f}; "
          f"replica {info['device']} {info['dtype']}, graphs {graphs} after the base, {info['graphs']} at the end")
    assert info["device"] == "cuda" and info["dtype"] == "torch.bfloat16"
    assert {"lora-a", "lora-b"} <= set(info["resident"])
    if speed:
        assert graphs > 0 and info["graphs"] == graphs  # compiled once, for the base; the LoRAs compiled nothing
    assert max(diffs) <= 2, diffs
    assert lora_gap > 5, lora_gap
