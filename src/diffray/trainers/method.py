"""How a training method is declared: `Method` bundles its config model, its worker-side task and its
optional driver-side hooks; `DataSource` is one dataset it trains on.

Each method package (`diffray.trainers.lora`, ...) declares one `METHOD` in its `__init__.py`, and
`diffray.methods.METHODS` lists them all: that list is the only registry. This module is light (no
torch, no Ray) so configs validate without importing any trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class DataSource:
    """One dataset a method trains on: where, an optional caption for every row, a sample-id offset."""

    path: str
    prompt: str | None = None
    id_offset: int = 0


@dataclass(frozen=True)
class Method:
    """A training method.

    Attributes:
        name: the `method:` value of its job configs.
        config: its job config model (a `diffray.config.TrainConfig` subclass whose `method` is `name`).
        task: returns its worker-side Task class (`diffray.trainers.loop.Task`); a function, so the
            heavy worker code is imported only where training runs.
        preflight: `preflight(cfg, model_path)`: driver-side checks before Ray starts (bad input fails
            fast, with one line).
        dataset_sources: `dataset_sources(cfg, model_path) -> {name: DataSource}` (it may prepare data on
            the driver first); None: {"train": data.path}.
        step_metric: (metric, mode, why) a Tune trial reports at every step, `why` naming it in errors;
            None: `val_loss` at validation steps.
        side_cpus: `side_cpus(cfg) -> CPUs` a run holds beside its workers (DDPO's reward actors).
    """

    name: str
    config: type
    task: Callable[[], type]
    preflight: Callable[[Any, str], None] | None = None
    dataset_sources: Callable[[Any, str], dict[str, DataSource]] | None = None
    step_metric: tuple[str, str, str] | None = None
    side_cpus: Callable[[Any], float] | None = None

    def family_check(self, cfg, model_path: str) -> None:
        """Refuse (ConfigError naming the field) a method or option the model's family does not train."""
        from diffray.models.family import family_of

        family_of(model_path).check(self.name, cfg)

    def check(self, cfg, model_path: str) -> None:
        """The family's check, then the method's own driver-side checks, if it has any."""
        self.family_check(cfg, model_path)
        if self.preflight is not None:
            self.preflight(cfg, model_path)

    def sources(self, cfg, model_path: str) -> dict[str, DataSource]:
        """The named datasets a run of `cfg` trains on."""
        if self.dataset_sources is not None:
            return self.dataset_sources(cfg, model_path)
        from diffray.data import resolve_data_path

        return {"train": DataSource(resolve_data_path(cfg.data.path))}
