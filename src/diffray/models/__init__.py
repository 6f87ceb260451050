"""Base models: the tiny-model factory, loading by path, and adapters (never imports ray)."""

from diffray.models.loading import SDComponents, load_components, load_pipeline, resolve_model_path

__all__ = ["SDComponents", "load_components", "load_pipeline", "resolve_model_path"]
