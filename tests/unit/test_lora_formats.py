"""LoRA layouts without Ray: kohya / PEFT exports of a LoRA built with PEFT on the tiny model reproduce
the diffusers artifact's predictions in stock loaders; a kohya file survives import -> export unchanged;
`lora.init_from` starts from the loaded weights; a kohya file in the serve registry loads."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffray.errors import ConfigError
from diffray.models import lora_formats
from diffray.models.adapters import export_lora
from diffray.models.loading import load_components
from diffray.trainers.denoising import lora_denoiser
from diffray.trainers.lora import LoraTrainConfig

LORA = {"rank": 4, "alpha": 8, "train_text_encoder": True}  # alpha != rank: the scale must survive


def _inputs(comps):
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    ids = comps.tokenizer(["a red circle", "a blue star"], padding="max_length", truncation=True,
                          max_length=comps.tokenizer.model_max_length, return_tensors="pt").input_ids
    return latents, t, ids


def _predict(unet, text_encoder, inputs):
    latents, t, ids = inputs
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=text_encoder(ids)[0]).sample


def _lora_model(path, **lora):
    comps = load_components(path)
    cfg = LoraTrainConfig.model_validate({"lora": {**LORA, **lora}})
    return comps, lora_denoiser(comps, cfg.lora, cfg.run.seed)


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """A perturbed ("trained") UNet + text-encoder LoRA, its diffusers artifact and its prediction."""
    comps, model = _lora_model(tiny_model_path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    artifact = export_lora(tmp_path_factory.mktemp("lora") / "artifact", comps.unet, comps.text_encoder,
                           {"method": "lora", "steps": 7, "config": {"run": {"name": "sks-lora"}}})
    return {"artifact": artifact, "pred": _predict(comps.unet, comps.text_encoder, _inputs(comps))}


def _kohya(trained, tmp_path):
    out = lora_formats.export_artifact(trained["artifact"], "kohya", tmp_path / "kohya")
    return out / "sks-lora.safetensors"


def test_kohya_export_loads_in_stock_diffusers_and_reproduces_outputs(trained, tiny_model_path, tmp_path):
    path = _kohya(trained, tmp_path)
    sd = load_file(str(path))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in sd)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in sd} == {"lora_down", "lora_up",
                                                                                         "alpha"}
    assert all(v.item() == 8.0 for k, v in sd.items() if k.endswith(".alpha"))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("4", "8", "7")
    assert (path.parent / "diffray_card.json").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    before = _predict(pipe.unet, pipe.text_encoder, _inputs(pipe))
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    got = _predict(pipe.unet, pipe.text_encoder, _inputs(pipe))
    assert (got - trained["pred"]).abs().max().item() < 1e-4
    assert (before - trained["pred"]).abs().max().item() > 1e-2  # the adapter does change the output


def test_kohya_file_round_trips_import_export_unchanged(trained, tiny_model_path, tmp_path):
    original = _kohya(trained, tmp_path)
    comps, model = _lora_model(tiny_model_path, init_from=str(original))  # import into a fresh LoRA
    again = export_lora(tmp_path / "again", comps.unet, comps.text_encoder,
                        {"config": {"run": {"name": "sks-lora"}}})
    back = lora_formats.export_artifact(again, "kohya", tmp_path / "kohya2") / original.name
    a, b = load_file(str(original)), load_file(str(back))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_starts_at_the_loaded_weights(trained, tiny_model_path, tmp_path):
    artifact = str(trained["artifact"])
    for source in (artifact, str(_kohya(trained, tmp_path))):
        comps, model = _lora_model(tiny_model_path, init_from=source)
        got = _predict(comps.unet, comps.text_encoder, _inputs(comps))
        assert (got - trained["pred"]).abs().max().item() < 1e-5, source
    fresh = {k: v for k, v in load_file(f"{artifact}/pytorch_lora_weights.safetensors").items()}
    exported = load_file(str(export_lora(tmp_path / "x", comps.unet, comps.text_encoder, {}) /
                             "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(fresh[k], exported[k]) for k in fresh)
    # another alpha: rescaled so the loaded delta is unchanged
    comps, model = _lora_model(tiny_model_path, init_from=artifact, alpha=2)
    assert (_predict(comps.unet, comps.text_encoder, _inputs(comps)) - trained["pred"]).abs().max() < 1e-5


def test_peft_export_loads_with_peft(trained, tiny_model_path, tmp_path):
    from peft import PeftModel

    out = lora_formats.export_artifact(trained["artifact"], "peft", tmp_path / "peft")
    comps = load_components(tiny_model_path)
    unet = PeftModel.from_pretrained(comps.unet, str(out / "unet"))
    te = PeftModel.from_pretrained(comps.text_encoder, str(out / "text_encoder"))
    got = _predict(unet, te, _inputs(comps))
    assert (got - trained["pred"]).abs().max().item() < 1e-4


def test_bad_sources_are_refused_naming_the_field(trained, tiny_model_path, tmp_path):
    with pytest.raises(ConfigError, match=r"lora.init_from: .*rank 4 .* lora.rank is 8"):
        _lora_model(tiny_model_path, init_from=str(trained["artifact"]), rank=8)
    with pytest.raises(ConfigError, match="lora.init_from: .*text-encoder LoRA"):
        _lora_model(tiny_model_path, init_from=str(trained["artifact"]), train_text_encoder=False)
    pt = tmp_path / "x.ckpt"
    pt.write_bytes(b"not a pickle we would read")
    with pytest.raises(ConfigError, match="lora.init_from: .*x.ckpt: not a .safetensors file"):
        _lora_model(tiny_model_path, init_from=str(pt))
    alien = tmp_path / "alien.safetensors"
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(8, 4)}, str(alien))
    with pytest.raises(ConfigError, match="lora_unet_nowhere_to_q names no module of this model"):
        _lora_model(tiny_model_path, init_from=str(alien))
    dora = tmp_path / "dora"
    dora.mkdir()
    sd = load_file(f"{trained['artifact']}/pytorch_lora_weights.safetensors")
    save_file({**sd, "unet.mid_block.attentions.0.proj_in.lora_magnitude_vector": torch.ones(32)},
              str(dora / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ConfigError, match="unsupported key unet.mid_block.attentions.0.proj_in.lora_magnitude"):
        lora_formats.export_artifact(dora, "kohya", tmp_path / "o")  # refused, never silently dropped
    from diffray.trainers.lora import METHOD

    missing = LoraTrainConfig.model_validate({"lora": {"init_from": str(tmp_path / "gone.safetensors")}})
    with pytest.raises(ConfigError, match="lora.init_from: .*gone.safetensors: no such LoRA file or folder"):
        METHOD.check(missing, tiny_model_path)  # on the driver, before Ray starts
    with pytest.raises(ConfigError, match="format: 'ckpt' is not one of diffusers, kohya, peft"):
        lora_formats.export_artifact(trained["artifact"], "ckpt", tmp_path / "o")


def test_export_command_writes_the_format_and_the_card(trained, tmp_path):
    from typer.testing import CliRunner

    from diffray.cli import app

    out = tmp_path / "cli-kohya"
    result = CliRunner().invoke(app, ["export", str(trained["artifact"]), str(out), "--format", "kohya"])
    assert result.exit_code == 0, result.output
    assert "diffray_card.json, sks-lora.safetensors" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["diffray_card.json", "sks-lora.safetensors"]


def test_rslora_kohya_export_keeps_its_scale_and_init_from_needs_plain_lora(tiny_model_path, tmp_path):
    """rsLoRA scales by alpha / sqrt(rank): its kohya file carries alpha x sqrt(rank), so stock diffusers
    (alpha / rank) reproduces it; starting another variant from a plain LoRA file is refused by name."""
    comps, model = _lora_model(tiny_model_path, variant="rslora", train_text_encoder=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    want = _predict(comps.unet, comps.text_encoder, _inputs(comps))
    artifact = export_lora(tmp_path / "artifact", comps.unet, None, {"config": {"run": {"name": "rs"}}})
    path = lora_formats.export_artifact(artifact, "kohya", tmp_path / "kohya") / "rs.safetensors"
    assert all(v.item() == pytest.approx(8 * 2.0) for k, v in load_file(str(path)).items() if k.endswith(".alpha"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    assert (_predict(pipe.unet, pipe.text_encoder, _inputs(pipe)) - want).abs().max().item() < 1e-4
    with pytest.raises(Exception, match="lora.init_from needs lora.variant lora"):
        LoraTrainConfig.model_validate({"lora": {**LORA, "variant": "dora", "init_from": str(path)}})


def test_preflight_refuses_a_missing_init_from_and_formats_that_cannot_carry_the_variant(tmp_path):
    from diffray.trainers.lora import preflight

    def cfg(**sections):
        return LoraTrainConfig.model_validate(sections)

    with pytest.raises(ConfigError, match="no such LoRA file or folder") as err:
        preflight(cfg(lora={"init_from": str(tmp_path / "missing.safetensors")}), "unused")
    assert err.value.field == "lora.init_from"
    with pytest.raises(ConfigError, match=r"\['kohya'\] hold plain LoRA layers only, not a loha") as err:
        preflight(cfg(lora={"variant": "loha"}, export={"formats": ["kohya", "diffusers"]}), "unused")
    assert err.value.field == "export.formats"
    preflight(cfg(lora={"variant": "rslora"}, export={"formats": ["kohya", "peft"]}), "unused")  # alpha folded
    preflight(cfg(lora={"variant": "dora"}, export={"formats": ["diffusers"]}), "unused")
