"""`diffray export` of a Textual Inversion artifact: kohya writes OUT/<name>.safetensors in the layout A1111 and
ComfyUI take from `embeddings/` (`emb_params`, SDXL's clip_l/clip_g), named after the token, which STOCK diffusers
loads into exactly the trained rows and prompt encoding; diffusers copies the file; peft and tokens that make no
file name are refused before anything is written, with every OUT guarantee of the LoRA export."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from testkit.adapters import random_textual_inversion
from testkit.cli import diffray

from diffray.errors import AdapterError, ConfigError
from diffray.models.lora_formats import export_artifact
from diffray.models.textual_inversion import (TI_WEIGHTS, add_placeholder_tokens, export_textual_inversion,
                                              learned_embeddings, load_textual_inversion, placeholder_tokens)

TOK, NAME = "<star-dust>", "star-dust"
CREATED = "2026-01-02T03:04:05Z"


def _sd_artifact(model_path, folder, num_vectors: int):
    """A TI artifact written by diffray's own exporter from a text encoder whose new rows moved off their init."""
    from diffray.models.loading import load_components

    comps = load_components(model_path)
    ids = add_placeholder_tokens(comps.tokenizer, comps.text_encoder, TOK, "o", num_vectors)
    with torch.no_grad():
        comps.text_encoder.get_input_embeddings().weight[ids] += torch.randn(
            num_vectors, 32, generator=torch.Generator().manual_seed(1))
    card = {"method": "textual_inversion", "base_model": model_path, "family": "stable-diffusion", "steps": 5,
            "created": CREATED, "placeholder_token": TOK, "num_vectors": num_vectors, "weight_name": TI_WEIGHTS}
    trained = learned_embeddings(comps.text_encoder, ids)
    return export_textual_inversion(folder, comps.text_encoder, ids, TOK, card), trained


def _file_artifact(folder, tensors: dict, card: dict):
    """A TI artifact folder from its file's tensors and card alone (no model: layout and name checks)."""
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / TI_WEIGHTS), metadata={"format": "pt"})
    (folder / "diffray_card.json").write_text(json.dumps({"method": "textual_inversion", **card}))
    return folder


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _tree(root):
    return sorted((str(p), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def _hidden(pipe, prompt: str) -> torch.Tensor:
    prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)  # `<tok>` -> all its vectors' tokens
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_sd_embedding_loads_in_stock_diffusers_as_trained(tiny_model_path, tmp_path, monkeypatch, capsys):
    """Before: "not a LoRA artifact but a Textual Inversion embedding"; A1111/ComfyUI users got no file."""
    src, trained = _sd_artifact(tiny_model_path, tmp_path / "ti", num_vectors=2)
    code, said = diffray(["export", src, "--format", "kohya", tmp_path / "out"], monkeypatch, capsys)
    assert code == 0, said
    assert said == f"exported {src} as kohya to {tmp_path / 'out'}: diffray_card.json, {NAME}.safetensors\n"
    tensors, meta = _read(tmp_path / "out" / f"{NAME}.safetensors")
    assert list(tensors) == ["emb_params"] and torch.equal(tensors["emb_params"], trained)
    assert {k: meta[k] for k in ("modelspec.architecture", "modelspec.title", "modelspec.trigger_phrase",
                                 "modelspec.date", "diffray.placeholder_token", "diffray.num_vectors",
                                 "ss_base_model_version", "ss_v2")} == {
        "modelspec.architecture": "stable-diffusion-v1/textual-inversion", "modelspec.title": NAME,
        "modelspec.trigger_phrase": NAME, "modelspec.date": CREATED, "diffray.placeholder_token": TOK,
        "diffray.num_vectors": "2", "ss_base_model_version": "sd_v1", "ss_v2": "False"}
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and not any(str(tmp_path) in v for v in meta.values())
    card = json.loads((tmp_path / "out" / "diffray_card.json").read_text())
    assert card["export_format"] == "kohya" and card["weight_name"] == f"{NAME}.safetensors"
    assert card["placeholder_token"] == TOK and card["base_model"].startswith("<local>/")
    assert f"write '{NAME}' in prompts" in card["usage"] and f"token='{NAME}'" in card["usage"]

    # STOCK diffusers, given the file and the name A1111 would use: the trained rows, and the prompt encoding
    # that diffray's own loader gives the original artifact under its placeholder.
    stock = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    stock.load_textual_inversion(str(tmp_path / "out" / f"{NAME}.safetensors"), token=NAME)
    rows = stock.text_encoder.get_input_embeddings().weight[stock.tokenizer.convert_tokens_to_ids(
        placeholder_tokens(NAME, 2))]
    assert torch.equal(rows, trained)
    ours = load_textual_inversion(StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None), src)
    assert torch.equal(_hidden(stock, f"a photo of {NAME}"), _hidden(ours, f"a photo of {TOK}"))
    assert not torch.equal(_hidden(stock, f"a photo of {NAME}"), _hidden(stock, "a photo of o"))


def test_sdxl_embedding_loads_into_both_stock_encoders_as_trained(tmp_path):
    from diffray.models.loading import resolve_model_path

    xl = resolve_model_path("builtin:tiny-sdxl")
    src = random_textual_inversion(xl, tmp_path / "ti", TOK, seed=3)
    trained = load_file(str(src / TI_WEIGHTS))
    export_artifact(src, "kohya", tmp_path / "out")
    tensors, meta = _read(tmp_path / "out" / f"{NAME}.safetensors")
    assert sorted(tensors) == ["clip_g", "clip_l"] and all(torch.equal(tensors[k], trained[k]) for k in tensors)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["diffray.placeholder_token"] == TOK

    stock = StableDiffusionXLPipeline.from_pretrained(xl, use_safetensors=True)
    for key, encoder, tokenizer in (("clip_l", stock.text_encoder, stock.tokenizer),
                                    ("clip_g", stock.text_encoder_2, stock.tokenizer_2)):
        stock.load_textual_inversion(tensors[key], token=NAME, text_encoder=encoder, tokenizer=tokenizer)
        assert torch.equal(encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids([NAME])], trained[key])
    ours = load_textual_inversion(StableDiffusionXLPipeline.from_pretrained(xl, use_safetensors=True), src)
    encode = lambda pipe, p: pipe.encode_prompt(p, device="cpu", do_classifier_free_guidance=False)  # noqa: E731
    with torch.no_grad():
        got, want = encode(stock, f"a photo of {NAME}"), encode(ours, f"a photo of {TOK}")
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])  # prompt embeds, pooled


@pytest.mark.parametrize("card,arch,version", [
    ({}, "stable-diffusion-v1", "sd_v1"),
    ({"base_model_config": {"text_encoder": {"hidden_act": "gelu"}}}, "stable-diffusion-v2-512", "sd_v2"),
    ({"base_model_config": {"text_encoder": {"hidden_act": "gelu"}, "prediction_type": "v_prediction"}},
     "stable-diffusion-v2-768-v", "sd_v2_v"),
])
def test_the_file_names_the_sd_version_the_card_records(tmp_path, card, arch, version):
    src = _file_artifact(tmp_path / "ti", {TOK: torch.ones(32)}, card)  # a one-vector file saved as [dim]
    export_artifact(src, "kohya", tmp_path / "out")
    tensors, meta = _read(tmp_path / "out" / f"{NAME}.safetensors")
    assert tensors["emb_params"].shape == (1, 32)  # A1111 and diffusers read [n, dim]
    assert meta["modelspec.architecture"] == f"{arch}/textual-inversion" and meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == str(version != "sd_v1")


@pytest.mark.parametrize("token,name", [
    ("<star>", "star"), ("<sks-widget>", "sks-widget"), ("..<.hidden.>", "hidden"), ("v1.5", "v1.5"),
    ('<a/b\\c:d*e?f"g|h>', "abcdefgh"), ("<x y\tz>", "xyz"),
    ("<..>", None), ("<con>", None), ("<LPT1.x>", None), ("<星>", None), ("<" + "a" * 101 + ">", None),
])
def test_the_file_is_named_by_the_token_made_a_safe_file_name(tmp_path, token, name):
    """Path separators, leading dots, characters Windows refuses and device names never reach the file name; a
    token that leaves none is refused naming the field, and an earlier export at OUT stays as it was."""
    good = _file_artifact(tmp_path / "good", {"<good>": torch.ones(1, 32)}, {})
    export_artifact(good, "kohya", tmp_path / "out")
    before = _tree(tmp_path / "out")
    src = _file_artifact(tmp_path / "ti", {token: torch.ones(1, 32)}, {"placeholder_token": token})
    if name is None:
        with pytest.raises(AdapterError, match=rf"^{src / TI_WEIGHTS}: placeholder_token .* cannot name the "
                                               "embedding file"):
            export_artifact(src, "kohya", tmp_path / "out")
        assert _tree(tmp_path / "out") == before and sorted(p.name for p in tmp_path.iterdir()) == ["good", "out", "ti"]
    else:
        export_artifact(src, "kohya", tmp_path / "out")
        assert {p.name for p in (tmp_path / "out").iterdir()} == {"diffray_card.json", f"{name}.safetensors"}


def test_an_sdxl_token_comes_from_the_card_and_is_checked_there(tmp_path):
    pair = {"clip_l": torch.ones(1, 32), "clip_g": torch.ones(1, 32)}
    src = _file_artifact(tmp_path / "none", pair, {"family": "stable-diffusion-xl"})
    with pytest.raises(AdapterError, match=rf"^{src / 'diffray_card.json'}: placeholder_token must name the token"):
        export_artifact(src, "kohya", tmp_path / "out")
    src = _file_artifact(tmp_path / "nul", pair, {"placeholder_token": "<NUL>"})
    with pytest.raises(AdapterError, match=rf"^{src / 'diffray_card.json'}: placeholder_token '<NUL>' cannot name"):
        export_artifact(src, "kohya", tmp_path / "out")
    src = _file_artifact(tmp_path / "sd", {TOK: torch.ones(1, 32)}, {"family": "stable-diffusion-xl"})
    with pytest.raises(AdapterError, match="family 'stable-diffusion-xl', but learned_embeds.safetensors holds a "
                                           "stable-diffusion embedding"):
        export_artifact(src, "kohya", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_peft_is_refused_naming_the_formats_a_ti_has(tmp_path, monkeypatch, capsys):
    src = _file_artifact(tmp_path / "ti", {TOK: torch.ones(1, 32)}, {})
    with pytest.raises(ConfigError, match=r"^format: .* is a Textual Inversion embedding, which has no 'peft' layout; "
                                          r"its formats are kohya \(the A1111/ComfyUI embedding file\) and diffusers"):
        export_artifact(src, "peft", tmp_path / "out")
    code, err = diffray(["export", src, tmp_path / "out", "-f", "peft"], monkeypatch, capsys)
    assert code == 2 and err.startswith("diffray: error: format: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_earlier_export_is_replaced_whole_and_out_is_checked_first(tmp_path):
    """diffusers copies the file as is; OUT is replaced whole; the artifact, a file, or a folder that is no
    export are refused as OUT, as for a LoRA."""
    src = _file_artifact(tmp_path / "ti", {TOK: torch.randn(2, 32)}, {})
    out = tmp_path / "out"
    export_artifact(src, "kohya", out)
    export_artifact(src, "diffusers", out)
    assert sorted(p.name for p in out.iterdir()) == ["diffray_card.json", TI_WEIGHTS]
    assert (out / TI_WEIGHTS).read_bytes() == (src / TI_WEIGHTS).read_bytes()
    assert json.loads((out / "diffray_card.json").read_text())["export_format"] == "diffusers"
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    before = _tree(tmp_path)
    for bad, says in ((src, "is the artifact itself"), (tmp_path / "file", "is a file, not a folder"),
                      (tmp_path / "mine", "is not empty and is not an export")):
        with pytest.raises(ConfigError, match=f"^OUT: {bad}.*{says}"):
            export_artifact(src, "kohya", bad)
    assert _tree(tmp_path) == before
