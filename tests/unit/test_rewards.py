"""DDPO rewards: JPEG sizes, the registry's errors, and the CLIP-based rewards on a tiny CLIP built here
(random weights, our own character-level tokenizer, saved with save_pretrained; nothing downloaded)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffray.errors import ConfigError
from testkit.models import build_tiny_clip, write_aesthetic_head
from diffray.trainers.components.rewards import REWARDS, get_reward, register, to_pil_images

PROJ = 16


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", projection_dim=PROJ)


@pytest.fixture(scope="module")
def head_path(tmp_path_factory) -> Path:
    """A LAION-layout head (Linear at 0, 2, 4, 6, 7; dropouts between) over PROJ features."""
    return write_aesthetic_head(tmp_path_factory.mktemp("head") / "head.safetensors", PROJ)


def images_batch(seed: int = 0) -> np.ndarray:
    """uint8 [3, 48, 40, 3]: a flat image, a gradient and uniform noise."""
    rng = np.random.default_rng(seed)
    flat = np.full((48, 40, 3), 120, np.uint8)
    grad = np.broadcast_to(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], (48, 40, 3))
    noise = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    return np.stack([flat, grad, noise])


def test_jpeg_rewards_order_images_and_equal_pil_sizes():
    batch = images_batch()
    comp = get_reward("jpeg_compressibility")(batch, ["p"] * 3, None)
    incomp = get_reward("jpeg_incompressibility")(batch, ["p"] * 3, None)
    assert comp.dtype == incomp.dtype == np.float32 and comp.shape == (3,)
    assert comp[0] > comp[2] and incomp[0] < incomp[2]
    np.testing.assert_array_equal(comp, -incomp)
    for i, a in enumerate(batch):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        assert incomp[i] == np.float32(len(buf.getvalue()) / 1000)
    low = get_reward("jpeg_incompressibility", quality=10)(batch, ["p"] * 3, None)
    assert low[2] < incomp[2]


def test_image_formats_agree():
    batch = images_batch()
    pil = [Image.fromarray(a) for a in batch]
    as_tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    reward = get_reward("jpeg_incompressibility")
    np.testing.assert_array_equal(reward(pil, [], None), reward(batch, [], None))
    np.testing.assert_array_equal(reward(as_tensor, [], None), reward(batch, [], None))
    assert [np.asarray(i).tolist() for i in to_pil_images(as_tensor)] == [a.tolist() for a in batch]
    with pytest.raises(ValueError, match="uint8"):
        to_pil_images(batch.astype(np.float32))


def test_registry_errors_and_registration():
    with pytest.raises(ConfigError, match=r"unknown reward 'nope' \(allowed: aesthetic, jpeg_compressibility, "
                                          r"jpeg_incompressibility, learned, prompt_alignment"):
        get_reward("nope")
    with pytest.raises(ConfigError, match="jpeg_compressibility: .*unexpected keyword"):
        get_reward("jpeg_compressibility", qualty=90)

    @register("constant_for_test")
    def constant(value: float = 1.0):
        return lambda images, prompts, metadata=None: np.full(len(prompts), value, np.float32)

    try:
        assert get_reward("constant_for_test", value=2.0)(None, ["a", "b"]).tolist() == [2.0, 2.0]
    finally:
        del REWARDS["constant_for_test"]


def test_missing_model_paths_name_the_option(tmp_path, clip_dir, head_path):
    with pytest.raises(ConfigError, match=r"^clip_path: CLIP model not found: .*nothing is downloaded"):
        get_reward("prompt_alignment", clip_path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"^head_path: aesthetic head not found"):
        get_reward("aesthetic", clip_path=str(clip_dir), head_path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match=r"^clip_path: "):
        get_reward("aesthetic", clip_path=str(tmp_path / "missing"), head_path=str(head_path))
    with pytest.raises(ConfigError, match=r"aesthetic: .*clip_path"):
        get_reward("aesthetic", head_path=str(head_path))


def reference_features(clip_dir: Path, images: np.ndarray, prompts: list[str]):
    """Normalised image/text features straight from CLIPModel, independently of the reward code."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = CLIPImageProcessor.from_pretrained(clip_dir)([Image.fromarray(a) for a in images],
                                                          return_tensors="pt").pixel_values
    tok = CLIPTokenizer(str(clip_dir / "vocab.json"), str(clip_dir / "merges.txt"))(
        prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img, txt = model.get_image_features(pixel_values=pixels), model.get_text_features(**tok)
    img, txt = (getattr(f, "pooler_output", f) for f in (img, txt))
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


PROMPTS = ["a flat grey square", "a horizontal gradient", "random coloured noise"]


def test_aesthetic_is_the_head_on_normalised_clip_embeddings(clip_dir, head_path):
    from safetensors.torch import load_file

    batch = images_batch()
    reward = get_reward("aesthetic", clip_path=str(clip_dir), head_path=str(head_path), device="cpu")
    scores = reward(batch, PROMPTS, None)
    assert scores.dtype == np.float32 and scores.shape == (3,) and np.isfinite(scores).all()
    np.testing.assert_array_equal(scores, reward(batch, PROMPTS, None))
    x, _ = reference_features(clip_dir, batch, PROMPTS)
    w = load_file(str(head_path))
    for i in (0, 2, 4, 6, 7):  # LAION's MLP: dropouts (identity at eval) and no activations in between
        x = x @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    np.testing.assert_allclose(scores, x[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    assert len(set(scores.tolist())) == 3


def test_prompt_alignment_is_clip_cosine_similarity(clip_dir):
    batch = images_batch()
    reward = get_reward("prompt_alignment", clip_path=str(clip_dir), device="cpu")
    scores = reward(batch, PROMPTS, None)
    assert scores.dtype == np.float32 and scores.shape == (3,) and (np.abs(scores) <= 1 + 1e-6).all()
    np.testing.assert_array_equal(scores, reward(batch, PROMPTS, None))
    img, txt = reference_features(clip_dir, batch, PROMPTS)
    np.testing.assert_allclose(scores, (img * txt).sum(-1).numpy(), rtol=1e-5, atol=1e-6)
    # the pairing matters: the same images with the prompts rotated score as the rotated cosines
    rotated = PROMPTS[1:] + PROMPTS[:1]
    rotated_scores = reward(batch, rotated, None)
    np.testing.assert_allclose(rotated_scores, (img * txt[[1, 2, 0]]).sum(-1).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(rotated_scores, scores)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(batch, PROMPTS[:2], None)


def test_world_alignment_is_the_share_of_stated_fields_the_reader_finds():
    from diffray.world.render import render
    from diffray.world.scenes import scene_at

    scenes = [scene_at(0, "pretrain", i) for i in range(4)]
    images = [render(s, 64) for s in scenes]
    reward = get_reward("world_alignment")
    own = reward(images, [s.caption for s in scenes], None)
    assert own.dtype == np.float32 and own.shape == (4,)
    np.testing.assert_array_equal(own, 1.0)  # a scene drawn from its caption states nothing the reader misses
    other = "a red circle on a blue background" if scenes[0].colour != "red" else "a green circle on a blue background"
    wrong = reward(images[:1], [other], None)[0]
    # the share of the three stated fields (colour, shape, background) the reader finds; the colour never
    want = np.mean([scenes[0].shape == "circle", scenes[0].bg == "blue", False])
    assert wrong == pytest.approx(want) and wrong < 1.0
    with pytest.raises(ValueError, match="world prompts only.*a photo of a cat"):
        reward(images[:1], ["a photo of a cat"], None)
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        reward(images[:1], [scenes[0].caption] * 2, None)


def test_world_alignment_refuses_prompts_outside_the_world_before_ray(tmp_path):
    from diffray.methods import load_config
    from diffray.trainers.ddpo import preflight

    cfg = load_config(Path("configs/ddpo.yaml"), ["ddpo.reward.name=world_alignment"])
    preflight(cfg, "unused")  # the shipped prompts are world prompts
    bad = tmp_path / "prompts.txt"
    bad.write_text("a red circle on a blue background\na photo of a cat\n")
    cfg = load_config(Path("configs/ddpo.yaml"), ["ddpo.reward.name=world_alignment", f"ddpo.prompts_file={bad}"])
    with pytest.raises(ConfigError, match="a photo of a cat") as err:
        preflight(cfg, "unused")
    assert err.value.field == "ddpo.prompts_file"
