"""SDXL on Ray Train (local cluster, 2 ZeRO-2 workers, `builtin:tiny-sdxl`): the shipped LoRA config runs
as-is and its loss falls, the exported LoRA loads with stock `StableDiffusionXLPipeline.load_lora_weights`
and reproduces the trained UNet (rebuilt from the ZeRO shards) on both encoders' conditioning, a resumed
run equals a straight one; the SDXL ControlNet and DreamBooth-LoRA configs learn and load in their stock
pipelines; full fine-tuning exports an SDXL pipeline dir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffray.methods import load_config
from diffray.models.adapters import LORA_WEIGHTS, read_card
from diffray.models.family import StableDiffusionXL
from diffray.models.loading import resolve_model_path
from diffray.trainers.runner import run_training
from testkit.adapters import Probe

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "lora_sdxl.yaml"


def events(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_shipped_sdxl_lora_config_learns_and_its_artifact_loads_in_stock_sdxl(ray_cluster, tmp_path,
                                                                               model_from_zero_checkpoint):
    from diffusers import StableDiffusionXLPipeline

    model_path = resolve_model_path("builtin:tiny-sdxl")
    cfg = load_config(CONFIG, [f"run.storage_path={tmp_path / 'runs'}", "train.progress_bar=false"])
    assert cfg.model.path == "builtin:tiny-sdxl" and cfg.strategy.zero_stage == 2 and cfg.scaling.num_workers == 2
    result = run_training(cfg)
    assert result.steps == cfg.train.max_steps == 60
    # The random tiny SDXL starts near loss 1.08; LoRA on its attention brings it down (fixed seed).
    assert result.loss_last_mean < result.loss_first_mean - 0.05, result.summary_line()
    assert (Path(result.run_dir) / "logs" / "validation" / "step_000060.png").is_file()  # rendered by SDXL
    card = read_card(result.artifact_dir)
    assert card["method"] == "lora" and card["steps"] == 60

    probe = Probe(*model_from_zero_checkpoint(result.run_dir, cfg, model_path), family=StableDiffusionXL())
    pipe = StableDiffusionXLPipeline.from_pretrained(model_path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert probe.error(pipe.unet) > 1e-3  # the base differs from the trained model...

    def draw():
        return pipe("a red circle on a blue background", num_inference_steps=4, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    base_img = draw()
    pipe.load_lora_weights(result.artifact_dir)
    assert probe.error(pipe.unet) < 1e-5  # ...and the stock pipeline with the artifact is the trained model
    assert abs(draw() - base_img).mean() > 1e-3


@pytest.mark.slow
@pytest.mark.eval  # CI: SDXL LoRA training (default suite), exact resume on SD (the checkpoint drill)
def test_sdxl_resume_equals_a_straight_run_and_a_both_encoder_lora_loads_in_stock_sdxl(
        ray_cluster, tmp_path, model_from_zero_checkpoint):
    """LoRA on the UNet and both text encoders (`lora.train_text_encoder`): 4 steps + resume to 8 equals 8
    straight steps to 1e-6 (random crops and flips, caption dropout on: each row's size ids and both
    tokenizers' ids come back the same on resume); the artifact holds `unet.`, `text_encoder.` and
    `text_encoder_2.` layers, and stock `StableDiffusionXLPipeline.load_lora_weights` + `encode_prompt`
    reproduce the trained model's prediction."""
    from diffusers import StableDiffusionXLPipeline

    def cfg(name: str, steps: int):
        return load_config(CONFIG, [f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}",
                                    "data.center_crop=false", f"train.max_steps={steps}", "train.checkpoint_every=4",
                                    "train.validate_every=null", "train.micro_batch_size=2", "train.progress_bar=false",
                                    "data.caption_dropout=0.2", "lora.train_text_encoder=true"])

    straight = run_training(cfg("straight", 8))
    assert run_training(cfg("resumed", 4)).steps == 4
    resumed = run_training(cfg("resumed", 8))
    assert [e["resumed_from_step"] for e in events(resumed.run_dir) if e.get("event") == "start"] == [0, 4]
    got, want = (load_file(str(Path(r.artifact_dir) / LORA_WEIGHTS)) for r in (resumed, straight))
    assert got.keys() == want.keys() and {k.split(".")[0] for k in got} == {"unet", "text_encoder", "text_encoder_2"}
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    assert worst < 1e-6, f"max |resumed - straight| = {worst:.2e}"

    model_path = resolve_model_path("builtin:tiny-sdxl")
    model, comps = model_from_zero_checkpoint(straight.run_dir, cfg("straight", 8), model_path)
    family = StableDiffusionXL()
    prompts = ["a red circle on a blue background", "x"]
    g = torch.Generator().manual_seed(1)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600])
    time_ids = family.time_ids({}, (64, 64), latents[:, 0, 0, 0])
    pipe = StableDiffusionXLPipeline.from_pretrained(model_path, use_safetensors=True)

    def stock() -> torch.Tensor:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        return pipe.unet(latents, t, encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    with torch.no_grad():
        expected = model(latents, t, input_ids=family.tokenize(comps, prompts), time_ids=time_ids)
        before = stock()
        pipe.load_lora_weights(straight.artifact_dir)
        after = stock()
    assert (before - expected).abs().max() > 1e-3 and (after - expected).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.eval  # CI: SD's latent cache reproducing training (test_data_pipeline.py)
def test_sdxl_latent_cache_reproduces_uncached_training_without_encoder_calls(ray_cluster, tmp_path):
    """The cache holds both encoders' states, the pooled projection and each row's size ids: 3 cached steps
    (caption dropout on: the empty caption's cached states) give the uncached steps' losses, with no VAE
    or text-encoder call. One worker, the whole set in every batch: a step's loss does not depend on the
    order in which Ray Data streams the rows (with 2 workers of 4 rows it does, and that order varies)."""
    from diffray.data.sample import write_sample_dataset

    # 80 px images trained at 64 with random crops: each row's size ids differ from the uncropped default.
    data = write_sample_dataset(tmp_path / "s", num_images=4, resolution=80) / "train"

    def run(name: str, *extra: str):
        cfg = load_config(CONFIG, [f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}", "train.max_steps=3",
                                   "train.checkpoint_every=3", "train.validate_every=null", "data.center_crop=false",
                                   "data.caption_dropout=0.3", "train.progress_bar=false", f"data.path={data}",
                                   "scaling.num_workers=1", "strategy.name=ddp", "train.micro_batch_size=4", *extra])
        return [e for e in events(run_training(cfg).run_dir) if "loss" in e and "event" not in e]

    plain, cached = run("uncached"), run("cached", f"data.cache={tmp_path / 'cache'}")
    assert [e["step"] for e in plain] == [e["step"] for e in cached] == [1, 2, 3]
    for x, y in zip(plain, cached):
        assert abs(x["loss"] - y["loss"]) < 1e-5 * max(1.0, abs(x["loss"])), (x["loss"], y["loss"])
        assert x["vae_encode_calls"] > 0 and x["text_encoder_calls"] > 0
        assert y["vae_encode_calls"] == 0 and y["text_encoder_calls"] == 0
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "shards")
    assert {"micro_cond", "pooled_prompt_embeds"} <= set(table.column_names)


def losses(run_dir: str) -> list[float]:
    return [e["loss"] for e in events(run_dir) if "loss" in e and "event" not in e]


@pytest.mark.eval  # CI: ControlNet training on SD, SDXL ControlNets served (e2e/test_serve_families.py)
def test_sdxl_controlnet_learns_and_its_artifact_drives_stock_sdxl_controlnet(ray_cluster, tmp_path):
    """configs/controlnet_sdxl.yaml (20 of its 40 steps): the ControlNet copies the SDXL UNet's encoder with
    its size/pooled-text embedding and gets the same added conditioning in training; the artifact equals
    the trained ZeRO weights and, in stock `StableDiffusionXLControlNetPipeline`, its control image matters."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from diffray.data import resolve_data_path
    from diffray.trainers.controlnet.task import ControlledUNet

    model_path = resolve_model_path("builtin:tiny-sdxl")
    cfg = load_config(REPO / "configs" / "controlnet_sdxl.yaml",
                      [f"run.storage_path={tmp_path / 'runs'}", "train.max_steps=20", "train.validate_every=20",
                       "train.progress_bar=false"])
    result = run_training(cfg)
    loss = losses(result.run_dir)
    assert result.steps == 20 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.05, loss
    assert (Path(result.run_dir) / "logs" / "validation" / "step_000020.png").is_file()

    exported = ControlNetModel.from_pretrained(result.artifact_dir, use_safetensors=True)
    assert exported.config.addition_embed_type == "text_time"
    ckpt = sorted(p for p in Path(result.run_dir).glob("checkpoint_*") if p.is_dir())[-1]
    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="state", exclude_frozen_parameters=True)
    trained = {k.removeprefix("controlnet."): v for k, v in trained.items()}
    state = exported.state_dict()
    assert set(trained) == set(state) and max((trained[k] - state[k]).abs().max().item() for k in trained) < 1e-6

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(model_path, controlnet=exported, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    family = StableDiffusionXL()
    comps = family.load(model_path)
    canny = Path(resolve_data_path("builtin:sample/canny")) / "conditioning"
    a, b = ([Image.open(canny / f"{i:08d}.png").convert("RGB")] for i in (0, 1))
    tensors = [torch.from_numpy(np.asarray(img[0], dtype=np.float32) / 255.0).permute(2, 0, 1)[None] for img in (a, b)]
    g = torch.Generator().manual_seed(1)
    latents, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([700])
    with torch.no_grad():
        text = family.conditioning(comps, family.tokenize(comps, ["a red circle"]), {}, (64, 64))
        pred = [ControlledUNet(pipe.controlnet, pipe.unet)(latents, t, controlnet_cond=c, **text) for c in tensors]
    assert (pred[0] - pred[1]).abs().max() > 1e-5  # the trained control path reads the control image

    def draw(image, scale):
        return pipe("a red circle", image=image, num_inference_steps=4, height=64, width=64, output_type="np",
                    controlnet_conditioning_scale=scale, generator=torch.Generator().manual_seed(0)).images

    assert np.abs(draw(a, 1.0) - draw(a, 0.0)).mean() > 1e-4


@pytest.mark.slow
@pytest.mark.eval  # CI: DreamBooth on SD and SDXL LoRA training (default suite)
def test_sdxl_dreambooth_lora_with_prior_preservation_learns_and_loads_in_stock_sdxl(ray_cluster, tmp_path):
    """configs/dreambooth_sdxl.yaml (20 of its 40 steps): class images drawn by the SDXL base, instance and
    class rows in each step's forward, the loss falls, the LoRA loads in `StableDiffusionXLPipeline`."""
    from diffusers import StableDiffusionXLPipeline

    cfg = load_config(REPO / "configs" / "dreambooth_sdxl.yaml",
                      [f"run.storage_path={tmp_path / 'runs'}", "train.max_steps=20", "train.validate_every=20",
                       "train.checkpoint_every=20", "train.progress_bar=false",
                       f"dreambooth.class_data_dir={tmp_path / 'class'}"])
    result = run_training(cfg)
    steps = [e for e in events(result.run_dir) if "loss" in e and "event" not in e]
    rows = cfg.train.micro_batch_size * cfg.scaling.num_workers
    assert len(steps) == 20 and all((e["instance_rows"], e["class_rows"]) == (rows, rows) for e in steps)
    assert result.loss_last_mean < result.loss_first_mean - 0.05, result.summary_line()
    pngs = sorted((tmp_path / "class").rglob("*.png"))
    assert len(pngs) == 8 and Image.open(pngs[0]).size == (64, 64)  # drawn by the SDXL base at its size
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model_path("builtin:tiny-sdxl"), use_safetensors=True)
    pipe.load_lora_weights(result.artifact_dir)
    assert read_card(result.artifact_dir)["instance_prompt"] == "a photo of sks widget"
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


@pytest.mark.eval  # CI: the same full-pipeline export under DreamBooth full mode is SD's (test_dreambooth_train.py)
def test_sdxl_full_fine_tuning_exports_a_stock_sdxl_pipeline(ray_cluster, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    cfg = load_config(REPO / "configs" / "full.yaml",
                      [f"run.storage_path={tmp_path / 'runs'}", "model.path=builtin:tiny-sdxl", "train.max_steps=4",
                       "train.checkpoint_every=4", "train.validate_every=null", "data.cache=off"])
    result = run_training(cfg)
    pipe = StableDiffusionXLPipeline.from_pretrained(result.artifact_dir, use_safetensors=True)
    base = StableDiffusionXLPipeline.from_pretrained(resolve_model_path("builtin:tiny-sdxl"), use_safetensors=True)
    moved = max((a - b).abs().max().item() for a, b in zip(pipe.unet.parameters(), base.unet.parameters()))
    assert moved > 1e-4 and type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


@pytest.mark.eval  # CI: Textual Inversion on SD, SDXL embeddings served (e2e/test_serve_families.py)
def test_sdxl_textual_inversion_learns_one_row_per_encoder_and_loads_as_diffusers_documents(ray_cluster, tmp_path):
    """configs/textual_inversion_sdxl.yaml (16 steps, weight decay on): the token's row trains in both
    encoders and every other row stays bit-identical; the file holds clip_l/clip_g, loaded into the stock
    pipeline by the two calls diffusers documents; on fixed draws the trained rows denoise better."""
    from diffusers import StableDiffusionXLPipeline

    from diffray.models.textual_inversion import TI_WEIGHTS, load_textual_inversion
    from diffray.trainers.session import WorkerEnv
    from diffray.trainers.textual_inversion.task import TextualInversionTask

    model_path = resolve_model_path("builtin:tiny-sdxl")
    cfg = load_config(REPO / "configs" / "textual_inversion_sdxl.yaml",
                      [f"run.storage_path={tmp_path / 'runs'}", "train.max_steps=16", "train.checkpoint_every=8",
                       "train.validate_every=16", "optim.weight_decay=0.1", "train.progress_bar=false"])
    result = run_training(cfg)
    card = read_card(result.artifact_dir)
    tok = cfg.textual_inversion.placeholder_token
    assert result.steps == 16 and card["placeholder_token"] == tok and "clip_g" in card["usage"]
    ckpt = sorted(p for p in Path(result.run_dir).glob("checkpoint_*") if p.is_dir())[-1]
    module = torch.load(ckpt / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    base = StableDiffusionXLPipeline.from_pretrained(model_path, use_safetensors=True)
    learned = load_file(str(Path(result.artifact_dir) / TI_WEIGHTS))
    assert set(learned) == {"clip_l", "clip_g"}
    for prefix, key, encoder, tokenizer in [("text_encoder.", "clip_l", base.text_encoder, base.tokenizer),
                                            ("text_encoder_2.", "clip_g", base.text_encoder_2, base.tokenizer_2)]:
        (trained,) = [v for k, v in module.items() if k.startswith(prefix) and k.endswith("token_embedding.weight")]
        old = encoder.get_input_embeddings().weight.detach()
        vocab = old.shape[0]
        assert trained.shape == (vocab + 1, old.shape[1]) and torch.equal(trained[:vocab], old), prefix
        init = old[tokenizer.encode("o", add_special_tokens=False)[0]]
        assert (trained[vocab] - init).norm() > 0.1 and torch.equal(learned[key], trained[vocab:]), prefix

    from diffray.data import resolve_data_path
    from diffray.data.pipeline import preprocess_batch
    from diffray.data.validate import Rules

    task = TextualInversionTask(cfg, model_path, WorkerEnv(0, 1, torch.device("cpu"), "fp32"))
    root = Path(resolve_data_path(cfg.data.path))
    meta = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    rows = preprocess_batch({"sample_id": np.arange(len(meta)), "source": np.array([m["file_name"] for m in meta]),
                             "image": np.array([(root / m["file_name"]).read_bytes() for m in meta], dtype=object),
                             "caption": np.array([""] * len(meta))}, model_path, 64, cfg.data.center_crop,
                            cfg.data.random_flip, cfg.run.seed, Rules())
    batch = {k: torch.from_numpy(v) for k, v in rows.items()}  # the subject images with their size ids

    def fixed_draw_loss() -> float:
        with torch.no_grad():
            return sum(task.losses(task.module, batch, s).mean().item() for s in range(1, 9)) / 8

    before = fixed_draw_loss()
    with torch.no_grad():
        for (_, encoder), ids, key in zip([(0, task.comps.text_encoder), (0, task.comps.text_encoder_2)],
                                          task.token_ids, ("clip_l", "clip_g")):
            encoder.get_input_embeddings().weight[ids] = learned[key]
    after = fixed_draw_loss()
    assert after < before - 1e-3, (before, after)  # the same noise, timesteps and templates: the token learned

    base.set_progress_bar_config(disable=True)

    def render(prompt):
        return base(prompt, num_inference_steps=4, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    plain = render("a photo of")
    for key, encoder, tokenizer in [("clip_l", base.text_encoder, base.tokenizer),
                                    ("clip_g", base.text_encoder_2, base.tokenizer_2)]:
        base.load_textual_inversion(learned[key], token=tok, text_encoder=encoder, tokenizer=tokenizer)
    assert (render("a photo of") == plain).all() and np.abs(render(f"a photo of {tok}") - plain).mean() > 1e-3
    # diffray's own loader (generate, serve) reads the card's token and gives the same pixels
    ours = load_textual_inversion(StableDiffusionXLPipeline.from_pretrained(model_path, use_safetensors=True),
                                  result.artifact_dir)
    ours.set_progress_bar_config(disable=True)
    assert (ours(f"a photo of {tok}", num_inference_steps=4, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images == render(f"a photo of {tok}")).all()
