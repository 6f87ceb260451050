"""Masked loss without Ray: the loss counts only masked elements (exact zero gradient elsewhere), an empty
mask changes nothing, the mask gets its image's crop and flip, and a bad mask file is quarantined by name."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffray.data.pipeline import preprocess_batch
from diffray.data.validate import Rules, check_row
from diffray.trainers.components.diffusion import batch_mean, masked_mse, per_sample_loss
from diffray.trainers.session import WorkerEnv

ENV = WorkerEnv(0, 1, torch.device("cpu"), "fp32")


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def left_half(size: int = 64, batch: int = 2) -> torch.Tensor:
    mask = torch.zeros(batch, 1, size, size)
    mask[..., : size // 2] = 1.0
    return mask


def test_left_half_mask_zeroes_right_half_gradients_and_equals_left_half_mse():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=g)
    # A pixel-resolution mask (64 px) averaged down to the 8x8 latent grid: the left half exactly.
    losses = per_sample_loss(pred, target, torch.tensor([10, 500]), None, "epsilon", mask=left_half(64))
    want = ((pred[..., :4] - target[..., :4]) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(losses, want, atol=1e-6), (losses, want)
    assert not torch.allclose(losses, F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)))
    losses.sum().backward()
    assert torch.equal(pred.grad[..., 4:], torch.zeros_like(pred.grad[..., 4:]))
    assert (pred.grad[..., :4] != 0).all()


def test_empty_mask_gives_zero_loss_no_nan_and_leaves_the_batch_mean():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = left_half(8)
    mask[1] = 0.0  # row 1 masks nothing
    losses = masked_mse(pred, target, mask)
    assert torch.isfinite(losses).all() and losses[1].item() == 0.0
    loss = batch_mean(losses, mask)
    assert torch.allclose(loss, losses[0])  # the empty row is not in the divisor either
    loss.backward()
    assert torch.equal(pred.grad[1], torch.zeros_like(pred.grad[1]))
    assert batch_mean(losses, torch.zeros_like(mask)).item() == 0.0


@pytest.fixture(scope="module")
def lora_task(tiny_model_path):
    """A real (tiny) LoRA task, shared by the tests that need the shared denoising loss."""
    from diffray.methods import validate_config
    from diffray.trainers.lora.task import LoraTask

    return LoraTask(validate_config({"method": "lora"}), tiny_model_path, ENV)


def test_a_row_with_an_empty_mask_changes_no_lora_gradient(lora_task):
    """Through the shared denoising loss: a batch of row A plus row B with an empty mask gives exactly
    A's loss and gradients."""
    task = lora_task
    tok = task.comps.tokenizer(["a red square"] * 2, padding="max_length", max_length=77, return_tensors="pt")
    g = torch.Generator().manual_seed(1)
    both = {"sample_id": torch.tensor([3, 4]), "pixel_values": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
            "input_ids": tok.input_ids, "loss_mask": left_half(64)}
    both["loss_mask"][1] = 0.0
    only_a = {k: v[:1] for k, v in both.items()}

    def loss_and_grads(batch):
        task.module.zero_grad()
        loss = batch_mean(task.losses(task.module, batch, 2), batch["loss_mask"])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in task.module.parameters() if p.requires_grad]

    (loss_ab, grads_ab), (loss_a, grads_a) = loss_and_grads(both), loss_and_grads(only_a)
    assert loss_a.item() > 0 and torch.allclose(loss_ab, loss_a, atol=1e-7)
    assert all(torch.allclose(x, y, atol=1e-7) for x, y in zip(grads_ab, grads_a))
    assert any(x.abs().sum() > 0 for x in grads_a)


def raw_row(image: bytes, mask: bytes | None, caption: str = "a toy") -> dict:
    return {"sample_id": np.array([7]), "source": np.array(["toy.png"], dtype=object),
            "caption": np.array([caption], dtype=object), "error": np.array([""], dtype=object),
            "image": np.array([image], dtype=object), "mask_image": np.array([mask], dtype=object)}


def test_mask_gets_its_images_crop_and_flip(tiny_model_path):
    # The image is its own mask (white left third, black elsewhere, non-square): after a random crop and
    # a flip the loss mask must still be where the image is white.
    a = np.zeros((64, 96, 3), dtype=np.uint8)
    a[:, :32] = 255
    a[:8, :] = 255  # a top band too: a vertical crop offset shows
    for seed in range(4):
        out = preprocess_batch(raw_row(png(a), png(a)), tiny_model_path, 32, center_crop=False, random_flip=True,
                               seed=seed, rules=Rules())
        image_white = (out["pixel_values"][0].mean(axis=0) + 1) / 2
        assert out["loss_mask"].shape == (1, 1, 32, 32) and out["loss_mask"].dtype == np.float32
        assert np.allclose(out["loss_mask"][0, 0], image_white, atol=1e-5)


def test_bad_or_mismatched_mask_is_quarantined_with_its_reason():
    img = png(np.full((64, 64, 3), 128, dtype=np.uint8))
    assert check_row(raw_row(img, png(np.zeros((64, 64, 3), dtype=np.uint8))), 0, Rules()) is None
    assert check_row(raw_row(img, None), 0, Rules()) == "mask image not found"
    assert check_row(raw_row(img, b"not a png"), 0, Rules()).startswith("mask image: cannot decode image")
    assert check_row(raw_row(img, png(np.zeros((32, 64, 3), dtype=np.uint8))), 0, Rules()) == \
        "mask image is 64x32, the image 64x64"


def test_denoising_task_shuffles_tags_per_step_and_encodes_the_shuffled_ids(lora_task):
    """data.shuffle_tags in the shared loss: the ids the text encoder sees are the keyed shuffle of the
    batch's (cached or not), not the cached states of the unshuffled caption."""
    task = lora_task
    ids = task.comps.tokenizer(["sks, red, blue, green, big, small"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    batch = {"sample_id": torch.tensor([9]), "input_ids": ids, "prompt_embeds": torch.zeros(1, 77, 32)}
    assert torch.equal(task.prompt_ids(batch, 3), ids)  # off: the dataset's ids
    task.cfg.data.shuffle_tags, task.cfg.data.keep_tokens = True, 1
    try:
        per_step = [task.prompt_ids(batch, s) for s in range(1, 6)]
        assert all(torch.equal(a, b) for a, b in zip(per_step, [task.prompt_ids(batch, s) for s in range(1, 6)]))
        assert len({tuple(p[0].tolist()) for p in per_step}) > 1 and all(p[0, 1] == ids[0, 1] for p in per_step)
        hidden = task.text_inputs(batch, 2, 0.0, (64, 64))["encoder_hidden_states"]
        want = task.family.encode(task.comps.text_encoder, task.prompt_ids(batch, 2))
        assert torch.allclose(hidden, want) and hidden.abs().sum() > 0
    finally:
        task.cfg.data.keep_tokens, task.cfg.data.shuffle_tags = 0, False
