"""A rerun of a run name resumes that run: only with the settings it was started with.

`diffray train` resumes from the latest checkpoint of `run.storage_path/run.name`. Its optimizer, LR
schedule and weights come from that checkpoint, so a rerun with another learning rate, rank, dataset or
method would go on training the old run while its card recorded the new settings (or fail deep in a
worker on a shape mismatch). The run's settings are kept beside its checkpoints (`RUN_CONFIG`); a rerun
may change only what leaves the trained weights as they were, extend `train.max_steps`, and regroup the
same global batch over other workers. Pure: no Ray, no torch.
"""

from __future__ import annotations

import json
from typing import Any

from diffray import storage
from diffray.errors import ConfigError

RUN_CONFIG = "diffray_run_config.json"

# Settings a rerun may change: how the run is watched, logged, checkpointed, placed and exported, and the
# GPU speed options (each tested to leave the trained weights as they were).
FREE = ("run.storage_path", "failure.", "tracking.", "export.", "scaling.use_gpu", "scaling.cpus_per_worker",
        "scaling.resources_per_worker", "scaling.wait_for_resources", "data.cache", "data.materialize",
        "data.max_bad_fraction", "train.log_every", "train.checkpoint_every", "train.checkpoint_steps",
        "train.keep_checkpoints", "train.validate_every", "train.validation_grids", "train.validation_prompts",
        "train.validation_inference_steps", "train.progress_bar", "train.attention", "train.channels_last",
        "train.compile", "train.compile_mode", "train.compile_backend", "train.gradient_checkpointing",
        "train.ema_on_cpu")
# The global batch may be regrouped: each sample's noise is keyed by (seed, step, sample id), not by rank.
BATCH = ("scaling.num_workers", "train.micro_batch_size", "train.grad_accum_steps")
MAX_SHOWN = 6


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def global_batch(settings: dict[str, Any]) -> int | None:
    values = [settings.get(k) for k in BATCH]
    return None if None in values else values[0] * values[1] * values[2]


def differences(before: dict[str, Any], now: dict[str, Any], may_extend: bool = True) -> list[str]:
    """The settings a rerun may not change, as `key old (now new)`; empty when it may resume. `may_extend`:
    a higher `train.max_steps` may resume."""
    a, b = flat(before), flat(now)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k) and not k.startswith(FREE)]
    out = []
    for key in keys:
        if may_extend and key == "train.max_steps" and (a.get(key) or 0) <= (b.get(key) or 0):
            continue  # a rerun may extend the run
        if key in BATCH and global_batch(a) == global_batch(b):
            continue
        out.append(f"{key} {json.dumps(a.get(key))} (now {json.dumps(b.get(key))})")
    return out


def shown(changed: list[str]) -> str:
    more = f", and {len(changed) - MAX_SHOWN} more" if len(changed) > MAX_SHOWN else ""
    return ", ".join(changed[:MAX_SHOWN]) + more


def check_rerun(cfg, run_dir: str) -> None:
    """Check a rerun's settings against those its run recorded (`record_settings`); a new run passes.

    Raises:
        ConfigError: naming `run.name`, the run's folder and the settings that differ.
    """
    path = storage.join(run_dir, RUN_CONFIG)
    now = cfg.model_dump(mode="json")
    fs, inner = storage.resolve(path)
    recorded = storage.read_or_none(fs, inner)
    if recorded is not None:
        try:
            before = json.loads(recorded.decode("utf-8"))
        except ValueError:
            before = None
        if not isinstance(before, dict):
            raise ConfigError(f"{path}: not the JSON of a run's settings; it records what run {cfg.run.name!r} "
                              "was started with (restore it, or give a new run.name)", field="run.name")
        changed = differences(before, now)
        if changed:
            raise ConfigError(
                f"run {cfg.run.name!r} in {run_dir} was started with other settings: {shown(changed)}. A rerun "
                "resumes a run from its checkpoint, so only with its settings (it may raise train.max_steps): "
                "restore them, or give a new run.name", field="run.name")


def record_settings(cfg, run_dir: str) -> None:
    """Keep `cfg`'s settings beside the run's checkpoints, once training is about to start (a run that failed
    before it, on a dataset or the cluster's resources, binds nothing); a rerun's raise the max_steps floor."""
    storage.write_text(storage.join(run_dir, RUN_CONFIG), json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
