"""Textual Inversion: learn the input embedding(s) of a new placeholder token from a few images of a
concept; the UNet, VAE and every other embedding row stay frozen and bit-identical. The artifact loads
with `pipe.load_textual_inversion`.

This file declares the method (config, driver checks, datasets, `METHOD`); the worker side is `task.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffray.config import DataSection, RunSection, Section, TrainConfig
from diffray.trainers.method import DataSource, Method


class TextualInversionSection(Section):
    placeholder_token: str = Field("<sks-widget>", pattern=r"^\S+$",
                                   description="New token that names the concept in prompts (no spaces).")
    initializer_token: str = Field("o", min_length=1,
                                   description="Existing single-token word whose embedding starts the new vector(s) "
                                               "(e.g. 'toy' on SD 1.5, 'widget' on builtin:tiny; builtin:tiny-random's "
                                               "tokenizer is per character: one letter).")
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


def preflight(cfg: TextualInversionTrainConfig, model_path: str) -> None:
    """Driver-side checks before any Ray work: the tokens against the model's tokenizer, and every image
    of `data.path` decodes (concept sets are a handful of images, so reading them here is cheap).

    Raises:
        ConfigError: the placeholder is already a token, or the initializer is not exactly one token.
        DatasetError: no images, or a bad one (named).
    """
    from diffray.data import resolve_data_path
    from diffray.data.folder import PathRules, check_concept_images
    from diffray.data.pipeline import load_tokenizer
    from diffray.models.textual_inversion import check_tokens

    ti = cfg.textual_inversion
    check_tokens(load_tokenizer(model_path), ti.placeholder_token, ti.initializer_token, ti.num_vectors)
    check_concept_images(resolve_data_path(cfg.data.path), cfg.data.caption_column, cfg.data.image_column,
                         ti.placeholder_token, cfg.train.micro_batch_size, "data.path: concept images",
                         PathRules.of(cfg.data))


def dataset_sources(cfg: TextualInversionTrainConfig, model_path: str) -> dict[str, DataSource]:
    """{"train": the concept images} (a plain image folder is fine: captions come from the templates)."""
    from diffray.data import resolve_data_path

    return {"train": DataSource(resolve_data_path(cfg.data.path), cfg.textual_inversion.placeholder_token)}


def _task() -> type:
    from diffray.trainers.textual_inversion.task import TextualInversionTask

    return TextualInversionTask


METHOD = Method(name="textual_inversion", config=TextualInversionTrainConfig, task=_task, preflight=preflight,
                dataset_sources=dataset_sources)
