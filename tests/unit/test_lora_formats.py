"""LoRA layouts without Ray: kohya / PEFT exports of a LoRA built with PEFT on the tiny model reproduce
the diffusers artifact's predictions in stock loaders; a kohya file survives import -> export unchanged;
`lora.init_from` starts from the loaded weights; a kohya file in the serve registry loads."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("method,settings,trigger", [
    ("lora", {"data": {"trigger_word": "sks", "resolution": 64}, "model": {"prediction_type": "v_prediction"}}, "sks"),
    ("dreambooth", {"data": {"resolution": 64}, "dreambooth": {"instance_prompt": "a photo of zwx dog"}},
     "a photo of zwx dog"),
])
def test_kohya_export_metadata_names_the_base_model_trigger_and_modelspec(method, settings, trigger, trained,
                                                                          tiny_model_path, tmp_path):
    """A1111/ComfyUI/sd-scripts read the base model (ss_sd_model_name), the trigger and the SAI ModelSpec keys;
    the file carried only rank, alpha and steps. A local base model is named by its folder's name only."""
    import shutil

    from diffray.trainers.dreambooth import DreamBoothTrainConfig
    from diffray.trainers.session import card

    kind = DreamBoothTrainConfig if method == "dreambooth" else LoraTrainConfig
    cfg = kind.model_validate({"run": {"name": "sks-lora"}, **settings,
                               "model": {"path": str(tmp_path / "home" / "sd15-base"), **settings.get("model", {})}})
    trained_card = {**card(cfg, tiny_model_path, {"step": 7}, {}), "created": "2026-12-07T04:45:33Z"}
    if method == "dreambooth":  # what DreamBooth's export adds to the card
        trained_card["instance_prompt"] = cfg.dreambooth.instance_prompt
    src = shutil.copytree(trained["artifact"], tmp_path / "artifact")
    (src / "diffray_card.json").write_text(json.dumps(trained_card))
    path = lora_formats.export_artifact(src, "kohya", tmp_path / "kohya") / "sks-lora.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert {k: v for k, v in meta.items() if k.startswith("modelspec.")} == {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "sks-lora", "modelspec.resolution": "64x64",
        "modelspec.date": "2026-12-07T04:45:33Z", "modelspec.trigger_phrase": trigger,
        "modelspec.description": f"diffray {method} LoRA of sd15-base, 7 steps",
        "modelspec.prediction_type": "v" if method == "lora" else "epsilon"}  # the config's, else the base's
    version = "sd_v1_v" if method == "lora" else "sd_v1"  # sd-scripts' name of a v-prediction SD 1.x LoRA
    assert (meta["ss_sd_model_name"], meta["ss_base_model_version"], meta["ss_v2"], meta["ss_network_dim"]) == (
        "sd15-base", version, "False", "4")
    assert not any(str(tmp_path) in v for v in meta.values())
    if method == "lora":  # still a file stock diffusers loads, with the adapter's outputs
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        assert (_predict(pipe.unet, pipe.text_encoder, _inputs(pipe)) - trained["pred"]).abs().max().item() < 1e-4


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


def _xl_unet_out(unet):
    """The SDXL UNet's prediction on fixed random inputs (both encoders' states, pooled embedding, size ids)."""
    cfg, g = unet.config, torch.Generator().manual_seed(0)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]),
                    encoder_hidden_states=torch.randn(1, 77, cfg.cross_attention_dim, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}).sample


def test_sdxl_unet_lora_kohya_export_loads_in_stock_sdxl_and_says_sdxl(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from diffray.models.adapters import add_lora
    from diffray.models.family import family_of
    from diffray.models.loading import resolve_model_path

    path = resolve_model_path("builtin:tiny-sdxl")
    comps = family_of(path).load(path)
    add_lora(comps.unet, 4, 8.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in comps.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    want = _xl_unet_out(comps.unet)
    artifact = export_lora(tmp_path / "artifact", comps.unet, None,
                           {"family": "stable-diffusion-xl", "config": {"run": {"name": "xl"}}})
    kohya = lora_formats.export_artifact(artifact, "kohya", tmp_path / "kohya") / "xl.safetensors"
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"], meta["modelspec.resolution"]) == (
        "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models", "1024x1024")
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    before = _xl_unet_out(pipe.unet)
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    assert (_xl_unet_out(pipe.unet) - want).abs().max().item() < 1e-4
    assert (before - want).abs().max().item() > 1e-3  # the adapter does change the output


def _synthetic_artifact(folder, components, card):
    """A diffusers-layout LoRA artifact with one rank-2 layer per component (no model needed)."""
    folder.mkdir(parents=True)
    sd = {}
    for c in components:
        sd[f"{c}.blocks.0.to_q.lora.down.weight"] = torch.ones(2, 8)
        sd[f"{c}.blocks.0.to_q.lora.up.weight"] = torch.ones(8, 2)
    save_file(sd, str(folder / "pytorch_lora_weights.safetensors"))
    (folder / "diffray_card.json").write_text(card if isinstance(card, str) else json.dumps(card))
    return folder


@pytest.mark.parametrize("components,family,fmt,refused", [
    (("unet", "text_encoder", "text_encoder_2"), "stable-diffusion-xl", "kohya", "text_encoder, text_encoder_2"),
    (("unet", "text_encoder", "text_encoder_2"), "stable-diffusion-xl", "peft", "text_encoder, text_encoder_2"),
    (("unet", "text_encoder", "text_encoder_2"), None, "kohya", "text_encoder, text_encoder_2"),  # told by its keys
    (("unet", "text_encoder"), "stable-diffusion-xl", "kohya", "text_encoder"),
    (("transformer",), "flux", "kohya", "transformer"),
    (("transformer",), None, "peft", "transformer"),
])
def test_a_format_that_cannot_hold_a_family_lora_is_refused_before_out_exists(components, family, fmt, refused,
                                                                               tmp_path):
    card = {"config": {"run": {"name": "x"}}, **({"family": family} if family else {})}
    artifact = _synthetic_artifact(tmp_path / "artifact", components, card)
    want = family or ("flux" if "transformer" in components else "stable-diffusion-xl")
    with pytest.raises(ConfigError, match=f"format: a {fmt} export .*{want} LoRA.*{refused}") as err:
        lora_formats.export_artifact(artifact, fmt, tmp_path / "out" / fmt)
    assert err.value.field == "format"
    assert not (tmp_path / "out").exists()  # nothing half-written, no empty folder
    # the artifact's own layout holds every component
    done = lora_formats.export_artifact(artifact, "diffusers", tmp_path / "copy")
    assert sorted(p.name for p in done.iterdir()) == ["diffray_card.json", "pytorch_lora_weights.safetensors"]


@pytest.mark.parametrize("fmt", lora_formats.FORMATS)
def test_export_bad_out_or_card_is_one_typed_error_and_writes_nothing(fmt, tmp_path):
    from diffray.errors import AdapterError, StorageError

    artifact = _synthetic_artifact(tmp_path / "artifact", ("unet",), {"config": {"run": {"name": "x"}}})
    before = {p.name: p.read_bytes() for p in artifact.iterdir()}
    for out in (artifact, tmp_path / "artifact" / ".." / "artifact"):
        with pytest.raises(ConfigError, match="OUT: .* is the artifact itself") as err:
            lora_formats.export_artifact(artifact, fmt, out)
        assert err.value.field == "OUT"
    assert {p.name: p.read_bytes() for p in artifact.iterdir()} == before  # the source is never written to
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="OUT: .*a_file is a file, not a folder"):
        lora_formats.export_artifact(artifact, fmt, a_file)
    with pytest.raises(StorageError, match="a_file/sub: cannot write"):
        lora_formats.export_artifact(artifact, fmt, a_file / "sub")
    bad = _synthetic_artifact(tmp_path / "bad", ("unet",), "{bad")
    with pytest.raises(AdapterError, match="bad/diffray_card.json: not valid JSON"):
        lora_formats.export_artifact(bad, fmt, tmp_path / "out" / "deep")
    with pytest.raises(AdapterError, match="listcard/diffray_card.json: not a JSON object"):
        lora_formats.export_artifact(_synthetic_artifact(tmp_path / "listcard", ("unet",), "[]"), fmt, tmp_path / "o")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_export_that_fails_while_writing_removes_the_folders_it_made(tmp_path, monkeypatch):
    from diffray.errors import StorageError

    artifact = _synthetic_artifact(tmp_path / "artifact", ("unet",), {"config": {"run": {"name": "x"}}})
    prev = lora_formats.export_artifact(artifact, "kohya", tmp_path / "prev")
    before = {p.name: p.read_bytes() for p in prev.iterdir()}

    def disk_full(weights, out_dir, card):
        (out_dir / "x.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_formats, "write_kohya", disk_full)
    with pytest.raises(StorageError, match="new/kohya: cannot write the kohya export \\(No space left on device\\)"):
        lora_formats.export_artifact(artifact, "kohya", tmp_path / "new" / "kohya")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made is kept
    with pytest.raises(StorageError):
        lora_formats.export_artifact(artifact, "kohya", tmp_path / "mine")
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    with pytest.raises(StorageError):  # an earlier export at OUT is kept whole (replaced only when complete)
        lora_formats.export_artifact(artifact, "kohya", prev)
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == before


def test_export_command_refusals_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from testkit.cli import diffray

    artifact = _synthetic_artifact(tmp_path / "artifact", ("unet", "text_encoder", "text_encoder_2"),
                                   {"family": "stable-diffusion-xl"})
    for args in ([artifact, tmp_path / "out", "-f", "kohya"], [artifact, artifact, "-f", "diffusers"]):
        code, err = diffray(["export", *args], monkeypatch, capsys)
        assert code == 2 and err.startswith("diffray: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
