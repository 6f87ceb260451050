"""Request and response shapes of the HTTP API, and the checks that turn a request into a `Job`.

Two request bodies: `ImagesRequest` (the OpenAI Images API: prompt, n, size "WxH", response_format,
model = adapter id or base) and `GenerateRequest` (every option). Static types live in the models;
limits from the app's config are checked by `images_job` / `generate_job`, which raise `RequestError`
naming the field. Never imports ray or torch.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from diffray.errors import DatasetError, RequestError
from diffray.serve.config import Limits, side_problem

BASE_IDS = ("base",)  # `model` values that mean "no adapter"
OPENAI_MODEL_NAMES = ("dall-e-2", "dall-e-3", "gpt-image-1")  # OpenAI defaults map to the base model too
# so no adapter may have one of these ids: the images API could never reach it (`registry.valid_id`)
RESERVED_IDS = frozenset(BASE_IDS + OPENAI_MODEL_NAMES)
SCHEDULERS = ("default", "ddim", "ddpm", "pndm", "euler", "euler_a", "dpmpp_2m", "unipc")
MAX_SEED = 2**63 - 1
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
# C0 controls (but tab, newline, carriage return) and DEL: never meaningful in a prompt, and NUL ends
# strings in C layers below us.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check_text(value: str) -> str:
    """Text a tokenizer, a database and a browser can all take: encodable as UTF-8 (no lone UTF-16
    surrogates, which JSON can carry as `\\ud800`) and free of control characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone UTF-16 surrogate (not encodable text)") from None
    if _CONTROL.search(value):
        raise ValueError("contains a control character")
    return value


Text = Annotated[str, AfterValidator(check_text)]


class Body(BaseModel):
    """A request body: unknown fields refused, types exact (no "2" for 2, no true for 1), text checked."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ImagesRequest(Body):
    """OpenAI `POST /v1/images/generations`."""

    prompt: Text = Field(..., description="What to draw.")
    model: Text | None = Field(None, description="Adapter id from GET /v1/models, or `base` (default).")
    n: int = Field(1, description="Images to return.")
    size: Text | None = Field(None, description="`WIDTHxHEIGHT`, multiples of 8 (default: the model's size).")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="b64_json, or url (answered as a data: URL; nothing is stored).")
    quality: Text | None = Field(None, description="Accepted for compatibility; ignored.")
    style: Text | None = Field(None, description="Accepted for compatibility; ignored.")
    user: Text | None = Field(None, description="Accepted for compatibility; ignored.")
    seed: int | None = Field(None, description="Extension: seed of the first image (random when absent).")


class AdapterWeight(Body):
    id: Text = Field(..., description="Adapter id (LoRA or Textual Inversion).")
    weight: float = Field(1.0, ge=-8.0, le=8.0, allow_inf_nan=False, description="LoRA strength.")


class ControlSpec(Body):
    model: Text = Field(..., description="A configured ControlNet name or a registry ControlNet id.")
    image: Text | None = Field(None, min_length=1, description="Control image (base64 PNG/JPEG), used as is.")
    raw_image: Text | None = Field(None, min_length=1, description="A plain image (base64); the server makes the "
                                   "control image "
                                  "(canny for canny ControlNets).")
    scale: float = Field(1.0, ge=0.0, le=4.0, allow_inf_nan=False, description="Conditioning scale.")


class GenerateRequest(Body):
    """`POST /v1/generate`: every option."""

    prompt: Text = Field(..., description="What to draw.")
    negative_prompt: Text | None = Field(None, description="What to steer away from.")
    n: int = Field(1, description="Images to return (seeds seed, seed+1, ...).")
    width: int | None = Field(None, description="Pixels, a multiple of 8.")
    height: int | None = Field(None, description="Pixels, a multiple of 8.")
    steps: int | None = Field(None, description="Sampler steps.")
    guidance: float | None = Field(None, allow_inf_nan=False, description="Guidance scale (absent: the model's "
                                   "default, 7.5 classifier-free for SD/SDXL, 3.5 distilled for Flux).")
    seed: int | None = Field(None, description="Seed of the first image (random when absent).")
    scheduler: Literal[SCHEDULERS] = Field("default", description="Sampler.")  # type: ignore[valid-type]
    adapter: Text | None = Field(None, description="One adapter id.")
    adapter_scale: float = Field(1.0, ge=-8.0, le=8.0, allow_inf_nan=False, description="Its LoRA strength.")
    adapters: list[AdapterWeight] | None = Field(None, description="Several adapters with weights.")
    control: ControlSpec | None = Field(None, description="ControlNet and its control image.")


@dataclass
class Job:
    """One request as the Generator runs it (plain, picklable data)."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    negative_prompt: str | None = None
    scheduler: str = "default"
    adapters: tuple[tuple[str, float], ...] = ()
    controlnet: str | None = None
    control_image: Any = None  # PIL image, already the control map
    control_scale: float = 1.0
    meta: dict = field(default_factory=dict)
    job_id: str = ""  # set by the ingress: how a replica is told this job was cancelled
    timeout_s: float = 0.0  # > 0: the Generator abandons the job this long after it arrives (a backstop)
    deadline: float = 0.0  # time.monotonic() in the Generator's process after which the job is abandoned

    def adapter_key(self) -> str:
        """The multiplexed model id: the adapter ids, sorted, joined by '+' ('' for the base model)."""
        return "+".join(sorted({a for a, _ in self.adapters}))

    def batch_key(self) -> tuple:
        """Jobs with equal keys run in one pipeline call."""
        return (*self.shape_key(), self.adapters)

    def shape_key(self) -> tuple:
        """Everything but the adapters that jobs in one pipeline call share: with one LoRA each (UNet only),
        jobs of equal shape keys may still share a call (`diffray.serve.mixing`)."""
        return (self.width, self.height, self.steps, self.guidance, self.scheduler, self.controlnet,
                self.control_scale, self.negative_prompt is None)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def check_prompt(text: str, limits: Limits, param: str) -> str:
    if not text.strip():
        raise RequestError("must not be empty", param=param)
    if len(text) > limits.max_prompt_chars:
        raise RequestError(f"{len(text)} characters; at most {limits.max_prompt_chars}", param=param)
    return text


def check_side(value: int, limits: Limits, param: str) -> int:
    problem = side_problem(value, limits)
    if problem:
        raise RequestError(problem, param=param)
    return value


def parse_size(size: str | None, default: int, limits: Limits) -> tuple[int, int]:
    """`"WxH"` -> (width, height), both checked; `default` square when None (within the limits: the config
    and the Ingress check it at start, `config.default_size`). Raises RequestError naming `size`."""
    if size is None:
        return default, default
    m = _SIZE.fullmatch(size)
    if not m:
        raise RequestError("must be WIDTHxHEIGHT (e.g. 512x512)", param="size")
    return check_side(int(m.group(1)), limits, "size"), check_side(int(m.group(2)), limits, "size")


def check_common(n: int, steps: int, guidance: float, seed: int | None, limits: Limits) -> int:
    """Checks n, steps, guidance and seed; returns the seed (drawn when None)."""
    if not 1 <= n <= limits.max_n:
        raise RequestError(f"{n} must be in [1, {limits.max_n}]", param="n")
    if not 1 <= steps <= limits.max_steps:
        raise RequestError(f"{steps} must be in [1, {limits.max_steps}]", param="steps")
    if not 0 <= guidance <= limits.max_guidance:
        raise RequestError(f"{guidance} must be in [0, {limits.max_guidance}]", param="guidance")
    if seed is None:
        import secrets

        return secrets.randbelow(2**31)
    if not 0 <= seed <= MAX_SEED - limits.max_n:
        raise RequestError(f"{seed} must be in [0, 2^63 - {limits.max_n + 1}]", param="seed")
    return seed


def adapter_of_model(model: str | None) -> str | None:
    """The adapter id an OpenAI `model` names; None for the base model (left out, `base` or an OpenAI name).

    Raises:
        RequestError: naming `model` when it is empty (as `adapter: ""` and a feedback `model: ""` are refused).
    """
    if model == "":
        raise RequestError("must not be empty: an adapter id from GET /v1/models, or leave it out (or `base`) "
                           "for the base model", param="model")
    if model is None or model in RESERVED_IDS:
        return None
    return model


def images_job(req: ImagesRequest, limits: Limits, default_size: int, default_steps: int,
               default_guidance: float = 7.5) -> Job:
    """An OpenAI request as a Job (adapter ids not yet resolved; the model family's guidance). Raises
    RequestError."""
    width, height = parse_size(req.size, default_size, limits)
    seed = check_common(req.n, default_steps, default_guidance, req.seed, limits)
    adapter = adapter_of_model(req.model)
    return Job(prompt=check_prompt(req.prompt, limits, "prompt"), n=req.n, width=width, height=height,
               steps=default_steps, guidance=default_guidance, seed=seed,
               adapters=((adapter, 1.0),) if adapter is not None else ())


def generate_job(req: GenerateRequest, limits: Limits, default_size: int, default_steps: int,
                 default_guidance: float = 7.5) -> Job:
    """A /v1/generate request as a Job (adapters not resolved, control image not decoded); a request
    without guidance gets `default_guidance` (the model family's)."""
    steps = default_steps if req.steps is None else req.steps
    guidance = default_guidance if req.guidance is None else req.guidance
    seed = check_common(req.n, steps, guidance, req.seed, limits)
    width = check_side(default_size if req.width is None else req.width, limits, "width")
    height = check_side(default_size if req.height is None else req.height, limits, "height")
    if req.adapter is not None and req.adapters:
        raise RequestError("give `adapter` or `adapters`, not both", param="adapters")
    pairs = [(req.adapter, req.adapter_scale)] if req.adapter is not None else \
        [(a.id, a.weight) for a in req.adapters or []]
    if len(pairs) > limits.max_adapters:
        raise RequestError(f"{len(pairs)} adapters; at most {limits.max_adapters}", param="adapters")
    if len({a for a, _ in pairs}) != len(pairs):
        raise RequestError("an adapter id appears twice", param="adapters")
    neg = None if req.negative_prompt is None else req.negative_prompt
    if neg is not None and len(neg) > limits.max_prompt_chars:
        raise RequestError(f"{len(neg)} characters; at most {limits.max_prompt_chars}", param="negative_prompt")
    return Job(prompt=check_prompt(req.prompt, limits, "prompt"), n=req.n, width=width, height=height,
               steps=steps, guidance=guidance, seed=seed, negative_prompt=neg, scheduler=req.scheduler,
               adapters=tuple(pairs), control_scale=req.control.scale if req.control else 1.0)


def decode_b64_image(data: str, param: str, max_pixels: int):
    """A base64 (or data: URL) image -> RGB PIL image (alpha on black). Raises RequestError naming `param`,
    whatever the bytes are (the decoder's own message is not passed on: it can carry reprs)."""
    from diffray.data.transforms import BLACK, decode_image

    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("not valid base64", param=param) from None
    if not raw:
        raise RequestError("empty image", param=param)
    try:
        return decode_image(raw, param, max_pixels, background=BLACK)
    except DatasetError as exc:
        if "decompression-bomb" in str(exc):
            raise RequestError(f"image larger than {max_pixels} pixels", param=param) from None
        raise RequestError("cannot decode image (PNG or JPEG expected)", param=param) from None
    except Exception:  # noqa: BLE001 - any decoder failure is the bytes' fault, never a 500
        raise RequestError("cannot decode image (PNG or JPEG expected)", param=param) from None
