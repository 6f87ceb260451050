"""Reward functions for DDPO: a batch of images and their prompts -> one float32 score per image.

A reward is built by a factory registered under a name (`register`, `get_reward(name, **options)`),
so a model-based reward loads its model once and scores many batches. The built function is
`reward(images, prompts, metadata) -> np.ndarray float32 [B]` (higher is better) where `images` is a
list of PIL images, a uint8 numpy batch [B, H, W, 3] or a float tensor [B, 3, H, W] in [0, 1] (what a
VAE decode gives after `(x / 2 + 0.5).clamp(0, 1)`), and `metadata` is an optional per-image list of
dicts that rewards may ignore.

Shipped: `jpeg_compressibility` / `jpeg_incompressibility` (-/+ JPEG size in kB, DDPO's tasks),
`aesthetic` (a LAION-style linear/MLP head on normalised CLIP image embeddings), `prompt_alignment`
(CLIP cosine similarity of prompt and image), `world_alignment` (the share of a world prompt's fields the
world reader finds), and `learned` (a preference model trained by
`method: reward_model`). Models come from local folders/files given as options;
nothing is ever downloaded. Never imports ray.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from diffray.errors import ConfigError, ModelError
from diffray.registry import Registry

RewardFn = Callable[[Any, Sequence[str], Sequence[dict] | None], np.ndarray]
REWARDS = Registry("reward", field="reward")  # name -> factory(**options) -> RewardFn
JPEG_QUALITY = 95  # DDPO's setting


register = REWARDS.register


def get_reward(name: str, **options: Any) -> RewardFn:
    """The reward `name` built with `options`.

    Raises:
        ConfigError: an unknown name (listing the known ones), an option it does not take, or a model
            path that does not exist (naming the option).
    """
    return REWARDS.build(name, **options)


def to_pil_images(images) -> list[Image.Image]:
    """A batch as RGB PIL images: from a list of PIL images, uint8 numpy [B, H, W, 3] or a float tensor
    [B, 3, H, W] in [0, 1] (rounded to uint8 as an image file would be)."""
    if isinstance(images, torch.Tensor):
        images = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        images = images.numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"a numpy image batch must be uint8 [B, H, W, C], got {images.dtype} {images.shape}")
        return [Image.fromarray(a).convert("RGB") for a in images]
    return [img.convert("RGB") for img in images]


def jpeg_size_kb(image: Image.Image, quality: int = JPEG_QUALITY) -> float:
    """Size in kB (1000 bytes) of the image encoded as JPEG at `quality` by PIL."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = JPEG_QUALITY) -> RewardFn:
    """Minus the JPEG size in kB: rewards images that compress well (flat, smooth)."""

    def reward(images, prompts=(), metadata=None) -> np.ndarray:
        return -np.asarray([jpeg_size_kb(i, quality) for i in to_pil_images(images)], dtype=np.float32)

    return reward


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = JPEG_QUALITY) -> RewardFn:
    """The JPEG size in kB: rewards detailed, high-frequency images."""

    def reward(images, prompts=(), metadata=None) -> np.ndarray:
        return np.asarray([jpeg_size_kb(i, quality) for i in to_pil_images(images)], dtype=np.float32)

    return reward


@register("world_alignment")
def world_alignment() -> RewardFn:
    """The share of the fields a world prompt states (background, colour, shape, texture, size, position) that
    the world reader finds in the image, in [0, 1]: DDPO's prompt-alignment task on the tiny world, scored by
    classical vision instead of a captioning model. A prompt outside the world's grammar is a ValueError."""
    from diffray.errors import DiffrayError
    from diffray.world.scores import alignment

    def reward(images, prompts, metadata=None) -> np.ndarray:
        pil = to_pil_images(images)
        if len(prompts) != len(pil):
            raise ValueError(f"{len(pil)} images but {len(prompts)} prompts")
        try:
            return np.asarray([alignment(img, p) for img, p in zip(pil, prompts)], dtype=np.float32)
        except DiffrayError as exc:
            raise ValueError(f"world_alignment scores world prompts only: {exc}") from None

    return reward


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_clip(path: str | Path, option: str, device: torch.device):
    """(CLIPModel in eval mode, CLIPProcessor) from a local folder saved with `save_pretrained`.

    Raises:
        ConfigError: `path` is not a folder (`option` names the config option that gave it).
        ModelError: the folder does not hold a loadable CLIP model and processor.
    """
    from transformers import CLIPModel, CLIPProcessor

    if not Path(path).expanduser().is_dir():
        raise ConfigError(f"CLIP model not found: {path} (a local folder; nothing is downloaded)", field=option)
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a CLIP model + processor folder ({exc})") from None
    return model, processor


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected feature; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_embeddings(model, processor, images) -> torch.Tensor:
    """L2-normalised CLIP image embeddings [B, P] (fp32) of a batch (any format `to_pil_images` takes)."""
    pixels = processor(images=to_pil_images(images), return_tensors="pt").pixel_values.to(model.device)
    feats = _features(model.get_image_features(pixel_values=pixels)).float()
    return feats / feats.norm(dim=-1, keepdim=True)


def text_embeddings(model, processor, prompts: Sequence[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings [B, P] (fp32); prompts truncated to the model's context."""
    tok = processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(model.device)
    feats = _features(model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)).float()
    return feats / feats.norm(dim=-1, keepdim=True)


class AestheticHead(torch.nn.Module):
    """The LAION aesthetic predictor's head: Linear layers stored as `layers.{i}.weight/bias` (the
    improved-aesthetic-predictor MLP has Linear at 0, 2, 4, 6, 7 with dropouts between and no
    activations; a single `layers.0` is a linear probe). Applied in index order."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
        if not idx:
            raise ValueError("no 'layers.<i>.weight' tensors")
        self.layers = torch.nn.ModuleList()
        for i in idx:
            w = state[f"layers.{i}.weight"]
            lin = torch.nn.Linear(w.shape[1], w.shape[0])
            lin.load_state_dict({"weight": w, "bias": state[f"layers.{i}.bias"]})
            self.layers.append(lin)
        if self.layers[-1].out_features != 1:
            raise ValueError(f"the last layer has {self.layers[-1].out_features} outputs, need 1")

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.squeeze(-1)


def load_aesthetic_head(path: str | Path, option: str = "head_path") -> AestheticHead:
    """An `AestheticHead` from a safetensors file (convert LAION's `.pth` once with
    `safetensors.torch.save_file(torch.load(pth), out)`).

    Raises:
        ConfigError: the file is missing (naming `option`). ModelError: it is not a head.
    """
    from safetensors.torch import load_file

    if not Path(path).expanduser().is_file():
        raise ConfigError(f"aesthetic head not found: {path} (a local .safetensors file; nothing is downloaded)",
                          field=option)
    try:
        return AestheticHead({k: v.float() for k, v in load_file(str(Path(path).expanduser())).items()}).eval()
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise ModelError(f"{path}: not an aesthetic head ({exc})") from None


@register("aesthetic")
def aesthetic(clip_path: str, head_path: str, device: str | None = None) -> RewardFn:
    """The aesthetic head's score of the normalised CLIP image embedding (LAION's predictor uses
    CLIP ViT-L/14: about 1-10, higher is prettier). `device`: default cuda when available."""
    dev = _device(device)
    head = load_aesthetic_head(head_path)
    model, processor = load_clip(clip_path, "clip_path", dev)
    if head.in_features != model.config.projection_dim:
        raise ConfigError(f"{head_path}: the head takes {head.in_features} features, the CLIP model gives "
                          f"{model.config.projection_dim}", field="head_path")
    head = head.to(dev)

    @torch.no_grad()
    def reward(images, prompts=(), metadata=None) -> np.ndarray:
        return head(image_embeddings(model, processor, images)).cpu().numpy().astype(np.float32)

    return reward


@register("prompt_alignment")
def prompt_alignment(clip_path: str, device: str | None = None) -> RewardFn:
    """Cosine similarity in [-1, 1] between each image's CLIP embedding and its prompt's (the
    CLIPScore without its x100 / clamp at 0). `device`: default cuda when available."""
    dev = _device(device)
    model, processor = load_clip(clip_path, "clip_path", dev)

    @torch.no_grad()
    def reward(images, prompts, metadata=None) -> np.ndarray:
        pil = to_pil_images(images)
        if len(prompts) != len(pil):
            raise ValueError(f"{len(pil)} images but {len(prompts)} prompts")
        sims = (image_embeddings(model, processor, pil) * text_embeddings(model, processor, prompts)).sum(-1)
        return sims.cpu().numpy().astype(np.float32)

    return reward


@register("learned")
def learned(path: str, device: str | None = None) -> RewardFn:
    """The score of a reward model trained by `method: reward_model` (a dir: its weights, config and card;
    the card's base model gives the frozen VAE and text encoder it reads). Higher: preferred."""
    from diffray.models.reward import LearnedReward

    if not Path(path).expanduser().is_dir():
        raise ConfigError(f"reward model not found: {path} (a local folder written by method reward_model)",
                          field="path")
    scorer = LearnedReward(Path(path).expanduser(), _device(device))

    def reward(images, prompts, metadata=None) -> np.ndarray:
        return scorer(to_pil_images(images), list(prompts)).astype(np.float32)

    return reward
