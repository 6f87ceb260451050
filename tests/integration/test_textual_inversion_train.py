"""Textual Inversion on Ray Train (local cluster, tiny model, sample subject set, 2 workers): only the new
token's rows train, the denoising loss on fixed draws falls, the artifact loads in stock diffusers, and
bad input fails on the driver before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffray.methods import load_config
from diffray.data.sample import resolve_data_path
from diffray.data.transforms import preprocess_images
from diffray.errors import ConfigError, DatasetError
from diffray.models.adapters import read_card
from diffray.models.loading import load_components
from diffray.models.textual_inversion import TI_WEIGHTS, placeholder_tokens
from diffray.trainers.runner import run_training
from diffray.trainers.session import WorkerEnv
from diffray.trainers.textual_inversion.task import TextualInversionTask
from testkit.models import TINY_RANDOM

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TOK = "<sks-widget>"


def ti_cfg(tmp_path, name: str, *overrides: str):
    # tiny-random's tokenizer is per character: one letter is its one-token initializer
    base = [f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}", "train.progress_bar=false",
            "textual_inversion.initializer_token=o"]
    return load_config(REPO / "configs" / "textual_inversion.yaml", [TINY_RANDOM] + base + list(overrides))


def newest_checkpoint(run_dir: str) -> Path:
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())[-1]


def fixed_draw_loss(cfg, model_path: str, rows: torch.Tensor | None, steps: range) -> float:
    """Mean denoising loss of every subject image under the (noise, timestep, template) draws of `steps`,
    with the placeholder rows at their initial value (None) or set to `rows`."""
    task = TextualInversionTask(cfg, model_path, WorkerEnv(0, 1, torch.device("cpu"), "fp32"))
    comps, model, ids = task.comps, task.module, task.token_ids[0]
    if rows is not None:
        with torch.no_grad():
            comps.text_encoder.get_input_embeddings().weight[ids] = rows
    root = Path(resolve_data_path(cfg.data.path))
    meta = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    sample_ids = list(range(len(meta)))
    pixels = preprocess_images([(root / m["file_name"]).read_bytes() for m in meta], sample_ids, ["-"] * len(meta),
                               cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip, cfg.run.seed)
    batch = {"sample_id": torch.tensor(sample_ids), "pixel_values": torch.from_numpy(pixels)}
    with torch.no_grad():
        return sum(task.losses(model, batch, s).mean().item() for s in steps) / len(steps)


def test_learns_only_the_new_token_and_exports_a_stock_embedding(ray_cluster, tmp_path, tiny_model_path):
    from diffusers import StableDiffusionPipeline

    # weight_decay > 0: AdamW would decay every row of the matrix; the guard must undo it each step.
    cfg = ti_cfg(tmp_path, "ti", "train.max_steps=16", "train.checkpoint_every=8", "train.validate_every=16",
                 "optim.weight_decay=0.1", "export.formats=[kohya]")
    assert cfg.scaling.num_workers == 2 and cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage == 2
    result = run_training(cfg)
    assert result.steps == 16 and result.loss_first_mean == result.loss_first_mean  # finite, not NaN
    card = read_card(result.artifact_dir)
    assert card["method"] == "textual_inversion" and card["steps"] == 16 and card["placeholder_token"] == TOK
    assert card["tokens"] == [TOK] and card["weight_name"] == TI_WEIGHTS
    assert (Path(result.run_dir) / "logs" / "validation" / "step_000016.png").is_file()

    # The trained matrix as the engine holds it (DeepSpeed module state of the final checkpoint).
    module = torch.load(newest_checkpoint(result.run_dir) / "state" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    (trained,) = [v for k, v in module.items() if k.endswith("token_embedding.weight")]
    base_comps = load_components(tiny_model_path)
    base = base_comps.text_encoder.get_input_embeddings().weight.detach()
    vocab, token_id = base.shape[0], base.shape[0]  # the new token is appended
    assert trained.shape == (vocab + 1, base.shape[1])
    assert torch.equal(trained[:vocab], base), "every old row is bit-identical to the base model"
    init = base[base_comps.tokenizer.encode("o", add_special_tokens=False)[0]]
    assert (trained[token_id] - init).norm() > 0.1, "the new row trained away from its initializer"
    learned = load_file(str(Path(result.artifact_dir) / TI_WEIGHTS))
    assert list(learned) == [TOK] and torch.equal(learned[TOK], trained[token_id:token_id + 1])
    a1111 = load_file(str(Path(result.artifact_dir) / "kohya" / "sks-widget.safetensors"))  # export.formats
    assert list(a1111) == ["emb_params"] and torch.equal(a1111["emb_params"], learned[TOK])

    # Learning: on the same noise/timestep/template draws, the trained token denoises better than its start.
    before = fixed_draw_loss(cfg, tiny_model_path, None, range(1, 9))
    after = fixed_draw_loss(cfg, tiny_model_path, learned[TOK], range(1, 9))
    assert after < before - 1e-3, (before, after, result.summary_line())

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    render = lambda p: pipe(p, num_inference_steps=4, generator=torch.Generator().manual_seed(0),  # noqa: E731
                            output_type="np").images
    base_img = render("a photo of")
    pipe.load_textual_inversion(result.artifact_dir, weight_name=TI_WEIGHTS)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], trained[token_id])
    assert (render("a photo of") == base_img).all(), "a prompt without the token is unchanged"
    assert abs(render(f"a photo of {TOK}") - base_img).mean() > 1e-3


def test_dataset_captions_teach_a_shape_the_model_knows_under_a_new_word(ray_cluster, tmp_path):
    """The pretrained world model's triangles with their own captions, 'triangle' swapped for <tri>, the token
    starting as 'circle' (configs/textual_inversion.yaml, 60 steps): the token then draws the triangles it did
    not draw before (scored with 'circle' in its place: what the untrained token feeds the model)."""
    from diffray.world.evaluate import evaluate

    cfg = load_config(REPO / "configs" / "textual_inversion.yaml", [
        f"run.storage_path={tmp_path / 'runs'}", "run.name=tri", "train.progress_bar=false", "train.validate_every=null",
        "data.path=builtin:world/triangle", "textual_inversion.placeholder_token=<tri>",
        "textual_inversion.initializer_token=circle", "textual_inversion.captions=dataset",
        "textual_inversion.concept_word=triangle"])
    assert cfg.model.path == "builtin:tiny" and cfg.train.max_steps == 60
    art = run_training(cfg).artifact_dir
    fast = dict(num=16, steps=10)
    start = evaluate(suite="triangle", adapter=art, token="circle", compare_base=False, **fast)
    trained = evaluate(suite="triangle", adapter=art, **fast)
    assert trained.settings["token"] == "<tri>" and all(
        "<tri>" in r["rendered_prompt"] for r in trained.records if r["variant"] == "textual_inversion")
    assert start.accuracy("textual_inversion", "shape") <= 0.1, "the untrained token draws circles"
    # as often as the word itself draws them (at 10 steps the base draws 14 of the 16)
    after, word = trained.accuracy("textual_inversion", "shape"), trained.accuracy("base", "shape")
    assert after >= 0.75 and after >= word - 2 / 16, (after, word)


@pytest.mark.eval  # CI: single-vector TI (above)
def test_multi_vector_style_token_with_ddp(ray_cluster, tmp_path, tiny_model_path):
    from diffusers import StableDiffusionPipeline

    cfg = ti_cfg(tmp_path, "ti-ddp", "strategy.name=ddp", "textual_inversion.num_vectors=3",
                 "textual_inversion.learnable_property=style", "train.max_steps=4", "train.checkpoint_every=4",
                 "train.validate_every=null", "optim.weight_decay=0.1")
    result = run_training(cfg)
    assert result.steps == 4
    trained = next(v for k, v in load_file(str(newest_checkpoint(result.run_dir) / "trainable.safetensors")).items()
                   if k.endswith("token_embedding.weight"))
    base = load_components(tiny_model_path).text_encoder.get_input_embeddings().weight.detach()
    vocab = base.shape[0]
    assert trained.shape[0] == vocab + 3 and torch.equal(trained[:vocab], base)
    learned = load_file(str(Path(result.artifact_dir) / TI_WEIGHTS))[TOK]
    assert learned.shape == (3, base.shape[1]) and torch.equal(learned, trained[vocab:])
    assert read_card(result.artifact_dir)["tokens"] == placeholder_tokens(TOK, 3)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    pipe.load_textual_inversion(result.artifact_dir, weight_name=TI_WEIGHTS)
    assert pipe.tokenizer.convert_tokens_to_ids(placeholder_tokens(TOK, 3)) == [vocab, vocab + 1, vocab + 2]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[vocab:], learned)


def test_bad_inputs_fail_on_the_driver_before_ray(tmp_path):
    import ray

    ray_was_up = ray.is_initialized()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "x"}) + "\n"
                                                   for i in range(2)))
    for i in range(2):
        (broken / f"{i}.png").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    shapes = tmp_path / "shapes"  # dataset captions: one of them lacks the concept word
    shapes.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40, 40)).save(shapes / f"{i}.png")
    (shapes / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n" for i, c in
                                                   enumerate(["a red triangle on a blue background", "a blue circle"])))
    cases = [
        (ConfigError, r"^textual_inversion\.placeholder_token: 'a' is already in the tokenizer's vocabulary",
         ["textual_inversion.placeholder_token=a"]),
        (ConfigError, r"^textual_inversion\.initializer_token: 'widget' tokenizes to 6 tokens",
         ["textual_inversion.initializer_token=widget"]),
        (DatasetError, r"^data\.path: concept images in .*broken: 2 of 2 cannot be used \(no valid images\): "
                       r"0\.png: cannot decode image", [f"data.path={broken}"]),
        (DatasetError, r"^data\.path: concept images: .*empty: no images", [f"data.path={tmp_path / 'empty'}"]),
        (DatasetError, r"^data\.path: concept images in .*shapes: 1 of 2 cannot be used: 1\.png: its caption 'a blue "
                       r"circle' does not hold 'triangle' as a word within the first 77 tokens",
         [f"data.path={shapes}", "textual_inversion.captions=dataset", "textual_inversion.concept_word=triangle"]),
    ]
    for error, message, overrides in cases:
        with pytest.raises(error, match=message) as err:
            run_training(ti_cfg(tmp_path, "bad", *overrides))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists() and ray.is_initialized() == ray_was_up, "nothing reached Ray"
