"""ImageEngine without Ray: resident adapters switch without a reload, shared adapters are reference
counted, batches equal single calls, seeds are deterministic, TI tokens load and unload and reach only the
prompts of the jobs that ask for them. The hardening
cases (a job fails alone, broken or replaced artifacts, cancellation between steps) are in
test_serve_engine_faults.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffray.serve.config import parse_args
from diffray.serve.schemas import Job


@pytest.fixture(scope="module")
def engine(tiny_model_path, tmp_path_factory):
    from testkit.adapters import random_lora, random_textual_inversion
    from diffray.models.lora_formats import export_artifact
    from diffray.serve.engine import ImageEngine

    reg = tmp_path_factory.mktemp("reg")
    random_lora(tiny_model_path, reg / "a", seed=1)
    random_lora(tiny_model_path, reg / "b.v2", seed=2)
    random_lora(tiny_model_path, reg / "te", seed=4, text_encoder=True)
    random_lora(tiny_model_path, reg / "dora", seed=5, variant="dora")
    random_lora(tiny_model_path, reg / "rs", seed=6, variant="rslora")
    random_textual_inversion(tiny_model_path, reg / "t", "<t-tok>", seed=3)
    random_textual_inversion(tiny_model_path, reg / "t-twin", "<t-tok>", seed=7)  # another tenant, same token
    random_textual_inversion(tiny_model_path, reg / "sks", "sks", seed=8)  # a token that is also part of words
    kohya = export_artifact(reg / "a", "kohya", tmp_path_factory.mktemp("kohya")) / "lora.safetensors"
    kohya.rename(reg / "a-kohya.safetensors")  # "a" as A1111/ComfyUI users ship it: a bare kohya file
    return ImageEngine(parse_args({"model": tiny_model_path, "adapters_dir": str(reg)}), device="cpu")


def job(**kw) -> Job:
    return Job(**{"prompt": "a red circle", "n": 1, "width": 64, "height": 64, "steps": 3, "guidance": 7.5,
                  "seed": 5, **kw})


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_native_size_and_determinism(engine):
    assert engine.native_size == 64
    one, two = engine.run([job()]), engine.run([job()])
    assert one == two
    assert engine.run([job(seed=6)]) != one


def test_batch_equals_single_calls(engine):
    a, b = job(prompt="x", seed=1), job(prompt="y", seed=2, n=2)
    batched = engine.run([a, b])
    single = engine.run([a]) + engine.run([b])
    for got, want in zip(sum(batched, []), sum(single, [])):
        assert np.abs(pixels(got) - pixels(want)).max() <= 1  # fp noise of batch shape, at most one level


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("guidance", [7.5, 1.0])  # with and without classifier-free guidance's stacked halves
def test_mixed_batch_equals_each_job_alone(engine, mix, guidance, monkeypatch):
    """One `run` with base, adapter a, a at weight 0.5, b at 0.7 (n=2), TI t and a+b (same seed, same shape):
    every job gets the image it gets alone. Mixed-adapter batching puts base, a, b and t in one call (each
    row its own LoRA); a at 0.5 needs a call of its own (one scale per LoRA per call), and so does a+b
    (two LoRAs). Without it, one call per adapter set and weights."""
    monkeypatch.setattr(engine.args.batching, "mix_adapters", mix)
    sets = [(), (("a", 1.0),), (("a", 0.5),), (("b.v2", 0.7),), (("t", 1.0),), (("a", 1.0), ("b.v2", 0.5))]
    jobs = [job(adapters=s, guidance=guidance, n=2 if i == 3 else 1) for i, s in enumerate(sets)]
    engine.acquire(["a", "b.v2", "t"])
    try:
        alone = [[pixels(png) for png in engine.run([j])[0]] for j in jobs]
        mixed = engine.run(jobs)
        assert engine.batch_log[-1] == (len(sets), 3 if mix else len(sets))
    finally:
        engine.release(["a", "b.v2", "t"])
    for i, (got, want) in enumerate(zip(mixed, alone)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert np.abs(pixels(g) - w).max() <= 1, sets[i]  # at most one level of batch-shape fp noise
    firsts = [w[0] for w in alone]
    assert min(np.abs(x - y).mean() for i, x in enumerate(firsts[:4]) for y in firsts[i + 1:4]) > 1  # LoRAs differ


def test_loras_with_a_text_encoder_part_or_dora_run_in_calls_of_their_own(engine):
    """A text-encoder LoRA would change every prompt of a shared call, a DoRA has another form: each gets its
    own call beside the mixed one (a, base and an rsLoRA at 0.8), and every image is the one the job gets
    alone."""
    jobs = [job(adapters=(("te", 1.0),)), job(adapters=(("a", 1.0),)), job(adapters=(("dora", 1.0),)), job(),
            job(adapters=(("rs", 0.8),))]
    engine.acquire(["te", "a", "dora", "rs"])
    try:
        alone = [pixels(engine.run([j])[0][0]) for j in jobs]
        mixed = engine.run(jobs)
        assert engine.batch_log[-1] == (5, 3)
    finally:
        engine.release(["te", "a", "dora", "rs"])
    for got, want in zip(mixed, alone):
        assert np.abs(pixels(got[0]) - want).max() <= 1
    assert all(np.abs(alone[i] - alone[3]).mean() > 1 for i in (0, 2, 4))  # each adapter changes the image


def test_adapters_switch_share_and_unload(engine):
    base = engine.run([job()])
    engine.acquire(["a"])
    engine.acquire(["a", "b.v2"])
    with_a = engine.run([job(adapters=(("a", 1.0),))])
    with_b = engine.run([job(adapters=(("b.v2", 1.0),))])
    both = engine.run([job(adapters=(("a", 1.0), ("b.v2", 0.5)))])
    assert len({with_a[0][0], with_b[0][0], both[0][0], base[0][0]}) == 4
    assert engine.run([job()]) == base  # resident adapters are off for base requests
    assert engine.run([job(adapters=(("a", 1.0),))]) == with_a
    engine.release(["a", "b.v2"])  # a still held by the first set
    assert set(engine.resident) == {"a"}
    engine.release(["a"])
    assert engine.resident == {} and engine.pipe.get_list_adapters() in ({}, {"unet": []})
    assert engine.run([job()]) == base


def test_a_kohya_file_in_the_registry_serves_like_its_diffusers_artifact(engine):
    with_a = pixels(engine.run([job(adapters=(("a", 1.0),))])[0][0])
    with_kohya = pixels(engine.run([job(adapters=(("a-kohya", 1.0),))])[0][0])
    assert np.abs(with_kohya - with_a).max() <= 1  # same weights, converted on load
    assert np.abs(with_kohya - pixels(engine.run([job()])[0][0])).mean() > 1  # and it is applied
    engine.release([])
    assert engine.registry.get("a-kohya").weights_name == "a-kohya.safetensors"


def test_textual_inversion_loads_and_unloads(engine):
    vocab = len(engine.pipe.tokenizer)
    plain = engine.run([job(prompt="a <t-tok>")])
    engine.acquire(["t"])
    assert len(engine.pipe.tokenizer) == vocab + 1
    with_t = engine.run([job(prompt="a <t-tok>", adapters=(("t", 1.0),))])
    assert with_t != plain
    engine.release(["t"])
    assert len(engine.pipe.tokenizer) == vocab


def test_a_resident_textual_inversion_reaches_only_the_jobs_that_ask_for_it(engine):
    """A prompt holding a resident TI's token (in any case, or inside a word) reads it as plain text unless
    the job asks for that TI: the image is the one a replica without the TI gives, alone or in a call beside
    the TI's job. The job that asks reads the embedding exactly as stock diffusers loads it."""
    import torch

    from diffray.errors import RequestError
    from diffray.models.loading import load_pipeline
    from diffray.models.textual_inversion import load_textual_inversion

    prompts = ["a <t-tok>", "a <T-TOK> and sks", "asks"]
    bare = {p: engine.run([job(prompt=p)])[0] for p in prompts}  # nothing resident yet
    engine.acquire(["t", "t-twin", "sks"])  # two tenants' TIs with one token are resident together
    try:
        for p in prompts:
            assert engine.run([job(prompt=p)])[0] == bare[p]
        with_t = job(prompt="a <T-TOK> and sks", adapters=(("t", 1.0),))
        together = engine.run([with_t, job(prompt="a <T-TOK> and sks"), job(prompt="a <t-tok>")])
        assert engine.batch_log[-1] == (3, 1)  # one call: the TI job's rows beside the others

        def close(a: bytes, b: bytes) -> bool:  # at most one level of batch-shape fp noise
            return np.abs(pixels(a) - pixels(b)).max() <= 1

        assert close(together[1][0], bare["a <T-TOK> and sks"][0]) and close(together[2][0], bare["a <t-tok>"][0])
        assert close(together[0][0], engine.run([with_t])[0][0])
        assert np.abs(pixels(together[0][0]) - pixels(bare["a <T-TOK> and sks"][0])).mean() > 1
        twin = engine.run([job(prompt="a <T-TOK> and sks", adapters=(("t-twin", 1.0),))])[0]
        assert twin not in (together[0], bare["a <T-TOK> and sks"])
        both = engine.run([job(prompt="a <t-tok>", adapters=(("t", 1.0), ("t-twin", 1.0)))])[0]
        assert isinstance(both, RequestError) and both.param == "adapters" and "'<t-tok>'" in str(both)

        for text, adapters in [("a <T-TOK> and sks", (("t", 1.0),)), ("asks <t-tok>", (("sks", 1.0), ("t", 1.0)))]:
            stock = load_pipeline(engine.model_path, dtype=torch.float32, device="cpu")  # holding just these TIs
            for adapter_id, _ in adapters:
                load_textual_inversion(stock, engine.registry.get(adapter_id).path)
            ours = engine.adapters.prompt_texts(adapters, text)[0]
            with torch.no_grad():
                want = stock.encode_prompt(text, "cpu", 1, False)[0]
                got = engine.pipe.encode_prompt(ours, "cpu", 1, False)[0]
            assert torch.equal(got, want), text
    finally:
        engine.release(["t", "t-twin", "sks"])
    hidden = engine.run([job(prompt="a \x1ft_xyz\x1f")])[0]  # a TI's hidden name cannot come from a prompt
    assert isinstance(hidden, RequestError) and hidden.param == "prompt"


def test_a_textual_inversion_whose_token_is_a_word_is_refused(engine, tmp_path):
    """Stock diffusers refuses a token already in the vocabulary (every prompt's word would change meaning)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from diffray.errors import AdapterError

    word = Path(engine.registry.root) / "word"
    shutil.copytree(Path(engine.registry.get("t").path), word)
    save_file({"a": next(iter(load_file(word / "learned_embeds.safetensors").values()))},
              str(word / "learned_embeds.safetensors"))
    try:
        out = engine.run([job(prompt="a red circle", adapters=(("word", 1.0),))])[0]
    finally:
        shutil.rmtree(word)
    assert isinstance(out, AdapterError) and "already in this model's vocabulary" in str(out)
    assert engine.resident == {}


def test_schedulers_and_negative_prompt(engine):
    outs = {name: engine.run([job(scheduler=name)])[0][0] for name in ("default", "ddim", "euler")}
    assert len(set(outs.values())) == 3
    assert engine.run([job(negative_prompt="blue")]) != engine.run([job()])
