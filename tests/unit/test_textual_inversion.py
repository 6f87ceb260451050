"""Textual Inversion without Ray: config, token setup, templates, the row guard, one training step's
gradient, and the export -> stock diffusers `load_textual_inversion` round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffray.methods import validate_config
from diffray.errors import ConfigError
from diffray.generate import generate_grid, load_adapter
from diffray.models.adapters import read_card
from diffray.models.loading import load_components
from diffray.models.textual_inversion import (
    TI_WEIGHTS,
    RowGuard,
    add_placeholder_tokens,
    check_tokens,
    export_textual_inversion,
    learned_embeddings,
    placeholder_text,
    placeholder_tokens,
)
from diffray.trainers.components.prompts import OBJECT_TEMPLATES, STYLE_TEMPLATES, template_prompts
from diffray.trainers.session import WorkerEnv
from diffray.trainers.textual_inversion import TextualInversionTrainConfig
from diffray.trainers.textual_inversion.task import TextualInversionTask

TOK = "<sks-widget>"


def _cfg(**ti) -> TextualInversionTrainConfig:
    return TextualInversionTrainConfig.model_validate({"textual_inversion": ti})


def test_config_defaults_and_errors():
    cfg = validate_config({"method": "textual_inversion"})
    assert isinstance(cfg, TextualInversionTrainConfig)
    assert cfg.data.path == "builtin:sample/subject" and cfg.model.path == "builtin:tiny"
    assert cfg.textual_inversion.placeholder_token == TOK and cfg.textual_inversion.num_vectors == 1
    for raw, expected in [
        ({"textual_inversion": {"num_vectors": 0}}, "textual_inversion.num_vectors: Input should be greater than"),
        ({"textual_inversion": {"placeholder_token": "<a b>"}}, "textual_inversion.placeholder_token: String should match"),
        ({"textual_inversion": {"learnable_property": "scene"}},
         "textual_inversion.learnable_property: Input should be 'object' or 'style'"),
        ({"textual_inversion": {"rank": 4}}, "textual_inversion.rank: unknown key (allowed: initializer_token,"),
        ({"strategy": {"zero_stage": 3}}, "strategy.zero_stage: textual inversion trains one small embedding matrix"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate_config({"method": "textual_inversion", **raw})
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_placeholder_names_follow_diffusers_multi_vector_convention():
    assert placeholder_tokens(TOK, 1) == [TOK]
    assert placeholder_tokens(TOK, 3) == [TOK, f"{TOK}_1", f"{TOK}_2"]
    assert placeholder_text(TOK, 3) == f"{TOK} {TOK}_1 {TOK}_2"


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_add_placeholder_tokens_grows_and_initialises_rows(tiny_model_path, num_vectors):
    comps = load_components(tiny_model_path)
    base = comps.text_encoder.get_input_embeddings().weight.detach().clone()
    vocab = len(comps.tokenizer)
    ids = add_placeholder_tokens(comps.tokenizer, comps.text_encoder, TOK, "o", num_vectors)
    assert ids == list(range(vocab, vocab + num_vectors))
    weight = comps.text_encoder.get_input_embeddings().weight
    init_id = comps.tokenizer.encode("o", add_special_tokens=False)[0]
    assert weight.shape == (vocab + num_vectors, base.shape[1])
    assert torch.equal(weight[:vocab], base), "existing rows are untouched"
    assert all(torch.equal(weight[i], base[init_id]) for i in ids)
    # Every vector is one token in a prompt, in order.
    got = comps.tokenizer(f"a photo of {placeholder_text(TOK, num_vectors)}").input_ids
    assert got[-1 - num_vectors:-1] == ids


def test_check_tokens_names_the_field(tiny_model_path):
    tok = load_components(tiny_model_path).tokenizer
    assert check_tokens(tok, TOK, "o", 2) == tok.encode("o", add_special_tokens=False)[0]
    for placeholder, initializer, n, field, text in [
        ("a", "o", 1, "textual_inversion.placeholder_token", "'a' is already in the tokenizer's vocabulary"),
        ("<|endoftext|>", "o", 1, "textual_inversion.placeholder_token", "already in the tokenizer's vocabulary"),
        (TOK, "widget", 1, "textual_inversion.initializer_token", "'widget' tokenizes to 6 tokens"),
        (TOK, "", 1, "textual_inversion.initializer_token", "'' tokenizes to 0 tokens"),
    ]:
        with pytest.raises(ConfigError, match=text) as err:
            check_tokens(tok, placeholder, initializer, n)
        assert err.value.field == field and str(err.value).startswith(field + ": ")
    tok.add_tokens([f"{TOK}_1"])  # a multi-vector name that is taken counts as well
    with pytest.raises(ConfigError, match=r"'<sks-widget>_1' is already"):
        check_tokens(tok, TOK, "o", 2)


def test_template_prompts_are_keyed_per_sample():
    a = template_prompts("object", TOK, [0, 1, 2, 3], step=5, seed=0)
    assert template_prompts("object", TOK, [3, 1], step=5, seed=0) == [a[3], a[1]], "independent of the batch"
    assert a == template_prompts("object", TOK, [0, 1, 2, 3], step=5, seed=0)
    assert all(TOK in p and "{}" not in p for p in a)
    many = template_prompts("object", TOK, list(range(64)), step=1, seed=0)
    assert set(many) <= {t.format(TOK) for t in OBJECT_TEMPLATES} and len(set(many)) > 10
    style = template_prompts("style", "<x> <x>_1", [0, 1], step=1, seed=0)
    assert all(p in {t.format("<x> <x>_1") for t in STYLE_TEMPLATES} for p in style)
    assert (len(OBJECT_TEMPLATES), len(STYLE_TEMPLATES)) == (27, 19)


def test_row_guard_masks_gradients_and_restores_rows():
    weight = torch.nn.Parameter(torch.randn(6, 4))
    base = weight.detach().clone()
    guard = RowGuard(weight, [4, 5]).register()
    opt = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.5)
    (weight ** 2).sum().backward()
    assert torch.equal(weight.grad[:4], torch.zeros(4, 4)) and weight.grad[4:].abs().min() > 0
    opt.step()
    assert not torch.equal(weight[:4], base[:4]), "weight decay moved the frozen rows"
    guard.restore()
    assert torch.equal(weight[:4], base[:4]) and not torch.equal(weight[4:], base[4:])


def test_only_new_rows_get_gradient(tiny_model_path):
    task = TextualInversionTask(_cfg(num_vectors=2), tiny_model_path, WorkerEnv(0, 1, torch.device("cpu"), "fp32"))
    model, ids = task.module, task.token_ids[0]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("embeddings.token_embedding.weight")
    weight = task.comps.text_encoder.get_input_embeddings().weight  # the task registered its RowGuard on it
    g = torch.Generator().manual_seed(0)
    batch = {"sample_id": torch.tensor([0, 1]), "pixel_values": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1}
    loss = task.losses(model, batch, 1).mean()
    loss.backward()
    rows = weight.grad.abs().sum(dim=1)
    assert rows[ids].min() > 0 and rows.nonzero().flatten().tolist() == ids


def _perturbed(tiny_model_path, num_vectors: int):
    comps = load_components(tiny_model_path)
    ids = add_placeholder_tokens(comps.tokenizer, comps.text_encoder, TOK, "o", num_vectors)
    with torch.no_grad():
        comps.text_encoder.get_input_embeddings().weight[ids] += torch.randn(num_vectors, 32,
                                                                         generator=torch.Generator().manual_seed(1))
    return comps, ids


def _hidden(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_export_loads_in_stock_diffusers(tiny_model_path, tmp_path, num_vectors):
    comps, ids = _perturbed(tiny_model_path, num_vectors)
    out = export_textual_inversion(tmp_path / "ti", comps.text_encoder, ids, TOK, {"method": "textual_inversion"})
    weights = load_file(str(out / TI_WEIGHTS))
    assert list(weights) == [TOK] and weights[TOK].shape == (num_vectors, 32)
    assert torch.equal(weights[TOK], learned_embeddings(comps.text_encoder, ids))
    assert read_card(out)["method"] == "textual_inversion"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    run = lambda p: pipe(p, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    base_plain = run("a photo of o")
    load_adapter(pipe, str(out))
    assert pipe.tokenizer.convert_tokens_to_ids(placeholder_tokens(TOK, num_vectors)) == ids
    # The pipeline expands `<tok>` to all its vectors and encodes exactly what training encoded.
    prompt = pipe.maybe_convert_prompt(f"a photo of {TOK}", pipe.tokenizer)
    assert prompt == f"a photo of {placeholder_text(TOK, num_vectors)}"
    assert torch.equal(_hidden(pipe.tokenizer, pipe.text_encoder, prompt),
                       _hidden(comps.tokenizer, comps.text_encoder, prompt))
    assert abs(run(f"a photo of {TOK}") - run("a photo of o")).max() > 1e-3
    assert (run("a photo of o") == base_plain).all(), "prompts without the token are unchanged"


def test_generate_grid_with_textual_inversion(tiny_model_path, tmp_path):
    comps, ids = _perturbed(tiny_model_path, 1)
    out = export_textual_inversion(tmp_path / "ti", comps.text_encoder, ids, TOK,
                                   {"method": "textual_inversion", "base_model": tiny_model_path})
    grid = generate_grid([f"a photo of {TOK}"], str(out), None, tmp_path / "grid.png", steps=2, compare_base=True)
    assert grid.is_file()
