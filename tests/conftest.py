"""Shared fixtures: a per-session cache for built-in models/data, and one local Ray cluster per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A fresh cache per test session, never the user's, the demo's or an earlier session's (DIFFRAY_CACHE is
# overridden): what a test builds (tiny model ~1 s, sample and world sets ~3 s in all, measured) is built once
# per session. DIFFRAY_TEST_CACHE names a cache to reuse instead (kept after the session).
SESSION_CACHE = os.environ.get("DIFFRAY_TEST_CACHE") or tempfile.mkdtemp(prefix="diffray-test-cache-")
os.environ["DIFFRAY_CACHE"] = SESSION_CACHE


def pytest_unconfigure(config):
    if not os.environ.get("DIFFRAY_TEST_CACHE"):
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


SLOW_TIMEOUT_S = 2400  # the README's every-block test is the longest slow test (~9 min alone on 2 cores)


def pytest_collection_modifyitems(config, items):
    """`slow` tests get a longer pytest-timeout than the default (pyproject's `timeout`), unless they
    set their own with @pytest.mark.timeout."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(autouse=True)
def cli_logging_undone():
    """A test that runs the CLI in-process (`testkit.cli`, typer's CliRunner) sets up its terminal on the
    `diffray` logger: its own stderr handler and no propagation. Undone after each test, or later tests'
    `caplog` would never see diffray's records."""
    import logging

    log = logging.getLogger("diffray")
    saved = list(log.handlers), log.propagate, log.level
    for name, logger in list(logging.root.manager.loggerDict.items()):  # a library's dictConfig may disable them
        if name.startswith("diffray.") and isinstance(logger, logging.Logger):
            logger.disabled = False
    yield
    log.handlers[:] = saved[0]
    log.propagate = saved[1]
    log.setLevel(saved[2])  # setLevel, not the attribute: it also clears the loggers' level caches


@pytest.fixture(scope="session")
def s3():
    """A real S3 endpoint on 127.0.0.1 (tests/testkit/s3.py) for the whole session. Its AWS_* variables are set
    in this process before any Ray cluster starts, so Ray workers and CLI commands reach it too."""
    from testkit.s3 import S3Endpoint

    endpoint = S3Endpoint()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in endpoint.env.items():
            mp.setenv(k, v)
        yield endpoint
    endpoint.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A local Ray cluster for integration tests (started once, shut down at the end). The dashboard
    (localhost) serves the state API that Ray Train's placement-group cleaner needs. Its workers see the
    session's S3 endpoint."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def model_from_zero_checkpoint():
    """`rebuild(run_dir, cfg, model_path) -> (model, components)`: the method's LoRA model with the weights
    of the run's last checkpoint, read independently from its ZeRO shards (DeepSpeed's zero_to_fp32)."""
    def rebuild(run_dir, cfg, model_path: str):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from diffray.models.family import family_of
        from diffray.trainers.denoising import lora_denoiser

        ckpt = sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())[-1]
        trained_sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="state", exclude_frozen_parameters=True)
        comps = family_of(model_path).load(model_path)
        model = lora_denoiser(comps, cfg.lora, cfg.run.seed)
        missing, unexpected = model.load_state_dict(trained_sd, strict=False)
        assert not unexpected and all("lora" not in k for k in missing)
        return model, comps

    return rebuild


@pytest.fixture()
def faults(monkeypatch):
    """`faults(**drills)`: the runs this test starts from now on get these failure drills (see
    tests/testkit/faults.py); `faults()` turns them off again."""
    from testkit.faults import fault_env

    def turn_on(**drills) -> None:
        for key, value in fault_env(**drills).items():
            monkeypatch.setenv(key, value)

    return turn_on


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from diffray.models.loading import resolve_model_path

    return resolve_model_path("builtin:tiny-random")


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img, **kwargs) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit gray) over a tiny, unfinished IDAT: what a
    decompression bomb looks like to a reader that trusts the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))


@pytest.fixture()
def messy_folder(tmp_path):
    """An imagefolder of 12 good sample images, 6 good-but-awkward files (CMYK, 16-bit, palette with
    transparency, RGBA, LA, EXIF-rotated) and one row of every bad kind. Returns (root, bad) where bad
    maps each bad file name to a substring of its quarantine reason."""
    import json

    import numpy as np
    from PIL import Image

    from diffray.data.sample import write_sample_dataset

    root = write_sample_dataset(tmp_path / "messy", num_images=12) / "train"
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    good = Image.open(root / rows[0]["file_name"]).convert("RGB")
    gray16 = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    rgba = good.convert("RGBA")
    rgba.putalpha(128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    files = {
        "cmyk.jpg": _jpeg(good.convert("CMYK")),
        "gray16.png": _png(gray16),
        "palette.png": _png(good.convert("P", palette=Image.Palette.ADAPTIVE)),
        "rgba.png": _png(rgba),
        "la.png": _png(good.convert("LA")),
        "exif_rotated.jpg": _jpeg(good.resize((96, 64)), exif=exif),
        "truncated.png": _png(good)[: len(_png(good)) // 2],
        "truncated.jpg": _jpeg(good)[:400],
        "zero.png": b"",
        "text.png": b"this is a text file, not an image\n",
        "bomb.png": _bomb_png(40_000, 40_000),
        "tiny.png": _png(good.resize((16, 16))),
        "no_caption.png": _png(good),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    bad = {"truncated.png": "cannot decode image", "truncated.jpg": "cannot decode image",
           "zero.png": "empty file", "text.png": "cannot decode image", "bomb.png": "decompression-bomb limit",
           "tiny.png": "too small: 16x16", "no_caption.png": "empty caption", "missing.png": "image file not found"}
    extra = [{"file_name": n, "text": "" if n == "no_caption.png" else f"an awkward file {n}"}
             for n in list(files) + ["missing.png"]]
    with (root / "metadata.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in extra)
    return root, bad
