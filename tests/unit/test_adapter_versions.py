"""An adapter is matched to its base by Stable Diffusion version, not by family only. Its card records the base it
trained on (`base_model_config`: the text encoder's activation and width, exact GELU and 1024 for SD 2.x); an SD
2.x adapter on an SD 1.x base (or the reverse) is refused before anything loads, naming the adapter, what it was
trained on and what the base is: by `diffray generate --adapter` and `diffray eval`, and by the server, which
lists it unavailable with that reason and refuses it with 422, as it does an adapter of another family. A card
written before the field existed is accepted by generate and eval (loading names a LoRA of another shape); the
server matches its LoRA's cross-attention shapes, read from the header, so that its listing says so; with neither,
it is accepted as before. The bases are config files only (no weights): what the check reads. No Ray cluster.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save as st_save
from testkit.cli import diffray

from diffray.errors import RequestError
from diffray.serve.registry import AdapterRegistry, base_problem

SD1 = {"text_encoder": {"hidden_act": "quick_gelu", "hidden_size": 768}, "prediction_type": "epsilon"}
SD2 = {"text_encoder": {"hidden_act": "gelu", "hidden_size": 1024}, "prediction_type": "v_prediction"}
CROSS_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"


def sd_base(folder, version: dict):
    """A Stable Diffusion model dir holding the configs that tell its version (a UNet config as wide)."""
    width = version["text_encoder"]["hidden_size"]
    for name, config in (("model_index.json", {"_class_name": "StableDiffusionPipeline"}),
                         ("unet/config.json", {"cross_attention_dim": width}),
                         ("text_encoder/config.json", version["text_encoder"]),
                         ("scheduler/scheduler_config.json", {"_class_name": "DDPMScheduler",
                                                              "prediction_type": version["prediction_type"]})):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    return folder


def lora(folder, card: dict | None, width: int = 768):
    """A LoRA artifact dir (cross-attention layers taking `width`-wide text states) with `card` (None: no card)."""
    folder.mkdir(parents=True)
    weights = {CROSS_K: np.ones((4, width), np.float32), CROSS_K.replace("lora_A", "lora_B"): np.zeros((320, 4),
                                                                                                          np.float32)}
    (folder / "pytorch_lora_weights.safetensors").write_bytes(st_save(weights))
    if card is not None:
        (folder / "diffray_card.json").write_text(json.dumps(card))
    return folder


def card_of(version: dict) -> dict:
    return {"family": "stable-diffusion", "method": "lora", "base_model_config": version}


@pytest.mark.parametrize("adapter,base,why", [
    (SD2, SD1, "trained on SD 2.x (cross-attention 1024), but the base model is SD 1.x (768)"),
    (SD1, SD2, "trained on SD 1.x (cross-attention 768), but the base model is SD 2.x (1024)"),
])
def test_generate_refuses_an_adapter_of_another_sd_version_in_one_line(tmp_path, adapter, base, why, monkeypatch,
                                                                       capsys):
    folder = lora(tmp_path / "x", card_of(adapter), adapter["text_encoder"]["hidden_size"])
    code, out = diffray(["generate", "-p", "a red circle", "--model", sd_base(tmp_path / "base", base), "--adapter",
                         folder, "--out", tmp_path / "out" / "grid.png"], monkeypatch, capsys)
    assert code == 2, out
    assert out.startswith(f"diffray: error: --adapter: {folder}: {why}; give --model the adapter's base")
    assert out.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_eval_refuses_an_adapter_of_another_sd_version_and_accepts_one_that_fits_or_does_not_say(tmp_path):
    from diffray.errors import ConfigError
    from diffray.generate import check_family
    from diffray.world.evaluate import check_inputs

    base = str(sd_base(tmp_path / "base", SD1))
    with pytest.raises(ConfigError, match=r"trained on SD 2\.x \(cross-attention 1024\), but the base model is "
                                          r"SD 1\.x \(768\)") as err:
        check_inputs(base, str(lora(tmp_path / "v2", card_of(SD2), 1024)), None, 4, 7.5, 64, 1)
    assert err.value.field == "adapter"
    # accepted: the same version; a card older than the field (generate leaves its shapes to the loader, which
    # names a LoRA of another shape in one line); no card
    for name, card, width in (("same", card_of(SD1), 768), ("old_card", {"family": "stable-diffusion"}, 1024),
                              ("no_card", None, 768)):
        check_family(card or {}, str(lora(tmp_path / name, card, width)), base, "--adapter")


def _ingress(registry, base: dict):
    """The serve Ingress's adapter checks on a stand-in `self` (no Ray cluster): family, SD version, registry."""
    from diffray.serve.deployments import Ingress

    cls = Ingress.func_or_class
    self = SimpleNamespace(family="stable-diffusion", base_version=base, registry=registry)
    self._family_problem = partial(cls._family_problem, self)
    return self, partial(cls._check_adapters, self)


def test_the_server_lists_an_adapter_of_another_sd_version_unavailable_and_refuses_it_with_422(tmp_path):
    root = tmp_path / "adapters"
    lora(root / "v2", card_of(SD2), 1024)
    lora(root / "v1", card_of(SD1), 768)
    lora(root / "old", {"family": "stable-diffusion", "method": "lora"}, 768)  # a card older than the field
    (root / "bare2.safetensors").write_bytes((root / "v2" / "pytorch_lora_weights.safetensors").read_bytes())
    registry = AdapterRegistry(root)
    ingress, check = _ingress(registry, SD1)
    reasons = {a.id: a.problem or ingress._family_problem(a) for a in registry.list()}
    assert reasons == {"v2": "trained on SD 2.x (cross-attention 1024); this server's model is SD 1.x (768)",
                       "v1": None, "old": None,
                       "bare2": "trained on a model of cross-attention 1024; this server's model is SD 1.x (768)"}
    with pytest.raises(RequestError) as err:
        asyncio.run(check(SimpleNamespace(adapters=[("v1", 1.0), ("v2", 1.0)]), None))
    assert (err.value.status, err.value.param) == (422, "adapters.1.id")
    assert err.value.message == ("adapter 'v2' is unavailable: trained on SD 2.x (cross-attention 1024); this server's "
                                  "model is SD 1.x (768)")
    asyncio.run(check(SimpleNamespace(adapters=[("v1", 1.0), ("old", 0.5)]), None))  # accepted as before


def test_base_problem_leaves_other_families_and_unknown_bases_to_the_family_check(tmp_path):
    from diffray.models.family import base_version

    root = tmp_path / "adapters"
    lora(root / "xl", {"family": "stable-diffusion-xl", "base_model_config": SD2}, 2048)
    lora(root / "v2", card_of(SD2), 1024)
    xl, v2 = AdapterRegistry(root).get("xl"), AdapterRegistry(root).get("v2")
    assert base_problem(xl, SD1) is None  # another family: refused by the family check, with its own reason
    assert base_problem(v2, None) is None  # a base whose version is unknown (not SD, or unreadable configs)
    assert base_version("stable-diffusion", str(sd_base(tmp_path / "sd2", SD2))) == SD2
    assert base_version("stable-diffusion-xl", str(tmp_path / "sd2")) is None
    assert base_version("stable-diffusion", str(tmp_path / "missing")) is None  # logged; matched by family only


@pytest.mark.parametrize("key", [
    CROSS_K, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight",  # kohya
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight",  # kohya, SD's own block names
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight",  # attention procs
])
def test_a_card_less_loras_cross_attention_width_is_read_from_every_key_layout(key):
    from diffray.serve.artifacts import base_mismatch

    tensors = ((key, (4, 1024)), ("unet.x.attn1.to_k.lora_A.weight", (4, 320)))
    assert base_mismatch({}, tensors, SD1) == ("a model of cross-attention 1024", "SD 1.x (768)")
    assert base_mismatch({}, tensors, SD2) is None
