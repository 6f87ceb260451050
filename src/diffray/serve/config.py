"""Typed arguments of the Serve application (`args:` of configs/serve.yaml, passed to `build_app`).

Plain pydantic, `extra="forbid"`, every field described; an error names the field path. Never imports
ray: the args are validated where the app is built and travel to replicas as a dict.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from diffray.config import Section, format_validation_error
from diffray.errors import ConfigError
from diffray.paths import looks_like_hub_id
from diffray.accelerator import Accelerator

API_KEYS_ENV = "DIFFRAY_API_KEYS"  # comma-separated keys, added to auth.api_keys


class ControlNetEntry(Section):
    path: str = Field(..., description="ControlNet dir (save_pretrained, safetensors) or a base model dir / "
                      "builtin: ref with `subfolder`; a relative dir is made absolute as `adapters_dir` is.")
    subfolder: str | None = Field(None, description="Subfolder of `path` holding the ControlNet (the tiny model "
                                  "ships one in `controlnet`).")
    preprocess: Literal["canny", "none"] = Field("canny", description="What the server runs on a request's "
                                                 "`control.raw_image` to make the control image.")

    @field_validator("path")
    @classmethod
    def _pinned(cls, path: str) -> str:
        return pinned_local_path(path, hub_ids=True)


class Limits(Section):
    max_prompt_chars: int = Field(1000, ge=1, description="Longest prompt / negative prompt in characters.")
    max_n: int = Field(4, ge=1, le=64, description="Most images per request.")
    max_side: int = Field(512, ge=8, description="Largest width or height in pixels.")
    min_side: int = Field(8, ge=8, description="Smallest width or height in pixels.")
    max_steps: int = Field(50, ge=1, description="Most sampler steps.")
    max_guidance: float = Field(30.0, gt=0, description="Largest guidance scale.")
    max_adapters: int = Field(4, ge=1, description="Most adapters combined in one request.")
    max_body_bytes: int = Field(4_000_000, ge=1024, description="Largest request body (413 above).")
    max_control_pixels: int = Field(4_194_304, ge=64, description="Largest control image (width x height).")
    request_timeout_s: float = Field(120.0, gt=0, description="A generation not done by then answers 504.")


class Auth(Section):
    api_keys: list[str] = Field([], description=f"Accepted bearer keys; keys in ${API_KEYS_ENV} (comma-separated) "
                                "are added. Any key switches auth on for /v1/*.")
    allow_unauthenticated: bool = Field(False, description="Allow serving without keys on a non-loopback host "
                                        "(the host is always the one Serve's proxy really binds).")


class Autoscaling(Section):
    min_replicas: int = Field(1, ge=0, description="Fewest Generator replicas.")
    max_replicas: int = Field(1, ge=1, description="Most Generator replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (default min_replicas).")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(10.0, ge=0, description="Sustained load before adding a replica.")
    downscale_delay_s: float = Field(120.0, ge=0, description="Sustained idleness before removing one.")
    downscale_to_zero_delay_s: float | None = Field(None, ge=0, description="Idleness before the last replica "
                                                    "goes when min_replicas is 0 (default downscale_delay_s).")
    look_back_period_s: float = Field(30.0, gt=0, description="Window the ongoing-request average is taken over.")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often handles and replicas report their load "
                                      "to Serve's controller (a scale-up waits for the next report).")

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) is outside min_replicas..max_replicas "
                             f"({self.min_replicas}..{self.max_replicas})")
        return self


class Batching(Section):
    enabled: bool = Field(True, description="Dynamic batching of requests with the same adapters and shape.")
    max_batch_size: int = Field(8, ge=1, le=64, description="Most requests in one pipeline call.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5, description="How long a batch waits to fill.")
    mix_adapters: bool = Field(True, description="Requests for different LoRAs (one plain UNet LoRA each) share "
                               "a pipeline call: base layers once, each row its own LoRA.")


class Hotswap(Section):
    rank: int = Field(..., ge=1, le=1024, description="The slot's rank: the largest LoRA rank served, or the sum "
                      "of the ranks of the LoRAs one request may combine.")
    targets: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description="Denoiser layers "
                               "the slot covers (PEFT target_modules); a LoRA on any other layer is refused.")


class GeneratorSection(Section, Accelerator):
    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count; None uses `autoscaling`.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica autoscaling.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (the pipeline then runs on CUDA).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom resources per replica, e.g. "
                                        "{A10G: 1} to place replicas on that node type (an autoscaler adds one).")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica (CPU).")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(32, ge=-1, description="Requests waiting for a replica; beyond it 503 "
                                     "(-1: unbounded).")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on a 503.")
    max_adapters_per_replica: int = Field(4, ge=1, description="Resident adapter sets per replica (LRU).")
    max_controlnets_per_replica: int = Field(4, ge=1, description="ControlNet pipelines kept per replica, each with "
                                             "its ControlNet's weights (LRU; an evicted one is loaded again on use).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Pipeline dtype (fp16 "
                                                             "only on GPU).")
    in_ingress: bool = Field(False, description="Run the pipeline in the Ingress's own replicas: one deployment, "
                             "so a request skips the Ingress -> Generator actor call (a few ms each, BENCHMARKS.md). "
                             "The Ingress then takes this section's replicas or autoscaling, resources and limits; "
                             "Serve's proxy routes by adapter set only a request that names its set in the "
                             "serve_multiplexed_model_id header, others load theirs on whichever replica takes them; "
                             "/v1/status lists the Ingress's replicas.")
    hotswap: Hotswap | None = Field(None, description="With compile: every LoRA is served through one LoRA slot "
                                    "of the compiled UNet/transformer whose weights are replaced in place, so a new "
                                    "LoRA or LoRA set compiles nothing (diffray.serve.hotswap). None: each LoRA is "
                                    "its own PEFT adapter, and each new set compiles again.")

    @model_validator(mode="after")
    def _hotswap_needs_compile(self) -> GeneratorSection:
        if self.hotswap is not None and not self.compile:
            raise ValueError("hotswap is for a compiled denoiser: set generator.compile: true, or leave hotswap out")
        return self


class IngressSection(Section):
    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Open HTTP requests per ingress replica.")


class FeedbackSection(Section):
    enabled: bool = Field(True, description="Accept POST /v1/feedback (preference pairs from the playground).")
    path: str = Field("./feedback/feedback.db", validate_default=True, description="SQLite database (WAL mode) of "
                      "the feedback store, on a local disk of the node(s) running the Ingress; created when missing. "
                      "A relative path is made absolute once, against the working directory of the process that "
                      "reads the config (`diffray serve`, `diffray feedback ...`, or Serve's app builder under "
                      "`serve run/deploy`), and the replicas get that absolute path; refused inside a Ray "
                      "runtime_env working_dir copy, which each deploy replaces.")
    max_image_bytes: int = Field(2_000_000, ge=1024, description="Largest image (decoded from base64) in a "
                                 "feedback post.")
    max_image_side: int = Field(2048, ge=8, description="Largest width or height of an image in a feedback post.")

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str, info: ValidationInfo) -> str:
        # Each Ray process has its own working directory (a runtime_env working_dir is a copy per node and
        # deploy): pinned here, the server's replicas and `diffray feedback export` read one file.
        if os.path.isabs(os.path.expanduser(path)):
            return os.path.expanduser(path)
        cwd = Path.cwd()
        if info.data.get("enabled", True) and in_ray_working_dir_copy(cwd):
            raise ValueError(f"{path!r} is relative, and this process runs in {cwd}, a copy of a Ray runtime_env "
                             "working_dir that the next deploy replaces (and `diffray feedback` on your machine "
                             "never reads): give an absolute path on a local disk of the Ingress's node")
        return os.path.abspath(path)

    def max_body_bytes(self, limits: Limits) -> int:
        """The body cap of POST /v1/feedback: two images of max_image_bytes (base64) and 64 KiB of the rest, or
        limits.max_body_bytes when larger (a pair of 1024 px PNGs is more than one generation request holds)."""
        return max(limits.max_body_bytes, 2 * (self.max_image_bytes * 4 // 3 + 4) + 64 * 1024)


class ServeArgs(Section):
    model: str = Field("builtin:tiny", description="Base model: diffusers dir, hub id or builtin:tiny; a relative "
                       "dir is made absolute as `adapters_dir` is.")
    adapters_dir: str = Field("./adapters", validate_default=True, description="Adapter registry: a folder of "
                              "artifact dirs, one per id (LoRA, Textual Inversion, ControlNet, each with "
                              "diffray_card.json), or a URI on object storage (s3://bucket/adapters, gs://...). A "
                              "relative folder is made absolute against the working directory of the process that "
                              "reads the config, so the replicas read the folder `diffray publish` wrote to there "
                              "(not one under the directory the cluster was started in); inside a Ray runtime_env "
                              "working_dir copy it is left relative: each replica reads its own copy.")
    adapters_listing_ttl_s: float = Field(5.0, ge=0, description="An object-storage registry is listed at most "
                                          "this often; a new or removed adapter shows after at most this long.")
    controlnets: dict[str, ControlNetEntry] = Field({}, description="ControlNets by name (the `control.model` of "
                                                    "a request); registry ControlNets are usable by id too.")
    default_size: int | None = Field(None, ge=8, description="Width and height when a request gives none; None: "
                                     "the model's native size.")
    default_steps: int = Field(20, ge=1, description="Sampler steps when a request gives none.")
    limits: Limits = Field(default_factory=Limits, description="Request limits (400 beyond them).")
    auth: Auth = Field(default_factory=Auth, description="API-key auth.")
    generator: GeneratorSection = Field(default_factory=GeneratorSection, description="Generator deployment.")
    batching: Batching = Field(default_factory=Batching, description="Dynamic batching in the Generator.")
    ingress: IngressSection = Field(default_factory=IngressSection, description="Ingress deployment.")
    feedback: FeedbackSection = Field(default_factory=dict, validate_default=True,  # errors then name feedback.*
                                      description="Preference feedback store.")

    @field_validator("model")
    @classmethod
    def _pinned_model(cls, path: str) -> str:
        return pinned_local_path(path, hub_ids=True)

    @field_validator("adapters_dir")
    @classmethod
    def _pinned_adapters(cls, path: str) -> str:
        return pinned_local_path(path, hub_ids=False)

    @model_validator(mode="after")
    def _one_deployment(self) -> ServeArgs:
        if self.generator.in_ingress:
            for name in ("num_replicas", "num_cpus"):  # by value: the args travel to the replicas as a full dump
                if getattr(self.ingress, name) != IngressSection.model_fields[name].default:
                    raise ValueError(f"ingress.{name}: with generator.in_ingress the Ingress's replicas are the "
                                     f"Generator's: set generator.{name} (or generator.autoscaling) instead")
        return self

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ServeArgs:
        # A default is what a request that gives none is drawn with: it must pass the checks a given value does.
        if self.default_steps > self.limits.max_steps:
            raise ValueError(f"default_steps: {self.default_steps} is above limits.max_steps "
                             f"({self.limits.max_steps}): lower it or raise the limit")
        if self.default_size is not None:
            problem = side_problem(self.default_size, self.limits)
            if problem:
                raise ValueError(f"default_size: {problem}")
        return self

    def api_keys(self) -> list[str]:
        """Configured keys plus those in $DIFFRAY_API_KEYS (read where this runs: the ingress replica)."""
        env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        return list(dict.fromkeys([*self.auth.api_keys, *env]))


def in_ray_working_dir_copy(folder: Path) -> bool:
    """Whether `folder` lies in a copy Ray unpacked for a runtime_env `working_dir`
    (`<session>/runtime_resources/working_dir_files/<package>/...`: the cwd of every process of that job or app)."""
    return any(p.name == "working_dir_files" and p.parent.name == "runtime_resources" for p in folder.parents)


def pinned_local_path(path: str, hub_ids: bool) -> str:
    """`path` made absolute against this process's working directory when it is a local path, so every replica
    reads what the process that read the config meant: a replica's working directory is the one the cluster was
    started in (`ray start` elsewhere, then RAY_ADDRESS), not the user's. URIs, `builtin:` refs, absolute paths
    and, with `hub_ids`, a hub id ("org/name" that is no local folder) stay as they are; so does any relative
    path inside a Ray runtime_env working_dir copy, where each replica has the same files in its own copy."""
    expanded = os.path.expanduser(path)
    if "://" in path or path.startswith("builtin:") or os.path.isabs(expanded):
        return expanded if os.path.isabs(expanded) else path
    if in_ray_working_dir_copy(Path.cwd()) or (hub_ids and looks_like_hub_id(path) and not os.path.exists(expanded)):
        return path
    return os.path.abspath(expanded)


def side_problem(side: int, limits: Limits) -> str | None:
    """Why `side` pixels is no width or height a request may have under `limits` (None when it may)."""
    if side % 8 or not limits.min_side <= side <= limits.max_side:
        return f"{side} must be a multiple of 8 in [{limits.min_side}, {limits.max_side}]"
    return None


def default_size(args: ServeArgs, native: int) -> int:
    """The width and height of a request that gives none: `default_size`, else the model's `native` size,
    which must then be within the limits too. Refused, not shrunk: a model drawn below its native size
    (SDXL or Flux at 512) gives poor images, and a deployment should say so at start rather than serve them.

    Raises:
        ConfigError: naming `limits.max_side` (or `limits.min_side`) when the native size is outside them.
    """
    if args.default_size is not None:
        return args.default_size  # checked against the limits by ServeArgs
    if native > args.limits.max_side:
        raise ConfigError(f"{args.limits.max_side} is below the model's native size {native}, which requests that "
                          f"give no size are drawn at: raise limits.max_side to {native}, or set default_size "
                          f"(a multiple of 8, at most {args.limits.max_side})", field="limits.max_side")
    if side_problem(native, args.limits):
        raise ConfigError(f"{args.limits.min_side} is above the model's native size {native}: lower it, or set "
                          "default_size", field="limits.min_side")
    return native


def parse_args(data: dict[str, Any] | None) -> ServeArgs:
    """Validate `build_app` args. Raises ConfigError naming the field path(s)."""
    try:
        return ServeArgs.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, ServeArgs)) from None


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(args: ServeArgs, host: str | None) -> None:
    """Refuse to serve without keys on a non-loopback host (unknown host counts as exposed). `host` is the
    one Serve's HTTP proxies really bind (`exposure.proxy_host`), never a value from these args.

    Raises:
        ConfigError: naming `auth.api_keys`.
    """
    if args.api_keys() or args.auth.allow_unauthenticated or (host is not None and is_loopback(host)):
        return
    raise ConfigError(f"the HTTP proxy binds {host or 'an unknown host'} (not loopback) and no API key is "
                      f"configured: set auth.api_keys or ${API_KEYS_ENV}, or auth.allow_unauthenticated: true",
                      field="auth.api_keys")


def load_serve_file(path: str, overrides: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any],
                                                                         ServeArgs]:
    """A Serve config file (the format `serve run` / `serve deploy` read) -> (http_options, {name,
    route_prefix} of its diffray application, validated args of it). Overrides `http_options.port=8001` change the file's top level;
    any other `key.path=value` changes the app's args (`generator.num_replicas=2`).

    Raises:
        ConfigError: unreadable file, no diffray application, or a bad arg (naming its path).
    """
    from diffray.config import apply_overrides, read_yaml

    data = read_yaml(path)
    apps = data.get("applications")
    if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict):
        raise ConfigError(f"{path}: needs `applications:` with the diffray app first", field="applications")
    if apps[0].get("import_path") != APP_IMPORT_PATH:
        raise ConfigError(f"{path}: the first application must have import_path: {APP_IMPORT_PATH}",
                          field="applications.0.import_path")
    top = [o for o in overrides or [] if o.startswith("http_options.")]
    data = apply_overrides(data, top)
    args = apply_overrides(apps[0].get("args") or {}, [o for o in overrides or [] if o not in top])
    app = {"name": apps[0].get("name", "diffray"), "route_prefix": apps[0].get("route_prefix", "/")}
    return dict(data.get("http_options") or {}), app, parse_args(args)


APP_IMPORT_PATH = "diffray.serve.app:build_app"
