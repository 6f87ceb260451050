"""`generator.hotswap`: a compiled UNet serves every LoRA through one slot whose weights are replaced in
place (diffray.serve.hotswap), so switching LoRAs, loading new ones and combining them compiles nothing,
and each image equals what the uncompiled engine with PEFT's own adapters draws. The engine runs without
Ray; compile uses the aot_eager backend (Dynamo's graph capture and guards, as with inductor, without
generating kernels). Graphs are counted with Dynamo's own counter."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diffray.errors import AdapterError, ConfigError, RequestError
from diffray.serve.config import parse_args
from diffray.serve.schemas import Job

COMPILE = {"compile": True, "compile_backend": "aot_eager"}


@pytest.fixture(scope="module")
def registry(tiny_model_path, tmp_path_factory):
    from diffray.models.lora_formats import export_artifact
    from testkit.adapters import random_lora, random_textual_inversion

    reg = tmp_path_factory.mktemp("hotswap-reg")
    random_lora(tiny_model_path, reg / "a", seed=1)
    random_lora(tiny_model_path, reg / "b", seed=2)
    random_lora(tiny_model_path, reg / "te", seed=3, text_encoder=True)
    random_lora(tiny_model_path, reg / "rs", seed=4, variant="rslora")
    random_lora(tiny_model_path, reg / "big", seed=5, rank=8)
    random_lora(tiny_model_path, reg / "huge", seed=6, rank=16)
    random_lora(tiny_model_path, reg / "dora", seed=7, variant="dora")
    random_textual_inversion(tiny_model_path, reg / "t", "<t-tok>", seed=8)
    kohya = export_artifact(reg / "a", "kohya", tmp_path_factory.mktemp("kohya")) / "lora.safetensors"
    kohya.rename(reg / "a-kohya.safetensors")  # "a" as a bare kohya file
    return reg


def engine(model: str, reg, **generator):
    from diffray.serve.engine import ImageEngine

    return ImageEngine(parse_args({"model": model, "adapters_dir": str(reg), "generator": generator}), device="cpu")


@pytest.fixture(scope="module")
def engines(tiny_model_path, registry):
    return engine(tiny_model_path, registry), engine(tiny_model_path, registry, **COMPILE, hotswap={"rank": 12})


def job(adapters=(), **kw) -> Job:
    return Job(**{"prompt": "a red circle", "n": 1, "width": 64, "height": 64, "steps": 3, "guidance": 7.5,
                  "seed": 5, "adapters": adapters, **kw})


def pixels(result) -> np.ndarray:
    assert isinstance(result, list), result
    return np.asarray(Image.open(io.BytesIO(result[0])), dtype=np.int16)


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


CASES = {
    "a": (("a", 1.0),),
    "b": (("b", 1.0),),
    "a-half": (("a", 0.5),),
    "a+b": (("a", 0.6), ("b", 1.0)),
    "text-encoder": (("te", 1.0),),
    "rslora": (("rs", 0.8),),
    "rank-8+a": (("big", 1.0), ("a", 1.0)),
    "ti+a": (("t", 1.0), ("a", 1.0)),
}


def test_hotswap_draws_what_peft_draws_and_compiles_once(engines):
    plain, hot = engines
    base = pixels(hot.run([job()])[0])  # the one compile
    before = graphs()
    hot.run([job(CASES["a"])])  # loaded for one run and unloaded after it, as without a holder
    for e in engines:  # then resident, as a Serve replica holds its adapter sets
        e.acquire(["a", "b", "te", "rs", "big", "t"])
    for name, adapters in CASES.items():
        prompt = "a photo of <t-tok>" if name.startswith("ti") else "a red circle"
        want = pixels(plain.run([job(adapters, prompt=prompt)])[0])
        got = pixels(hot.run([job(adapters, prompt=prompt)])[0])
        assert np.abs(got - want).max() <= 1, name  # float order: B*scale then matmul, against PEFT's reverse
        assert np.abs(got - base).mean() > 2, name  # the LoRA is drawn, not the base
    # LoRA sets of one run, each its own call, then the base again: the slot emptied
    mixed = hot.run([job(CASES["a"]), job(CASES["b"]), job(), job(CASES["a+b"])])
    for result, adapters in zip(mixed, (CASES["a"], CASES["b"], (), CASES["a+b"])):
        assert np.abs(pixels(result) - pixels(plain.run([job(adapters)])[0])).max() <= 1
    assert np.array_equal(pixels(mixed[2]), base)
    assert graphs() == before, "a LoRA switch, load or combination compiled the UNet again"
    assert hot.info()["resident"] == ["a", "b", "big", "rs", "t", "te"]
    assert list(hot.denoiser.peft_config) == ["diffray_slot"]  # every LoRA's UNet part sits outside it


def test_without_hotswap_each_new_lora_compiles_again(tiny_model_path, registry):
    """What the slot prevents, seen by the same counter (so the test above can fail)."""
    compiled = engine(tiny_model_path, registry, **COMPILE)
    compiled.run([job()])
    before = graphs()
    compiled.run([job(CASES["a"])])
    compiled.run([job(CASES["b"])])
    assert graphs() >= before + 2


def test_what_the_slot_cannot_hold_is_refused_by_name(tiny_model_path, registry, engines):
    _, hot = engines
    too_many = hot.run([job((("big", 1.0), ("a", 1.0), ("b", 1.0)))])[0]
    assert isinstance(too_many, RequestError) and too_many.param == "adapters" and too_many.status == 422
    assert "add up to 16" in str(too_many) and "generator.hotswap.rank" in str(too_many)
    for adapter_id, why in (("huge", "rank 16 is beyond the hotswap slot's rank 12"),
                            ("dora", "hotswap takes plain LoRAs, not dora")):
        with pytest.raises(AdapterError, match=why):
            hot.acquire([adapter_id])
        assert adapter_id not in hot.info()["resident"]
    assert list(hot.denoiser.peft_config) == ["diffray_slot"]  # a refused LoRA leaves nothing behind
    narrow = engine(tiny_model_path, registry, **COMPILE, hotswap={"rank": 8, "targets": ["to_q", "to_k", "to_v"]})
    base = narrow.run([job()])[0]
    before = graphs()
    outside = r"outside the hotswap slot's targets .*generator.hotswap.targets"
    with pytest.raises(AdapterError, match=outside):  # refused from the file's keys, before loading
        narrow.acquire(["a"])
    assert narrow.run([job()])[0] == base and graphs() == before  # no PEFT wrapper left on to_out.0
    with pytest.raises(AdapterError, match=outside):  # a kohya file: refused once loaded
        narrow.acquire(["a-kohya"])
    with pytest.raises(ConfigError, match="generator.compile"):
        parse_args({"model": tiny_model_path, "generator": {"hotswap": {"rank": 8}}})


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-flux"])
def test_hotswap_on_sdxl_and_flux(preset, tmp_path):
    """SDXL (a LoRA with parts on both text encoders) and Flux (the slot on the transformer)."""
    from diffray.models.loading import resolve_model_path
    from testkit.adapters import random_lora

    model = resolve_model_path(f"builtin:{preset}")
    random_lora(model, tmp_path / "a", seed=1)
    random_lora(model, tmp_path / "b", seed=2, text_encoder=preset == "tiny-sdxl")
    plain, hot = engine(model, tmp_path), engine(model, tmp_path, **COMPILE, hotswap={"rank": 8})
    guidance = 3.5 if preset == "tiny-flux" else 7.5
    base = pixels(hot.run([job(guidance=guidance)])[0])
    before = graphs()
    for adapters in (CASES["a"], CASES["b"], CASES["a+b"], ()):
        want = pixels(plain.run([job(adapters, guidance=guidance)])[0])
        got = pixels(hot.run([job(adapters, guidance=guidance)])[0])
        assert np.abs(got - want).max() <= 1, adapters
        assert (np.abs(got - base).mean() > 1) == bool(adapters), adapters
    assert graphs() == before
