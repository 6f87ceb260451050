"""Config system: YAML + overrides -> typed configs; errors name the field and allowed values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffray import yaml_io
from diffray.config import apply_overrides
from diffray.methods import load_config, validate_config
from diffray.trainers.lora import LoraTrainConfig
from diffray.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ALL_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Training jobs; Tune jobs (a `tune:` section) and Serve config files (`applications:`) are other kinds.
CONFIGS = [p for p in ALL_CONFIGS if not {"tune", "applications"} & set(yaml.safe_load(p.read_text()))]
TUNE_CONFIGS = [p for p in ALL_CONFIGS if "tune" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# diffray ") and path.name in first, "first line must name the command"
    assert cfg.model.path.startswith("builtin:"), "shipped configs run as-is on the embedded model"


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=[p.name for p in TUNE_CONFIGS])
def test_every_shipped_tune_config_validates(path):
    from diffray.tune.config import load_tune_job

    job = load_tune_job(path)
    assert path.read_text().splitlines()[0] == f"# diffray tune configs/{path.name}"
    assert job.train.model.path.startswith("builtin:") and job.domains


def test_overrides_parse_types():
    cfg = validate_config(apply_overrides({}, ["train.max_steps=7", "optim.lr=1e-4", "lora.target_modules=[to_q, to_v]",
                                               "train.snr_gamma=null", "scaling.use_gpu=true", "model.path=/x/y"]))
    assert cfg.train.max_steps == 7 and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.lora.target_modules == ["to_q", "to_v"] and cfg.train.snr_gamma is None
    assert cfg.scaling.use_gpu is True and cfg.model.path == "/x/y"
    # YAML reads a bare `off` as false; data.cache takes it as the word it looks like.
    assert validate_config(apply_overrides({}, ["data.cache=off"])).data.cache == "off"
    assert validate_config({"data": {"cache": "auto"}}).data.cache == "auto"


@pytest.mark.parametrize("override, expected", [
    ("lora.rnk=4", "lora.rnk: unknown key (allowed: alpha, dropout,"),
    ("export.formats=[kohya, ckpt]", "export.formats.1: Input should be 'diffusers', 'kohya' or 'peft'"),
    ("strategy.name=fsdp", "strategy.name: Input should be 'deepspeed' or 'ddp'"),
    ("strategy.zero_stage=4", "strategy.zero_stage: Input should be 0, 1, 2 or 3"),
    ("train.max_steps=0", "train.max_steps: Input should be greater than or equal to 1"),
    ("train.max_steps=abc", "train.max_steps: Input should be a valid integer"),
    ("data.resolution=60", "data.resolution: must be a multiple of 8"),
    ("strategy.offload_params=true", "offload_params needs zero_stage 3"),
    ("method=dreamboat", "method: unknown method 'dreamboat' (allowed: lora, dreambooth, textual_inversion, "
     "controlnet, ddpo, diffusion_dpo, reward_model, full, vae)"),
    ("run.name=../etc", "run.name: String should match pattern"),
    ("train.timestep_range=[900, 100]", "train.timestep_range: [900, 100]: needs [lo, hi] with 0 <= lo < hi <= 1000"),
    ("train.timestep_range=[0, 1001]", "train.timestep_range: [0, 1001]: needs"),
    ("bogus.key=1", "bogus: unknown key"),
    ("optim.betas=[0.9, 1.5]", "optim.betas.1: Input should be less than 1"),
])
def test_bad_values_name_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        validate_config(apply_overrides({}, [override]))
    assert expected in str(err.value)


def test_bad_override_syntax_and_non_section():
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        apply_overrides({}, ["max_steps"])
    with pytest.raises(ConfigError, match="train.max_steps is not a section"):
        apply_overrides({"train": {"max_steps": 3}}, ["train.max_steps.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML at line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_a_repeated_section_or_key_is_refused_with_both_lines(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  max_steps: 5000\nlora:\n  rank: 4\ntrain:\n  log_every: 10\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: invalid YAML at line 5: found duplicate key 'train' \(first at line 1\)"):
        load_config(dup)
    dup.write_text("train:\n  max_steps: 5000\n  max_steps: 10\n")
    with pytest.raises(ConfigError, match="at line 3: found duplicate key 'max_steps' \\(first at line 2\\)"):
        load_config(dup)
    # A merge key is not a repeat: the keys written after `<<: *base` override the merged ones.
    assert yaml_io.load("a: &t {x: 1, y: 2}\nb:\n  <<: *t\n  y: 5\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 5}}


def test_exponent_numbers_are_numbers_in_files_lists_and_overrides(tmp_path):
    assert yaml_io.load("lr: 1e-4\nspace: [1e-5, 1.0e-3, -2E+3, 5e2]\nwords: [1e, e5]\n") == {
        "lr": 1e-4, "space": [1e-5, 1e-3, -2000.0, 500.0], "words": ["1e", "e5"]}
    assert apply_overrides({}, ["optim.lr=3e-4"]) == {"optim": {"lr": 3e-4}}


def test_a_hash_in_an_override_value_is_text_not_a_comment():
    out = apply_overrides({}, ["data.default_caption=a photo of item #3", "lora.init_from=/data/run #2/artifact",
                               "train.validation_prompts=['a #1 red circle']", "train.max_steps=7"])
    assert out["data"]["default_caption"] == "a photo of item #3"
    assert out["lora"]["init_from"] == "/data/run #2/artifact"
    assert out["train"] == {"validation_prompts": ["a #1 red circle"], "max_steps": 7}


def test_config_round_trips_through_dict():
    cfg = load_config(REPO / "configs" / "lora.yaml", ["lora.rank=16"])
    again = LoraTrainConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg and again.lora.scale_alpha == 8.0


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffray.cli", "train", str(REPO / "configs" / "lora.yaml"),
                           "lora.rank=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "diffray: error: lora.rank: Input should be greater than or equal to 1"
    assert "Traceback" not in proc.stderr


def test_workers_that_fit_count_whole_bundles_per_node():
    from diffray.cluster import workers_that_fit

    gpu = {"CPU": 2.0, "GPU": 1.0}
    assert workers_that_fit(gpu, [{"CPU": 16.0, "GPU": 8.0}, {"CPU": 3.0, "GPU": 4.0}, {"CPU": 64.0}]) == 9
    assert workers_that_fit({"CPU": 1.5}, [{"CPU": 2.0}, {"CPU": 3.0}]) == 3  # bundles never span nodes
    assert workers_that_fit({"CPU": 1.0, "accel_a100": 1.0}, [{"CPU": 8.0}]) == 0
    assert workers_that_fit({"CPU": 1.0}, []) == 0
    cfg = validate_config({"scaling": {"use_gpu": True, "cpus_per_worker": 4, "resources_per_worker": {"a": 1}}})
    assert cfg.scaling.worker_bundle() == {"CPU": 4.0, "GPU": 1.0, "a": 1.0}


# Ray 2.60's monitor reports (their `autoscaler_report`, abridged), taken from a `ray start --head` without an
# autoscaling config and from one with the fake multi-node provider (tests/e2e/test_autoscaler.py starts one).
FIXED_REPORT = {"autoscaler_report": {"active_nodes": {"node_1978ae": 1}, "pending_launches": {},
                                      "node_type_mapping": {"1978ae": "node_1978ae"}, "legacy": True}}
AUTOSCALER_REPORT = {"autoscaler_report": {"active_nodes": {"ray.head.default": 1, "gpu_node": 1},
                                           "node_type_mapping": {"ffff00": "ray.head.default", "0a1b": "gpu_node"},
                                           "legacy": True}}


def test_an_autoscaler_is_told_from_a_fixed_clusters_read_only_report():
    from diffray.cluster import autoscales

    assert not autoscales(FIXED_REPORT)
    assert autoscales(AUTOSCALER_REPORT)
    head_only = {"autoscaler_report": {"node_type_mapping": {"ffff00": "ray.head.default"}}}
    assert autoscales(head_only)  # no worker launched yet: the head's type still comes from a config
    assert not autoscales({}) and not autoscales({"autoscaler_report": None})
    assert validate_config({}).scaling.wait_for_resources is None  # detect by default
    assert validate_config({"scaling": {"wait_for_resources": False}}).scaling.wait_for_resources is False


def test_ray_train_settings_go_to_the_cluster_and_the_drivers_own_value_wins(monkeypatch):
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    from diffray.cluster import RAY_TRAIN_ENV, forwarded_env, worker_env_vars

    assert set(RAY_TRAIN_ENV) <= ENV_VARS_TO_PROPAGATE  # Ray Train hands them from fit()'s process to its controller
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.setenv("DIFFRAY_HOOK_TEST", "x")
    assert forwarded_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "DIFFRAY_HOOK_TEST": "x"}
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    assert worker_env_vars()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    assert worker_env_vars()["TOKENIZERS_PARALLELISM"] == "false"
