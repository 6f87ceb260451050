"""Every training method, and the job configs that name one.

`METHODS` is the only method registry: each method declares itself once, as `METHOD` in its package
(`diffray.trainers.<name>/__init__.py`: its config model, its worker task and its driver hooks), and is
listed here by an ordinary import. `validate_config` / `load_config` turn a job YAML into the method's
typed config. Light: importing this imports no trainer (tasks are imported where training runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffray.config import TrainConfig, apply_overrides, read_yaml, validate_as
from diffray.errors import ConfigError
from diffray.trainers import (controlnet, ddpo, diffusion_dpo, dreambooth, full, lora, reward_model,
                              textual_inversion, vae)
from diffray.trainers.method import Method

METHODS: dict[str, Method] = {m.name: m for m in (lora.METHOD, dreambooth.METHOD, textual_inversion.METHOD,
                                                  controlnet.METHOD, ddpo.METHOD, diffusion_dpo.METHOD,
                                                  reward_model.METHOD, full.METHOD, vae.METHOD)}


def method_of(name: str) -> Method:
    """The method called `name`. Raises ConfigError listing the known ones."""
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ConfigError(f"unknown method {name!r} (allowed: {', '.join(METHODS)})", field="method")
    return method


def validate_config(data: dict[str, Any]) -> TrainConfig:
    """Validate a raw job dict against the config model of its `method` (default lora)."""
    return validate_as(method_of(data.get("method", "lora")).config, data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Load a job config file, apply CLI overrides and validate it."""
    return validate_config(apply_overrides(read_yaml(path), overrides or []))
