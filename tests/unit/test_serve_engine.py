"""ImageEngine without Ray: resident adapters switch without a reload, shared adapters are reference
counted, batches equal single calls, seeds are deterministic, TI tokens load and unload. The hardening
cases (a job fails alone, broken or replaced artifacts, cancellation between steps) are in
test_serve_engine_faults.py."""

from __future__ import annotations

import io

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
    random_textual_inversion(tiny_model_path, reg / "t", "<t-tok>", seed=3)
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


def test_mixed_batch_equals_each_job_alone(engine):
    """One `run` with base, adapter a, a at weight 0.5, b and a+b (same seed, same shape): every job gets
    the image it gets alone, in one pipeline call per adapter set and weights."""
    sets = [(), (("a", 1.0),), (("a", 0.5),), (("b.v2", 1.0),), (("a", 1.0), ("b.v2", 0.5))]
    engine.acquire(["a", "b.v2"])
    try:
        alone = [pixels(engine.run([job(adapters=s)])[0][0]) for s in sets]
        mixed = engine.run([job(adapters=s) for s in sets])
        assert engine.batch_log[-1] == (len(sets), len(sets))  # one call per adapter set and weights
    finally:
        engine.release(["a", "b.v2"])
    for i, (got, want) in enumerate(zip(mixed, alone)):
        assert np.abs(pixels(got[0]) - want).max() <= 1, sets[i]  # at most one level of batch-shape fp noise
    assert min(np.abs(x - y).mean() for i, x in enumerate(alone) for y in alone[i + 1:]) > 1  # all differ

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


def test_schedulers_and_negative_prompt(engine):
    outs = {name: engine.run([job(scheduler=name)])[0][0] for name in ("default", "ddim", "euler")}
    assert len(set(outs.values())) == 3
    assert engine.run([job(negative_prompt="blue")]) != engine.run([job()])
