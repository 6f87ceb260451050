"""`diffray eval`: render a suite's prompts with a Stable Diffusion 1.x model (+ a LoRA or Textual Inversion
adapter and/or a ControlNet) as one Ray Data batch-inference job, and score every image with the world
reader. This is the Ray edge of `diffray.world`; scoring and reports stay pure (`scores`, `report`).

Protocol: the stock `StableDiffusionPipeline` with the model dir's own scheduler, 25 steps, guidance 5,
64x64, one `torch.Generator` per image seeded by the suite; base rows (no adapter, no control) beside the
adapter's unless `compare_base` is off.
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
from PIL import Image

from diffray.errors import AdapterError, ConfigError, DiffrayError
from diffray.world.report import EvalResult, score_rows, write_report
from diffray.world.suites import CONCEPT_SUITES, EvalItem, build_suite, check_suite


SPACINGS = (None, "leading", "trailing", "linspace")
MAX_STEPS = 500  # as `diffray generate`'s: the schedulers hold 1000 training timesteps
MAX_RESOLUTION = 2048
LIMITS = {"steps": f"must be in [1, {MAX_STEPS}]", "guidance": "must be a finite number >= 0",
          "resolution": f"must be a multiple of 8 in [8, {MAX_RESOLUTION}]", "batch_size": "must be >= 1",
          "lora_scale": "must be a finite number"}
CONTROLNET_WEIGHTS = ("diffusion_pytorch_model.safetensors",)
REMOTE_ERROR = re.compile(r"^diffray\.errors\.(\w+): (.+?)\s*$", re.M)


class Renderer:
    """Ray Data callable class: holds one pipeline (adapter loaded, ControlNet variant sharing its parts) and
    the suite's items; renders rows {variant, chunk} (a chunk: `batch_size` consecutive items) into PNG bytes.
    Chunks are fixed on the driver, so base and adapter images of an item come from equal batches (a batch's
    size changes the float result in its last bits)."""

    def __init__(self, *args, **kwargs):
        self.failed: DiffrayError | None = None
        try:
            self._load(*args, **kwargs)
        except DiffrayError as exc:  # raised by the first batch: Ray Data prints an actor that dies starting as a
            self.failed = exc        # bug of its own, with its whole trace, before the driver sees the error

    def _load(self, items: list[EvalItem], model_path: str, adapter: str | None, controlnet: str | None,
              steps: int, guidance: float, resolution: int, lora_scale: float, batch_size: int, threads: int,
              timestep_spacing: str | None = None) -> None:
        import torch

        from diffray.generate import load_adapter
        from diffray.models.loading import load_pipeline

        self.items, self.batch_size = items, batch_size
        torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(model_path, device=device)
        self.pipe.set_progress_bar_config(disable=True)
        if timestep_spacing:  # the model's scheduler, spaced otherwise
            self.pipe.scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config,
                                                                        timestep_spacing=timestep_spacing)
        self.control_pipe = None
        if controlnet:
            from diffusers import StableDiffusionControlNetPipeline

            from diffray.models.loading import load_controlnet

            self.control_pipe = StableDiffusionControlNetPipeline.from_pipe(
                self.pipe, controlnet=load_controlnet(controlnet).to(device))
            self.control_pipe.set_progress_bar_config(disable=True)
        self.has_lora = False
        if adapter:
            load_adapter(self.pipe, adapter)  # components are shared, so the ControlNet pipeline sees it too
            self.has_lora = bool(getattr(self.pipe.unet, "peft_config", None))
        self.call = dict(num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution)
        if self.has_lora and lora_scale != 1.0:
            self.call["cross_attention_kwargs"] = {"scale": lora_scale}

    def _render(self, variant: str, prompts: list[str], seeds: list[int], controls: list[bytes]) -> list[Image.Image]:
        import torch

        base = variant == "base"
        if self.has_lora:
            (self.pipe.disable_lora if base else self.pipe.enable_lora)()
        pipe, extra = self.pipe, dict(self.call)
        if self.control_pipe is not None and not base:
            pipe = self.control_pipe
            extra["image"] = [Image.open(io.BytesIO(c)).convert("RGB") for c in controls]
        if base:
            extra.pop("cross_attention_kwargs", None)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return pipe(prompts, generator=gens, **extra).images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.failed is not None:
            raise self.failed
        out: dict[str, list] = {"id": [], "variant": [], "image": []}
        for variant, chunk in zip(batch["variant"], batch["chunk"]):
            items = self.items[int(chunk) * self.batch_size:(int(chunk) + 1) * self.batch_size]
            prompts = [it.prompt if variant == "base" else it.adapter_prompt for it in items]
            images = self._render(str(variant), prompts, [it.seed for it in items], [it.control for it in items])
            for it, img in zip(items, images):
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                out["id"].append(it.id)
                out["variant"].append(str(variant))
                out["image"].append(buf.getvalue())
        return {"id": np.asarray(out["id"], dtype=np.int64), "variant": np.array(out["variant"], dtype=object),
                "image": np.array(out["image"], dtype=object)}


def adapter_kind(adapter: str | None, controlnet: str | None) -> str | None:
    """The adapted variant's name: the adapter's method (its card, else its weights file), + controlnet."""
    from diffray.models.adapters import read_card
    from diffray.models.textual_inversion import TI_WEIGHTS

    names = []
    if adapter:
        names.append(read_card(adapter).get("method")
                     or ("textual_inversion" if (Path(adapter) / TI_WEIGHTS).is_file() else "lora"))
    if controlnet:
        names.append("controlnet")
    return "+".join(names) or None


def ti_token(adapter: str | None) -> str | None:
    """The placeholder token of a Textual Inversion adapter dir (the one `load_textual_inversion` adds: an
    SDXL file's keys are `clip_l`/`clip_g`, its token is on the card), or None for other adapters."""
    from diffray.models.textual_inversion import TI_WEIGHTS, stored_token

    if not adapter or not (Path(adapter) / TI_WEIGHTS).is_file():
        return None
    return stored_token(adapter)


def check_inputs(model: str | None, adapter: str | None, controlnet: str | None, steps: int, guidance: float,
                 resolution: int, batch_size: int, timestep_spacing: str | None = None, lora_scale: float = 1.0) -> str:
    """The base model reference (the adapter's card's base when `model` is None); ConfigError naming a bad
    option (a value out of range, an adapter or ControlNet folder that is missing, broken or of another model
    family), before Ray starts."""
    from diffray.generate import check_adapter_dir, check_family
    from diffray.models.loading import resolve_model_path

    for name, value, ok in (("steps", steps, 1 <= steps <= MAX_STEPS),
                            ("guidance", guidance, math.isfinite(guidance) and guidance >= 0),
                            ("resolution", resolution, 8 <= resolution <= MAX_RESOLUTION and resolution % 8 == 0),
                            ("batch_size", batch_size, batch_size >= 1), ("lora_scale", lora_scale,
                                                                          math.isfinite(lora_scale))):
        if not ok:
            raise ConfigError(f"bad value {value!r} ({LIMITS[name]})", field=name)
    if timestep_spacing not in SPACINGS:
        raise ConfigError(f"must be leading, trailing or linspace, got {timestep_spacing!r}", field="timestep_spacing")
    dirs = [(f, d, w) for f, d, w in (("adapter", adapter, None), ("controlnet", controlnet, CONTROLNET_WEIGHTS)) if d]
    cards = [check_adapter_dir(d, f, *([w] if w else [])) for f, d, w in dirs]
    base = model or next((c["base_model"] for c in cards if isinstance(c.get("base_model"), str)), None) \
        or "builtin:tiny"
    if cards:
        base_path = resolve_model_path(base)
        for (field, d, _), card in zip(dirs, cards):
            check_family(card, d, base_path, field)
    return base


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse, before Ray starts, a report folder diffray eval did not write (it holds files but no
    results.json) or one that cannot be a folder (ConfigError naming `out`)."""
    from diffray.generate import check_parent

    out = Path(out_dir)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file()):
        raise ConfigError(f"{out}: {'is a file' if out.is_file() else 'folder holds files but no results.json'}"
                          " (not a report of diffray eval, whose files would overwrite its own); give a new or "
                          "empty folder", field="out")
    check_parent(out, "out")


def check_demo_outputs(out_dir: Path, suite: str, num: int) -> None:
    """What `diffray demo` writes after training, checked before it trains: the grid's file, the report's folder
    and the suite. ConfigError naming --out-dir (or the suite's own option)."""
    from diffray.generate import check_out_file

    try:
        check_out_file(out_dir / "demo_grid.png")
        if suite != "none":
            check_out_dir(out_dir / "demo_eval")
    except ConfigError as exc:
        raise ConfigError(str(exc).removeprefix(f"{exc.field}: "), field="--out-dir") from None
    if suite != "none":
        check_suite(suite, num, None)


def pool_size(num_batches: int) -> tuple[float, int, int]:
    """(CPUs per actor, GPUs per actor, most actors): one actor per GPU; on CPU, one per CPU but one (the
    driver and Ray Data need one), never more actors than batches."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return 1.0, 1, max(1, min(gpus, num_batches))
    return 1.0, 0, max(1, min(int(res.get("CPU", 1.0)) - 1, num_batches))


def render_images(items: list[EvalItem], variants: list[str], model_path: str, adapter: str | None,
                  controlnet: str | None, settings: dict[str, Any], batch_size: int) -> dict[tuple[str, int], bytes]:
    """Run the batch-inference job: one row per (variant, chunk of items); {(variant, id): PNG bytes}."""
    from diffray.cluster import connect_ray

    connect_ray()
    chunks = -(-len(items) // batch_size)
    rows = [{"variant": v, "chunk": k} for v in variants for k in range(chunks)]
    cpus, gpus, pool = pool_size(len(rows))
    kwargs = dict(items=items, model_path=model_path, adapter=adapter, controlnet=controlnet,
                  steps=settings["steps"], guidance=settings["guidance"], resolution=settings["resolution"],
                  lora_scale=settings["lora_scale"], batch_size=batch_size, threads=int(cpus),
                  timestep_spacing=settings.get("timestep_spacing"))
    ds = ray.data.from_items(rows).map_batches(
        Renderer, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool), num_cpus=cpus, num_gpus=gpus)
    try:
        rows_out = ds.take_all()
    except Exception as exc:  # Ray wraps a renderer's own error (an adapter its model cannot load) in its own
        cause = diffray_cause(exc)
        if cause is None:
            raise
        raise (ConfigError(str(cause), field="adapter") if isinstance(cause, AdapterError) else cause) from None
    return {(str(r["variant"]), int(r["id"])): bytes(r["image"]) for r in rows_out}


def diffray_cause(exc: BaseException) -> DiffrayError | None:
    """The DiffrayError a renderer raised, from Ray's wrapper: the object when Ray kept it (`cause`), else
    rebuilt from the last `diffray.errors.X: message` line of the remote traceback Ray keeps as text (an
    actor that died in `__init__`); None when the failure is not one of ours."""
    from diffray import errors

    inner: BaseException | None = exc
    for _ in range(10):
        if inner is None or isinstance(inner, DiffrayError):
            break
        inner = getattr(inner, "cause", None) or inner.__cause__
    if isinstance(inner, DiffrayError):
        return inner
    found = REMOTE_ERROR.findall(str(exc))
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DiffrayError)) or cls in (errors.AdapterNotFound,
                                                                               errors.RequestError):
        return DiffrayError(message)
    return cls(message)


def absolute(path: str | None) -> str | None:
    """A local path as an absolute one: the renderers are Ray actors, whose working directory is not the
    driver's (on a cluster joined through RAY_ADDRESS). Hub ids and URIs pass as they are."""
    if path and Path(path).exists():
        return str(Path(path).resolve())
    return path


def evaluate(model: str | None = None, suite: str = "prompts", adapter: str | None = None,
             controlnet: str | None = None, num: int | None = None, seed: int = 0, steps: int = 25,
             guidance: float = 5.0, resolution: int = 64, token: str | None = None, compare_base: bool = True,
             lora_scale: float = 1.0, batch_size: int = 8, out_dir: str | Path | None = None,
             timestep_spacing: str | None = None) -> EvalResult:
    """Render `suite` with the model (and adapter / ControlNet) and score it; write the report to `out_dir`.

    A Textual Inversion adapter's token replaces the concept's words in concept suites unless `token` says
    otherwise. `timestep_spacing` ("leading" | "trailing" | "linspace") respaces the model's scheduler (None:
    as it is). Raises ConfigError (bad option), ModelError / AdapterError (what cannot be loaded).
    """
    from diffray.models.loading import resolve_model_path

    t0 = time.time()
    base_ref = check_inputs(model, adapter, controlnet, steps, guidance, resolution, batch_size, timestep_spacing,
                            lora_scale)
    if out_dir is not None:
        check_out_dir(out_dir)
    token = token if token is not None else (ti_token(adapter) if suite in CONCEPT_SUITES else None)
    check_suite(suite, num, token)
    if controlnet and suite != "controlnet":
        raise ConfigError(f"a ControlNet needs control images: use --suite controlnet (not {suite!r})",
                          field="controlnet")
    items = build_suite(suite, num, seed, resolution, token)
    kind = adapter_kind(adapter, controlnet)
    variants = (["base"] if compare_base or kind is None else []) + ([kind] if kind else [])
    settings = dict(model=base_ref, adapter=adapter, controlnet=controlnet, suite=suite, num=len(items), seed=seed,
                    steps=steps, guidance=guidance, resolution=resolution, token=token, lora_scale=lora_scale,
                    **({"timestep_spacing": timestep_spacing} if timestep_spacing else {}))
    images = render_images(items, variants, absolute(resolve_model_path(base_ref)), absolute(adapter),
                           absolute(controlnet), settings, batch_size)
    result = score_rows(suite, settings, variants, items, images, time.time() - t0)
    if out_dir is not None:
        write_report_whole(result, Path(out_dir))
    return result


def write_report_whole(result: EvalResult, out: Path) -> None:
    """The report's files written into a temporary sibling, then moved into `out` one rename each: a failed
    write leaves the previous report (or nothing) in place, never a half-written file."""
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        paths = write_report(result, tmp)
        out.mkdir(parents=True, exist_ok=True)
        for path in paths.values():
            os.replace(path, out / path.name)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write the report ({exc.strerror or exc})", field="out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["EvalItem", "EvalResult", "evaluate"]
