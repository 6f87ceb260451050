"""The two Serve deployments: `Generator` (the pipeline; multiplexed adapters, dynamic batching) and
`Ingress` (FastAPI: the OpenAI-style and full APIs, models list, feedback, the playground page, health,
auth, limits). With `generator.in_ingress` there is one: each Ingress replica holds the pipeline side
(`drawing.Drawing`) itself, and a request skips the actor call to a Generator.

This is the Ray edge of serving: request checks live in `schemas`/`feedback`, the pipeline in `engine`,
HTTP policy in `http`, routes' answers in `api_models`. The ingress turns every Ray failure into a JSON
4xx/503/504, never a 500. A request the ingress gives up on (timeout, client gone) is cancelled on the
replica, which abandons it at the next sampler step.
(No `from __future__ import annotations` here: FastAPI must see the real request-body types.)
"""


import asyncio
import base64
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from diffray.errors import AdapterError, AdapterNotFound, DiffrayError, ModelError, RequestError
from diffray.serve import pages
from diffray.serve.api_models import (BEARER, FeedbackAccepted, GenerateResponse, Health, ImagesResponse, ModelList,
                                      ServerStatus, error_responses)
from diffray.serve.artifacts import card_text
from diffray.serve.config import default_size, parse_args
from diffray.serve.drawing import Drawing
from diffray.serve.exposure import enforce
from diffray.serve.feedback import FeedbackRequest, feedback_record, key_fingerprint
from diffray.serve.http import EdgeMiddleware, EdgePolicy, install_error_handlers
from diffray.serve.remote_registry import open_registry
from diffray.serve.registry import base_problem
from diffray.serve.replicas import generator_replicas
from diffray.serve.schemas import (GenerateRequest, ImagesRequest, Job, decode_b64_image, generate_job,
                                   images_job)

REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError)

api = FastAPI(title="diffray", version="1", description="Stable Diffusion with trained adapters on Ray Serve: "
              "an OpenAI-compatible images API plus the full set of options, preference feedback, and a "
              "playground page at `/`.")
POLICY = EdgePolicy()  # filled in by the ingress replica's constructor
api.add_middleware(EdgeMiddleware, policy=POLICY)
install_error_handlers(api)
AUTH = [Security(BEARER)]  # documents the bearer scheme in OpenAPI; EdgeMiddleware enforces it


def _overloaded(message: str, retry_after: int) -> RequestError:
    err = RequestError(message, status=503, kind="overloaded")
    err.retry_after = retry_after
    return err


def _timed_out(job: Job) -> RequestError:
    return RequestError(f"generation took longer than {job.timeout_s}s", status=504, kind="timeout")


def _client_error(exc: DiffrayError, param: Optional[str] = "model") -> RequestError:
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the replica's exception
    if isinstance(cause, RequestError):
        return cause
    if isinstance(cause, AdapterNotFound):
        return RequestError(f"unknown adapter {cause.adapter_id!r} (GET /v1/models lists them)", param=param,
                            status=404, kind="not_found_error")
    if isinstance(cause, (AdapterError, ModelError)):
        return RequestError(str(cause), param=param, status=422)
    return RequestError(str(cause), status=422)


def _model_name(model: str) -> str:
    """The base model as shown to clients: a builtin or hub id as is, a local folder or a URI (which may hold
    credentials) by its last name only."""
    if model.startswith("builtin:") or (not model.startswith(("/", ".", "~")) and model.count("/") == 1):
        return model
    return Path(model).name


def answer_headers(result: dict, t0: float) -> dict[str, str]:
    """An image answer's headers: the replica that drew it, and a Server-Timing header saying where the
    request's time went, in ms: `ingress` (this handler, from the validated request to the encoded images),
    `generator` (its call to the Generator, the actor hop included), and within the replica `adapters`
    (loading or finding the adapter set), `queue` (waiting for its batch to start) and `engine` (the engine's
    run over the whole batch: its pipeline calls and PNG encoding). `X-Diffray-Batch` is how many jobs the
    batcher handed to the engine together; the engine splits them into one pipeline call per shape and
    adapter set (or per shape, mixing one LoRA each), so a job's own call may have held fewer."""
    timing = {**result["timing"], "ingress": time.perf_counter() - t0}
    parts = [f"{name};dur={timing[name] * 1e3:.1f}" for name in ("ingress", "generator", "adapters", "queue", "engine")]
    return {"X-Diffray-Replica": result["replica"], "X-Diffray-Batch": str(timing["batch"]),
            "Server-Timing": ", ".join(parts)}


@serve.deployment(name="Generator")
class Generator:
    """One pipeline per replica (`Drawing`); its adapter set is the request's multiplexed model id."""

    def __init__(self, args: dict):
        self.drawing = Drawing(parse_args(args))

    async def generate(self, job: Job) -> dict:
        return await self.drawing.generate(job, serve.get_multiplexed_model_id())

    def info(self) -> dict:
        return self.drawing.info()


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP in, jobs to the Generator, images out; preferences into the feedback store. `generator` is
    the Generator's handle, or None with `generator.in_ingress`: this replica then draws itself."""

    def __init__(self, generator, args: dict):
        from diffray.models.loading import native_size, resolve_model_path
        from diffray.serve.feedback_store import FeedbackStore

        self.args = parse_args(args)
        enforce(self.args)  # with the keys this replica really has, against the host Serve really binds
        self.generator = generator
        self.drawing = Drawing(self.args) if generator is None else None
        self.registry = open_registry(self.args.adapters_dir, self.args.adapters_listing_ttl_s)
        POLICY.api_keys = self.args.api_keys()
        POLICY.max_body_bytes = self.args.limits.max_body_bytes
        fb = self.args.feedback
        POLICY.body_bytes_by_path = {"/v1/feedback": fb.max_body_bytes(self.args.limits)} if fb.enabled else {}
        from diffray.models.family import base_version, family_of

        model_path = resolve_model_path(self.args.model)
        self.default_size = default_size(self.args, native_size(model_path))  # ConfigError when over the limits
        family = family_of(model_path)
        self.family, self.default_guidance = family.name, family.default_guidance
        self.base_version = base_version(family.name, model_path)  # which SD (1.x/2.x) adapters must be for
        self.feedback = FeedbackStore(fb.path) if fb.enabled else None
        self.app_name = serve.get_replica_context().app_name
        self.in_flight = 0
        self.answers: dict[str, dict] = {}  # Generator replica id -> its last answer's resident adapters, count, time

    # ----------------------------------------------------------------------------------------- routes
    @api.get("/healthz", summary="Liveness: 200 while the ingress answers", response_model=Health)
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/", summary="The playground page", response_class=Response, include_in_schema=False)
    async def playground(self) -> Response:
        return pages.asset("index.html")

    @api.get("/playground/{name}", summary="The playground's script and style", response_class=Response,
             include_in_schema=False)
    async def playground_asset(self, name: str) -> Response:
        return pages.asset(name)

    @api.get("/v1/status", summary="The Generator's replicas (count by state; each running one's resident adapters "
             "as last seen) and the requests in flight", response_model=ServerStatus, dependencies=AUTH,
             responses=error_responses(401, 503))
    async def status(self) -> dict:
        try:
            drawing = "Generator" if self.drawing is None else "Ingress"  # the deployment whose replicas draw
            deployment, live = await asyncio.to_thread(generator_replicas, self.app_name, drawing)
        except RayError:  # Serve's controller restarting
            raise _overloaded("Serve's controller did not answer; retry", self.args.generator.retry_after_s) from None
        now = time.monotonic()
        for gone in set(self.answers) - set(live):
            del self.answers[gone]
        replicas = []
        for rid in live:
            seen = self.answers.get(rid)
            replicas.append({"id": rid, "resident_adapters": seen and seen["resident"],
                             "answered": seen["answered"] if seen else 0,
                             "last_answer_s_ago": round(now - seen["at"], 3) if seen else None})
        return {"generator": deployment, "replicas": replicas, "in_flight": self.in_flight}

    @api.get("/v1/models", summary="The base model and every adapter (rescanned per call; broken ones listed "
             "as unavailable with the reason)", response_model=ModelList, dependencies=AUTH,
             responses=error_responses(400, 401))
    async def models(self) -> dict:
        now = int(time.time())
        data = [{"id": "base", "created": now, "kind": "base", "base_model": _model_name(self.args.model),
                 "family": self.family}]
        for a in await asyncio.to_thread(self.registry.list):
            problem = a.problem or self._family_problem(a)
            data.append({"id": a.id, "created": int(a.mtime), "kind": a.kind, "available": problem is None,
                         "reason": problem, "base_model": _model_name(card_text(a.card, "base_model") or "") or None,
                         "method": card_text(a.card, "method"), "family": card_text(a.card, "family")})
        data += [{"id": name, "created": now, "kind": "controlnet"} for name in self.args.controlnets]
        return {"object": "list", "data": data}

    @api.post("/v1/images/generations", summary="OpenAI Images API: prompt, n, size, model, response_format",
              response_model=ImagesResponse, dependencies=AUTH,
              responses=error_responses(400, 401, 404, 413, 422, 503, 504))
    async def images_generations(self, req: ImagesRequest) -> JSONResponse:
        t0 = time.perf_counter()
        job = images_job(req, self.args.limits, self.default_size, self.args.default_steps, self.default_guidance)
        await self._check_adapters(job, single_param="model")
        result = await self._run(job, "model")
        if req.response_format == "url":
            data = [{"url": "data:image/png;base64," + base64.b64encode(png).decode(), "revised_prompt": None}
                    for png in result["images"]]
        else:
            data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": None} for png in result["images"]]
        return JSONResponse({"created": int(time.time()), "data": data}, headers=answer_headers(result, t0))

    @api.post("/v1/generate", summary="Everything: negative prompt, steps, guidance, seed, scheduler, "
              "adapters with weights, ControlNet with a control image", response_model=GenerateResponse,
              dependencies=AUTH, responses=error_responses(400, 401, 404, 413, 422, 503, 504))
    async def generate(self, req: GenerateRequest) -> JSONResponse:
        t0 = time.perf_counter()
        job = generate_job(req, self.args.limits, self.default_size, self.args.default_steps, self.default_guidance)
        await self._check_adapters(job, single_param="adapter" if req.adapter is not None else None)
        if req.control is not None:
            job.controlnet, job.control_image = await asyncio.to_thread(self._control, req, job)
        result = await self._run(job, "adapter" if req.adapter is not None else "adapters")
        images = [{"b64_json": base64.b64encode(png).decode(), "seed": job.seed + i}
                  for i, png in enumerate(result["images"])]
        return JSONResponse({"created": int(time.time()), "model": job.adapter_key() or "base", "seed": job.seed,
                             "width": job.width, "height": job.height, "images": images},
                            headers=answer_headers(result, t0))

    @api.post("/v1/feedback", summary="Record which of two images of one prompt a person preferred",
              response_model=FeedbackAccepted, dependencies=AUTH,
              responses=error_responses(400, 401, 404, 409, 413, 503))
    async def post_feedback(self, req: FeedbackRequest,
                            creds: Optional[HTTPAuthorizationCredentials] = Security(BEARER)) -> dict:
        if self.feedback is None:
            raise RequestError("feedback is switched off on this server (feedback.enabled)", status=404,
                               kind="not_found_error")
        user = key_fingerprint(creds.credentials if creds and POLICY.api_keys else None)
        rec = await asyncio.to_thread(feedback_record, req, self.args.limits, self.args.feedback, user)
        rec_id, created, duplicate = await asyncio.to_thread(self.feedback.add, rec)
        return {"id": rec_id, "created": created, "duplicate": duplicate}

    # ---------------------------------------------------------------------------------------- helpers
    def _family_problem(self, info) -> Optional[str]:
        """Why an artifact whose card names another model family, or another SD version (`base_problem`), cannot
        be served here (None: it can, or its card is older than the family field and the replica's load checks it)."""
        trained = card_text(info.card, "family")
        if trained and trained != self.family:
            return f"trained for a {trained} model; this server's model is {self.family}"
        return base_problem(info, self.base_version)

    async def _check_adapters(self, job: Job, single_param: Optional[str]) -> None:
        for i, (adapter_id, _) in enumerate(job.adapters):
            param = single_param or f"adapters.{i}.id"
            try:
                info = await asyncio.to_thread(self.registry.get, adapter_id, param)
            except AdapterError as exc:
                raise _client_error(exc, param) from None
            if problem := self._family_problem(info):
                raise RequestError(f"adapter {adapter_id!r} is unavailable: {problem}", param=param, status=422)
            if info.kind not in ("lora", "textual_inversion"):
                raise RequestError(f"{adapter_id!r} is a {info.kind}; use it as control.model", param=param)

    def _control(self, req: GenerateRequest, job: Job):
        """(ControlNet name, control image at the job's size) from the request; canny for a raw image."""
        from PIL import Image

        from diffray.data.conditioning import make_preprocessor

        spec = req.control
        if (spec.image is None) == (spec.raw_image is None):
            raise RequestError("give exactly one of control.image and control.raw_image", param="control.image")
        entry = self.args.controlnets.get(spec.model)
        if entry is None:
            try:
                info = self.registry.get(spec.model, param="control.model")
            except AdapterError as exc:
                raise _client_error(exc, "control.model") from None
            if info.kind != "controlnet":
                raise RequestError(f"{spec.model!r} is a {info.kind}, not a ControlNet", param="control.model")
            if problem := self._family_problem(info):
                raise RequestError(f"adapter {spec.model!r} is unavailable: {problem}", param="control.model",
                                   status=422)
        param, data = ("control.image", spec.image) if spec.image is not None else ("control.raw_image", spec.raw_image)
        img = decode_b64_image(data, param, self.args.limits.max_control_pixels)
        img = img.resize((job.width, job.height), Image.Resampling.BICUBIC)
        if spec.raw_image is not None and (entry is None or entry.preprocess == "canny"):
            img = make_preprocessor("canny")(img)
        return spec.model, img

    def info(self) -> dict:
        """This replica's engine figures (`ImageEngine.info`) when it draws itself (`generator.in_ingress`)."""
        if self.drawing is None:
            raise RequestError("this Ingress does not draw: ask the Generator (generator.in_ingress is off)")
        return self.drawing.info()

    async def _run(self, job: Job, param: str) -> dict:
        """The Generator's answer; overload -> 503 (Retry-After), timeout -> 504 (and the job is cancelled
        on its replica), a lost replica is retried once, then 503."""
        key = job.adapter_key()
        retry_after = self.args.generator.retry_after_s
        job.timeout_s = self.args.limits.request_timeout_s
        self.in_flight += 1
        t0 = time.perf_counter()
        try:
            if self.drawing is not None:
                result = await self._draw_here(job, key, param, retry_after)
            else:
                handle = self.generator.options(multiplexed_model_id=key) if key else self.generator
                result = await self._attempts(job, handle, param, retry_after)
        finally:
            self.in_flight -= 1
        result["timing"]["generator"] = time.perf_counter() - t0
        seen = self.answers.setdefault(result["replica"], {"answered": 0})
        seen.update(resident=result.get("resident", []), at=time.monotonic(), answered=seen["answered"] + 1)
        return result

    async def _draw_here(self, job: Job, key: str, param: str, retry_after: int) -> dict:
        """`_attempts` for `generator.in_ingress`: this replica's own pipeline, with the Generator's limits
        (`max_ongoing_requests` drawing or waiting for a batch, `max_queued_requests` more waiting)."""
        g = self.args.generator
        if g.max_queued_requests >= 0 and self.in_flight > g.max_ongoing_requests + g.max_queued_requests:
            raise _overloaded("the server is at capacity; retry later", retry_after)
        job.job_id = uuid.uuid4().hex
        try:  # a timeout or a client gone cancels the drawing, which abandons the job at its next step
            return await asyncio.wait_for(self.drawing.generate(job, key), timeout=job.timeout_s)
        except asyncio.TimeoutError:
            raise _timed_out(job) from None
        except DiffrayError as exc:
            raise _client_error(exc, param) from None

    async def _attempts(self, job: Job, handle, param: str, retry_after: int) -> dict:
        for attempt in range(2):
            job.job_id = uuid.uuid4().hex
            response = handle.generate.remote(job)
            try:
                return await asyncio.wait_for(response, timeout=job.timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                raise _timed_out(job) from None
            except asyncio.CancelledError:  # the client went away: stop the work it asked for
                response.cancel()
                raise
            except BackPressureError:
                raise _overloaded("the server is at capacity; retry later", retry_after) from None
            except DeploymentUnavailableError:
                raise _overloaded("no Generator replica is available yet; retry later", retry_after) from None
            except REPLICA_GONE:
                if attempt == 0:
                    continue
                raise _overloaded("the Generator replica went away; retry", retry_after) from None
            except DiffrayError as exc:
                raise _client_error(exc, param) from None
        raise AssertionError("unreachable")
