"""ControlNet on Ray Train (local cluster, tiny model, the sample set paired with its Canny edges):
it learns, the artifact round-trips through stock diffusers, control changes the output, ZeRO-3
shards it, `diffray data condition` builds pairs as a Ray Data job, and bad pairs are handled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffray.methods import load_config
from diffray.data import resolve_data_path
from diffray.data.conditioning import condition_dataset
from diffray.data.pipeline import prepare_training_dataset
from diffray.errors import DatasetError
from diffray.models.loading import load_components
from diffray.trainers.runner import run_training
from testkit.models import TINY_RANDOM

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def cn_cfg(tmp_path, name: str, *overrides: str):
    return load_config(REPO / "configs" / "controlnet.yaml",
                       [TINY_RANDOM, f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}",
                        "train.progress_bar=false", *overrides])


def losses(run_dir: str) -> list[float]:
    lines = (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if "loss" in e and "event" not in e]


def residual_prediction(controlnet, comps, control: torch.Tensor) -> torch.Tensor:
    """The base UNet's noise prediction steered by `controlnet` on fixed inputs."""
    from diffray.trainers.controlnet.task import ControlledUNet

    g = torch.Generator().manual_seed(3)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 500])
    hidden = torch.randn(2, 77, comps.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        return ControlledUNet(controlnet.eval(), comps.unet)(latents, t, hidden, control)


def control_tensor(path: Path) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)
    return x.permute(2, 0, 1)[None].repeat(2, 1, 1, 1)


def test_controlnet_learns_round_trips_and_follows_the_control_image(ray_cluster, tmp_path, tiny_model_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from diffusers import ControlNetModel

    cfg = cn_cfg(tmp_path, "cn", "train.max_steps=30", "train.checkpoint_every=30", "train.validate_every=30")
    assert cfg.scaling.num_workers == 2 and cfg.strategy.zero_stage == 2
    result = run_training(cfg)
    loss = losses(result.run_dir)
    assert result.steps == 30 and len(loss) == 30
    assert np.mean(loss[-10:]) < np.mean(loss[:10]) - 0.05, (np.mean(loss[:10]), np.mean(loss[-10:]))
    assert (Path(result.run_dir) / "logs" / "validation" / "step_000030.png").is_file()

    # The artifact is a stock ControlNet dir (safetensors) equal to the trained fp32 weights.
    exported = ControlNetModel.from_pretrained(result.artifact_dir, use_safetensors=True)
    assert (Path(result.artifact_dir) / "diffusion_pytorch_model.safetensors").is_file()
    ckpt = sorted(p for p in Path(result.run_dir).glob("checkpoint_*") if p.is_dir())[-1]
    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="state", exclude_frozen_parameters=True)
    trained = {k.removeprefix("controlnet."): v for k, v in trained.items()}
    state = exported.state_dict()
    assert set(trained) == set(state)
    assert max((trained[k] - state[k]).abs().max().item() for k in trained) < 1e-6
    card = json.loads((Path(result.artifact_dir) / "diffray_card.json").read_text())
    assert card["method"] == "controlnet" and card["conditioning"]["type"] == "canny"

    # Trained residuals reproduce from the loaded artifact, and the control image now matters.
    comps = load_components(tiny_model_path)
    reference = ControlNetModel.from_unet(comps.unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    reference.load_state_dict(trained)
    canny = Path(resolve_data_path("builtin:sample/canny"))
    a, b = (control_tensor(canny / "conditioning" / f"{i:08d}.png") for i in (0, 1))
    pred_a = residual_prediction(exported, comps, a)
    assert torch.allclose(pred_a, residual_prediction(reference, comps, a), atol=1e-5)
    # Same inputs give bit-identical predictions (and at initialisation any two control images do:
    # tests/unit/test_controlnet.py), so a difference is the trained control path, not noise. It is
    # small after 30 CPU steps: control enters through two chained zero-initialised convolutions.
    assert torch.equal(pred_a, residual_prediction(exported, comps, a))
    assert (pred_a - residual_prediction(exported, comps, b)).abs().max() > 1e-5

    # Generation: one ControlNet, and two at once (MultiControlNet) with per-control scales.
    from diffray.generate import generate_grid

    controls = [str(canny / "conditioning" / f"{i:08d}.png") for i in (0, 1)]
    one = generate_grid(["a red circle"], None, None, tmp_path / "one.png", steps=4, compare_base=True,
                        controlnets=[result.artifact_dir], control_images=controls[:1])
    grid = np.asarray(Image.open(one), dtype=np.float32)
    half = grid.shape[0] // 2
    assert np.abs(grid[:half] - grid[half:half * 2]).mean() > 0.5  # base row vs controlled row differ
    alone = generate_grid(["a red circle"], None, None, tmp_path / "alone.png", steps=4,
                          controlnets=[result.artifact_dir], control_images=controls[:1])
    two = generate_grid(["a red circle"], None, None, tmp_path / "two.png", steps=4,
                        controlnets=[result.artifact_dir] * 2, control_images=controls, control_scales=[1.0, 0.0])
    # MultiControlNet sums scaled residuals: the second at scale 0 leaves exactly the first's image.
    np.testing.assert_array_equal(np.asarray(Image.open(two)), np.asarray(Image.open(alone)))
    three = generate_grid(["a red circle"], None, None, tmp_path / "three.png", steps=4,
                          controlnets=[result.artifact_dir] * 2, control_images=controls, control_scales=[1.0, 1.0])
    assert not np.array_equal(np.asarray(Image.open(three)), np.asarray(Image.open(alone)))


# `make test-eval`: one run for ZeRO-3 and the latent cache: the conditioning images still read per row, the
# VAE and text encoder never. CI: ControlNet under ZeRO-2 (default suite), ZeRO-3 in LoRA's option matrix, the
# cache's equivalence through LoRA (test_data_pipeline.py).
@pytest.mark.slow
@pytest.mark.eval
def test_controlnet_trains_under_zero3_from_the_latent_cache(ray_cluster, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from diffusers import ControlNetModel

    result = run_training(cn_cfg(tmp_path, "cn-z3", "strategy.zero_stage=3", "train.max_steps=4",
                                 "train.checkpoint_every=4", "train.validate_every=4", "train.micro_batch_size=2",
                                 f"data.cache={tmp_path / 'latents'}", "train.log_every=1"))
    assert result.steps == 4 and all(np.isfinite(losses(result.run_dir)))
    lines = (Path(result.run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    steps = [e for e in map(json.loads, lines) if "loss" in e and "event" not in e]
    assert len(steps) == 4 and all(e["vae_encode_calls"] == 0 and e["text_encoder_calls"] == 0 for e in steps)
    exported = ControlNetModel.from_pretrained(result.artifact_dir, use_safetensors=True).state_dict()
    ckpt = sorted(p for p in Path(result.run_dir).glob("checkpoint_*") if p.is_dir())[-1]
    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="state", exclude_frozen_parameters=True)
    trained = {k.removeprefix("controlnet."): v for k, v in trained.items()}
    assert set(trained) == set(exported)
    assert max((trained[k] - exported[k]).abs().max().item() for k in trained) < 1e-6


def test_data_condition_job_and_bad_pairs(s3, ray_cluster, tmp_path, tiny_model_path, monkeypatch, capsys):
    # The Ray Data job gives the same pairs as the built-in paired set (same images, same edges).
    out, pairs, bad = condition_dataset(resolve_data_path("builtin:sample"), tmp_path / "pairs", "canny")
    assert (pairs, bad) == (32, 0) and out == str(tmp_path / "pairs")
    out, builtin = Path(out), Path(resolve_data_path("builtin:sample/canny"))
    assert (out / "metadata.jsonl").read_text() == (builtin / "metadata.jsonl").read_text()
    for name in ("00000000.png", "00000031.png"):
        for sub in ("images", "conditioning"):
            np.testing.assert_array_equal(np.asarray(Image.open(out / sub / name)),
                                          np.asarray(Image.open(builtin / sub / name)))
    with pytest.raises(DatasetError, match="pairs: output folder exists and is not empty"):
        condition_dataset(resolve_data_path("builtin:sample"), tmp_path / "pairs", "canny")

    # No shared filesystem: the tasks write the pairs straight to object storage, the same bytes. From the command
    # line (its DST was a Path, which made s3://b/x s3:/b/x).
    from testkit.cli import diffray

    remote = f"{s3.bucket('pairs')}/canny"
    code, text = diffray(["data", "condition", "builtin:sample", remote], monkeypatch, capsys)
    assert code == 0 and f"wrote 32 pairs to {remote} (0 quarantined)\n" in text, text
    names = [k.removeprefix(f"{remote[5:]}/") for k in s3.keys(remote)]
    top = {n for n in names if "/" not in n}
    assert len(names) == 2 * 32 + 3 and top == {"conditioning.json", "metadata.jsonl", "quarantine.jsonl"}, top
    for rel in ("metadata.jsonl", "conditioning/00000031.png", "images/00000000.png"):
        assert s3.fs.open_input_stream(f"{remote[5:]}/{rel}").read() == (out / rel).read_bytes(), rel
    with pytest.raises(DatasetError, match="canny: output folder exists and is not empty"):
        condition_dataset(resolve_data_path("builtin:sample"), remote, "canny")

    # Pairs with a grayscale control (converted), an RGBA control (alpha on black) and one of the
    # wrong size (quarantined with both sizes in the reason).
    meta = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    Image.open(out / meta[0]["conditioning_image"]).convert("L").save(out / meta[0]["conditioning_image"])
    Image.open(out / meta[1]["conditioning_image"]).convert("RGBA").save(out / meta[1]["conditioning_image"])
    Image.new("RGB", (32, 32)).save(out / meta[2]["conditioning_image"])
    cfg = cn_cfg(tmp_path, "pairs", f"data.path={out}", "data.max_bad_fraction=0.1")
    ds, report = prepare_training_dataset(str(out), tiny_model_path, cfg.data, 0, tmp_path / "report")
    assert [(r["sample_id"], r["reason"]) for r in report.quarantined] == [
        (2, "conditioning image is 32x32, the image 64x64")]
    rows = ds.take_batch(40, batch_format="numpy")
    assert len(rows["sample_id"]) == 31 and rows["conditioning_pixel_values"].shape[1:] == (3, 64, 64)
    first = rows["conditioning_pixel_values"][list(rows["sample_id"]).index(0)]
    assert (first[0] == first[1]).all() and (first[0] == first[2]).all()

    # A dataset without the conditioning column: one clear line before training.
    with pytest.raises(DatasetError, match="conditioning_image"):
        run_training(cn_cfg(tmp_path, "no-column", "data.path=builtin:sample"))


def test_data_condition_runs_that_fail_leave_dst_ready_for_a_rerun(ray_cluster, tmp_path, monkeypatch):
    """A run that fails validation leaves DST holding only its quarantine report (named in the error), and a rerun
    replaces it; a run that fails while writing pairs leaves no half-written images/ or conditioning/; DST that
    cannot be created is one line naming it."""
    from diffray.data import conditioning
    from diffray.data.sample import write_sample_dataset
    from diffray.errors import StorageError

    good = write_sample_dataset(tmp_path / "sample", num_images=4) / "train"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.png", "text": "x"}}\n' for i in range(3)))
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png")
    dst = tmp_path / "pairs"
    with pytest.raises(DatasetError, match=rf"3 of 3 rows are bad .*report: {dst}/quarantine.jsonl"):
        condition_dataset(str(bad), dst, "canny")
    assert [p.name for p in dst.iterdir()] == ["quarantine.jsonl"]

    real = conditioning.condition_batch

    def fails_after_two_pairs(batch, **kwargs):  # a full disk or a lost node, half-way through
        real({k: v[:2] for k, v in batch.items()}, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conditioning, "condition_batch", fails_after_two_pairs)
    with pytest.raises(StorageError, match=r"pairs: cannot write the paired dataset \(No space left on device\)$"):
        condition_dataset(str(good), dst, "canny")  # one line, not Ray's traceback of the task
    assert [p.name for p in dst.iterdir()] == ["quarantine.jsonl"], "no half-written pairs"
    monkeypatch.undo()

    assert condition_dataset(str(good), dst, "canny") == (str(dst), 4, 0)
    assert (dst / "quarantine.jsonl").read_text() == ""  # this run's report, not the failed run's
    assert len(list((dst / "conditioning").iterdir())) == 4 and not list(tmp_path.glob(".pairs*"))

    (tmp_path / "afile").write_text("keep")
    with pytest.raises(StorageError, match=r"afile/sub: cannot create the output folder \(.*Not a directory"):
        condition_dataset(str(good), tmp_path / "afile" / "sub", "canny")
