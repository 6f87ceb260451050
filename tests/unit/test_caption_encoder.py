"""Stage 2 of `diffray pretrain-world` (`diffray.world.caption_encoder`): from random weights, the text encoder
learns to name every field of held-out captions, and its output then tells the position words apart as far
as it tells colours apart (the first world model's jointly trained encoder: 0.016 for a position swap, 0.35
for a colour swap). Planted bugs it catches: pooling only the first token (nothing to learn from: lowest field
accuracy 13%), heads trained on a frozen random encoder (17%)."""

from __future__ import annotations

import json

import pytest
import torch

from diffray.errors import DatasetError
from diffray.world.caption_encoder import FIELDS, train_caption_encoder

CAPTION = "a small red circle on the left on a green background"
SWAPS = {"position": CAPTION.replace("left", "right"), "colour": CAPTION.replace("red", "blue")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffray.models.tiny import build_pipeline_dir
    from diffray.world.writers import write_world_dataset

    root = tmp_path_factory.mktemp("caption-encoder")
    model = build_pipeline_dir(root / "random", "tiny", seed=0, random_init=True)
    data = root / "data"
    write_world_dataset(data, "pretrain", 1500, 0, fmt="parquet")
    return root, model, data


def swap_distance(model_dir) -> dict[str, float]:
    """How far the encoder's output moves (relative to its norm, over all tokens) when one word is swapped."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()

    def states(text):
        ids = tok([text], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids)[0]

    base = states(CAPTION)
    return {k: float((states(t) - base).norm() / base.norm()) for k, t in SWAPS.items()}


def test_the_encoder_learns_every_field_and_keeps_the_positions_apart(world):
    root, model, data = world
    before = swap_distance(model)
    figures = train_caption_encoder(model, data, root / "trained", steps=150, batch=64, lr=1e-3, seed=0)
    assert set(figures["heldout_accuracy"]) == set(FIELDS)
    assert min(figures["heldout_accuracy"].values()) >= 0.95, figures["heldout_accuracy"]
    assert figures["loss_last"] < figures["loss_first"] / 10
    after = swap_distance(root / "trained")
    assert before["position"] < 0.15  # the random encoder, for scale
    assert after["position"] > 0.3 and after["position"] > 0.5 * after["colour"], after
    # the rest of the pipeline dir is the input's; the stage is recorded and not run again
    assert (root / "trained" / "unet").is_dir() and (root / "trained" / "vae").is_dir()
    assert json.loads((root / "trained" / "diffray_stage.json").read_text()) == figures
    again = train_caption_encoder(model, data, root / "trained", steps=150, batch=64, lr=1e-3, seed=0)
    assert again == figures


def test_the_same_seed_trains_the_same_encoder(world):
    root, model, data = world
    a = train_caption_encoder(model, data, root / "a", steps=5, batch=16, lr=1e-3, seed=1)
    b = train_caption_encoder(model, data, root / "b", steps=5, batch=16, lr=1e-3, seed=1)
    assert a["loss_last"] == b["loss_last"] and a["heldout_accuracy"] == b["heldout_accuracy"]


def test_a_dir_without_parquet_is_named(world, tmp_path):
    _, model, _ = world
    with pytest.raises(DatasetError, match=str(tmp_path)):
        train_caption_encoder(model, tmp_path, tmp_path / "out", steps=1, batch=1, lr=1e-3, seed=0)


@pytest.mark.parametrize("field, value", [("position_p", 1.5), ("text_steps", 0), ("text_batch", 0)])
def test_the_pretrain_plan_names_a_bad_field_before_anything_runs(field, value):
    import dataclasses

    from diffray.errors import ConfigError
    from diffray.world.pretrain import PretrainPlan

    with pytest.raises(ConfigError, match=f"^{field}: "):
        dataclasses.replace(PretrainPlan(), **{field: value}).check()
