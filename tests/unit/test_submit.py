"""`diffray submit` without a cluster: the job's command line, storage path and checks before upload."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from diffray.errors import ConfigError
from diffray.submit import entrypoint, precheck, with_storage_path

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args, expected", [
    (["train", "configs/lora.yaml"], ["train", "configs/lora.yaml", "run.storage_path=s3://b/runs"]),
    (["tune", "configs/tune_lora.yaml", "tune.name=x"],
     ["tune", "configs/tune_lora.yaml", "tune.name=x", "run.storage_path=s3://b/runs"]),
    (["train", "configs/lora.yaml", "run.storage_path=/shared"], ["train", "configs/lora.yaml", "run.storage_path=/shared"]),
    (["tune", "results", "s3://b/runs/tune-lora"], ["tune", "results", "s3://b/runs/tune-lora"]),
    (["generate", "--prompt", "x"], ["generate", "--prompt", "x"]),
    (["-v", "train", "configs/lora.yaml"], ["-v", "train", "configs/lora.yaml", "run.storage_path=s3://b/runs"]),
])
def test_storage_path_reaches_train_and_tune_jobs_that_do_not_set_it(args, expected):
    assert with_storage_path(args, "s3://b/runs") == expected
    assert with_storage_path(args, None) == args


def test_entrypoint_quotes_arguments():
    assert entrypoint(["train", "configs/lora.yaml", "run.name=a b"]) == "diffray train configs/lora.yaml 'run.name=a b'"
    with pytest.raises(ConfigError, match="nothing to submit"):
        entrypoint([])


def test_precheck_validates_train_and_tune_configs_and_warns_on_relative_storage():
    err = io.StringIO()
    precheck(["tune", "configs/tune_lora.yaml"], REPO, err)
    assert "run.storage_path=./runs is relative" in err.getvalue()
    err = io.StringIO()
    precheck(["train", "configs/lora.yaml", "run.storage_path=s3://bucket/runs"], REPO, err)
    assert err.getvalue() == ""
    with pytest.raises(ConfigError, match=r"tune\.scheduler\.grace_period"):
        precheck(["tune", "configs/tune_lora.yaml", "tune.scheduler.grace_period=1"], REPO, io.StringIO())
    with pytest.raises(ConfigError, match="no such config under the working dir"):
        precheck(["train", "configs/nope.yaml"], REPO, io.StringIO())
    with pytest.raises(ConfigError, match=r"lora\.rnak: unknown key"):  # after diffray's own options too
        precheck(["--verbose", "train", "configs/lora.yaml", "lora.rnak=3"], REPO, io.StringIO())


@pytest.mark.parametrize("config", ["lora_sdxl.yaml", "dreambooth_sdxl.yaml", "textual_inversion_sdxl.yaml",
                                    "controlnet_sdxl.yaml", "lora_flux.yaml", "dreambooth_flux.yaml"])
def test_every_family_config_submits_as_the_sd_ones_do(config):
    """SDXL's and Flux's shipped configs pass the same checks and get the same job line (the family is the
    cluster job's to read from the model, as `diffray train` does)."""
    args = with_storage_path(["train", f"configs/{config}", "train.max_steps=8"], "s3://b/runs")
    err = io.StringIO()
    precheck(args, REPO, err)
    assert err.getvalue() == ""
    assert entrypoint(args) == f"diffray train configs/{config} train.max_steps=8 run.storage_path=s3://b/runs"
    with pytest.raises(ConfigError, match="train.max_stepz"):
        precheck([*args, "train.max_stepz=4"], REPO, io.StringIO())
