"""The image engine a Generator replica wraps: one diffusers pipeline, resident adapters, ControlNets and
samplers, and `run` for a batch of compatible jobs. Never imports ray (unit tests and the benchmark use
it directly).

Adapters are loaded into the one UNet / text encoder under their own names and switched with
`set_adapters`, so a resident adapter costs no reload of the base model. A reference count per adapter
lets several resident adapter sets (the multiplexed "models") share one LoRA; the last release deletes it.
Every pipeline or adapter operation holds one lock: generation runs in a worker thread while the
replica's event loop keeps accepting requests.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from pathlib import Path

import torch

from diffray.errors import AdapterError, RequestError
from diffray.models.adapters import LORA_WEIGHTS
from diffray.models.textual_inversion import TI_WEIGHTS, placeholder_tokens
from diffray.serve.config import ServeArgs
from diffray.serve.registry import AdapterInfo, AdapterRegistry
from diffray.serve.schemas import Job

SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
                     "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                     "dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def peft_name(adapter_id: str) -> str:
    """A PEFT-safe adapter name for an id ('.' would split module paths); a hash keeps them distinct."""
    return re.sub(r"[^A-Za-z0-9_]", "_", adapter_id) + "_" + hashlib.sha1(adapter_id.encode()).hexdigest()[:6]


def ti_tokens(path: str) -> list[str]:
    """The tokens a TI artifact adds: its placeholder and the `_1..` of a multi-vector one."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / TI_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        if len(keys) != 1:
            raise AdapterError(f"{path}: {TI_WEIGHTS} must hold one token, holds {keys}")
        return placeholder_tokens(keys[0], f.get_slice(keys[0]).get_shape()[0])


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ImageEngine:
    """The pipeline of one replica. `device` None picks CUDA when present."""

    def __init__(self, args: ServeArgs, device: str | None = None):
        from diffray.models.loading import load_pipeline, resolve_model_path

        self.args = args
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES[args.generator.dtype] if self.device != "cpu" else torch.float32
        self.model_path = resolve_model_path(args.model)
        self.pipe = load_pipeline(self.model_path, dtype=dtype, device=self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.registry = AdapterRegistry(args.adapters_dir)
        self.lock = threading.RLock()
        self.refs: dict[str, int] = {}  # adapter id -> resident adapter sets holding it
        self.resident: dict[str, AdapterInfo] = {}
        self.schedulers = {"default": self.pipe.scheduler}
        self.control_pipes: dict[str, object] = {}
        self.native_size = int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    # ------------------------------------------------------------------------------------------ adapters
    def acquire(self, ids: list[str]) -> None:
        """Make `ids` resident (loading what is not) and count one more holder of each."""
        with self.lock:
            for adapter_id in ids:
                self._ensure(adapter_id)
                self.refs[adapter_id] = self.refs.get(adapter_id, 0) + 1

    def release(self, ids: list[str]) -> None:
        """One holder fewer; adapters nobody holds are removed from the pipeline."""
        with self.lock:
            for adapter_id in ids:
                self.refs[adapter_id] = max(0, self.refs.get(adapter_id, 0) - 1)
            self._trim()

    def _ensure(self, adapter_id: str) -> AdapterInfo:
        info = self.registry.get(adapter_id, param="adapters")
        old = self.resident.get(adapter_id)
        if old is not None and old.mtime == info.mtime:
            return old
        if old is not None:  # replaced on disk: reload
            self._unload(old)
        self._load(info)
        self.resident[adapter_id] = info
        return info

    def _load(self, info: AdapterInfo) -> None:
        if info.kind == "lora":
            try:
                self.pipe.load_lora_weights(info.path, weight_name=LORA_WEIGHTS, adapter_name=peft_name(info.id),
                                            use_safetensors=True)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                raise AdapterError(f"adapter {info.id!r} does not fit this base model: {exc}") from None
        elif info.kind == "textual_inversion":
            try:
                self.pipe.load_textual_inversion(info.path, weight_name=TI_WEIGHTS, use_safetensors=True)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                raise AdapterError(f"adapter {info.id!r} does not fit this base model: {exc}") from None
        else:
            raise RequestError(f"{info.id!r} is a {info.kind}, not a LoRA or Textual Inversion adapter",
                               param="adapters")

    def _unload(self, info: AdapterInfo) -> None:
        if info.kind == "lora":
            self.pipe.delete_adapters(peft_name(info.id))
        else:
            self.pipe.unload_textual_inversion(ti_tokens(info.path))
        self.resident.pop(info.id, None)

    def _trim(self) -> None:
        for adapter_id in [a for a, info in self.resident.items() if not self.refs.get(a)]:
            self._unload(self.resident[adapter_id])
            self.refs.pop(adapter_id, None)

    def activate(self, adapters: tuple[tuple[str, float], ...]) -> None:
        """Point the pipeline at these adapters and weights (LoRA on, TI tokens just resident)."""
        infos = [(self._ensure(a), w) for a, w in adapters]
        loras = [(peft_name(i.id), w) for i, w in infos if i.kind == "lora"]
        if not any(i.kind == "lora" for i in self.resident.values()):
            return
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in loras], [w for _, w in loras])
        else:
            self.pipe.disable_lora()

    # ------------------------------------------------------------------------------------- control, samplers
    def controlnet_pipe(self, name: str):
        """The ControlNet pipeline for a configured name or registry id (built once, shares the base
        pipeline's modules, so resident LoRAs apply to it too)."""
        if name not in self.control_pipes:
            from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

            from diffray.models.loading import resolve_model_path

            entry = self.args.controlnets.get(name)
            if entry is not None:
                path, sub = resolve_model_path(entry.path) if entry.path.startswith("builtin:") else entry.path, \
                    entry.subfolder
            else:
                info = self.registry.get(name, param="control.model")
                if info.kind != "controlnet":
                    raise RequestError(f"{name!r} is a {info.kind}, not a ControlNet", param="control.model")
                path, sub = info.path, None
            try:
                cn = ControlNetModel.from_pretrained(path, subfolder=sub, use_safetensors=True,
                                                     dtype=self.pipe.unet.dtype)
            except (OSError, ValueError) as exc:
                raise AdapterError(f"ControlNet {name!r}: cannot load {path}: {exc}") from None
            cp = StableDiffusionControlNetPipeline.from_pipe(self.pipe, controlnet=cn.to(self.device))
            cp.set_progress_bar_config(disable=True)
            self.control_pipes[name] = cp
        return self.control_pipes[name]

    def scheduler(self, name: str):
        if name not in self.schedulers:
            import diffusers

            cls = getattr(diffusers, SCHEDULER_CLASSES[name])
            self.schedulers[name] = cls.from_config(self.pipe.scheduler.config)
        return self.schedulers[name]

    # ------------------------------------------------------------------------------------------- generate
    def run(self, jobs: list[Job]) -> list[list[bytes]]:
        """PNG bytes per job, `n` each; jobs are grouped by `batch_key` into one pipeline call per group.
        Image j of a job uses its own `torch.Generator` seeded `seed + j`: same request, same pixels."""
        out: list[list[bytes] | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.batch_key(), []).append(i)
        with self.lock:
            for idx in groups.values():
                images = self._call([jobs[i] for i in idx])
                for i in idx:
                    out[i] = [png_bytes(images.pop(0)) for _ in range(jobs[i].n)]
        return out  # type: ignore[return-value]

    def _call(self, jobs: list[Job]) -> list:
        first = jobs[0]
        self.activate(first.adapters)
        pipe = self.controlnet_pipe(first.controlnet) if first.controlnet else self.pipe
        pipe.scheduler = self.scheduler(first.scheduler)
        prompts, negs, gens, controls = [], [], [], []
        for job in jobs:
            for j in range(job.n):
                prompts.append(job.prompt)
                negs.append(job.negative_prompt or "")
                gens.append(torch.Generator(device="cpu").manual_seed(job.seed + j))
                controls.append(job.control_image)
        extra = {}
        if first.controlnet:
            extra = {"image": controls, "controlnet_conditioning_scale": first.control_scale}
        with torch.inference_mode():
            result = pipe(prompt=prompts, negative_prompt=negs if first.negative_prompt is not None else None,
                          height=first.height, width=first.width, num_inference_steps=first.steps,
                          guidance_scale=first.guidance, generator=gens, **extra)
        return list(result.images)
