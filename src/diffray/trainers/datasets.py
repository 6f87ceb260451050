"""The driver side of a method's data: its named datasets (validated, preprocessed or read from the
latent cache, materialized), the held-out `validation` split, and `diffray data prepare`.
"""

from __future__ import annotations

import logging
from typing import Any

from diffray.errors import ConfigError, DatasetError
from diffray.methods import method_of
from diffray.trainers.session import VALIDATION

log = logging.getLogger(__name__)


def build_dataset(cfg, model_path: str, report_dir: str | None = None, path: str | None = None,
                  prompt: str | None = None, id_offset: int = 0):
    """A training dataset (Ray Data) of `path` (default `data.path`): validated (bad rows quarantined
    to `report_dir/quarantine.jsonl`), preprocessed or read from the latent cache, materialized when
    configured. `prompt` replaces every caption; `id_offset` shifts sample ids.

    Raises:
        DatasetError: a bad source, too many bad rows, or fewer rows than one global batch.
    """
    from diffray.data import resolve_data_path

    d = cfg.data
    path = resolve_data_path(d.path) if path is None else path
    if d.cache != "off":
        from diffray.data.cache import cached_dataset

        ds = cached_dataset(cfg, model_path, path, prompt, id_offset)
    else:
        from diffray.data.pipeline import prepare_training_dataset

        ds, _ = prepare_training_dataset(path, model_path, d, cfg.run.seed, report_dir, prompt, id_offset)
    if d.materialize:
        ds = ds.materialize()
    rows = ds.count()
    need = cfg.scaling.num_workers * cfg.train.micro_batch_size
    if rows < need:
        raise DatasetError(f"{path}: {rows} usable rows, but num_workers x micro_batch_size = {need} are needed "
                           "per step")
    return ds


def build_datasets(cfg, model_path: str, report_dir: str | None = None) -> dict[str, Any]:
    """{name: training dataset} of the job's method; quarantine reports go to report_dir (the first
    dataset's) or report_dir/<name>. With `data.validation_fraction` the first dataset's held-out rows
    become the `validation` dataset (every worker reads all of it)."""
    out = {}
    for i, (name, src) in enumerate(method_of(cfg.method).sources(cfg, model_path).items()):
        reports = report_dir if report_dir is None or i == 0 else f"{report_dir}/{name}"
        out[name] = build_dataset(source_config(cfg, i), model_path, reports, src.path, src.prompt, src.id_offset)
        if i == 0 and cfg.data.validation_fraction > 0:
            out[name], out[VALIDATION] = split_validation(out[name], cfg, src.path)
    return out


def split_validation(ds, cfg, path: str):
    """(training rows, held-out rows) of a built dataset; DatasetError when either side is too small."""
    from diffray.data.pipeline import keep_rows

    f = cfg.data.validation_fraction
    train, held = (ds.map_batches(keep_rows, fn_kwargs={"fraction": f, "held_out": side}, batch_format="numpy")
                   for side in (False, True))
    if cfg.data.materialize:
        train, held = train.materialize(), held.materialize()
    n_train, n_held = train.count(), held.count()
    need = cfg.scaling.num_workers * cfg.train.micro_batch_size
    if n_held == 0 or n_train < need:
        raise DatasetError(f"{path}: data.validation_fraction={f:g} holds out {n_held} rows and leaves {n_train} "
                           f"for training (need >= 1 and >= {need}); change the fraction or add data")
    log.info("data %s: %d rows held out for val_loss, %d train", path, n_held, n_train)
    return train, held


def prepare_data(cfg) -> dict[str, str]:
    """`diffray data prepare`: validate and encode every dataset the job trains on into the latent
    cache (`data.cache`; `auto` when off), without training. Returns {dataset name: cache folder}."""
    from diffray.cluster import check_resources, connect_ray
    from diffray.data.cache import build_cache
    from diffray.models.loading import resolve_model_path

    if cfg.data is None:
        raise ConfigError(f"method {cfg.method} trains without a dataset: there is nothing to prepare", field="data")
    if getattr(cfg.data, "pair_column", None) is not None:
        raise ConfigError(f"method {cfg.method} trains both images of a pair from pixels: the latent cache does not "
                          "hold pairs, there is nothing to prepare", field="data.cache")
    if cfg.data.cache == "off":
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache": "auto"})})
    model_path = resolve_model_path(cfg.model.path)
    method = method_of(cfg.method)
    method.check(cfg, model_path)
    connect_ray()
    check_resources(cfg.scaling)
    return {name: str(build_cache(source_config(cfg, i), model_path, src.path, src.prompt, src.id_offset)[0])
            for i, (name, src) in enumerate(method.sources(cfg, model_path).items())}


def source_config(cfg, index: int):
    """The config the `index`-th dataset of a method is read with: `data.mask_column` names a column of
    the first (the user's) dataset only; others (DreamBooth's generated class images) train every pixel."""
    if index == 0 or cfg.data.mask_column is None:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"mask_column": None})})
