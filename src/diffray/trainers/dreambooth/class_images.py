"""DreamBooth's class images, on the driver: missing ones are generated with the base model as a Ray Data
batch-inference job (an actor pool over the cluster, a GPU each when `scaling.use_gpu`), written to
`dreambooth.class_data_dir` or a cache folder keyed by everything that changes the images, and reused
by every later run (only what is missing is generated). Either may be a URI (`s3://...`): with `data.cache`
on object storage the default folder is `<data.cache>/class-images/<key>`, so workers on every node read
the same images and no node needs a shared filesystem.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath

import numpy as np

from diffray import storage
from diffray.paths import cache_dir

CLASS_ID_OFFSET = 1_000_000  # class rows' sample ids start here (distinct noise keys from instance rows)

GENERATED_FILE = "generated.json"


def class_dir_for(cfg, model_path: str) -> str:
    """The configured class folder (an absolute path or a URI), or a cache folder keyed by everything that
    changes the images: beside a `data.cache` on object storage, else in the local diffray cache."""
    db = cfg.dreambooth
    if db.class_data_dir:
        return storage.absolute(db.class_data_dir)
    key = json.dumps({"model": cfg.model.path, "model_path": model_path, "prompt": db.class_prompt,
                      "resolution": cfg.data.resolution, "steps": db.class_inference_steps,
                      "guidance": db.class_guidance_scale, "seed": cfg.run.seed}, sort_keys=True)
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    if storage.is_uri(cfg.data.cache):
        return storage.join(cfg.data.cache, "class-images", key)
    return str(cache_dir() / "class-images" / key)


class ClassImageGenerator:
    """Ray Data actor: the base pipeline, loaded once; a batch of indices -> PNG bytes.

    Image i is drawn with seed (run seed, i), so the set does not depend on batching or actor count.
    """

    def __init__(self, model_path: str, prompt: str, resolution: int, steps: int, guidance: float, seed: int,
                 use_gpu: bool):
        import torch

        from diffray.models.loading import load_pipeline

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.pipe = load_pipeline(model_path, dtype=dtype, device=self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompt, self.resolution, self.steps, self.guidance, self.seed = prompt, resolution, steps, guidance, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from diffray.models.flux import call_args

        index = [int(i) for i in batch["index"]]
        gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + i) for i in index]
        extra = {k: v for k, v in call_args(self.pipe).items() if k not in ("height", "width")}  # Flux's T5 length
        images = self.pipe([self.prompt] * len(index), height=self.resolution, width=self.resolution,
                           num_inference_steps=self.steps, guidance_scale=self.guidance, generator=gens,
                           **extra).images
        png = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            png.append(buf.getvalue())
        return {"index": np.asarray(index, dtype=np.int64), "png": np.array(png, dtype=object)}


def image_names(folder: str) -> list[str]:
    """The image files directly in `folder` (a path or URI), by name."""
    from diffray.data.folder import IMAGE_SUFFIXES

    fs, root = storage.resolve(folder)
    names = (posixpath.basename(i.path) for i in storage.list_files(fs, root))
    return sorted(n for n in names if posixpath.splitext(n)[1].lower() in IMAGE_SUFFIXES)


def generate_missing(cfg, model_path: str, out: str, start: int, missing: int) -> int:
    """Generate images start .. start+missing-1 into `out` (each written atomically); returns how many."""
    import ray.data

    db, s = cfg.dreambooth, cfg.scaling
    ds = ray.data.range(missing).map(lambda r: {"index": r["id"] + start})
    ds = ds.map_batches(
        ClassImageGenerator, batch_size=db.class_batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model_path": model_path, "prompt": db.class_prompt, "resolution": cfg.data.resolution,
                               "steps": db.class_inference_steps, "guidance": db.class_guidance_scale,
                               "seed": cfg.run.seed, "use_gpu": s.use_gpu},
        concurrency=(1, max(1, min(s.num_workers, -(-missing // db.class_batch_size)))),
        num_cpus=s.cpus_per_worker, num_gpus=1 if s.use_gpu else 0)
    generated = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, data in zip(batch["index"], batch["png"]):
            storage.write_bytes(storage.join(out, f"{int(i):05d}.png"), data)
            generated += 1
    return generated


def ensure_class_images(cfg, model_path: str) -> tuple[str, int]:
    """The class folder (a path or URI), filled up to `num_class_images`; returns (folder, images generated now).

    Existing images (generated earlier or the user's own) are kept and counted; each new image is
    written whole (atomically on local disk, one object on object storage) and `metadata.jsonl` is
    rewritten last, so an interrupted job resumes.
    """
    db = cfg.dreambooth
    out = class_dir_for(cfg, model_path)
    fs, root = storage.resolve(out)
    fs.create_dir(root, recursive=True)
    existing = image_names(out)
    missing = db.num_class_images - len(existing)
    generated = 0
    if missing > 0:
        start = max([int(n.split(".")[0]) for n in existing if n.split(".")[0].isdigit()] + [-1]) + 1
        generated = generate_missing(cfg, model_path, out, start, missing)
        existing = image_names(out)
    meta = "".join(json.dumps({"file_name": n, "text": db.class_prompt}) + "\n" for n in existing)
    if storage.read_or_none(fs, f"{root}/metadata.jsonl") != meta.encode():
        storage.write_text(storage.join(out, "metadata.jsonl"), meta)
    if generated:
        raw = storage.read_or_none(fs, f"{root}/{GENERATED_FILE}")
        record = json.loads(raw) if raw else {}
        record = {"prompt": db.class_prompt, "model": cfg.model.path,
                  "generated": record.get("generated", 0) + generated}
        storage.write_text(storage.join(out, GENERATED_FILE), json.dumps(record) + "\n")
    return out, generated
