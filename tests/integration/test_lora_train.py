"""LoRA on Ray Train (local cluster, tiny model): learning, export round trip, data-parallel
equivalence, resume, worker failure, NaN stop, interrupted checkpoint writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffray.config import apply_overrides
from diffray.methods import load_config, validate_config
from diffray.errors import TrainingError
from diffray.models.adapters import CARD, LORA_WEIGHTS, read_card
from diffray.trainers.runner import run_training
from testkit.adapters import Probe
from testkit.models import TINY_RANDOM

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def events(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


def starts(run_dir: str) -> list[int]:
    return [e["resumed_from_step"] for e in events(run_dir) if e.get("event") == "start"]


def step_lines(run_dir: str) -> list[int]:
    return [e["step"] for e in events(run_dir) if "loss" in e and "event" not in e]


def small_cfg(tmp_path, name: str, *overrides: str):
    base = ["run.storage_path=" + str(tmp_path / "runs"), f"run.name={name}", "train.max_steps=8",
            "train.checkpoint_every=2", "train.micro_batch_size=2", "train.progress_bar=false"]
    return load_config(REPO / "configs" / "lora.yaml", [TINY_RANDOM] + base + list(overrides))


def adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.artifact_dir) / LORA_WEIGHTS))


def assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Equal to 1e-6: the README promises a resumed run sees the same data, noise and dropout as a
    straight one (randomness keyed by (seed, step, sample_id)), whatever the resume path."""
    assert got.keys() == want.keys() and got
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    assert worst < 1e-6, f"{what}: max |resumed - straight| = {worst:.2e}"


@pytest.fixture(scope="module")
def straight_run(ray_cluster, tmp_path_factory):
    """The 8-step `small_cfg` run (ZeRO-2, 2 workers, validate_every null) without any interruption: the
    reference every resumed run of this module must reproduce to 1e-6."""
    result = run_training(small_cfg(tmp_path_factory.mktemp("straight"), "straight", "train.validate_every=null"))
    assert result.steps == 8 and starts(result.run_dir) == [0]
    return adapter(result)


def checkpoint_steps(run_dir: str) -> list[int]:
    """The step of every checkpoint dir kept in the run dir, in step order."""
    return sorted(json.loads((p / "trainer_state.json").read_text())["step"]
                  for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())


def test_demo_run_learns_exports_and_roundtrips(ray_cluster, tmp_path, tiny_model_path, model_from_zero_checkpoint):
    from diffusers import StableDiffusionPipeline

    from diffray.generate import load_adapter

    cfg = load_config(REPO / "configs" / "lora.yaml", [TINY_RANDOM, f"run.storage_path={tmp_path / 'runs'}",
                                                       "export.formats=[kohya, peft]"])
    assert cfg.scaling.num_workers == 2 and cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage == 2
    result = run_training(cfg)
    assert result.steps == cfg.train.max_steps == 60
    # The training loss falls: mean of the last 10 steps clearly below the first 10 (fixed seed).
    assert result.loss_last_mean < result.loss_first_mean - 0.05, result.summary_line()
    losses = [e["loss"] for e in events(result.run_dir) if "loss" in e and "event" not in e]
    assert len(losses) == 60 and abs(sum(losses[:10]) / 10 - result.loss_first_mean) < 1e-6
    metric = next(e for e in events(result.run_dir) if e.get("step") == 30 and "loss" in e)
    assert set(metric) >= {"loss", "lr", "grad_norm", "step_time", "samples_per_s"} and metric["grad_norm"] > 0
    assert 0 < metric["data_time"] < metric["step_time"]  # the wait for the micro-batch, inside the step
    assert (Path(result.run_dir) / "logs" / "validation" / "step_000060.png").is_file()
    assert list((Path(result.run_dir) / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    card = read_card(result.artifact_dir)
    assert card["method"] == "lora" and card["steps"] == 60 and card["config"]["lora"]["rank"] == 8

    # The trained weights, rebuilt independently from the ZeRO-2 shards of the final checkpoint.
    probe = Probe(*model_from_zero_checkpoint(result.run_dir, cfg, tiny_model_path))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base_img = pipe("a red circle on a blue background", num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    load_adapter(pipe, result.artifact_dir)
    assert probe.error(pipe.unet) < 1e-5
    # export.formats wrote the kohya layout beside the artifact; stock diffusers reads it to the same output
    kohya = Path(result.artifact_dir) / "kohya" / f"{cfg.run.name}.safetensors"
    assert (Path(result.artifact_dir) / "peft" / "unet" / "adapter_model.safetensors").is_file()
    kpipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    kpipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    assert probe.error(kpipe.unet) < 1e-4
    lora_img = pipe("a red circle on a blue background", num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    assert abs(lora_img - base_img).mean() > 1e-3


@pytest.mark.slow
@pytest.mark.eval  # CI: 2 ZeRO-2 workers reproduce a straight run in the SIGKILL and checkpoint drills
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_data_parallel_equivalence(ray_cluster, tmp_path, strategy):
    """2 workers x micro-batch 1 == 1 worker x micro-batch 2 on the same data (gradients are averaged)."""
    from diffray.data.sample import write_sample_dataset

    data = write_sample_dataset(tmp_path / "two", num_images=2) / "train"
    weights = {}
    for workers, mb in [(2, 1), (1, 2)]:
        cfg = small_cfg(tmp_path, f"dp-{strategy}-{workers}", f"data.path={data}", f"strategy.name={strategy}",
                        f"scaling.num_workers={workers}", f"train.micro_batch_size={mb}", "train.max_steps=4",
                        "train.checkpoint_every=4", "train.validate_every=null", "data.random_flip=false",
                        "failure.max_failures=0")
        result = run_training(cfg)
        weights[workers] = load_file(str(Path(result.artifact_dir) / LORA_WEIGHTS))
    a, b = weights[2], weights[1]
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k or "lora.up" in k)
    assert moved > 1e-3, "the adapter must have trained"
    # Same data, same noise per sample: only float reduction order differs between the layouts.
    assert worst < 1e-5, f"max |2x1 - 1x2| = {worst:.2e}"


def test_worker_sigkill_recovers_from_last_checkpoint(ray_cluster, tmp_path, faults, straight_run):
    # Ray registers a checkpoint asynchronously after every rank reported it, so the restart resumes
    # from the newest *registered* one: the kill waits until step 2's is (on a loaded machine a kill at
    # step 5 came before any was, and the run restarted from scratch); step 4 may be registered too.
    faults(kill_rank_at_step={"rank": 1, "step": 5, "registered": 2})
    cfg = small_cfg(tmp_path, "killed", "failure.max_failures=1", "train.validate_every=null")
    result = run_training(cfg)
    assert result.steps == 8
    begin = starts(result.run_dir)
    assert begin[0] == 0 and len(begin) == 2 and begin[1] in (2, 4), begin
    steps = step_lines(result.run_dir)
    assert steps[-1] == 8 and sorted(set(steps)) == list(range(1, 9)), "no step lost"
    repeated = sorted(s for s in set(steps) if steps.count(s) > 1)
    assert repeated == list(range(begin[1] + 1, 5)), "only the steps after the resumed checkpoint ran twice"
    assert len(repeated) <= cfg.train.checkpoint_every
    assert (Path(result.run_dir) / "logs" / "faults" / "rank1-step5").is_file()
    assert_same_adapter(adapter(result), straight_run, f"restarted from step {begin[1]}")


@pytest.mark.slow  # ~85 s; CI's slow suite runs it (the default suite keeps the SIGKILL drill on the same run)
def test_nan_loss_stops_with_step_and_last_checkpoint_still_loads(ray_cluster, tmp_path, faults, straight_run):
    faults(nan_loss_at_step=3)
    cfg = small_cfg(tmp_path, "nan", "failure.max_failures=1", "train.validate_every=null")
    with pytest.raises(TrainingError, match=r"loss became NaN/inf at step 3.*Last good checkpoint: .*checkpoint_"):
        run_training(cfg)
    run_dir = str(tmp_path / "runs" / "nan")
    assert max(step_lines(run_dir)) == 2 and starts(run_dir) == [0]
    # The step-2 checkpoint is intact: the same run without the fault resumes from it and finishes.
    faults()
    fixed = small_cfg(tmp_path, "nan", "train.validate_every=null")
    result = run_training(fixed)
    assert starts(run_dir) == [0, 2] and result.steps == 8
    assert_same_adapter(adapter(result), straight_run, "resumed from step 2")


@pytest.mark.slow  # ~130 s; CI's slow suite runs it (the default suite's 20-min budget)
def test_checkpoint_killed_mid_write_never_replaces_last_good(ray_cluster, tmp_path, faults, straight_run):
    run_dir = str(tmp_path / "runs" / "midwrite")
    assert run_training(small_cfg(tmp_path, "midwrite", "train.max_steps=4", "train.validate_every=null",
                                  "train.keep_checkpoints=1")).steps == 4
    assert checkpoint_steps(run_dir) == [4]  # keep_checkpoints=1: step 2's dir is gone
    # Continue to 8; rank 0 is SIGKILLed half-way through writing the step-6 checkpoint, no retries.
    faults(kill_during_checkpoint_at_step=6)
    with pytest.raises(TrainingError, match="failed"):
        run_training(small_cfg(tmp_path, "midwrite", "failure.max_failures=0", "train.validate_every=null"))
    assert (Path(run_dir) / "logs" / "faults" / "checkpoint-6").is_file()
    faults()
    # The half-written step-6 checkpoint never replaced step 4: the next run resumes from 4, and the
    # 4 + 4 steps give the straight 8-step run's adapter.
    result = run_training(small_cfg(tmp_path, "midwrite", "train.validate_every=null", "train.keep_checkpoints=3"))
    assert starts(run_dir) == [0, 4, 4] and result.steps == 8
    assert_same_adapter(adapter(result), straight_run, "4 steps + resume to 8")
    assert checkpoint_steps(run_dir) == [4, 6, 8]  # exactly the last keep_checkpoints=3


@pytest.mark.slow  # ~110 s with its straight run; CI's slow suite runs it beside the mid-write drill
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(ray_cluster, tmp_path, straight_run):
    # A registered checkpoint damaged afterwards (a node that lost power before its page cache reached the disk, a
    # copy stopped half-way) made the run unresumable: every rerun failed on it ("JSONDecodeError", "EOFError: Ran
    # out of input") though intact older checkpoints sat beside it.
    run_dir = tmp_path / "runs" / "damaged"
    assert run_training(small_cfg(tmp_path, "damaged", "train.max_steps=6", "train.validate_every=null",
                                  "train.keep_checkpoints=3")).steps == 6
    ckpt = {json.loads((p / "trainer_state.json").read_text())["step"]: p
            for p in run_dir.glob("checkpoint_*") if p.is_dir()}
    assert sorted(ckpt) == [2, 4, 6]
    (ckpt[6] / "trainer_state.json").write_text('{"step": 6, "first_l')  # torn JSON
    shard = ckpt[4] / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's ZeRO shard, cut in half
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run_training(small_cfg(tmp_path, "damaged", "train.validate_every=null", "train.keep_checkpoints=3"))
    assert starts(str(run_dir)) == [0, 2] and result.steps == 8
    assert_same_adapter(adapter(result), straight_run, "resumed from step 2 past two damaged checkpoints")
    warned = (run_dir / "logs" / "driver.log").read_text()  # and the terminal: "diffray: warning: ..."
    assert f"{ckpt[6]}: trainer_state.json is not valid JSON" in warned
    assert f"{ckpt[4]}: state/zero_pp_rank_1_mp_rank_00_optim_states.pt has " in warned


# The option matrix's DDP entry: LoRA on the text encoder too, v-prediction, Min-SNR, noise offset, gradient
# checkpointing, a cosine schedule, LoRA dropout (the global RNG, seeded per step) and gradient accumulation.
DDP_OPTIONS = ["strategy.name=ddp", "lora.train_text_encoder=true", "model.prediction_type=v_prediction",
               "train.snr_gamma=5.0", "train.noise_offset=0.05", "train.gradient_checkpointing=true",
               "optim.lr_scheduler=cosine", "lora.dropout=0.1", "train.grad_accum_steps=2", "train.micro_batch_size=1"]


@pytest.mark.slow
@pytest.mark.eval  # CI: exact resume under ZeRO-2 (the checkpoint drill), the loss options' unit tests
def test_resume_is_exact_under_ddp_with_every_loss_option(ray_cluster, tmp_path):
    """The other engine with every loss option (accumulation's micro-batches skipped on resume, dropout
    reseeded): 4 steps + resume to 8 equals 8 straight steps, and the adapter exports both models' LoRAs."""
    opts = [*DDP_OPTIONS, "train.checkpoint_every=4", "train.validate_every=null"]
    straight = run_training(small_cfg(tmp_path, "ddp-straight", *opts))
    assert run_training(small_cfg(tmp_path, "ddp-resumed", *opts, "train.max_steps=4")).steps == 4
    resumed = run_training(small_cfg(tmp_path, "ddp-resumed", *opts))
    assert starts(resumed.run_dir) == [0, 4] and resumed.steps == 8
    weights = adapter(resumed)
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    assert_same_adapter(weights, adapter(straight), "DDP: 4 steps + resume to 8")
    from diffray.errors import ConfigError  # a rerun with another learning rate would go on with the old one

    with pytest.raises(ConfigError, match=r"run 'ddp-resumed' in .* was started with other settings: optim.lr "):
        run_training(small_cfg(tmp_path, "ddp-resumed", *opts, "optim.lr=1e-5"))


def test_bad_dataset_is_a_clear_error(ray_cluster, tmp_path):
    from diffray.errors import DatasetError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no metadata.jsonl"):
        run_training(small_cfg(tmp_path, "bad", f"data.path={tmp_path / 'empty'}"))
    assert validate_config(apply_overrides({}, [])).data.path == "builtin:sample"


def test_workers_the_cluster_cannot_hold_fail_fast(ray_cluster, tmp_path):
    from diffray.errors import ConfigError

    # No GPU on this cluster and no autoscaler (detected: scaling.wait_for_resources is null): one line
    # naming the resource and what the nodes have, before any placement is requested (a wait for one
    # would hang until pytest-timeout).
    with pytest.raises(ConfigError, match=r"scaling: 2 workers x \(1 CPU, 1 GPU\) do not fit .* 0 GPU\] \(room for 0\)"):
        run_training(small_cfg(tmp_path, "gpu", "scaling.use_gpu=true"))
    with pytest.raises(ConfigError, match=r"8 workers x \(1 CPU\) do not fit .*room for 4"):
        run_training(small_cfg(tmp_path, "wide", "scaling.num_workers=8"))
    # tests/e2e/test_cluster.py's job, which waits for Ray's autoscaler there, fails fast here: no autoscaler.
    from diffray.cluster import has_autoscaler

    assert not has_autoscaler()
    with pytest.raises(ConfigError, match=r"2 workers x \(1 CPU, 1 A10G\) do not fit .* 0 A10G\] \(room for 0\); "
                                          "lower scaling.num_workers"):
        run_training(small_cfg(tmp_path, "a10g", "scaling.resources_per_worker={A10G: 1}"))
    assert not (tmp_path / "runs" / "gpu").exists()


@pytest.mark.slow
@pytest.mark.eval  # CI: the trackers' unit tests; no CI test computes val_loss now
def test_held_out_validation_loss_is_logged_and_reproducible(ray_cluster, tmp_path, tiny_model_path):
    from diffray.trainers.datasets import build_datasets

    common = ["data.validation_fraction=0.25", "train.max_steps=4", "train.validate_every=2", "train.log_every=1",
              "train.checkpoint_every=4"]
    cfg = small_cfg(tmp_path, "val-a", *common, "tracking.mlflow={}")  # the two runs also carry the trackers
    datasets = build_datasets(cfg, tiny_model_path)
    ids = {k: sorted(int(i) for i in ds.take_batch(100, batch_format="numpy")["sample_id"]) for k, ds in datasets.items()}
    assert set(ids) == {"train", "validation"} and 4 <= len(ids["validation"]) <= 12
    assert not set(ids["train"]) & set(ids["validation"]) and sorted(ids["train"] + ids["validation"]) == list(range(32))

    runs = [run_training(cfg), run_training(small_cfg(tmp_path, "val-b", *common, "tracking.wandb={}"))]
    vals = [[(e["step"], e["val_loss"]) for e in json.loads("[" + ",".join(
        (Path(r.run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()) + "]") if "val_loss" in e] for r in runs]
    assert [s for s, _ in vals[0]] == [2, 4]  # at every validation step and the last one
    for (_, x), (_, y) in zip(*vals):  # same data, seed and weights: the same value
        assert abs(x - y) < 1e-6 and 0 < x < 10
    assert runs[0].metrics["val_loss"] == vals[0][-1][1] and "val_loss=" in runs[0].summary_line()
    assert_tracked(runs, vals)


def assert_tracked(runs, vals) -> None:
    """Run a tracked to MLflow's default store, run b to W&B offline (both in the run's log dir), from
    rank 0 of the Ray workers: every step's loss as metrics.jsonl has it, val_loss, grids, the artifact."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from testkit import wandb_offline

    losses = [[(e["step"], e["loss"]) for e in events(r.run_dir) if "loss" in e and "event" not in e] for r in runs]
    assert [s for s, _ in losses[0]] == [1, 2, 3, 4]
    mlflow.set_tracking_uri(f"sqlite:///{Path(runs[0].run_dir) / 'logs' / 'mlflow.db'}")
    client = MlflowClient()
    (run,) = mlflow.search_runs(experiment_names=["diffray"], output_format="list")  # one run: rank 0 only
    assert run.info.run_name == "val-a" and (run.data.params["run.name"], run.data.params["train.max_steps"]) == ("val-a", "4")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == losses[0]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/val_loss")] == vals[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "artifact")} >= {
        f"artifact/{LORA_WEIGHTS}", f"artifact/{CARD}"}
    grids = {re.search(r"validation\+step\+(\d+)\+", a.path).group(1) for a in client.list_artifacts(run.info.run_id, "images")}
    assert grids == {"2", "4"}  # the grids of steps 2 and 4 (MLflow stores each with a thumbnail)
    rows = wandb_offline.history(wandb_offline.run_file(Path(runs[1].run_dir) / "logs"))
    assert [(r["_step"], r["train/loss"]) for r in rows] == losses[1]
    assert [(r["_step"], r["train/val_loss"]) for r in rows if "train/val_loss" in r] == vals[1]
    assert [r["_step"] for r in rows if r.get("validation/_type") == "image-file"] == [2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides", [
    pytest.param("zero3", ["strategy.zero_stage=3", "train.validate_every=4", "data.validation_fraction=0.2"],
                 marks=pytest.mark.eval),  # no ZeRO-3 run in CI: full fine-tuning's and Flux's are eval too
    pytest.param("zero1-offload", ["strategy.zero_stage=1", "strategy.offload_optimizer=true"],
                 marks=pytest.mark.eval),  # CI: ZeRO-3 above, ZeRO-2 in the default suite (the same engine)
    pytest.param("zero0-accum", ["strategy.zero_stage=0", "train.grad_accum_steps=2", "train.micro_batch_size=1"],
                 marks=pytest.mark.eval),  # accumulation in CI: the DDP exact-resume test
    # DDP with every loss option: test_resume_is_exact_under_ddp_with_every_loss_option
])
def test_strategy_and_option_matrix(ray_cluster, tmp_path, name, overrides):
    """Every engine setting and loss option trains end to end and exports a loadable adapter."""
    cfg = small_cfg(tmp_path, name, "train.max_steps=4", "train.checkpoint_every=4", *overrides)
    result = run_training(cfg)
    assert result.steps == 4 and result.loss_first_mean == result.loss_first_mean  # not NaN
    weights = load_file(str(Path(result.artifact_dir) / LORA_WEIGHTS))
    assert any(k.startswith("text_encoder.") for k in weights) == cfg.lora.train_text_encoder
    ups = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert ups and max(v.abs().max().item() for v in ups) > 0, "B moved away from its zero init"
    if cfg.train.validate_every:
        assert (Path(result.run_dir) / "logs" / "validation" / "step_000004.png").is_file()


# Training configs the README does not already run as shipped (tests/e2e/test_readme.py: its `diffray train`
# lines, and `diffray demo`, which trains configs/demo.yaml; the other-methods block's DreamBooth, Textual
# Inversion, ControlNet and full configs are trained in CI by their methods' integration tests, which load
# those files), nor configs/ddpo.yaml (test_ddpo_train.py loads it).
RUN_ELSEWHERE = (set(re.findall(r"diffray train configs/(\S+\.yaml)", (REPO / "README.md").read_text()))
                 | {"ddpo.yaml", "demo.yaml"})


@pytest.mark.slow
@pytest.mark.eval  # CI: each config's engine and method run in the tests above (DDP: make test-eval only)
@pytest.mark.parametrize("path", [p for p in sorted((REPO / "configs").glob("*.yaml"))  # training jobs only
                                  if not {"tune", "applications"} & set(yaml.safe_load(p.read_text()))
                                  and p.name not in RUN_ELSEWHERE],
                         ids=lambda p: p.name)
def test_shipped_configs_run(ray_cluster, tmp_path, path):
    cfg = load_config(path, [f"run.storage_path={tmp_path / 'runs'}", "train.max_steps=2", "train.checkpoint_every=2",
                             "train.validate_every=null"])
    assert run_training(cfg).steps == 2


@pytest.mark.eval  # CI: the same engine EMA, checked by hand on full fine-tuning (test_full_train.py)
def test_ema_adapter_is_the_hand_computed_ema_and_the_card_says_so(ray_cluster, tmp_path, tiny_model_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from diffusers import StableDiffusionPipeline

    from diffray.generate import load_adapter
    from diffray.models.loading import load_components
    from diffray.trainers.denoising import lora_denoiser

    cfg = small_cfg(tmp_path, "ema", "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3",
                    "train.ema_decay=0.9", "train.validate_every=null")
    result = run_training(cfg)
    ckpts = {json.loads((p / "trainer_state.json").read_text())["step"]: p
             for p in Path(result.run_dir).glob("checkpoint_*") if (p / "trainer_state.json").is_file()}
    ema: dict = {}
    for k in (1, 2, 3):  # diffusers' warmup: decay 0 at the first step, then min(0.9, k / (k + 9))
        w = get_fp32_state_dict_from_zero_checkpoint(str(ckpts[k]), tag="state", exclude_frozen_parameters=True)
        d = 0.0 if k == 1 else min(0.9, k / (k + 9))
        ema = {n: d * ema[n] + (1 - d) * v if ema else v for n, v in w.items()}
    comps = load_components(tiny_model_path)
    model = lora_denoiser(comps, cfg.lora, cfg.run.seed)
    model.load_state_dict(ema, strict=False)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    load_adapter(pipe, result.artifact_dir)
    g = torch.Generator().manual_seed(1)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600])
    with torch.no_grad():
        hidden = comps.text_encoder(torch.randint(0, 100, (2, 77), generator=g))[0]
        want = model(latents, t, encoder_hidden_states=hidden)
        got = pipe.unet(latents, t, encoder_hidden_states=hidden).sample
        model.load_state_dict(w, strict=False)
        raw = model(latents, t, encoder_hidden_states=hidden)
    assert (got - want).abs().max().item() < 1e-5 and (raw - want).abs().max().item() > 1e-5
    assert read_card(result.artifact_dir)["weights"] == "ema (decay 0.9)"


@pytest.mark.eval  # CI: unit/test_speed.py (each option on the model, same outputs and gradients)
def test_accelerator_options_train_the_same_adapter(ray_cluster, tmp_path, straight_run):
    """Eager attention, torch.compile (aot_eager: graph capture without kernel generation) and fused AdamW
    under ZeRO-2 on 2 workers: the same adapter as the straight run, to float noise. (Channels-last is
    refused with DeepSpeed; tests/unit/test_speed.py checks it on the model.)"""
    result = run_training(small_cfg(tmp_path, "accelerated", "train.validate_every=null", "train.attention=eager",
                                    "train.compile=true", "train.compile_backend=aot_eager", "optim.fused=true"))
    got = adapter(result)
    assert got.keys() == straight_run.keys() and got
    worst = max((got[k] - straight_run[k]).abs().max().item() for k in got)
    assert worst < 1e-4, f"max |accelerated - straight| = {worst:.2e}"
