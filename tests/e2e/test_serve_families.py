"""The Serve application on an SDXL model (`builtin:tiny-sdxl`, one Generator replica, 2 steps) over real
HTTP: `/v1/models` names the family, sizes default to the model's native size, a LoRA and an SDXL
ControlNet from the registry change the image, concurrent requests for different adapters batched
together each get their image alone, and the official `openai` client gets the adapter's images."""

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
    from testkit.adapters import controlnet_from_unet, random_lora, random_textual_inversion

    xl = resolve_model_path("builtin:tiny-sdxl")
    reg = tmp_path_factory.mktemp("adapters")
    random_lora(xl, reg / "lora-xl", seed=1)
    random_lora(xl, reg / "lora-xl-b", seed=2)
    controlnet_from_unet(xl, reg / "cn-xl", seed=4)
    random_textual_inversion(xl, reg / "ti-xl", "<x-tok>", seed=3)  # clip_l + clip_g
    sd = resolve_model_path("builtin:tiny-random")  # adapters made for another base model
    random_lora(sd, reg / "lora-sd", seed=5)
    controlnet_from_unet(sd, reg / "cn-sd", seed=6)
    random_textual_inversion(sd, reg / "ti-sd", "<y-tok>", seed=7)
    old = controlnet_from_unet(sd, reg / "cn-sd-old", seed=6)  # a card from before cards named the family
    card = json.loads((old / CARD).read_text())
    (old / CARD).write_text(json.dumps({k: v for k, v in card.items() if k != "family"}))
    yield from serve_feedback_app("diffray-sdxl", reg, model="builtin:tiny-sdxl", controlnets={})


def test_models_name_the_family_and_sdxl_draws_at_its_native_size(server):
    status, js, _ = server.call("GET", "/v1/models")
    entries = {m["id"]: m for m in js["data"]}
    assert status == 200 and entries["base"]["family"] == "stable-diffusion-xl"
    assert {k: m["kind"] for k, m in entries.items()} == {"base": "base", "lora-xl": "lora", "lora-xl-b": "lora",
                                                          "cn-xl": "controlnet", "lora-sd": "lora",
                                                          "cn-sd": "controlnet", "ti-xl": "textual_inversion",
                                                          "ti-sd": "textual_inversion", "cn-sd-old": "controlnet"}
    # an adapter whose card names another family is listed as unavailable, saying why
    other = {"lora-sd", "cn-sd", "ti-sd"}
    assert all(m["available"] for k, m in entries.items() if k not in other) and all(
        not entries[k]["available"] and entries[k]["family"] == "stable-diffusion" and entries[k]["reason"] ==
        "trained for a stable-diffusion model; this server's model is stable-diffusion-xl" for k in other)
    base, _ = server.generate(prompt="a red circle", n=2)  # no width/height: the model's 64 px
    assert base[0].shape == (64, 64, 3) and np.abs(base[0] - base[1]).max() > 0
    again, _ = server.generate(prompt="a red circle", n=2)
    assert all((a == b).all() for a, b in zip(base, again))
    wide, _ = server.generate(prompt="a red circle", width=96, height=64)
    assert wide[0].shape == (64, 96, 3)


def test_lora_and_controlnet_change_sdxl_images_and_mixed_batches_equal_each_alone(server):
    base, _ = server.generate(prompt="a red circle")
    lora, _ = server.generate(prompt="a red circle", adapter="lora-xl")
    other, _ = server.generate(prompt="a red circle", adapter="lora-xl-b")
    assert np.abs(lora[0] - base[0]).mean() > 1 and np.abs(other[0] - lora[0]).mean() > 1
    controlled, _ = server.generate(prompt="a red circle", control={"model": "cn-xl", "image": b64_png(control_disc())})
    assert np.abs(controlled[0] - base[0]).mean() > 1
    ti_base, _ = server.generate(prompt="a photo of <x-tok>")
    ti, _ = server.generate(prompt="a photo of <x-tok>", adapter="ti-xl")  # the token in both encoders
    assert np.abs(ti[0] - ti_base[0]).mean() > 1
    # eight concurrent requests over three models share the replica's batches: each equals its image alone
    models = ["lora-xl", None, "lora-xl-b"] * 3
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda m: server.generate(prompt="a red circle", **({"adapter": m} if m else {})),
                            models[:8]))
    alone = {"lora-xl": lora[0], None: base[0], "lora-xl-b": other[0]}
    for m, (images, _) in zip(models, got):
        assert np.abs(images[0] - alone[m]).max() <= 1, m  # batching's float noise at most one level


def test_adapters_made_for_another_base_model_are_a_422_naming_the_field(server):
    disc = b64_png(control_disc())
    for body, param in [({"control": {"model": "cn-sd", "image": disc}}, "control.model"),
                        ({"adapter": "lora-sd"}, "adapter"), ({"adapter": "ti-sd"}, "adapter"),
                        ({"adapters": [{"id": "lora-xl"}, {"id": "lora-sd"}]}, "adapters.1.id")]:
        status, js, _ = server.call("POST", "/v1/generate", {"prompt": "a red circle", "steps": 2, **body})
        assert status == 422 and js["error"]["param"] == param, js
        assert "trained for a stable-diffusion model; this server's model is stable-diffusion-xl" in \
            js["error"]["message"], js
    # a card without the family: the replica's load finds the mismatch
    old = {"prompt": "x", "control": {"model": "cn-sd-old", "image": disc}}
    message = server.call("POST", "/v1/generate", old)[1]["error"]["message"]
    assert "cross_attention_dim is 32, the model's 64" in message
    again, _ = server.generate(prompt="a photo of <x-tok>", adapter="ti-xl")  # the replica still serves, TI too
    assert again[0].shape == (64, 64, 3)


def test_openai_client_gets_sdxl_lora_images(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=2)
    result = client.images.generate(model="lora-xl", prompt="a blue square", n=1, size="64x64",
                                    response_format="b64_json", extra_body={"seed": 7})
    want, _ = server.generate(prompt="a blue square", adapter="lora-xl", steps=2)  # the app's default steps
    assert (png_array(result.data[0].b64_json) == want[0]).all()
