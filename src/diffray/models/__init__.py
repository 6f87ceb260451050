"""Base models: the tiny-model factory, loading by path, and adapters (never imports ray)."""

from diffray.models.loading import SDComponents, load_components, load_pipeline, resolve_model_path
from diffray.models.tiny import PRESETS, build_pipeline_dir, preset_configs

__all__ = [
    "PRESETS",
    "SDComponents",
    "build_pipeline_dir",
    "load_components",
    "load_pipeline",
    "preset_configs",
    "resolve_model_path",
]
