"""Latent cache: VAE posterior statistics and text-encoder states of a validated, preprocessed dataset,
computed once by a Ray Data `map_batches` job (an actor pool, a GPU per actor when `scaling.use_gpu`)
and stored as Parquet shards, so training does no VAE or frozen text-encoder work per step.

Each cache lives in `<root>/<key>/`, the key a hash of everything that changes its contents: the
source files (names, sizes, mtimes), the model's VAE/text-encoder/tokenizer files, resolution, crop,
flip, aspect buckets, seed (crop and flip are drawn per sample from it), column names, validation
rules and the caption override. A changed setting is a new key, so a stale cache is never read.
`<root>` is `$DIFFRAY_CACHE/latents` for `data.cache: auto`, else the configured folder.

Stored per row: sample_id, input_ids [77], latent_mean and latent_std [4, H/8, W/8] (the posterior,
so training still draws a fresh latent sample per step exactly as without the cache), prompt_embeds
[77, D], pooled_prompt_embeds [D] and, with a conditioning column, conditioning_pixel_values; with a
mask column, loss_mask [1, H, W] (pixel resolution: the loss averages it down to the latent grid). For
SDXL: input_ids [2, 77], prompt_embeds both encoders' penultimate states [77, D1 + D2], pooled the
second encoder's projection, and micro_cond (original size, crop) as the data pipeline made it. For
Flux: input_ids [77 + L] (CLIP's, then T5's), prompt_embeds T5's last states [L, D], pooled CLIP's pooled
output. The encoder actors load the VAE and text encoders only, never the denoiser.
Quarantined rows are reported in the cache folder's `quarantine.jsonl`. The rows are read back in sample-id order
(`read_cache`), the same order on every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import torch

from diffray import storage
from diffray.data.raydata import in_order
from diffray.errors import ConfigError, DatasetError, StorageError
from diffray.paths import cache_dir

CACHE_VERSION = 3  # 2: control images with alpha composited on black; 3: flipped captions mirrored
CACHE_INFO = "cache.json"
SHARDS = "shards"
MODEL_PARTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")  # the last two: SDXL's
log = logging.getLogger(__name__)


def _file_infos(fs: pafs.FileSystem, paths: list[str]) -> list[list]:
    return [[i.path, i.size, i.mtime_ns] for i in fs.get_file_info(paths)]


def source_fingerprint(path: str, fmt: str) -> list:
    """Names, sizes and mtimes of every file the dataset reads (metadata, images or Parquet files)."""
    from diffray.data.pipeline import source_format

    fs, root = storage.resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return _file_infos(fs, [root])
    files = [i.path for i in storage.list_files(fs, root, recursive=True)]
    if source_format(path, fmt) == "parquet":
        files = [f for f in files if f.endswith(".parquet")]
    return _file_infos(fs, files)


def model_fingerprint(model_path: str) -> list:
    """Names, sizes and mtimes of the VAE, text encoder and tokenizer files (a hub id: the id itself)."""
    root = Path(model_path)
    if not root.is_dir():
        return [model_path]
    files = sorted(p for part in MODEL_PARTS for p in (root / part).rglob("*") if p.is_file())
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files] + [str(root)]


def cache_settings(cfg, path: str, prompt: str | None, id_offset: int) -> dict:
    """Every setting the cached values depend on (readable; hashed into the key)."""
    d = cfg.data
    return {"version": CACHE_VERSION, "source": path, "format": d.format, "resolution": d.resolution,
            "center_crop": d.center_crop, "random_flip": d.random_flip, "seed": cfg.run.seed,
            "aspect_buckets": d.aspect_buckets, "bucket_step": d.bucket_step, "max_aspect_ratio": d.max_aspect_ratio,
            "caption_column": d.caption_column, "image_column": d.image_column,
            "conditioning_column": d.conditioning_column, "default_caption": d.default_caption,
            "mask_column": d.mask_column, "trigger_word": d.trigger_word,
            "min_image_size": d.min_image_size, "max_image_pixels": d.max_image_pixels, "prompt": prompt,
            "id_offset": id_offset}


def cache_key(cfg, model_path: str, path: str, prompt: str | None = None, id_offset: int = 0) -> str:
    blob = json.dumps({"settings": cache_settings(cfg, path, prompt, id_offset),
                       "data": source_fingerprint(path, cfg.data.format), "model": model_fingerprint(model_path)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_root(cfg) -> str:
    """The configured cache root: an absolute local path, or a URI (s3://...) every node reads."""
    c = cfg.data.cache
    if c == "off":
        raise ValueError("data.cache is off")
    return str(cache_dir() / "latents") if c == "auto" else storage.absolute(c)


def check_cache_root(root: str, path: str) -> None:
    """Refuse, before any work, a cache root (`data.cache`) that is a file, cannot be created, or lies inside the
    dataset `path` it caches: every build would add files to the dataset, so its key would change on every run
    (a new cache each time, none ever reused) and a Parquet folder would read the cache's shards as its rows.

    Raises:
        ConfigError: (field data.cache) the root is a file or inside the dataset.
        StorageError: the local root cannot be created.
    """
    src = storage.absolute(path).rstrip("/")
    if root == src or root.startswith(src + "/"):
        raise ConfigError(f"{root} is inside the dataset {path}: its files would become part of the dataset; "
                          "give a folder outside it", field="data.cache")
    if storage.file_type(root) == pafs.FileType.File:
        raise ConfigError(f"{root} is a file; give a folder for the latent cache", field="data.cache")
    if not storage.is_uri(root):
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{root}: cannot create the latent cache folder ({exc.strerror or exc})") from None


class Encoder:
    """Ray Data actor: the frozen VAE and text encoder, loaded once; preprocessed rows -> cached rows."""

    def __init__(self, model_path: str, use_gpu: bool, threads: int = 1):
        from diffray.models.family import family_of

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.family = family_of(model_path)
        self.comps = self.family.load(model_path, device=self.device, denoiser=False)  # encoders and VAE only
        for part in (self.comps.vae, self.comps.text_encoder, self.comps.text_encoder_2):
            if part is not None:
                part.eval()
        self.vae = self.comps.vae

    def text_states(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds, pooled_prompt_embeds) of token ids: the family's `text_states`."""
        hidden, pooled = self.family.text_states(self.comps, torch.from_numpy(input_ids).to(self.device))
        return hidden.float().cpu().numpy(), pooled.float().cpu().numpy()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch["pixel_values"]  # [B, 3, H, W], or an object array of mixed shapes (aspect buckets)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(tuple(p.shape), []).append(i)
        mean, std = np.empty(len(pixels), dtype=object), np.empty(len(pixels), dtype=object)
        for idx in groups.values():  # one VAE call per shape
            dist = self.vae.encode(torch.from_numpy(np.stack([pixels[i] for i in idx])).to(self.device)).latent_dist
            for j, i in enumerate(idx):
                mean[i], std[i] = dist.mean[j].float().cpu().numpy(), dist.std[j].float().cpu().numpy()
        if len(groups) == 1:
            mean, std = np.stack(list(mean)), np.stack(list(std))
        hidden, pooled = self.text_states(batch["input_ids"])
        cached = {"sample_id": batch["sample_id"], "input_ids": batch["input_ids"], "latent_mean": mean,
                  "latent_std": std, "prompt_embeds": hidden, "pooled_prompt_embeds": pooled}
        for column in ("conditioning_pixel_values", "loss_mask", "micro_cond"):  # stored as they are
            if column in batch:
                cached[column] = batch[column]
        return cached


def encoder_resources(scaling, cluster_cpus: float) -> tuple[float, int]:
    """(CPUs per encoder actor, most actors) for a cluster with `cluster_cpus` CPUs.

    The read/decode/preprocess tasks feeding the pool need a CPU too, so the pool never takes every
    CPU (an actor holding all of them would leave its own input unproduced). GPU actors reserve one
    CPU each; CPU actors up to `scaling.cpus_per_worker`, and at most `scaling.num_workers` of them.
    """
    spare = max(cluster_cpus - 1.0, 0.5)
    if scaling.use_gpu:
        return min(1.0, spare), max(1, scaling.num_workers)
    cpus = min(scaling.cpus_per_worker, spare)
    return cpus, max(1, min(scaling.num_workers, int(spare // cpus)))


def build_cache(cfg, model_path: str, path: str, prompt: str | None = None, id_offset: int = 0,
                batch_size: int = 16) -> tuple[str, bool]:
    """The cache folder (a path or URI) for this dataset and settings, built if absent; returns (folder, built now).

    The job validates (quarantine report into the folder; fails above `data.max_bad_fraction`),
    preprocesses and encodes. `cache.json` marks a finished cache and is written last: on local disk
    the cache is built in a temporary sibling renamed into place; on object storage (no rename) the
    shards go straight to the folder, after clearing what an interrupted build left there. Either way
    an interrupted build is never read.
    """
    from diffray.data.pipeline import prepare_training_dataset

    root = cache_root(cfg)
    check_cache_root(root, path)
    out = storage.join(root, cache_key(cfg, model_path, path, prompt, id_offset))
    if storage.exists(storage.join(out, CACHE_INFO)):
        return out, False
    t0 = time.time()
    remote = storage.is_uri(out)
    tmp = Path(tempfile.mkdtemp(prefix="diffray-cache-")) if remote else Path(out).with_name(
        f".{Path(out).name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if remote:
        fs, inner = storage.resolve(out)
        fs.create_dir(inner, recursive=True)
        fs.delete_dir_contents(inner, missing_dir_ok=True)
    ds, report = prepare_training_dataset(path, model_path, cfg.data, cfg.run.seed, tmp, prompt, id_offset)
    try:
        encode_to_parquet(ds, cfg.scaling, model_path, batch_size, storage.join(out, SHARDS) if remote
                          else str(tmp / SHARDS))
    except BaseException:  # a failed or interrupted build: its partial shards are never read, so none is kept
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = {"key": posixpath.basename(out), "settings": cache_settings(cfg, path, prompt, id_offset),
            "model": model_path, "rows": report.used, "quarantined": len(report.quarantined),
            "build_time_s": round(time.time() - t0, 3)}
    if remote:  # the data report, then cache.json last
        for f in (p for p in tmp.rglob("*") if p.is_file()):
            storage.write_bytes(storage.join(out, str(f.relative_to(tmp))), f.read_bytes())
        storage.write_text(storage.join(out, CACHE_INFO), json.dumps(info, indent=2) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        (tmp / CACHE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:  # another build of the same key finished first: use that one
            shutil.rmtree(tmp, ignore_errors=True)
            if not (Path(out) / CACHE_INFO).is_file():
                raise
    log.info("latent cache %s: %d rows encoded, %d quarantined in %.1fs", out, report.used, len(report.quarantined),
             info["build_time_s"])
    return out, True


def encode_to_parquet(ds: ray.data.Dataset, scaling, model_path: str, batch_size: int, shards: str) -> None:
    """Encode the preprocessed rows of `ds` on a pool of `Encoder` actors and write them as Parquet to `shards`."""
    cpus, pool = encoder_resources(scaling, ray.cluster_resources().get("CPU", 1.0))
    encoded = ds.map_batches(Encoder, batch_size=batch_size, batch_format="numpy",
                             fn_constructor_kwargs={"model_path": model_path, "use_gpu": scaling.use_gpu,
                                                    "threads": int(scaling.cpus_per_worker)},
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool), num_cpus=cpus,
                             num_gpus=1 if scaling.use_gpu else 0)
    encoded.write_parquet(shards)  # rows in any order: `read_cache` returns them in sample-id order


def read_cache(folder: str | Path) -> ray.data.Dataset:
    """The cached rows of a built cache folder (a path or URI)."""
    folder = str(folder)
    if not storage.exists(storage.join(folder, CACHE_INFO)):
        raise DatasetError(f"{folder}: not a latent cache (no {CACHE_INFO}); build it with `diffray data prepare`")
    shards = storage.join(folder, SHARDS)
    ds = in_order(ray.data.read_parquet(shards))  # Ray reads the files in name order
    return ds if ids_ascending(shards) else ds.sort("sample_id")


def ids_ascending(shards: str) -> bool:
    """Whether the shards (in file-name order) hold their rows in ascending sample-id order. Ray Data
    writes a cache's rows in the order its encoder batches finish, even with `preserve_order`; training
    needs one order on every run (a seed reproduces a run), so a cache that is not already in id order
    is read through a sort (about 12 s for 30k rows of the tiny world on 2 CPUs; this check reads only
    the id column)."""
    fs, root = storage.resolve(shards)
    files = [i.path for i in storage.list_files(fs, root, recursive=True) if i.path.endswith(".parquet")]
    ids = [pq.read_table(f, columns=["sample_id"], filesystem=fs)["sample_id"].to_numpy() for f in files]
    return bool(np.all(np.diff(np.concatenate(ids)) > 0)) if ids else True


def cached_dataset(cfg, model_path: str, path: str, prompt: str | None = None, id_offset: int = 0) -> ray.data.Dataset:
    """The training dataset from the latent cache (built first if absent)."""
    folder, _ = build_cache(cfg, model_path, path, prompt, id_offset)
    info = json.loads(storage.read_text(storage.join(folder, CACHE_INFO)))
    log.info("data %s: %d rows from latent cache %s, %d quarantined", path, info["rows"], folder, info["quarantined"])
    return read_cache(folder)
