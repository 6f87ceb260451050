"""Response shapes of the HTTP API, so the OpenAPI schema documents every answer (success and error) and
a schema-driven fuzzer (Schemathesis) can check the server against it. Never imports ray or torch.
"""

from __future__ import annotations

from typing import Literal

from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field

BEARER = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` (when the server has keys)")


class ErrorDetail(BaseModel):
    message: str = Field(..., description="What is wrong, for a person.")
    type: str = Field(..., description="invalid_request_error, invalid_api_key, not_found_error, overloaded, "
                      "timeout, request_too_large, server_error, ...")
    param: str | None = Field(None, description="The request field at fault.")
    code: str | None = Field(None, description="Always null (OpenAI compatibility).")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "diffray"
    kind: Literal["base", "lora", "textual_inversion", "controlnet", "unknown"]
    available: bool = Field(True, description="False: listed but cannot be served (see `reason`).")
    reason: str | None = Field(None, description="Why an adapter is unavailable.")
    base_model: str | None = None
    method: str | None = None
    family: str | None = Field(None, description="The model family (`stable-diffusion`, `stable-diffusion-xl`, "
                               "`flux`): the served base's on the `base` entry, the one an adapter was trained on "
                               "(its card's) on an adapter's, where the card says.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class GeneratedImage(BaseModel):
    b64_json: str
    seed: int


class GenerateResponse(BaseModel):
    created: int
    model: str
    seed: int
    width: int
    height: int
    images: list[GeneratedImage]


class FeedbackAccepted(BaseModel):
    id: str = Field(..., description="The feedback record's id (the client's `id` when it sent one).")
    created: float = Field(..., description="When it was first stored (Unix seconds).")
    duplicate: bool = Field(False, description="True: this id was already stored with the same content.")


class ReplicaEntry(BaseModel):
    id: str = Field(..., description="The Generator replica's id (also each image answer's X-Diffray-Replica).")
    resident_adapters: list[str] | None = Field(None, description="Adapters loaded on it at its last answer to this "
                                                "ingress replica; null before its first answer.")
    answered: int = Field(0, description="Requests it answered for this ingress replica.")
    last_answer_s_ago: float | None = Field(None, description="Seconds since its last answer to this ingress replica.")


class GeneratorStatus(BaseModel):
    status: str = Field(..., description="Serve's deployment status: HEALTHY, UPSCALING, DOWNSCALING, ...")
    replicas: dict[str, int] = Field(..., description="Replica count by Serve's replica state (RUNNING, STARTING, "
                                     "STOPPING, ...).")
    running: int = Field(..., description="Replicas serving now.")


class ServerStatus(BaseModel):
    generator: GeneratorStatus
    replicas: list[ReplicaEntry] = Field(..., description="The Generator's replicas alive now (running, starting or "
                                         "stopping).")
    in_flight: int = Field(..., description="Requests this ingress replica has passed to the Generator and not yet "
                           "answered (queued or running): the queue depth as this ingress sees it.")


def error_responses(*codes: int) -> dict:
    """The `responses=` of a route: the error shape for each status it can answer."""
    return {code: {"model": ErrorResponse} for code in codes}
