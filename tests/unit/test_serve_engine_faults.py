"""ImageEngine under hostile input, without Ray: a job fails alone (its batch-mates get the pixels they get
alone), broken artifacts fail as AdapterError naming the adapter and leave the pipeline clean, replaced or
removed artifacts are noticed by content and unloaded with their tokens, and a cancelled or timed-out job
stops within one sampler step while its batch-mates finish."""

from __future__ import annotations

import io
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image
from testkit.wait import wait_until

from diffray.errors import AdapterError, AdapterNotFound, RequestError
from diffray.serve.config import parse_args
from diffray.serve.schemas import Job

TI = "learned_embeds.safetensors"


@pytest.fixture(scope="module")
def setup(tiny_model_path, tmp_path_factory):
    from testkit.adapters import random_lora, random_textual_inversion

    from diffray.serve.engine import ImageEngine

    reg = tmp_path_factory.mktemp("reg")
    spare = tmp_path_factory.mktemp("spare")
    random_lora(tiny_model_path, reg / "lora", seed=1)
    random_textual_inversion(tiny_model_path, reg / "ti", "<old-tok>", seed=3)
    random_textual_inversion(tiny_model_path, spare / "ti-new-token", "<new-tok>", seed=4)
    random_textual_inversion(tiny_model_path, spare / "ti-same-token", "<old-tok>", seed=5)
    engine = ImageEngine(parse_args({"model": tiny_model_path, "adapters_dir": str(reg), "controlnets": {
        "canny": {"path": "builtin:tiny-random", "subfolder": "controlnet"}}}), device="cpu")
    return engine, reg, spare, tiny_model_path


def job(**kw) -> Job:
    return Job(**{"prompt": "a red circle", "n": 1, "width": 64, "height": 64, "steps": 2, "guidance": 7.5,
                  "seed": 5, **kw})


def same_pixels(a: list[bytes], b: list[bytes]) -> bool:
    """Equal up to one grey level (fp noise of a different batch shape)."""
    import io

    import numpy as np
    from PIL import Image

    arr = [np.asarray(Image.open(io.BytesIO(x)), dtype=np.int16) for x in (*a, *b)]
    return len(a) == len(b) and all(np.abs(x - y).max() <= 1 for x, y in zip(arr[:len(a)], arr[len(a):]))


def clean_state(engine, vocab: int) -> bool:
    return engine.resident == {} and engine.pipe.get_list_adapters() in ({}, {"unet": []}) \
        and len(engine.pipe.tokenizer) == vocab


def test_a_prompt_the_tokenizer_cannot_encode_fails_only_its_job(setup):
    engine = setup[0]
    good = [job(prompt=f"a red circle {i}", seed=i) for i in range(3)]
    alone = [engine.run([j])[0] for j in good]
    out = engine.run([good[0], job(prompt="bad \ud800 prompt"), good[1], job(negative_prompt="\udfff"), good[2]])
    assert isinstance(out[1], RequestError) and out[1].param == "prompt" and out[1].status == 400
    assert isinstance(out[3], RequestError) and out[3].param == "negative_prompt"
    assert all(same_pixels(got, want) for got, want in zip([out[0], out[2], out[4]], alone))


def test_a_job_failing_inside_the_pipeline_fails_alone(setup):
    """Same batch key (so one pipeline call), one job's control image is not an image: the call fails, the
    engine reruns each job alone, and only that job carries the error."""
    from PIL import Image

    engine = setup[0]
    ok = Image.new("RGB", (64, 64), (200, 30, 30))
    good = job(controlnet="canny", control_image=ok)
    alone = engine.run([good])[0]
    out = engine.run([good, job(controlnet="canny", control_image="not an image", seed=9)])
    assert same_pixels(out[0], alone) and isinstance(out[1], Exception)


def _write_broken(reg, name: str, data: bytes) -> None:
    (reg / name).mkdir()
    (reg / name / "pytorch_lora_weights.safetensors").write_bytes(data)


@pytest.mark.parametrize("kind", ["truncated", "wrong-shapes", "wrong-keys", "nan", "text-encoder-wrong"])
def test_broken_lora_is_an_adapter_error_naming_it_and_leaves_the_pipeline_clean(setup, kind):
    import torch
    from safetensors.torch import load, save

    engine, reg, _, _ = setup
    vocab = len(engine.pipe.tokenizer)
    good = (reg / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    sd = load(good)
    data = {"truncated": good[:-100],
            "wrong-shapes": save({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in sd.items()}),
            "wrong-keys": save({"foo.weight": torch.zeros(3)}),
            "nan": save({k: torch.full_like(v, float("nan")) for k, v in sd.items()}),
            # the UNet part loads, then the text encoder part does not fit: the half-loaded UNet LoRA must go
            "text-encoder-wrong": save({**sd, **{f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.{n}": t
                                                 for n, t in (("lora_A.weight", torch.ones(4, 33)),
                                                              ("lora_B.weight", torch.ones(32, 4)))}})}[kind]
    name = f"broken-{kind}"
    _write_broken(reg, name, data)
    base = engine.run([job()])[0]
    with pytest.raises(AdapterError, match=f"adapter '{name}'") as err:
        engine.acquire([name])
    assert str(reg) not in str(err.value) and "tensor(" not in str(err.value)
    assert clean_state(engine, vocab)
    out = engine.run([job(adapters=((name, 1.0),)), job()])
    assert isinstance(out[0], AdapterError) and out[1] == base


def _publish(src, dst) -> None:
    """Publish-by-rename: copy beside, then swap into place (the documented way)."""
    tmp = dst.parent / f".{dst.name}.incoming"
    shutil.copytree(src, tmp)
    old = dst.parent / f".{dst.name}.old"
    dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old)


@pytest.mark.parametrize("replacement", ["ti-new-token", "ti-same-token"])
def test_resident_ti_replaced_on_disk_is_reloaded_with_its_own_token(setup, replacement, tmp_path):
    from diffray.serve.config import parse_args as _pa
    from diffray.serve.engine import ImageEngine

    engine, reg, spare, model = setup
    name = f"ti-{replacement}"
    shutil.copytree(reg / "ti", reg / name)
    vocab = len(engine.pipe.tokenizer)
    engine.acquire([name])
    assert engine.adapters.loaded[name].token == "<old-tok>"
    _publish(spare / replacement, reg / name)
    token = "<new-tok>" if replacement == "ti-new-token" else "<old-tok>"
    got = engine.run([job(prompt=f"a {token}", adapters=((name, 1.0),))])[0]
    assert engine.adapters.loaded[name].token == token and len(engine.pipe.tokenizer) == vocab + 1
    fresh_reg = tmp_path / "fresh"
    shutil.copytree(spare / replacement, fresh_reg / name)
    fresh = ImageEngine(_pa({"model": model, "adapters_dir": str(fresh_reg)}), device="cpu")
    assert got == fresh.run([job(prompt=f"a {token}", adapters=((name, 1.0),))])[0]  # the new vectors, exactly
    engine.release([name])
    assert clean_state(engine, vocab)


def test_a_lora_replaced_on_disk_is_mixed_with_its_new_weights(setup, tmp_path):
    """Mixed-adapter calls reuse stacked LoRA factors; replacing one LoRA on disk (publish-by-rename) while
    resident must give the next mixed call the new weights, as a fresh engine computes them alone."""
    from testkit.adapters import random_lora

    from diffray.serve.engine import ImageEngine

    engine, reg, spare, model = setup
    random_lora(model, reg / "mix-x", seed=7)
    random_lora(model, spare / "mix-x-new", seed=8)
    jobs = [job(adapters=(("lora", 1.0),)), job(adapters=(("mix-x", 1.0),))]
    engine.acquire(["lora", "mix-x"])
    try:
        before = engine.run(jobs)
        assert engine.batch_log[-1] == (2, 1)  # one mixed call
        _publish(spare / "mix-x-new", reg / "mix-x")
        after = engine.run(jobs)
        assert engine.batch_log[-1] == (2, 1)
    finally:
        engine.release(["lora", "mix-x"])
    fresh_reg = tmp_path / "fresh"
    shutil.copytree(spare / "mix-x-new", fresh_reg / "mix-x")
    fresh = ImageEngine(parse_args({"model": model, "adapters_dir": str(fresh_reg)}), device="cpu")
    want = np.asarray(Image.open(io.BytesIO(fresh.run([jobs[1]])[0][0])), dtype=np.int16)
    got = np.asarray(Image.open(io.BytesIO(after[1][0])), dtype=np.int16)
    assert after[1] != before[1] and np.abs(got - want).max() <= 1
    assert after[0] == before[0]  # the other LoRA's rows are unchanged


def test_resident_adapters_removed_from_disk_are_unloaded_and_eviction_never_raises(setup):
    engine, reg, _, _ = setup
    vocab = len(engine.pipe.tokenizer)
    shutil.copytree(reg / "ti", reg / "ti-gone")
    shutil.copytree(reg / "lora", reg / "lora-gone")
    engine.acquire(["ti-gone", "lora-gone"])
    base = engine.run([job(prompt="a <old-tok>")])[0]
    shutil.rmtree(reg / "ti-gone")
    shutil.rmtree(reg / "lora-gone")
    out = engine.run([job(prompt="a <old-tok>"), job(prompt="x", adapters=(("lora-gone", 1.0),)),
                      job(prompt="a <old-tok>", adapters=(("ti-gone", 1.0),))])
    assert isinstance(out[1], AdapterNotFound) and isinstance(out[2], AdapterNotFound)
    assert engine.resident == {} and len(engine.pipe.tokenizer) == vocab  # swept: weights and token gone
    assert out[0] == base  # a prompt that asks for no TI reads its token as text, resident or not
    engine.release(["ti-gone", "lora-gone"])  # Serve's eviction of the set: nothing left to do, no error
    assert clean_state(engine, vocab)


def _run_in_thread(engine, jobs):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", engine.run(jobs)))
    thread.start()
    return thread, box


def _wait_for_steps(engine, count: int) -> None:
    start = engine.steps_done
    wait_until(lambda: engine.steps_done >= start + count, f"{count} steps on the engine's own step counter",
               interval=0.005)


def test_cancel_stops_within_one_step_and_batch_mates_finish(setup):
    engine = setup[0]
    mate = job(prompt="mate", seed=11, steps=40)
    alone = engine.run([mate])[0]
    doomed = job(prompt="doomed", seed=12, steps=40, job_id="doomed-1")
    before = engine.steps_done
    thread, box = _run_in_thread(engine, [doomed, mate])
    _wait_for_steps(engine, 2)
    engine.cancel("doomed-1")
    thread.join(120)
    out = box["out"]
    assert isinstance(out[0], RequestError) and out[0].status == 504
    assert same_pixels(out[1], alone)  # rerun without the cancelled job: the pixels it gets alone
    why, steps = engine.cancel_log[-1]
    assert why == "cancel" and steps <= 1  # steps run between the cancel and the stop
    assert engine.steps_done - before < 40 + 40  # the doomed call never ran to the end


def test_past_deadline_is_abandoned_at_the_first_step(setup):
    engine = setup[0]
    before = engine.steps_done
    out = engine.run([job(steps=50, deadline=time.monotonic() - 1)])
    assert isinstance(out[0], RequestError) and out[0].status == 504 and engine.steps_done - before <= 1
    assert engine.cancel_log[-1] == ("deadline", 0)
    assert isinstance(engine.run([job()])[0], list)  # the next job is served normally


@pytest.mark.parametrize("scheduler,steps", [("default", 1000), ("unipc", 1000), ("euler", 1001)])
def test_step_counts_the_sampler_cannot_run_fail_alone_before_any_pipeline_call(setup, scheduler, steps):
    """DDPM with 1000 of 1000 steps indexed timestep 1000 (IndexError) and UniPC failed an assertion,
    both inside the pipeline; the dry run of the sampler refuses them first, naming `steps`."""
    engine = setup[0]
    before = engine.steps_done
    out = engine.run([job(scheduler=scheduler, steps=steps, width=8, height=8), job(seed=77)])
    assert isinstance(out[0], RequestError) and out[0].param == "steps" and isinstance(out[1], list)
    assert engine.steps_done - before == 2  # only the good job ran


def test_controlnet_pipelines_are_kept_least_recently_used_first_out(tiny_model_path, tmp_path):
    """Each registry ControlNet a request names holds a pipeline with its weights: at most
    generator.max_controlnets_per_replica stay (a client cycling through many cannot grow the replica), the
    least recently used goes first, a kept one is reused as it is, and an evicted one draws the same again."""
    from testkit.adapters import controlnet_from_unet

    from diffray.serve.engine import ImageEngine

    for i in range(3):
        controlnet_from_unet(tiny_model_path, tmp_path / f"cn{i}", seed=i)
    engine = ImageEngine(parse_args({"model": tiny_model_path, "adapters_dir": str(tmp_path),
                                     "generator": {"max_controlnets_per_replica": 2}}), device="cpu")
    ctrl = Image.new("RGB", (64, 64), (255, 255, 255))

    def draw(name):
        (out,) = engine.run([job(controlnet=name, control_image=ctrl)])
        assert isinstance(out, list), out
        return out

    first = draw("cn0")
    draw("cn1")
    kept = engine.control_pipes["cn1"][1]
    draw("cn0")  # cn0 is now the most recent: cn1 goes next
    draw("cn2")
    assert list(engine.control_pipes) == ["cn0", "cn2"]
    assert engine.controlnet_pipe("cn0") is engine.control_pipes["cn0"][1]  # kept: reused (and now most recent)
    assert draw("cn1") is not None and engine.control_pipes["cn1"][1] is not kept  # evicted: built again
    assert list(engine.control_pipes) == ["cn0", "cn1"]
    assert same_pixels(draw("cn0"), first)


def test_a_deleted_or_replaced_registry_controlnet_leaves_the_replica_at_the_next_run(tiny_model_path, tmp_path):
    """A registry ControlNet's pipeline holds its weights: once its folder is deleted the next batch (whatever it
    asks) drops it instead of keeping it until the LRU evicts it; once replaced, the old one is dropped and the
    new content is built on request. A configured ControlNet is never swept."""
    import shutil

    from testkit.adapters import controlnet_from_unet

    from diffray.serve.engine import ImageEngine

    controlnet_from_unet(tiny_model_path, tmp_path / "cn0", seed=0)
    controlnet_from_unet(tiny_model_path, tmp_path / "cn1", seed=1)
    engine = ImageEngine(parse_args({"model": tiny_model_path, "adapters_dir": str(tmp_path)}), device="cpu")
    ctrl = Image.new("RGB", (64, 64), (255, 255, 255))
    for name in ("cn0", "cn1"):
        assert isinstance(engine.run([job(controlnet=name, control_image=ctrl)])[0], list)
    old = engine.control_pipes["cn1"][1]
    assert engine.info()["controlnets"] == ["cn0", "cn1"]

    shutil.rmtree(tmp_path / "cn0")
    shutil.rmtree(tmp_path / "cn1")
    controlnet_from_unet(tiny_model_path, tmp_path / "cn1", seed=5)  # same id, other weights
    assert isinstance(engine.run([job()])[0], list)  # a plain request sweeps
    assert engine.info()["controlnets"] == []
    (out,) = engine.run([job(controlnet="cn0", control_image=ctrl)])
    assert isinstance(out, RequestError) and out.status == 404 and out.param == "control.model"
    assert isinstance(engine.run([job(controlnet="cn1", control_image=ctrl)])[0], list)
    assert engine.control_pipes["cn1"][1] is not old and engine.info()["controlnets"] == ["cn1"]


def test_an_adapter_set_dropped_on_the_event_loop_releases_without_blocking_it(setup):
    """A load whose caller was cancelled leaves its finished AdapterSet to be dropped on the replica's event
    loop. Releasing it waits for the engine lock, which a running batch holds: that wait happens on a thread,
    so the loop goes on serving, and the adapter is released once the batch ends."""
    import asyncio

    from diffray.serve.drawing import AdapterSet

    engine = setup[0]
    held, finish = threading.Event(), threading.Event()

    def batch():  # a batch running in the engine: it holds the lock until told to finish
        with engine.lock:
            held.set()
            finish.wait(timeout=20)  # with the bug, the loop blocks until then

    async def drop_on_the_loop() -> bool:
        adapters = await asyncio.to_thread(AdapterSet, engine, ["lora"])
        assert "lora" in engine.resident
        threading.Thread(target=batch, daemon=True).start()
        assert await asyncio.to_thread(held.wait, 60)
        del adapters  # on the loop thread, while the batch holds the lock
        return finish.is_set()

    assert asyncio.run(drop_on_the_loop()) is False  # the loop went on before the batch ended
    assert "lora" in engine.resident  # not released while the batch ran
    finish.set()
    wait_until(lambda: "lora" not in engine.resident, "the dropped adapter set released after the batch")
