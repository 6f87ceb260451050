"""Textual Inversion without Ray: config, token setup, templates, the row guard, one training step's
gradient, and the export -> stock diffusers `load_textual_inversion` round trip."""

from __future__ import annotations

import re

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
    has_word,
    learned_embeddings,
    placeholder_text,
    placeholder_tokens,
    substitute_tokens,
    word_ends,
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
        ({"textual_inversion": {"rank": 4}}, "textual_inversion.rank: unknown key (allowed: captions, concept_word, initializer_token,"),
        ({"strategy": {"zero_stage": 3}}, "strategy.zero_stage: textual inversion trains one small embedding matrix"),
        ({"textual_inversion": {"concept_word": "star"}},
         "textual_inversion.concept_word: names a word of the dataset's captions; it needs textual_inversion.captions: "
         "dataset"),
        ({"textual_inversion": {"captions": "dataset", "concept_word": "two words"}},
         "textual_inversion.concept_word: String should match"),
        ({"export": {"formats": ["kohya", "peft"]}}, "export.formats: a Textual Inversion embedding has no peft "
                                                      "layout; its formats are kohya"),
        ({"export": {"formats": ["kohya"]}, "textual_inversion": {"placeholder_token": "<nul>"}},
         "export.formats: kohya: textual_inversion.placeholder_token: placeholder_token '<nul>' cannot name the "
         "embedding file (a Windows device name"),
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


def test_dataset_captions_swap_the_word_for_the_token_as_the_tokenizer_would():
    """The ids `substitute_tokens` makes from the pipeline's tokenized captions equal tokenizing the caption with
    the word replaced in the text, by the tokenizer that knows the placeholder: one and three vectors, the word
    twice, next to punctuation, not inside another word, and a caption truncated at 77 tokens."""
    from diffray.data.transforms import tokenize_captions
    from diffray.models.loading import resolve_model_path

    path = resolve_model_path("builtin:tiny")  # the world model's word-level tokenizer
    for num_vectors, word, tok_path in [(1, "star", path), (3, "star", path), (1, "star", None), (2, "<star>", None)]:
        base = load_components(tok_path or _tiny_random()).tokenizer
        captions = ["a large cyan striped star on the left on a black background", "a star, a star", "star",
                    "a superstar and a starry star", "stars " * 80 + "star", "a red circle on a blue background"]
        if tok_path == path:  # 74 one-token words: three vectors each push it past 77 tokens
            captions.append("a " * 72 + "star star")
        if word.startswith("<"):  # the placeholder written in the captions themselves
            captions = [c.replace("star", word) if "star" in c.split() else c for c in captions[:3]] + [
                f"a {word} on a blue background"]
        ids = torch.from_numpy(tokenize_captions(base, captions, None))
        word_ids = base.encode(word, add_special_tokens=False)
        ends = word_ends(base)
        base.add_tokens(placeholder_tokens("<s>", num_vectors))
        new = base.convert_tokens_to_ids(placeholder_tokens("<s>", num_vectors))
        got = substitute_tokens(ids, word_ids, new, base.eos_token_id, base.pad_token_id, ends)
        text = placeholder_text("<s>", num_vectors)
        # a placeholder written in a caption is found only with spaces around it: '<star>,' splits as '<', 'star', '>,'
        after = r"(?=\s|$)" if word.startswith("<") else r"(?=[\s,]|$)"
        want = [re.sub(rf"(?<!\S){re.escape(word)}{after}", text, c) for c in captions]
        assert want[0] == f"a large cyan striped {text} on the left on a black background"
        assert torch.equal(got, torch.from_numpy(tokenize_captions(base, want, None))), (num_vectors, word, tok_path)
        assert got.shape == ids.shape and (got == new[0]).any(dim=1).tolist()[:3] == [True, True, True]
    # the preflight check finds the word where the swap would
    tok = load_components(path).tokenizer
    assert has_word(tok, "a red star on a blue background", "star") and has_word(tok, "<x> on blue", "<x>")
    assert not has_word(tok, "a red circle", "star") and not has_word(tok, "a superstar", "star")
    assert not has_word(tok, "stars " * 80 + "star", "star"), "past the 77 tokens training sees"
    assert not has_word(tok, "a <x>, on blue", "<x>"), "'>,' is one piece"


def _tiny_random() -> str:
    from diffray.models.loading import resolve_model_path

    return resolve_model_path("builtin:tiny-random")


def test_dataset_caption_prompts_put_the_token_in_the_batch_captions(tiny_model_path):
    """`captions: dataset`: the task's prompt ids are the batch's own captions with the word's ids swapped for
    the token's; templates are not drawn."""
    from diffray.data.transforms import tokenize_captions

    cfg = _cfg(captions="dataset", concept_word="oo", initializer_token="o", num_vectors=2)
    task = TextualInversionTask(cfg, tiny_model_path, WorkerEnv(0, 1, torch.device("cpu"), "fp32"))
    tok = task.comps.tokenizer  # now holds the placeholder
    captions = ["a oo b", "no word here", "oo oo"]
    batch = {"sample_id": torch.tensor([0, 1, 2]),
             "input_ids": torch.from_numpy(tokenize_captions(load_components(tiny_model_path).tokenizer, captions,
                                                             None))}
    text = placeholder_text(TOK, 2)
    want = tokenize_captions(tok, ["a " + text + " b", "no word here", text + " " + text], None)
    assert torch.equal(task.prompt_ids(batch, step=3), torch.from_numpy(want))
    templated = TextualInversionTask(_cfg(initializer_token="o"), tiny_model_path,
                                     WorkerEnv(0, 1, torch.device("cpu"), "fp32")).prompt_ids(batch, step=3)
    assert not torch.equal(templated, batch["input_ids"])


def test_dataset_caption_prompts_on_sdxl_swap_the_word_in_both_tokenizers(tmp_path):
    """SDXL's batches hold both tokenizers' ids [B, 2, 77]; each gets its own tokenizer's token ids (and padding)."""
    from diffray.data.transforms import tokenize_captions
    from diffray.models.tiny import build_pipeline_dir

    xl = str(build_pipeline_dir(tmp_path / "xl", "tiny-sdxl", seed=0))
    cfg = _cfg(captions="dataset", concept_word="oo", initializer_token="o")
    cfg.model.path = xl
    task = TextualInversionTask(cfg, xl, WorkerEnv(0, 1, torch.device("cpu"), "fp32"))
    fresh = load_components(xl, second_encoder=True)
    captions = ["a oo b", "oo"]
    ids = torch.from_numpy(tokenize_captions(fresh.tokenizer, captions, fresh.tokenizer_2))
    assert ids.shape == (2, 2, 77)
    got = task.prompt_ids({"sample_id": torch.tensor([0, 1]), "input_ids": ids}, step=0)
    want = tokenize_captions(task.comps.tokenizer, ["a " + TOK + " b", TOK], task.comps.tokenizer_2)
    assert torch.equal(got, torch.from_numpy(want)) and (got[:, 1] == task.token_ids[1][0]).any(dim=1).all()


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
