"""`POST /v1/feedback`: the request body (a preference between two images of one prompt) and the checks
that turn it into a `FeedbackRecord` ready to store.

Every image is decoded within the configured limits and re-encoded as PNG, so what is stored is pixels,
never whatever else the client's file carried (metadata chunks, a second payload). Text goes through
the same checks as generation prompts; adapter ids through the registry's id rule. A client may send its
own `id` to make retries idempotent. Never imports ray or torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from diffray.errors import RequestError
from diffray.serve.config import FeedbackSection, Limits
from diffray.serve.registry import check_adapter_id
from diffray.serve.schemas import MAX_SEED, RESERVED_IDS, SCHEDULERS, Body, Text, check_prompt, decode_b64_image

CHOICES = ("left", "right", "tie", "both_bad")
FEEDBACK_ID = r"[A-Za-z0-9_-]{8,64}"


class ComparedImage(Body):
    """One side of a comparison: the image and how it was made."""

    b64_json: Text = Field(..., min_length=1, description="The image shown (base64 PNG or JPEG).")
    model: Text = Field("base", description="Adapter id that made it, or `base`.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Its seed.")
    steps: int | None = Field(None, ge=1, le=10_000, description="Its sampler steps.")
    guidance: float | None = Field(None, ge=0, le=1000, allow_inf_nan=False, description="Its guidance scale.")
    scheduler: Literal[SCHEDULERS] | None = Field(None, description="Its sampler.")  # type: ignore[valid-type]
    adapter_scale: float | None = Field(None, ge=-8.0, le=8.0, allow_inf_nan=False, description="Its adapter's "
                                        "LoRA strength (as the request's adapter_scale).")
    control_model: Text | None = Field(None, min_length=1, max_length=64, description="The ControlNet that "
                                       "guided it (the request's control.model).")
    control_scale: float | None = Field(None, ge=0.0, le=4.0, allow_inf_nan=False, description="That "
                                        "ControlNet's conditioning scale.")


class FeedbackRequest(Body):
    """Which of two images of the same prompt a person preferred."""

    id: Text | None = Field(None, pattern=f"^{FEEDBACK_ID}$", description="Client-chosen id (8-64 of A-Z a-z 0-9 "
                            "_ -): a retry with the same id and content is stored once.")
    prompt: Text = Field(..., description="The prompt both images were made from.")
    negative_prompt: Text | None = Field(None, description="Their negative prompt.")
    images: list[ComparedImage] = Field(..., min_length=2, max_length=2, description="Left, then right.")
    choice: Literal[CHOICES] = Field(..., description="left, right, tie or both_bad.")  # type: ignore[valid-type]


@dataclass
class FeedbackRecord:
    """A validated preference, images as clean PNG bytes."""

    id: str | None
    prompt: str
    negative_prompt: str | None
    choice: str
    models: tuple[str, str]
    params: tuple[dict, dict]
    images: tuple[bytes, bytes]
    user: str | None
    created: float

    def digest(self) -> str:
        """Content identity (not time or user): a retry must match it to count as the same post."""
        content = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "choice": self.choice,
                   "models": self.models, "params": self.params,
                   "images": [hashlib.sha256(b).hexdigest() for b in self.images]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def clean_png(b64: str, param: str, cfg: FeedbackSection) -> bytes:
    """Decoded, size-checked and re-encoded image. Raises RequestError naming `param`."""
    data = b64.partition(",")[2] if b64.startswith("data:") else b64
    if len(data) > (cfg.max_image_bytes * 4) // 3 + 4:
        raise RequestError(f"image larger than {cfg.max_image_bytes} bytes", param=param, status=413,
                           kind="request_too_large")
    img = decode_b64_image(data, param, cfg.max_image_side ** 2)
    if max(img.size) > cfg.max_image_side:
        raise RequestError(f"{img.size[0]}x{img.size[1]} exceeds {cfg.max_image_side} pixels per side", param=param)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _model_id(model: str, param: str) -> str:
    """`base` for any name the images API maps to the base model (`base`, `dall-e-3`, ...), else the adapter id."""
    return "base" if model in RESERVED_IDS else check_adapter_id(model, param)


def feedback_record(req: FeedbackRequest, limits: Limits, cfg: FeedbackSection, user: str | None) -> FeedbackRecord:
    """A checked record from a request. Raises RequestError naming the field."""
    prompt = check_prompt(req.prompt, limits, "prompt")
    if req.negative_prompt is not None and len(req.negative_prompt) > limits.max_prompt_chars:
        raise RequestError(f"{len(req.negative_prompt)} characters; at most {limits.max_prompt_chars}",
                           param="negative_prompt")
    models = tuple(_model_id(im.model, f"images.{i}.model") for i, im in enumerate(req.images))
    params = tuple(_params(im) for im in req.images)
    images = tuple(clean_png(im.b64_json, f"images.{i}.b64_json", cfg) for i, im in enumerate(req.images))
    return FeedbackRecord(req.id, prompt, req.negative_prompt, req.choice, models, params, images,  # type: ignore[arg-type]
                          user, time.time())


def _params(im: ComparedImage) -> dict:
    """How an image was made, as stored: seed, steps, guidance and sampler always (None when not sent); the
    adapter's strength and the ControlNet only when sent (a record of a plain comparison keeps its old shape)."""
    made = {"seed": im.seed, "steps": im.steps, "guidance": im.guidance, "scheduler": im.scheduler}
    extra = {"adapter_scale": im.adapter_scale, "control_model": im.control_model, "control_scale": im.control_scale}
    return {**made, **{k: v for k, v in extra.items() if v is not None}}


def key_fingerprint(token: str | None) -> str | None:
    """Who sent it, without storing the key: a short hash of the bearer key (None without one)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else None
