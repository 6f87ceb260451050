"""The image engine a Generator replica wraps: one diffusers pipeline, resident adapters, ControlNets and
samplers, and `run` for a batch of compatible jobs. Never imports ray (unit tests and the benchmark use
it directly).

Adapters live in `resident.ResidentAdapters` (loaded once, switched with `set_adapters`, unloaded when no
adapter set holds them or when their files change). Every pipeline or adapter operation holds one lock:
generation runs in a worker thread while the replica's event loop keeps accepting requests.

A job's prompt reads the tokens of the Textual Inversions it asks for and of no other resident one
(`ResidentAdapters.prompt_texts`). A job fails alone: its prompts are checked against the tokenizer before
any pipeline call, and when a pipeline call over several jobs fails, each job is run on its own so only
the culprit gets the error.
A job is abandoned between sampler steps once it is cancelled (`cancel`) or past its deadline: the call
stops at the next step callback and the group's other jobs run again without it.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import io
import logging
import threading
import time

import torch

from diffray.errors import AdapterError, AdapterNotFound, DiffrayError, RequestError
from diffray.models import speed
from diffray.models.flux import call_args
from diffray.serve import controls, hotswap, mixing
from diffray.serve.config import ServeArgs
from diffray.serve.remote_registry import open_registry
from diffray.serve.resident import ResidentAdapters, peft_name  # noqa: F401 - peft_name re-exported
from diffray.serve.schemas import Job, check_text

log = logging.getLogger(__name__)

SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
                     "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                     "dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Interrupted(Exception):
    """Raised from the step callback: a job of the running call was cancelled or timed out."""


def _sampler_runs(scheduler, steps: int) -> bool:
    """Whether a fresh copy of `scheduler` completes `steps` steps on a 1x1 latent without error or NaN."""
    try:
        sched = type(scheduler).from_config(scheduler.config)
        sched.set_timesteps(steps)
        extra = {"generator": torch.Generator().manual_seed(0)} \
            if "generator" in inspect.signature(sched.step).parameters else {}  # as the pipelines do
        sample = torch.ones(1, 4, 1, 1)
        for t in sched.timesteps:
            model_input = sched.scale_model_input(sample, t)
            sample = sched.step(torch.zeros_like(model_input), t, sample, **extra).prev_sample
        return len(sched.timesteps) > 0 and bool(torch.isfinite(sample).all())
    except Exception:  # noqa: BLE001 - a sampler that cannot run the count says so by raising
        return False


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def cancelled_error() -> RequestError:
    return RequestError("the generation was cancelled (timed out or the client went away)", status=504,
                        kind="timeout")


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
        self.flux = type(self.pipe).__name__ == "FluxPipeline"  # a transformer, flow-matching sampler, T5
        self.denoiser = self.pipe.transformer if self.flux else self.pipe.unet
        hs = args.generator.hotswap  # the slot goes in before the denoiser is compiled
        slot = hotswap.Slot(self.pipe, "transformer" if self.flux else "unet", hs.rank, hs.targets) if hs else None
        speed.apply(self.denoiser, args.generator)
        self.registry = open_registry(args.adapters_dir, args.adapters_listing_ttl_s)
        self.adapters = ResidentAdapters(self.pipe, self.registry, slot)
        self.lock = threading.RLock()
        self.schedulers = {"default": self.pipe.scheduler}
        self.step_checks: dict[tuple[str, int], RequestError | None] = {}
        self.control_pipes: collections.OrderedDict[str, tuple] = collections.OrderedDict()  # LRU: recent last
        self.native_size = (int(self.pipe.vae.config.sample_size) if self.flux else
                            int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor))
        self.call_args = {k: v for k, v in call_args(self.pipe).items() if k == "max_sequence_length"}
        self.steps_done = 0  # sampler steps run by this engine (the clock cancellations are measured on)
        self.cancelled: collections.OrderedDict[str, int] = collections.OrderedDict()  # job id -> steps_done then
        # (why, steps run between the cancel and the stop) per abandoned job: "cancel" or "deadline"
        self.cancel_log: collections.deque[tuple[str, int]] = collections.deque(maxlen=256)
        # (jobs, pipeline calls) per `run`: shows whether Serve's batching happens and how batches split
        self.batch_log: collections.deque[tuple[int, int]] = collections.deque(maxlen=256)
        self.runs = 0  # `run` calls so far (the last 256 are in batch_log)
        # mixed-adapter batching, valid while no adapter is loaded or unloaded (`ResidentAdapters.version`):
        self.mixable: dict[tuple[int, str], bool] = {}  # (version, PEFT name) -> mixing.can_mix
        self.mixes: collections.OrderedDict[tuple, mixing.Stacks] = collections.OrderedDict()  # last 4 sets

    @property
    def resident(self) -> dict:
        return self.adapters.loaded

    # ------------------------------------------------------------------------------------------ adapters
    def acquire(self, ids: list[str]) -> None:
        """Make `ids` resident (loading what is not) and count one more holder of each."""
        with self.lock:
            self.adapters.acquire(ids)

    def release(self, ids: list[str]) -> None:
        """One holder fewer; adapters nobody holds are removed from the pipeline. Never raises."""
        with self.lock:
            self.adapters.release(ids)

    def activate(self, adapters: tuple[tuple[str, float], ...]) -> None:
        """Point the pipeline at these adapters and weights (LoRA on, TI tokens just resident)."""
        self.adapters.activate(adapters)

    # ------------------------------------------------------------------------------------------ cancellation
    def cancel(self, job_id: str) -> None:
        """Abandon `job_id` at the next sampler step (called from another thread; takes no engine lock)."""
        if job_id:
            self.cancelled[job_id] = self.steps_done
            while len(self.cancelled) > 1024:
                self.cancelled.popitem(last=False)

    def abandoned(self, job: Job) -> bool:
        return job.job_id in self.cancelled or (job.deadline > 0 and time.monotonic() > job.deadline)

    def _note_abandoned(self, job: Job) -> None:
        since = self.cancelled.pop(job.job_id, None)
        self.cancel_log.append(("cancel", self.steps_done - since) if since is not None else ("deadline", 0))

    # ------------------------------------------------------------------------------------- control, samplers
    def controlnet_pipe(self, name: str):
        """The ControlNet pipeline for a configured name or registry id (`controls.build`, once per content).

        Raises:
            RequestError: naming `control.model` (404 unknown, 422 broken or not loadable, 400 not a ControlNet).
        """
        from diffray.models.loading import resolve_model_path

        entry = self.args.controlnets.get(name)
        if entry is not None:
            path = resolve_model_path(entry.path) if entry.path.startswith("builtin:") else entry.path
            key, sub = ("config", path, entry.subfolder), entry.subfolder
        else:
            try:
                info = self.registry.get(name, param="control.model")
            except AdapterError as exc:
                status = 404 if isinstance(exc, AdapterNotFound) else 422
                raise RequestError(str(exc), param="control.model", status=status) from None
            if info.kind != "controlnet":
                raise RequestError(f"{name!r} is a {info.kind}, not a ControlNet", param="control.model")
            path, sub, key = info.path, None, ("registry", info.fingerprint)
        cached = self.control_pipes.pop(name, None)
        if cached is None or cached[0] != key:  # new, or replaced on disk
            cached = (key, controls.build(self.pipe, name, path, sub, self.flux, self.device))
        self.control_pipes[name] = cached
        while len(self.control_pipes) > self.args.generator.max_controlnets_per_replica:  # its weights go with it
            self.control_pipes.popitem(last=False)
        return cached[1]

    def scheduler(self, name: str):
        if self.flux and name != "default":
            raise RequestError(f"the {name} sampler is for DDPM-trained models; a Flux model samples with its own "
                               "flow-matching scheduler (scheduler: default)", param="scheduler", status=422)
        if name not in self.schedulers:
            import diffusers

            cls = getattr(diffusers, SCHEDULER_CLASSES[name])
            self.schedulers[name] = cls.from_config(self.pipe.scheduler.config)
        return self.schedulers[name]

    # ------------------------------------------------------------------------------------------- generate
    def run(self, jobs: list[Job]) -> list[list[bytes] | DiffrayError | Exception]:
        """Per job: `n` PNGs, or the exception that job alone failed with. Jobs are grouped (`_group_key`)
        into one pipeline call per group. Image j of a job uses its own `torch.Generator` seeded
        `seed + j`: same request, same pixels, whatever it was batched with."""
        out: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        with self.lock:
            self.adapters.sweep()
            for name in controls.stale(self.control_pipes, self.registry):  # deleted or replaced: weights go
                del self.control_pipes[name]
            slots: dict[tuple, list[dict[str, float]]] = {}  # per shape key: the mixed calls' LoRA weights
            for i, job in enumerate(jobs):
                out[i] = self._check_text(job) or self._check_steps(job)
                if out[i] is None:
                    groups.setdefault(self._group_key(job, slots), []).append(i)
            self.batch_log.append((len(jobs), len(groups)))
            self.runs += 1
            for idx in groups.values():
                self._run_group(jobs, idx, out)
            self.adapters.trim()
        return out

    def _group_key(self, job: Job, slots: dict[tuple, list[dict[str, float]]]) -> tuple:
        """Jobs with equal group keys share a pipeline call: equal `batch_key`s, or (mixed-adapter batching)
        equal shape keys, one LoRA each, no LoRA at two weights."""
        # A compiled UNet never sees forward hooks added after it was compiled (torch.compile does not guard
        # on them), and mixed batches add theirs per call: with compile, each LoRA set gets its own call.
        mix = self.args.batching.mix_adapters and not self.args.generator.compile and not self.flux
        lora = self._mixable_lora(job) if mix else None
        if lora is None:
            return job.batch_key()
        shape = job.shape_key()
        return ("mixed", shape, mixing.assign(slots.setdefault(shape, []), *lora))

    def _mixable_lora(self, job: Job) -> tuple[str, float] | None:
        """(PEFT name, weight) of the job's one mixable LoRA (`mixing.can_mix`), (BASE, 1) without one, None
        when the job cannot join a mixed call (several LoRAs, one that cannot mix, or an adapter that fails
        to load: its own call then reports that)."""
        try:
            loras = self.adapters.lora_names(job.adapters)
        except Exception:  # noqa: BLE001 - reported by the job's own call
            return None
        if not loras:
            return mixing.BASE, 1.0
        if len(loras) > 1:
            return None
        key = (self.adapters.version, loras[0][0])
        if key not in self.mixable:
            if len(self.mixable) > 1024:
                self.mixable.clear()
            self.mixable[key] = mixing.can_mix(self.pipe, loras[0][0])
        return loras[0] if self.mixable[key] else None

    def _check_text(self, job: Job) -> RequestError | None:
        """The error of a job whose prompt the tokenizer cannot encode (None when it can)."""
        if self.flux and job.negative_prompt is not None:
            return RequestError("a Flux model is guidance-distilled: it takes no negative prompt",
                                param="negative_prompt", status=422)
        params = [(param, text) for param, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt))
                  if text is not None]
        for param, text in params:
            try:
                check_text(text)  # as the HTTP schemas do; a TI's hidden name cannot come from a prompt
            except ValueError as exc:
                return RequestError(f"the text {exc}", param=param)
        texts = [text for _, text in params]
        try:
            texts = self.adapters.prompt_texts(job.adapters, *texts)
        except RequestError as exc:
            return exc
        except Exception:  # noqa: BLE001 - an adapter that cannot load: reported by the job's own call
            pass
        for (param, _), text in zip(params, texts):
            try:
                self.pipe.tokenizer(text)
            except Exception:  # noqa: BLE001 - whatever the tokenizer chokes on is the prompt's fault
                return RequestError("the tokenizer cannot encode this text", param=param)
        return None

    def _check_steps(self, job: Job) -> RequestError | None:
        """The error of a job whose step count its sampler cannot run (None when it can). Samplers index
        their training timesteps with the schedule and some break near the limit (DDPM asked for timestep
        1000 of 1000, UniPC failed an assertion), so each (sampler, steps) is dry-run once on a 1x1 latent
        with a zero model output: the sampler's own code decides, at no UNet cost."""
        key = (job.scheduler, job.steps)
        if self.flux:
            try:
                self.scheduler(job.scheduler)
            except RequestError as exc:
                return exc
            return None  # the flow-matching Euler sampler runs any step count
        if key not in self.step_checks:
            self.step_checks[key] = None if _sampler_runs(self.scheduler(job.scheduler), job.steps) else RequestError(
                f"the {job.scheduler} sampler cannot run {job.steps} steps with this model", param="steps")
        return self.step_checks[key]

    def _run_group(self, jobs: list[Job], idx: list[int], out: list) -> None:
        pending = list(idx)
        while pending:
            for i in [i for i in pending if self.abandoned(jobs[i])]:
                self._note_abandoned(jobs[i])
                out[i] = cancelled_error()
            pending = [i for i in pending if out[i] is None]
            if not pending:
                return
            try:
                images = self._call([jobs[i] for i in pending])
            except Interrupted:
                continue  # the abandoned ones are marked above; the rest run again
            except Exception as exc:  # noqa: BLE001 - decided per job below
                if len(pending) > 1:
                    for i in pending:  # alone, so only the job that fails gets the error
                        self._run_group(jobs, [i], out)
                    return
                if not isinstance(exc, DiffrayError):
                    log.error("generation failed", exc_info=exc)
                out[pending[0]] = exc
                return
            for i in pending:
                out[i] = [png_bytes(images.pop(0)) for _ in range(jobs[i].n)]
            return

    def _step_callback(self, jobs: list[Job]):
        def on_step_end(pipe, step, timestep, kwargs):
            self.steps_done += 1
            if any(self.abandoned(j) for j in jobs):
                raise Interrupted()
            return kwargs

        return on_step_end

    def _call(self, jobs: list[Job]) -> list:
        first = jobs[0]
        if len({job.adapters for job in jobs}) == 1:
            self.activate(first.adapters)
            return self._generate(jobs, contextlib.nullcontext())
        loras = [self._mixable_lora(job) for job in jobs]  # a mixed group: one LoRA (or BASE) per job
        weights = dict(lora for lora in loras if lora[0] != mixing.BASE)
        key = (self.adapters.version, tuple(sorted(weights.items())))
        if key not in self.mixes:
            self.mixes[key] = mixing.Stacks(self.pipe.unet, weights)
            while len(self.mixes) > 4:
                self.mixes.popitem(last=False)
        self.mixes.move_to_end(key)
        self.pipe.disable_lora()  # PEFT's own LoRA path off: the stacks add each row's LoRA
        names = [name for job, (name, _) in zip(jobs, loras) for _ in range(job.n)]
        return self._generate(jobs, self.mixes[key].rows(names))

    def _generate(self, jobs: list[Job], adapter_context) -> list:
        first = jobs[0]
        pipe = self.controlnet_pipe(first.controlnet) if first.controlnet else self.pipe
        pipe.scheduler = self.scheduler(first.scheduler)
        prompts, negs, gens, conds = [], [], [], []
        for job in jobs:
            # the job's own TIs' tokens, and no other's
            prompt, neg = self.adapters.prompt_texts(job.adapters, job.prompt, job.negative_prompt or "")
            for j in range(job.n):
                prompts.append(prompt)
                negs.append(neg)
                gens.append(torch.Generator(device="cpu").manual_seed(job.seed + j))
                conds.append(job.control_image)
        extra = dict(self.call_args)
        if first.controlnet:
            extra = {"image": conds, "controlnet_conditioning_scale": first.control_scale}
        with torch.inference_mode(), adapter_context:
            result = pipe(prompt=prompts, negative_prompt=negs if first.negative_prompt is not None else None,
                          height=first.height, width=first.width, num_inference_steps=first.steps,
                          guidance_scale=first.guidance, generator=gens, callback_on_step_end=self._step_callback(jobs),
                          **extra)
        return list(result.images)

    def info(self) -> dict:
        """What a test or operator may ask a replica: device, resident adapters, batches, cancellations, and
        the graphs torch.compile made in this process so far (Dynamo's count)."""
        from torch._dynamo.utils import counters

        return {"native_size": self.native_size, "device": self.device, "dtype": str(self.pipe.dtype),
                "graphs": counters["stats"]["unique_graphs"],
                "resident": sorted(self.adapters.loaded), "controlnets": list(self.control_pipes),
                "steps_done": self.steps_done, "abandoned": [list(x) for x in self.cancel_log],
                "runs": self.runs, "batches": [list(x) for x in self.batch_log],
                "busy": not self._idle()}

    def _idle(self) -> bool:
        if self.lock.acquire(blocking=False):
            self.lock.release()
            return True
        return False
