"""DreamBooth: teach the model a subject from a few instance images, with prior preservation.

Driver side: the instance images are checked before anything starts (`preflight`); missing class images
are generated with the base model as a Ray Data batch-inference job (`class_images.py`) and reused by
later runs. Worker side (`task.py`): each micro-batch is `micro_batch_size` instance rows followed by as
many class rows; the loss is instance loss + `prior_loss_weight` x class loss. `mode: lora` trains a LoRA
adapter; `mode: full` fine-tunes every UNet weight and exports a full pipeline directory.

This file declares the method (config, driver hooks, `METHOD`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffray.config import DataSection, LoraSection, RunSection, Section, TrainConfig, TrainSection
from diffray.trainers.method import DataSource, Method



class DreamBoothSection(Section):
    instance_prompt: str = Field("a photo of sks widget", min_length=1,
                                 description="Prompt of every instance image, with the rare identifier.")
    class_prompt: str = Field("a photo of a widget", min_length=1, description="Prompt of the subject's class.")
    with_prior_preservation: bool = Field(True, description="Add the class-image loss (prior preservation).")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class-image loss.")
    num_class_images: int = Field(16, ge=1, le=100_000,
                                  description="Class images wanted; missing ones are generated with the base model.")
    class_data_dir: str | None = Field(None, description="Folder or URI of class images (read, and filled up when "
                                       "short); None = a cache folder keyed by model, prompt and sampler settings "
                                       "(beside data.cache when that is a URI, so every node reads them).")
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


def preflight(cfg: DreamBoothTrainConfig, model_path: str) -> None:
    """Every instance image decodes (there are only a few): otherwise one error naming the files."""
    from diffray.data import resolve_data_path
    from diffray.data.folder import PathRules, check_concept_images

    check_concept_images(resolve_data_path(cfg.data.path), cfg.data.caption_column, cfg.data.image_column,
                         cfg.dreambooth.instance_prompt, cfg.train.micro_batch_size, "instance images",
                         PathRules.of(cfg.data))


def dataset_sources(cfg: DreamBoothTrainConfig, model_path: str) -> dict[str, DataSource]:
    """{"train": the instance images, "class": the class images (with prior preservation; generated
    first when short)}, each captioned by its prompt."""
    from diffray.data import resolve_data_path
    from diffray.trainers.dreambooth.class_images import CLASS_ID_OFFSET, ensure_class_images

    db = cfg.dreambooth
    sources = {"train": DataSource(resolve_data_path(cfg.data.path), db.instance_prompt)}
    if db.with_prior_preservation:
        class_dir, _ = ensure_class_images(cfg, model_path)
        sources["class"] = DataSource(str(class_dir), db.class_prompt, CLASS_ID_OFFSET)
    return sources


def _task() -> type:
    from diffray.trainers.dreambooth.task import DreamBoothTask

    return DreamBoothTask


METHOD = Method(name="dreambooth", config=DreamBoothTrainConfig, task=_task, preflight=preflight,
                dataset_sources=dataset_sources)
