"""Conditioning preprocessors for ControlNet: image -> control image (same size, RGB), and the Ray Data
job that turns an image dataset into a paired one (`diffray data condition`).

A preprocessor is a callable `PIL.Image -> PIL.Image` registered under a name. `canny` ships (OpenCV,
thresholds configurable). Model-based preprocessors (depth, pose, segmentation) register the same
way and take their model from a local path (`model_path` option); nothing is downloaded. `depth`
wraps a transformers depth-estimation model (DPT, Depth Anything, ...) saved in a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image

from diffray import storage
from diffray.errors import ConfigError, DatasetError, DiffrayError, StorageError
from diffray.registry import Registry
from diffray.world.render import png_bytes

Preprocessor = Callable[[Image.Image], Image.Image]
PREPROCESSORS = Registry("conditioning type", field="type")  # name -> factory(**options)
CONDITIONING_DIR = "conditioning"
IMAGES_DIR = "images"
log = logging.getLogger(__name__)


register = PREPROCESSORS.register


def make_preprocessor(kind: str, **options: Any) -> Preprocessor:
    """The preprocessor `kind` built with `options`.

    Raises:
        ConfigError: an unknown kind (naming the known ones) or an option it does not take.
    """
    return PREPROCESSORS.build(kind, **options)


@register("canny")
def canny(low_threshold: int = 100, high_threshold: int = 200) -> Preprocessor:
    """Canny edges of the grayscale image (OpenCV, L2 gradient off, aperture 3), white on black, as RGB.

    Deterministic: the same image gives the same edge map on every machine.
    """
    if not 0 <= low_threshold <= high_threshold <= 1000:
        raise ConfigError(f"need 0 <= low_threshold ({low_threshold}) <= high_threshold ({high_threshold}) <= 1000",
                          field="canny")

    def run(img: Image.Image) -> Image.Image:
        import cv2

        gray = np.asarray(img.convert("L"))
        edges = cv2.Canny(gray, low_threshold, high_threshold)
        return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2), mode="RGB")

    return run


@register("depth")
def depth(model_path: str | None = None) -> Preprocessor:
    """Relative depth from a transformers depth-estimation model in a local folder, as RGB (near = bright)."""
    if not model_path:
        raise ConfigError("depth needs a transformers depth-estimation model in a local folder (--model-path; "
                          "nothing is downloaded)", field="model_path")
    if not Path(model_path).is_dir():
        raise ConfigError(f"depth model not found: {model_path} (a local folder; nothing is downloaded)",
                          field="model_path")
    from transformers import pipeline

    estimator = pipeline("depth-estimation", model=model_path, device="cpu")

    def run(img: Image.Image) -> Image.Image:
        d = np.asarray(estimator(img)["predicted_depth"].squeeze().float().numpy(), dtype=np.float64)
        d = (d - d.min()) / max(d.max() - d.min(), 1e-12) * 255.0
        out = Image.fromarray(d.round().astype(np.uint8)).resize(img.size, Image.Resampling.BICUBIC)
        return out.convert("RGB")

    return run


# ---------------------------------------------------------------------------------------------- the job


def write_pair(img: Image.Image, sample_id: int, run: Preprocessor, root: str, source: str) -> dict:
    """Save `img` and its control image under `root` (images/, conditioning/; a path or URI); their metadata
    row. Each file is written whole (atomically on local disk, one object on object storage)."""
    name = f"{sample_id:08d}.png"
    control = run(img)
    if control.size != img.size:
        raise DatasetError(f"{source}: the preprocessor returned {control.size[0]}x{control.size[1]}, "
                           f"the image is {img.size[0]}x{img.size[1]}")
    storage.write_bytes(storage.join(root, IMAGES_DIR, name), png_bytes(img))
    storage.write_bytes(storage.join(root, CONDITIONING_DIR, name), png_bytes(control))
    return {"file_name": f"{IMAGES_DIR}/{name}", "conditioning_image": f"{CONDITIONING_DIR}/{name}"}


def condition_batch(batch: dict, kind: str, options: dict, out_dir: str, rules, skip: frozenset[int]) -> dict:
    """map_batches: decode each good row, write it (PNG) and its control image into `out_dir`; return
    the metadata rows {sample_id, file_name, text, conditioning_image}."""
    from diffray.data.transforms import decode_image
    from diffray.data.validate import caption_of

    run = make_preprocessor(kind, **options)
    out: dict[str, list] = {"sample_id": [], "file_name": [], "text": [], "conditioning_image": []}
    for sid, src, data, cap in zip(batch["sample_id"], batch["source"], batch["image"], batch["caption"]):
        if int(sid) in skip:
            continue
        img = decode_image(bytes(data), str(src), rules.max_image_pixels)
        row = write_pair(img, int(sid), run, out_dir, str(src))
        for k, v in {"sample_id": int(sid), "text": caption_of(cap, rules) or "", **row}.items():
            out[k].append(v)
    return {"sample_id": np.asarray(out["sample_id"], dtype=np.int64),
            **{k: np.array(v, dtype=object) for k, v in out.items() if k != "sample_id"}}


def _prepare_out(dst: str | Path) -> str:
    """`dst` as an absolute path or URI: a new or empty folder, or one holding only the quarantine report of a
    run that failed validation (replaced). Anything else is refused before any work, nothing in it touched.

    Raises:
        StorageError: `dst` is a file.
        DatasetError: `dst` holds other files (the unfinished output of an interrupted run named as such).
    """
    from diffray.data.pipeline import QUARANTINE_FILE

    out = storage.absolute(dst)
    fs, root = storage.resolve(out)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.File:
        raise StorageError(f"{dst}: exists and is a file; give a new or empty folder for the paired dataset")
    files = [] if kind == pafs.FileType.NotFound else [
        posixpath.relpath(i.path, root) for i in storage.list_files(fs, root, recursive=True)]
    if files in ([], [QUARANTINE_FILE]):
        return out
    if "metadata.jsonl" not in files and any(f.startswith((f"{IMAGES_DIR}/", f"{CONDITIONING_DIR}/")) for f in files):
        raise DatasetError(f"{dst}: holds the unfinished output of an interrupted run (no metadata.jsonl); "
                           "remove it or give a new folder")
    raise DatasetError(f"{dst}: output folder exists and is not empty")


def _make_out(out: str, dst: str | Path) -> None:
    """Create the folder `out` (of `dst`) for the quarantine report, or fail naming it before any work."""
    fs, root = storage.resolve(out)
    try:
        fs.create_dir(root, recursive=True)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"{dst}: cannot create the output folder ({getattr(exc, 'strerror', None) or exc})") \
            from None
    if storage.local_path(out) is not None and not os.access(root, os.W_OK):
        raise StorageError(f"{dst}: the output folder is not writable")


@contextmanager
def _written_whole(out: str) -> Iterator[str]:
    """Where to write the pairs of `out`: on local disk a temporary sibling that replaces `out` (which holds only
    the quarantine report) once complete (`replaced_dir`), so a failed or killed run leaves `out` as it was; on
    object storage `out` itself, its images/ and conditioning/ removed again when the run fails."""
    from diffray.models.export_io import replaced_dir

    local = storage.local_path(out)
    if local is not None:
        with replaced_dir(Path(local), "paired dataset") as stage:
            yield str(stage)
        return
    fs, root = storage.resolve(out)
    try:
        yield out
    except BaseException:
        for sub in (IMAGES_DIR, CONDITIONING_DIR):
            storage._delete_quietly(fs, f"{root}/{sub}", folder=True)
        raise


def _finish(out: str, rows: list[dict], src: str, kind: str, options: dict) -> None:
    """conditioning.json, then metadata.jsonl last: a reader that finds the metadata finds every pair."""
    rows = sorted(rows, key=lambda r: r["file_name"])
    storage.write_text(storage.join(out, "conditioning.json"),
                       json.dumps({"source": src, "type": kind, "options": options}, indent=2))
    storage.write_text(storage.join(out, "metadata.jsonl"), "".join(
        json.dumps({"file_name": r["file_name"], "text": r["text"], "conditioning_image": r["conditioning_image"]})
        + "\n" for r in rows))


def _pairs(ds) -> list[dict]:
    """The metadata rows of the pairing job `ds`. A task's I/O or diffray error is raised as the task raised it
    (a full disk, a preprocessor's wrong size), so it reads as one line, not as Ray's traceback of the task."""
    from diffray.data.raydata import raise_original_errors

    try:
        return raise_original_errors(ds).take_all()
    except Exception as exc:
        if isinstance(cause := getattr(exc, "cause", None), (OSError, DiffrayError)):
            raise cause from None
        raise


def condition_dataset(src: str, dst: str | Path, kind: str, options: dict | None = None,
                      data=None) -> tuple[str, int, int]:
    """Write the paired dataset of `src` into `dst` as a Ray Data job: images/ (PNG), conditioning/
    (control images, same size), metadata.jsonl {file_name, text, conditioning_image}, and
    quarantine.jsonl for rows that fail validation. Returns (dst, pairs written, rows quarantined).

    `data`: a config `data` section (columns, validation limits, bad-row limit); defaults when None.
    Each task writes its files into `dst` itself (on local disk into a temporary sibling renamed into place at the
    end), so on a multi-node cluster `dst` is a URI (`s3://...`) or a shared filesystem path; `metadata.jsonl` is
    written last.

    Raises:
        ConfigError: unknown preprocessor or option (before any work).
        DatasetError: `dst` holds files (but a failed run's quarantine report); the source is unreadable or too
            many rows are bad (then `dst` holds that report only).
        StorageError: `dst` is a file or cannot be created or written; a run that fails writing pairs (or is
            interrupted) leaves `dst` as it was on local disk, without images/ and conditioning/ on object storage.
    """
    from diffray.config import DataSection
    from diffray.data.pipeline import read_source, validate_rows, write_quarantine
    from diffray.data.validate import Rules

    options = dict(options or {})
    make_preprocessor(kind, **options)  # a bad type or option fails before anything is read
    data = (data or DataSection(path=src)).model_copy(update={"conditioning_column": None})
    out = _prepare_out(dst)
    raw, total = read_source(src, data)
    rules = Rules.of(data)
    _make_out(out, dst)
    # The report goes into `out` itself: a run that fails validation leaves it there (and nothing else).
    report = validate_rows(raw, total, src, rules, data.max_bad_fraction, out)
    with _written_whole(out) as target:
        if target != out:
            write_quarantine(report.quarantined, target)
        rows = _pairs(raw.map_batches(condition_batch, batch_format="numpy", batch_size=16,
                                      fn_kwargs={"kind": kind, "options": options, "out_dir": target,
                                                 "rules": rules, "skip": report.bad_ids}))
        _finish(target, rows, src, kind, options)
    log.info("conditioned %s -> %s: %d pairs (%s), %d quarantined", src, out, len(rows), kind, len(report.quarantined))
    return out, len(rows), len(report.quarantined)


def condition_folder_locally(src: Path, dst: Path, kind: str, options: dict | None = None) -> Path:
    """`condition_dataset` for a small, known-good imagefolder without Ray (the built-in sample set)."""
    from diffray.data.transforms import decode_image

    options = dict(options or {})
    run = make_preprocessor(kind, **options)
    out = Path(_prepare_out(dst))
    rows = []
    for i, line in enumerate((src / "metadata.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        img = decode_image((src / rec["file_name"]).read_bytes(), str(src / rec["file_name"]))
        rows.append({"text": rec["text"], **write_pair(img, i, run, str(out), rec["file_name"])})
    _finish(str(out), rows, str(src), kind, options)
    return out
