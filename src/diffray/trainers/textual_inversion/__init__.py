"""Textual Inversion: learn the input embedding(s) of a new placeholder token from a few images of a
concept; the UNet, VAE and every other embedding row stay frozen and bit-identical. The artifact loads
with `pipe.load_textual_inversion`.

This file declares the method (config, driver checks, datasets, `METHOD`); the worker side is `task.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffray.config import DataSection, ExportSection, RunSection, Section, TrainConfig
from diffray.errors import ConfigError, DiffrayError
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
    captions: Literal["templates", "dataset"] = Field(
        "templates", description="Training prompts: the learnable_property's templates (the reference implementations'), "
                                 "or the dataset's own captions with concept_word replaced by the placeholder (for a "
                                 "model that knows its captions' language better than 'a photo of', or a concept "
                                 "best learned in context).")
    concept_word: str | None = Field(None, pattern=r"^\S+$",
                                     description="With captions: dataset, the word of every caption that the "
                                                 "placeholder replaces (e.g. 'star'); unset: the captions write the "
                                                 "placeholder token itself.")

    def caption_word(self) -> str | None:
        """What the placeholder replaces in a dataset caption (None with templates)."""
        return None if self.captions == "templates" else self.concept_word or self.placeholder_token


class TextualInversionTrainConfig(TrainConfig):
    method: Literal["textual_inversion"] = Field("textual_inversion", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="textual-inversion-sample"))
    data: DataSection = Field(default_factory=lambda: DataSection(path="builtin:sample/subject"),
                              description="The concept's images; their captions are replaced by templates unless "
                                          "textual_inversion.captions is 'dataset'.")
    textual_inversion: TextualInversionSection = Field(default_factory=TextualInversionSection)
    export: ExportSection = Field(default_factory=ExportSection,
                                  description="kohya: also the A1111/ComfyUI embedding file, in artifact/kohya/.")

    @model_validator(mode="after")
    def _check(self) -> TextualInversionTrainConfig:
        # Row restore edits the whole embedding matrix in place; under ZeRO-3 it is partitioned across ranks.
        if self.strategy.name == "deepspeed" and self.strategy.zero_stage == 3:
            raise ValueError("strategy.zero_stage: textual inversion trains one small embedding matrix; "
                             "use zero_stage 0-2 or name: ddp")
        ti = self.textual_inversion
        if ti.concept_word is not None and ti.captions != "dataset":
            raise ValueError("textual_inversion.concept_word: names a word of the dataset's captions; it needs "
                             "textual_inversion.captions: dataset")
        if "peft" in self.export.formats:
            raise ValueError("export.formats: a Textual Inversion embedding has no peft layout; its formats are "
                             "kohya (the A1111/ComfyUI embedding file) and diffusers")
        if "kohya" in self.export.formats:  # the file is named after the token: refused now, not after training
            from diffray.models.ti_formats import embedding_name

            try:
                embedding_name(ti.placeholder_token, "textual_inversion.placeholder_token")
            except DiffrayError as exc:
                raise ValueError(f"export.formats: kohya: {exc}") from None
        return self


def preflight(cfg: TextualInversionTrainConfig, model_path: str) -> None:
    """Driver-side checks before any Ray work: the tokens against the model's tokenizer, and every image
    of `data.path` decodes (concept sets are a handful of images, so reading them here is cheap).

    Raises:
        ConfigError: the placeholder is already a token, or the initializer is not exactly one token.
        DatasetError: no images, or a bad one (named); with dataset captions, a caption without the word.
    """
    from diffray.data import resolve_data_path
    from diffray.data.folder import PathRules, check_concept_images
    from diffray.data.pipeline import load_tokenizer, model_class
    from diffray.models.textual_inversion import check_tokens, has_word

    ti = cfg.textual_inversion
    tokenizer = load_tokenizer(model_path)
    check_tokens(tokenizer, ti.placeholder_token, ti.initializer_token, ti.num_vectors)
    word = ti.caption_word()

    def missing_word(caption: str) -> str | None:
        if has_word(tokenizer, caption, word):
            return None
        return (f"its caption {caption[:80]!r} does not hold {word!r} as a word within the first "
                f"{tokenizer.model_max_length} tokens (textual_inversion.concept_word; a placeholder written in "
                "captions needs spaces around it)")

    if word is not None and model_class(model_path) == "FluxPipeline":
        raise ConfigError("textual_inversion.captions: dataset is for CLIP text encoders (SD 1.x/2.x, SDXL)",
                          field="textual_inversion.captions")
    check_concept_images(resolve_data_path(cfg.data.path), cfg.data.caption_column, cfg.data.image_column,
                         None if word else ti.placeholder_token, cfg.train.micro_batch_size,
                         "data.path: concept images", PathRules.of(cfg.data),
                         caption_check=None if word is None else missing_word)


def dataset_sources(cfg: TextualInversionTrainConfig, model_path: str) -> dict[str, DataSource]:
    """{"train": the concept images} (a plain image folder is fine with templates; dataset captions need a
    metadata file)."""
    from diffray.data import resolve_data_path

    ti = cfg.textual_inversion
    return {"train": DataSource(resolve_data_path(cfg.data.path),
                                ti.placeholder_token if ti.captions == "templates" else None)}


def _task() -> type:
    from diffray.trainers.textual_inversion.task import TextualInversionTask

    return TextualInversionTask


METHOD = Method(name="textual_inversion", config=TextualInversionTrainConfig, task=_task, preflight=preflight,
                dataset_sources=dataset_sources)
