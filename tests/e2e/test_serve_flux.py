"""The Serve application on a Flux model (`builtin:tiny-flux`, one Generator replica, 2 steps) over real
HTTP: `/v1/models` names the family, sizes default to the model's native size (the VAE's 64, not
FluxPipeline's 1024), LoRAs from the registry (diffusers' `transformer.` layout) change the image and
concurrent requests for different ones each get their image alone, what Flux does not take (another
base's LoRA, a DDPM sampler, a negative prompt, a ControlNet) is a 422 naming the field, and the official
`openai` client gets the adapter's images."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import KEY, b64_png, control_disc, png_array, serve_feedback_app

from diffray.models.adapters import CARD

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from diffray.models.loading import resolve_model_path
    from testkit.adapters import controlnet_from_unet, random_lora

    flux = resolve_model_path("builtin:tiny-flux")
    reg = tmp_path_factory.mktemp("adapters")
    random_lora(flux, reg / "lora-flux", seed=1)
    random_lora(flux, reg / "lora-flux-b", seed=2)
    sd = resolve_model_path("builtin:tiny-random")  # made for another base model
    random_lora(sd, reg / "lora-sd", seed=5)
    old = random_lora(sd, reg / "lora-sd-old", seed=5)  # a card from before cards named the family
    card = json.loads((old / CARD).read_text())
    (old / CARD).write_text(json.dumps({k: v for k, v in card.items() if k != "family"}))
    controlnet_from_unet(sd, reg / "cn-sd", seed=6)
    yield from serve_feedback_app("diffray-flux", reg, model="builtin:tiny-flux", controlnets={})


def test_models_name_the_family_and_flux_draws_at_its_native_size(server):
    status, js, _ = server.call("GET", "/v1/models")
    entries = {m["id"]: m for m in js["data"]}
    assert status == 200 and entries["base"]["family"] == "flux"
    assert {k: m["kind"] for k, m in entries.items()} == {"base": "base", "lora-flux": "lora", "lora-flux-b": "lora",
                                                          "lora-sd": "lora", "cn-sd": "controlnet",
                                                          "lora-sd-old": "lora"}
    # an adapter's family is its card's: the one it was trained on, whatever this app serves
    assert (entries["lora-flux"]["family"], entries["lora-sd"]["family"]) == ("flux", "stable-diffusion")
    assert entries["lora-flux"]["available"] and not entries["lora-sd"]["available"]
    assert entries["lora-sd"]["reason"] == "trained for a stable-diffusion model; this server's model is flux"
    base, _ = server.generate(prompt="a red circle", n=2)  # no width/height: the model's 64 px
    assert base[0].shape == (64, 64, 3) and np.abs(base[0] - base[1]).max() > 0
    again, _ = server.generate(prompt="a red circle", n=2)
    assert all((a == b).all() for a, b in zip(base, again))
    # no guidance given: Flux's distilled 3.5 (FluxPipeline's), not SD's classifier-free 7.5
    distilled, _ = server.generate(prompt="a red circle", n=2, guidance=3.5)
    assert all((a == b).all() for a, b in zip(base, distilled))
    assert np.abs(server.generate(prompt="a red circle", n=2, guidance=7.5)[0][0] - base[0]).max() > 0
    wide, _ = server.generate(prompt="a red circle", width=96, height=64)
    assert wide[0].shape == (64, 96, 3)


def test_flux_loras_change_images_and_concurrent_requests_equal_each_alone(server):
    base, _ = server.generate(prompt="a red circle")
    lora, _ = server.generate(prompt="a red circle", adapter="lora-flux")
    other, _ = server.generate(prompt="a red circle", adapter="lora-flux-b")
    assert np.abs(lora[0] - base[0]).mean() > 1 and np.abs(other[0] - lora[0]).mean() > 1
    models = ["lora-flux", None, "lora-flux-b"] * 2
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda m: server.generate(prompt="a red circle", **({"adapter": m} if m else {})), models))
    alone = {"lora-flux": lora[0], None: base[0], "lora-flux-b": other[0]}
    for m, (images, _) in zip(models, got):
        assert np.abs(images[0] - alone[m]).max() <= 1, m  # batching's float noise at most one level


def test_what_flux_does_not_take_is_a_422_naming_the_field(server):
    disc = b64_png(control_disc())
    for body, param in [({"adapter": "lora-sd"}, "adapter"), ({"scheduler": "ddim"}, "scheduler"),
                        ({"negative_prompt": "blurry"}, "negative_prompt"),
                        ({"control": {"model": "cn-sd", "image": disc}}, "control.model")]:
        status, js, _ = server.call("POST", "/v1/generate", {"prompt": "a red circle", "steps": 2, **body})
        assert status == 422 and js["error"]["param"] == param, (body, js)
    assert "trained for a stable-diffusion model; this server's model is flux" in server.call(
        "POST", "/v1/generate", {"prompt": "x", "adapter": "lora-sd"})[1]["error"]["message"]
    status, js, _ = server.call("POST", "/v1/generate", {"prompt": "x", "adapter": "lora-sd-old"})
    assert status == 422 and "none of its layers is in this base model" in js["error"]["message"]  # the replica's
    again, _ = server.generate(prompt="a red circle", adapter="lora-flux")  # the replica still serves
    assert again[0].shape == (64, 64, 3)


def test_openai_client_gets_flux_lora_images(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=2)
    result = client.images.generate(model="lora-flux", prompt="a blue square", n=1, size="64x64",
                                    response_format="b64_json", extra_body={"seed": 7})
    want, _ = server.generate(prompt="a blue square", adapter="lora-flux", steps=2)  # the app's default steps
    assert (png_array(result.data[0].b64_json) == want[0]).all()
