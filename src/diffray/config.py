"""Typed job configs: YAML -> pydantic models, dotted `key=value` overrides, one-line errors. Every section
forbids unknown keys so a typo fails at load time with the field path named. Configs are plain data: they
travel to Ray workers as dicts (`model_dump()`) and are re-validated there. This module holds the sections
every method shares (`flow:` in `diffray.flow_config`) and the loading helpers; each method's own section
and config model live in its package (`diffray.trainers.<method>`), and `diffray.methods` maps `method:` to
them and validates whole job files. Never touches the environment (cache dirs, Ray, CUDA): resolving
`builtin:` paths and devices is the runner's job."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from diffray import yaml_io
from diffray.errors import ConfigError
from diffray.accelerator import Accelerator
from diffray.flow_config import FlowSection

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("lora-sample", pattern=RUN_NAME_PATTERN,
                      description="Run name; a rerun with the same name and storage_path resumes (with the "
                      "settings the run was started with: trainers/rerun.py).")
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
    random_flip: bool = Field(False, description="Random horizontal flip, seeded per sample (caption: left<->right).")
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
    mask_column: str | None = Field(None, description="Loss-mask image column (a file name in metadata, image "
                                    "bytes in Parquet): white pixels train, black ones do not (grey: a weight); "
                                    "cropped and flipped with its image, averaged down to the latent grid. None: "
                                    "every pixel trains.")
    default_caption: str | None = Field(None, description="Caption for rows whose caption is missing or empty; "
                                        "None quarantines them.")
    trigger_word: str | None = Field(None, min_length=1, max_length=200, description="Prepended to every "
                                     "caption as its first tag ('sks, a photo of ...'); with shuffle_tags set "
                                     "keep_tokens >= 1 to keep it first.")
    shuffle_tags: bool = Field(False, description="Shuffle each caption's comma-separated tags every step, drawn "
                               "per (seed, step, sample) so a resume sees the same order (kohya's shuffle_caption).")
    keep_tokens: int = Field(0, ge=0, le=75, description="With shuffle_tags: the first N tags stay in place "
                             "(kohya semantics: the trigger word counts as the first).")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="Probability a sample trains with the empty "
                                   "caption (for classifier-free guidance), drawn per (seed, step, sample).")
    follow_symlinks: bool = Field(False, description="Read image files that are links to outside the dataset "
                                  "folder (local disks). Off: such rows are quarantined without being opened; "
                                  "paths that climb out with '..' or are absolute are refused either way.")
    image_roots: tuple[str, ...] = Field((), description="Folders (absolute) or URI prefixes that "
                                   "image paths may name besides the dataset's own folder, e.g. where an HF "
                                   "`datasets` Parquet file's absolute image paths point. Others are quarantined.")
    min_image_size: int = Field(32, ge=1, description="Rows whose shorter image side is smaller are quarantined.")
    max_image_pixels: int = Field(89_478_485, ge=1, description="Decompression-bomb limit: larger images "
                                  "(width x height, read from the header) are quarantined undecoded.")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="Fail the job when more than this fraction "
                                    "of rows is quarantined.")
    shuffle_buffer: int = Field(256, ge=0, description="Per-epoch shuffle of each worker's rows through a local "
                                "buffer of this size, seeded by (run.seed, epoch, rank); 0 keeps the dataset order.")
    cache: str = Field("off", min_length=1, description="Latent cache: off | auto (build under the cache dir on "
                       "first use, keyed by data, model and transform settings) | DIR or a URI such as s3://bucket/"
                       "latents (built by `diffray data prepare`; a URI is what every node of a cluster reads).")
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
    def _check_keep_tokens(self) -> DataSection:
        if self.keep_tokens and not self.shuffle_tags:
            raise ValueError(f"data.keep_tokens={self.keep_tokens} needs data.shuffle_tags: true (it says which "
                             "tags the shuffle keeps in place)")
        return self

    @model_validator(mode="after")
    def _check_buckets(self) -> DataSection:
        if self.aspect_buckets and self.resolution % self.bucket_step:
            raise ValueError(f"data.resolution={self.resolution} must be a multiple of data.bucket_step="
                             f"{self.bucket_step} with data.aspect_buckets")
        return self


class LoraSection(Section):
    variant: Literal["lora", "dora", "rslora", "loha", "lokr"] = Field(
        "lora", description="Adapter kind (PEFT): lora; dora (weight-decomposed LoRA); rslora (alpha/sqrt(rank) "
        "scaling); loha (Hadamard product); lokr (Kronecker product). LoHa/LoKr export as a PEFT adapter dir.")
    rank: int = Field(4, ge=1, le=1024, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; None means alpha = rank (scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                                      description="UNet module names (suffixes) that get LoRA.")
    train_text_encoder: bool = Field(False, description="Also train LoRA on the text encoder.")
    text_encoder_target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1,
                                                   description="Text-encoder modules that get LoRA.")
    init_from: str | None = Field(None, min_length=1, description="Start from this LoRA instead of B = 0: a "
                                  "diffusers artifact dir, a PEFT adapter dir, or a .safetensors file in the "
                                  "diffusers, PEFT or kohya layout (same rank; rescaled to this alpha).")

    @model_validator(mode="after")
    def _check_variant(self) -> LoraSection:
        if self.train_text_encoder and self.variant in ("loha", "lokr"):
            raise ValueError(f"lora.train_text_encoder needs lora.variant lora, dora or rslora (a {self.variant} "
                             "adapter is exported for the UNet only)")
        if self.init_from and self.variant != "lora":
            raise ValueError(f"lora.init_from needs lora.variant lora (a plain LoRA file is loaded into the new "
                             f"adapter; a {self.variant} adapter has other layers or scaling)")
        return self

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class ExportSection(Section):
    formats: list[Literal["diffusers", "kohya", "peft"]] = Field(
        [], description="Also write the LoRA artifact in these layouts at the end of a run, each in "
        "artifact/<format>/ (kohya: the A1111/ComfyUI layout; peft: a PEFT adapter dir per component).")


Beta = Annotated[float, Field(ge=0, lt=1)]  # what torch's AdamW accepts (it raised inside the workers)


class OptimSection(Section):
    lr: float = Field(1e-4, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant_with_warmup", description="Learning-rate schedule (diffusers.optimization).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; None disables.")
    fused: bool = Field(False, description="torch's fused AdamW kernel (one launch for all parameters; CUDA and "
                        "CPU): the same update as the default loop, in fewer kernels.")


class TrainSection(Section, Accelerator):
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train.")
    micro_batch_size: int = Field(2, ge=1, description="Samples per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, else fp32; always fp32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward.")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (5.0 is usual).")
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset-noise strength.")
    timestep_range: tuple[int, int] | None = Field(
        None, description="Draw training (and val_loss) timesteps from [lo, hi) of the model's 1000, not all: [500, "
        "1000] trains only the high-noise steps, where layout is decided (a ControlNet: configs/controlnet.yaml).")
    log_every: int = Field(1, ge=1, description="Log metrics every N steps.")
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the end).")
    checkpoint_steps: list[PositiveInt] = Field(
        default_factory=list, description="Steps that also save a checkpoint (Tune's sha scheduler adds its rungs).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the last K checkpoints.")
    validate_every: int | None = Field(None, ge=1, description="Validate every N steps (and at the end): val_loss "
                                       "on the held-out rows (data.validation_fraction) and validation grids.")
    validation_grids: bool = Field(True, description="Render validation image grids at validation steps (false: "
                                   "val_loss only, as Tune trials do).")
    validation_prompts: list[str] = Field(["a red circle on a blue background"],
                                          description="Prompts for validation grids (empty: no prompt row).")
    validation_inference_steps: int = Field(10, ge=1, le=200, description="Sampler steps for validation.")
    progress_bar: bool = Field(True, description="Show training progress on the driver (a live bar on a terminal, "
                               "else a plain line every N steps) when run from the CLI.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the trained weights (e.g. 0.9999), updated "
                                    "each optimizer step (diffusers' warmup); validation and the artifact use it.")
    ema_on_cpu: bool = Field(False, description="Keep the EMA weights on the CPU (saves accelerator memory).")


class ScalingSection(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (torch threads follow it).")
    resources_per_worker: dict[str, float] = Field(default_factory=dict,
                                                    description="Extra custom resources per worker.")
    wait_for_resources: bool | None = Field(None, description="Alive nodes too few for the workers: null = wait if "
                                            "Ray's autoscaler runs, else fail naming what is missing; true/false = "
                                            "always wait/fail.")

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


class MlflowSection(Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (http://..., sqlite:///..., databricks); "
                                     "None: a SQLite store `mlflow.db` (artifacts beside it) in the run's log dir.")
    experiment: str = Field("diffray", min_length=1, max_length=200, description="MLflow experiment name (created "
                            "when missing).")


class WandbSection(Section):
    project: str = Field("diffray", min_length=1, max_length=128, description="W&B project.")
    mode: Literal["offline", "online"] = Field("offline", description="offline: write the run under `dir` with no "
                                               "network and no login (`wandb sync` uploads it later); online: "
                                               "needs WANDB_API_KEY or a login.")
    dir: str | None = Field(None, description="Local dir for W&B's files; None: the run's log dir.")


class TrackingSection(Section):
    """Experiment trackers besides TensorBoard (always on): rank 0 logs the resolved config, every logged
    step's metrics, validation grids and the final artifact + card. A tracker that fails is a warning."""

    mlflow: MlflowSection | None = Field(None, description="Log to MLflow (needs the `tracking` extra).")
    wandb: WandbSection | None = Field(None, description="Log to Weights & Biases (needs the `tracking` extra).")


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
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    flow: FlowSection = Field(default_factory=FlowSection, description="Flow-matching training (Flux).")

    @model_validator(mode="after")
    def _check_train(self) -> TrainConfig:
        span = self.train.timestep_range
        if span and not 0 <= span[0] < span[1] <= 1000:
            raise ValueError(f"train.timestep_range: {list(span)}: needs [lo, hi] with 0 <= lo < hi <= 1000")
        if self.train.ema_decay is not None and self.strategy.name == "deepspeed" and self.strategy.zero_stage == 3:
            raise ValueError("train.ema_decay: not supported with strategy.zero_stage 3 (the weights are partitioned "
                             "across ranks); use zero_stage 0-2 or strategy.name ddp, or set train.ema_decay null")
        if self.train.channels_last and self.strategy.name == "deepspeed":  # its broadcasts need contiguous weights
            raise ValueError("train.channels_last: needs strategy.name ddp (DeepSpeed broadcasts the weights as flat "
                             "buffers, which a channels-last weight is not)")
        return self


# ---------------------------------------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; missing file or bad syntax -> ConfigError naming the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.stat().st_size > yaml_io.MAX_BYTES:
        raise ConfigError(f"{p}: {p.stat().st_size} bytes; the limit for a config file is {yaml_io.MAX_BYTES} bytes")
    try:
        data = yaml_io.load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    except yaml_io.YamlLimitError as exc:
        raise ConfigError(f"{p}: {exc}") from None
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
    out = deep_copy(data)
    for item in overrides:
        m = _OVERRIDE.match(item)
        if not m:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, raw = m.group(1), m.group(2)
        try:
            value = yaml_io.load(raw) if raw.strip() else ""
        except yaml_io.YamlLimitError as exc:
            raise ConfigError(f"override {path}: {exc}", field=path) from None
        except yaml.YAMLError:
            value = raw
        if "#" in raw and "#" not in repr(value):  # ` #...` read as a YAML comment: the user meant the text
            value = raw
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



deep_copy = copy.deepcopy  # of a config dict (YAML scalars, lists, dicts)


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


def validate_as(cls: type[BaseModel], data: dict[str, Any]) -> Any:
    """`data` validated as `cls`; a ConfigError of one line per problem, naming each field path."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, cls)) from None
