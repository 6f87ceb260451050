"""Typed job configs: YAML -> pydantic models, dotted `key=value` overrides, one-line errors.

Every section forbids unknown keys so a typo fails at load time with the field path named. Configs are
plain data: they travel to Ray workers as dicts (`model_dump()`) and are re-validated there. This
module must never touch the environment (cache dirs, Ray, CUDA): resolving `builtin:` paths and
devices is the runner's job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffray.errors import ConfigError

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("lora-sample", pattern=RUN_NAME_PATTERN,
                      description="Run name; a rerun with the same name and storage_path resumes.")
    storage_path: str = Field("./runs", description="Local dir or pyarrow URI (s3://...) for checkpoints.")
    seed: int = Field(0, ge=0, description="Seed for LoRA init, noise, timesteps and data augmentation.")


class ModelSection(Section):
    path: str = Field("builtin:tiny", description="Diffusers model dir, hub id, or builtin:tiny / builtin:sd15-shaped.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Training target; None uses the model's scheduler config.")


class DataSection(Section):
    path: str = Field("builtin:sample", description="Imagefolder dir (metadata.jsonl/csv), Parquet file or dir, "
                      "a pyarrow URI (s3://...) of either, or builtin:sample.")
    format: Literal["auto", "imagefolder", "parquet"] = Field(
        "auto", description="auto: .parquet files -> parquet, a folder with metadata.jsonl/csv -> imagefolder.")
    resolution: int = Field(64, ge=8, le=4096, description="Square training resolution in pixels (multiple of 8).")
    center_crop: bool = Field(True, description="Center crop after resizing (else a random crop).")
    random_flip: bool = Field(False, description="Random horizontal flip, seeded per sample.")
    aspect_buckets: bool = Field(False, description="Aspect-ratio buckets: crop each image to the bucket (about "
                                 "resolution^2 pixels, sides multiples of bucket_step) nearest its aspect ratio "
                                 "instead of a square; each micro-batch holds one bucket.")
    bucket_step: int = Field(64, ge=8, le=1024, description="Bucket side granularity in pixels (multiple of 8; 64 "
                             "suits SD 1.x/2.x UNets, whose latents must divide by 8).")
    max_aspect_ratio: float = Field(2.0, ge=1.0, le=8.0, description="Longest bucket side over its shortest side.")
    caption_column: str = Field("text", description="Caption column (metadata or Parquet).")
    image_column: str = Field("file_name", description="Image column: file name in metadata; in Parquet image "
                              "bytes or an HF Image struct {bytes, path} (default there: 'image' if this is absent).")
    conditioning_column: str | None = Field(None, description="Conditioning image column (ControlNet); rows then "
                                            "need one of the image's size.")
    default_caption: str | None = Field(None, description="Caption for rows whose caption is missing or empty; "
                                        "None quarantines them.")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="Probability a sample trains with the empty "
                                   "caption (for classifier-free guidance), drawn per (seed, step, sample).")
    min_image_size: int = Field(32, ge=1, description="Rows whose shorter image side is smaller are quarantined.")
    max_image_pixels: int = Field(89_478_485, ge=1, description="Decompression-bomb limit: larger images "
                                  "(width x height, read from the header) are quarantined undecoded.")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="Fail the job when more than this fraction "
                                    "of rows is quarantined.")
    shuffle_buffer: int = Field(256, ge=0, description="Per-epoch shuffle of each worker's rows through a local "
                                "buffer of this size, seeded by (run.seed, epoch, rank); 0 keeps the dataset order.")
    cache: str = Field("off", description="Latent cache: off | auto (build under the cache dir on first use, "
                       "keyed by data, model and transform settings) | DIR (built by `diffray data prepare`).")
    validation_fraction: float = Field(0.0, ge=0.0, le=0.5, description="Hold out this fraction of the rows "
                                       "(picked by a hash of the sample id: the same rows for the same data) and "
                                       "log their denoising loss, at fixed noise and timesteps, as val_loss at "
                                       "every validation step and the last step.")
    materialize: bool = Field(True, description="Keep the preprocessed dataset in the object store "
                              "(fast epochs; turn off for data larger than object-store memory).")

    @field_validator("resolution", "bucket_step")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {v}")
        return v

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _check_buckets(self) -> DataSection:
        if self.aspect_buckets and self.resolution % self.bucket_step:
            raise ValueError(f"data.resolution={self.resolution} must be a multiple of data.bucket_step="
                             f"{self.bucket_step} with data.aspect_buckets")
        return self


class LoraSection(Section):
    rank: int = Field(4, ge=1, le=1024, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; None means alpha = rank (scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                                      description="UNet module names (suffixes) that get LoRA.")
    train_text_encoder: bool = Field(False, description="Also train LoRA on the text encoder.")
    text_encoder_target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1,
                                                   description="Text-encoder modules that get LoRA.")

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class OptimSection(Section):
    lr: float = Field(1e-4, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant_with_warmup", description="Learning-rate schedule (diffusers.optimization).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; None disables.")


class TrainSection(Section):
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train.")
    micro_batch_size: int = Field(2, ge=1, description="Samples per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, else fp32; always fp32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward.")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (5.0 is usual).")
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset-noise strength.")
    log_every: int = Field(1, ge=1, description="Log metrics every N steps.")
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the last K checkpoints.")
    validate_every: int | None = Field(None, ge=1, description="Validate every N steps (and at the end): val_loss "
                                       "on the held-out rows (data.validation_fraction) and validation grids.")
    validation_grids: bool = Field(True, description="Render validation image grids at validation steps (false: "
                                   "val_loss only, as Tune trials do).")
    validation_prompts: list[str] = Field(["a red circle on a blue background"],
                                          description="Prompts for validation grids.")
    validation_inference_steps: int = Field(10, ge=1, le=200, description="Sampler steps for validation.")
    progress_bar: bool = Field(True, description="Show a progress bar (rank 0).")


class ScalingSection(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (torch threads follow it).")
    resources_per_worker: dict[str, float] = Field(default_factory=dict,
                                                    description="Extra custom resources per worker.")
    wait_for_resources: bool = Field(False, description="false: fail at once when the cluster's nodes cannot hold "
                                     "the workers; true: wait for them (an autoscaling cluster adds nodes).")

    def worker_bundle(self) -> dict[str, float]:
        """What one training worker reserves."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {}), **self.resources_per_worker}


class StrategySection(Section):
    name: Literal["deepspeed", "ddp"] = Field("deepspeed", description="Data-parallel engine.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (deepspeed only).")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer-state offload to CPU.")
    offload_params: bool = Field(False, description="ZeRO-3 parameter offload to CPU.")

    @model_validator(mode="after")
    def _check(self) -> StrategySection:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.name == "ddp" and (self.offload_optimizer or self.offload_params):
            raise ValueError("offload_* options need name: deepspeed")
        return self


class FailureSection(Section):
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1 = forever).")


class KillRank(Section):
    rank: int = Field(..., ge=0)
    step: int = Field(..., ge=1)


class FaultsSection(Section):
    """Fault injection for tests and failure drills; all off by default."""

    nan_loss_at_step: int | None = Field(None, ge=1, description="Make the loss NaN at this step.")
    kill_rank_at_step: KillRank | None = Field(None, description="SIGKILL this rank's worker once at this step.")
    kill_during_checkpoint_at_step: int | None = Field(
        None, ge=1, description="SIGKILL rank 0 half-way through writing this step's checkpoint.")
    kill_driver_after_step: int | None = Field(None, ge=1, description="Kill the driver once this step is checkpointed.")
    kill_reward_actor_at_step: int | None = Field(
        None, ge=1, description="DDPO: ray.kill (restartable) the reward actor scoring rank 0's first batch of this "
        "epoch, while the call is in flight.")


class TrainConfig(Section):
    """The sections every training method shares; a method's config subclasses it, fixes `method`,
    adds its own section and may change defaults."""

    method: str = Field(description="Training method.")
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    failure: FailureSection = Field(default_factory=FailureSection)
    faults: FaultsSection = Field(default_factory=FaultsSection)


class LoraTrainConfig(TrainConfig):
    method: Literal["lora"] = Field("lora", description="Training method.")
    lora: LoraSection = Field(default_factory=LoraSection)


class TextualInversionSection(Section):
    placeholder_token: str = Field("<sks-widget>", pattern=r"^\S+$",
                                   description="New token that names the concept in prompts (no spaces).")
    initializer_token: str = Field("o", min_length=1,
                                   description="Existing single-token word whose embedding starts the new vector(s) "
                                               "(e.g. 'toy' on SD 1.5; the builtin tiny tokenizer is per character).")
    num_vectors: int = Field(1, ge=1, le=64, description="Embedding vectors learned for the token: <tok>, <tok>_1, ...")
    learnable_property: Literal["object", "style"] = Field(
        "object", description="Prompt templates: 'a photo of a {}' (object) or 'a painting in the style of {}' (style).")


class TextualInversionTrainConfig(TrainConfig):
    method: Literal["textual_inversion"] = Field("textual_inversion", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="textual-inversion-sample"))
    data: DataSection = Field(default_factory=lambda: DataSection(path="builtin:sample/subject"),
                              description="The concept's images; their captions are replaced by templates.")
    textual_inversion: TextualInversionSection = Field(default_factory=TextualInversionSection)

    @model_validator(mode="after")
    def _check(self) -> TextualInversionTrainConfig:
        # Row restore edits the whole embedding matrix in place; under ZeRO-3 it is partitioned across ranks.
        if self.strategy.name == "deepspeed" and self.strategy.zero_stage == 3:
            raise ValueError("strategy.zero_stage: textual inversion trains one small embedding matrix; "
                             "use zero_stage 0-2 or name: ddp")
        return self


class DreamBoothSection(Section):
    instance_prompt: str = Field("a photo of sks widget", min_length=1,
                                 description="Prompt of every instance image, with the rare identifier.")
    class_prompt: str = Field("a photo of a widget", min_length=1, description="Prompt of the subject's class.")
    with_prior_preservation: bool = Field(True, description="Add the class-image loss (prior preservation).")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class-image loss.")
    num_class_images: int = Field(16, ge=1, le=100_000,
                                  description="Class images wanted; missing ones are generated with the base model.")
    class_data_dir: str | None = Field(None, description="Folder of class images (read, and filled up when short); "
                                       "None = a cache folder keyed by model, prompt and sampler settings.")
    class_inference_steps: int = Field(25, ge=1, le=500, description="Sampler steps for class-image generation.")
    class_guidance_scale: float = Field(7.5, ge=0, description="CFG scale for class-image generation.")
    class_batch_size: int = Field(4, ge=1, description="Images per generation batch.")
    mode: Literal["lora", "full"] = Field("lora", description="lora: train a LoRA adapter (lora section); "
                                          "full: fine-tune all UNet weights (artifact is a full pipeline).")
    train_text_encoder: bool = Field(False, description="full mode: also fine-tune the text encoder's weights "
                                     "(in lora mode use lora.train_text_encoder).")


def _dreambooth_data() -> DataSection:
    return DataSection(path="builtin:sample/subject", random_flip=True)


class DreamBoothTrainConfig(TrainConfig):
    method: Literal["dreambooth"] = Field("dreambooth", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="dreambooth-sample"))
    data: DataSection = Field(default_factory=_dreambooth_data,
                              description="data.path is the instance-image folder (metadata file optional).")
    train: TrainSection = Field(default_factory=lambda: TrainSection(validation_prompts=[]))
    dreambooth: DreamBoothSection = Field(default_factory=DreamBoothSection)
    lora: LoraSection = Field(default_factory=LoraSection)

    @model_validator(mode="after")
    def _check(self) -> DreamBoothTrainConfig:
        db = self.dreambooth
        if db.mode == "full" and self.lora.train_text_encoder:
            raise ValueError("lora.train_text_encoder: dreambooth.mode is full; use dreambooth.train_text_encoder")
        if db.mode == "lora" and db.train_text_encoder:
            raise ValueError("dreambooth.train_text_encoder is for mode full; in mode lora use lora.train_text_encoder")
        if db.with_prior_preservation and self.data.aspect_buckets:
            raise ValueError("data.aspect_buckets: not supported with dreambooth.with_prior_preservation (instance "
                             "and class rows share one forward pass, so they need one size)")
        return self

    @property
    def trains_text_encoder(self) -> bool:
        return self.lora.train_text_encoder if self.dreambooth.mode == "lora" else self.dreambooth.train_text_encoder


class ControlNetSection(Section):
    init_from: str | None = Field(None, description="An existing ControlNet dir (diffusers format) to continue "
                                  "training; None initialises one from the base UNet (ControlNetModel.from_unet).")
    conditioning_scale: float = Field(1.0, ge=0.0, le=10.0, description="Scale of the ControlNet residuals in training.")
    conditioning_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability a sample trains with a blank "
                                        "(black) control image, drawn per (seed, step, sample).")
    validation_images: list[str] = Field([], description="Control images for validation grids; empty: the first "
                                         "two of the dataset (local imagefolders).")
    conditioning_embedding_out_channels: tuple[int, ...] = Field(
        (16, 32, 96, 256), min_length=2, description="Channels of the control-image encoder (from_unet only).")


def _controlnet_data() -> DataSection:
    return DataSection(path="builtin:sample/canny", conditioning_column="conditioning_image")


class ControlNetTrainConfig(TrainConfig):
    method: Literal["controlnet"] = Field("controlnet", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="controlnet-sample"))
    data: DataSection = Field(default_factory=_controlnet_data,
                              description="Paired data: data.conditioning_column names the control images.")
    controlnet: ControlNetSection = Field(default_factory=ControlNetSection)

    @model_validator(mode="after")
    def _check(self) -> ControlNetTrainConfig:
        if not self.data.conditioning_column:
            raise ValueError("data.conditioning_column: ControlNet trains on (image, control image) pairs; name the "
                             "column (e.g. conditioning_image; `diffray data condition` writes such datasets)")
        return self


class RewardSection(Section):
    name: str = Field("jpeg_compressibility", description="Reward in the registry (diffray.trainers.components."
                      "rewards): jpeg_compressibility | jpeg_incompressibility | aesthetic | prompt_alignment.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the reward's factory "
                                    "(e.g. clip_path, head_path: local paths; nothing is downloaded).")
    actors: int = Field(1, ge=0, le=64, description="Reward actors in the pool shared by all workers, called "
                        "asynchronously (the next batch samples while the last is scored); 0 scores inline on "
                        "each training worker.")
    num_cpus: float = Field(0.25, ge=0, description="CPUs each reward actor reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each reward actor reserves (a model-based reward on GPU).")
    max_restarts: int = Field(3, ge=-1, description="Ray restarts of a dead reward actor (-1 = forever).")
    retries: int = Field(3, ge=0, description="Times a scoring call is resubmitted after its actor died "
                         "(RayActorError); the restarted actor scores it.")
    start_timeout_s: float = Field(300.0, gt=0, description="Fail when the reward actors have not started by then "
                                   "(the cluster cannot place them).")


class DDPOSection(Section):
    prompts: list[str] = Field(["a red circle on a blue background", "a green square on a white background",
                                "a yellow triangle", "a photo of a cat"], min_length=1,
                               description="Prompts drawn (uniformly, seeded) for each sample.")
    prompts_file: str | None = Field(None, description="A text file of prompts, one per line (blank lines "
                                     "skipped); replaces `prompts` when set.")
    negative_prompt: str = Field("", description="Prompt of the unconditional branch of classifier-free guidance.")
    reward: RewardSection = Field(default_factory=RewardSection)
    resolution: int | None = Field(None, ge=8, le=4096, description="Image size in pixels (multiple of 8); None: "
                                   "the UNet's sample_size x 8.")
    sample_steps: int = Field(10, ge=2, le=1000, description="DDIM steps per trajectory (T).")
    eta: float = Field(1.0, gt=0, le=1.0, description="DDIM noise weight (> 0: each step is a Gaussian policy).")
    guidance: float = Field(5.0, ge=0, description="Classifier-free guidance scale while sampling and training.")
    samples_per_epoch: int = Field(16, ge=1, description="Trajectories each worker samples per epoch.")
    sample_batch_size: int = Field(4, ge=1, description="Trajectories per sampling batch (one reward call each).")
    inner_epochs: int = Field(1, ge=1, le=100, description="PPO passes over each epoch's samples.")
    timestep_fraction: float = Field(1.0, gt=0, le=1.0, description="Fraction of the T steps trained per sample "
                                     "(a random subset, per sample and pass).")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip epsilon.")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clamped to [-adv_clip_max, adv_clip_max].")
    per_prompt_advantages: bool = Field(True, description="Normalise rewards per prompt with a running stat tracker "
                                        "(else over the epoch's batch of all workers).")
    stat_buffer_size: int | None = Field(32, ge=1, description="Rewards kept per prompt by the stat tracker "
                                         "(None: all).")
    stat_min_count: int = Field(16, ge=1, description="Below this many rewards for a prompt, normalise over the "
                                "epoch's batch instead.")
    grid_images: int = Field(4, ge=1, le=32, description="Best and worst samples shown in each epoch's image grid "
                             "(every train.validate_every epochs and the last).")


class DDPOTrainConfig(TrainConfig):
    """DDPO reward alignment: train.max_steps counts epochs (sample, score, inner_epochs of PPO updates);
    train.micro_batch_size is the trajectories per PPO forward."""

    method: Literal["ddpo"] = Field("ddpo", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="ddpo-sample"))
    data: DataSection | None = Field(None, description="Unused: DDPO samples its own images from ddpo.prompts.")
    train: TrainSection = Field(default_factory=lambda: TrainSection(max_steps=10, checkpoint_every=5,
                                                                     validate_every=5, validation_prompts=[]))
    lora: LoraSection = Field(default_factory=LoraSection)
    ddpo: DDPOSection = Field(default_factory=DDPOSection)

    @model_validator(mode="after")
    def _check(self) -> DDPOTrainConfig:
        d, t = self.ddpo, self.train
        if self.data is not None:
            raise ValueError("data: DDPO trains on samples of ddpo.prompts, not a dataset; remove the data section")
        if self.lora.train_text_encoder:
            raise ValueError("lora.train_text_encoder: DDPO trains LoRA on the UNet only")
        if d.resolution is not None and d.resolution % 8:
            raise ValueError(f"ddpo.resolution must be a multiple of 8 (the VAE downsamples by 8), "
                             f"got {d.resolution}")
        if d.samples_per_epoch % d.sample_batch_size:
            raise ValueError(f"ddpo.samples_per_epoch={d.samples_per_epoch} must be a multiple of "
                             f"ddpo.sample_batch_size={d.sample_batch_size}")
        per_update = t.micro_batch_size * t.grad_accum_steps
        if d.samples_per_epoch % per_update:
            raise ValueError(f"ddpo.samples_per_epoch={d.samples_per_epoch} must be a multiple of "
                             f"train.micro_batch_size x train.grad_accum_steps = {per_update}")
        return self


METHODS: dict[str, type[TrainConfig]] = {"lora": LoraTrainConfig, "dreambooth": DreamBoothTrainConfig,
                                         "textual_inversion": TextualInversionTrainConfig,
                                         "controlnet": ControlNetTrainConfig, "ddpo": DDPOTrainConfig}



# ---------------------------------------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; missing file or bad syntax -> ConfigError naming the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)=(.*)$", re.S)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides in order; values are parsed as YAML (`8`, `1e-4`, `[a, b]`, `null`)."""
    out = _deep_copy(data)
    for item in overrides:
        m = _OVERRIDE.match(item)
        if not m:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, raw = m.group(1), m.group(2)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _looks_like_float(value):
            value = float(value)
        set_path(out, path, value)
    return out


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict in place, creating sections; ConfigError if a prefix is not a section."""
    node = data
    keys = path.split(".")
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {path}: {'.'.join(keys[: i + 1])} is not a section", field=path)
        node = child
    node[keys[-1]] = value


def _looks_like_float(s: str) -> bool:
    # PyYAML (YAML 1.1) reads `1e-4` as a string; users mean a number.
    return bool(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", s.strip()))


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem: `field.path: message (allowed: ...)`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            msg = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    cls: Any = model
    for key in loc:
        field = getattr(cls, "model_fields", {}).get(key)
        if field is None:
            return []
        cls = field.annotation
        # unwrap Optional[...] / X | None
        for arg in getattr(cls, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                cls = arg
    return sorted(getattr(cls, "model_fields", {}).keys())


def validate_config(data: dict[str, Any]) -> Section:
    """Validate a raw dict against the config class of its `method` (default lora)."""
    method = data.get("method", "lora")
    cls = METHODS.get(method) if isinstance(method, str) else None
    if cls is None:
        raise ConfigError(f"unknown method {method!r} (allowed: {', '.join(METHODS)})", field="method")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, cls)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Section:
    """Load a job config file, apply CLI overrides and validate it."""
    return validate_config(apply_overrides(read_yaml(path), overrides or []))
