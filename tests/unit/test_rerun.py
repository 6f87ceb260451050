"""A rerun of a run name resumes that run from its checkpoint, so it must bring the settings the run was
started with: a changed learning rate, rank or dataset is refused naming each setting (it went on training
the old run while the card claimed the new settings); what leaves the trained weights as they were, a
longer max_steps and the same global batch over other workers pass."""

from __future__ import annotations

import json

import pytest

from diffray.config import apply_overrides
from diffray.errors import ConfigError
from diffray.methods import validate_config
from diffray.trainers.rerun import RUN_CONFIG, check_rerun, record_settings
from diffray.trainers.runner import run_training


def cfg(*overrides: str):
    return validate_config(apply_overrides({"method": "lora", "run": {"name": "mix"}}, list(overrides)))


def test_a_new_run_passes_and_records_its_settings(tmp_path):
    check_rerun(cfg(), str(tmp_path / "mix"))
    assert not (tmp_path / "mix").exists()  # nothing written until training starts
    record_settings(cfg("optim.lr=2e-3"), str(tmp_path / "mix"))
    assert json.loads((tmp_path / "mix" / RUN_CONFIG).read_text())["optim"]["lr"] == 2e-3


@pytest.mark.parametrize("overrides", [
    ["train.max_steps=400"],  # extend the run
    ["train.progress_bar=false", "train.log_every=7", "train.checkpoint_every=3", "train.validate_every=5",
     "train.validation_prompts=['a blue square']", "failure.max_failures=2", "export.formats=[kohya]",
     "data.cache=auto", "train.gradient_checkpointing=true", "train.attention=sdpa"],
    ["scaling.num_workers=1", "train.micro_batch_size=4"],  # the same global batch: 2 x 2 = 1 x 4
])
def test_what_leaves_the_weights_as_they_were_may_change(tmp_path, overrides):
    record_settings(cfg("scaling.num_workers=2", "train.micro_batch_size=2"), str(tmp_path))
    check_rerun(cfg("scaling.num_workers=2", "train.micro_batch_size=2", *overrides), str(tmp_path))


@pytest.mark.parametrize("overrides, named", [
    (["optim.lr=1e-5"], "optim.lr 0.002 (now 1e-05)"),
    (["lora.rank=16", "lora.alpha=4"], "lora.rank 4 (now 16), lora.alpha 8.0 (now 4.0)"),
    (["train.max_steps=50"], "train.max_steps 100 (now 50)"),
    (["train.micro_batch_size=4"], "train.micro_batch_size 2 (now 4)"),  # a larger global batch
    (["data.path=./other"], 'data.path "builtin:sample" (now "./other")'),
    (["method=dreambooth"], 'method "lora" (now "dreambooth")'),
])
def test_a_setting_that_changes_the_training_is_refused_naming_it(tmp_path, overrides, named):
    record_settings(cfg("optim.lr=2e-3", "lora.alpha=8"), str(tmp_path))
    with pytest.raises(ConfigError) as err:
        check_rerun(cfg(*overrides) if overrides[0].startswith("method") else cfg("optim.lr=2e-3", "lora.alpha=8",
                                                                                  *overrides), str(tmp_path))
    assert err.value.field == "run.name"
    assert f"run.name: run 'mix' in {tmp_path} was started with other settings: {named}" in str(err.value)
    assert "restore them, or give a new run.name" in str(err.value)


def test_the_recorded_floor_rises_with_an_extended_run_and_a_broken_record_is_named(tmp_path):
    record_settings(cfg(), str(tmp_path))
    check_rerun(cfg("train.max_steps=200"), str(tmp_path))
    record_settings(cfg("train.max_steps=200"), str(tmp_path))
    with pytest.raises(ConfigError, match=r"train.max_steps 200 \(now 150\)"):
        check_rerun(cfg("train.max_steps=150"), str(tmp_path))
    (tmp_path / RUN_CONFIG).write_text("[1, 2]")
    with pytest.raises(ConfigError, match=f"{RUN_CONFIG}: not the JSON of a run's settings"):
        check_rerun(cfg(), str(tmp_path))


@pytest.mark.parametrize("where", ["file", "under_a_file", "read_only"])
def test_a_storage_path_that_cannot_hold_the_run_is_one_error_naming_the_field(tmp_path, where):
    # Was "internal error: NotADirectoryError: [Errno 20] Not a directory: '.../lora-sample/logs'", and for a
    # folder that cannot be written, "internal error: FileNotFoundError"/"PermissionError".
    (tmp_path / "afile").write_text("not a folder")
    storage_path = {"file": tmp_path / "afile", "under_a_file": tmp_path / "afile" / "runs",
                    "read_only": "/sys/diffray-runs"}[where]  # sysfs: no new folders, not even for root
    with pytest.raises(ConfigError) as err:
        run_training(cfg(f"run.storage_path={storage_path}", "model.path=builtin:tiny-random"))
    assert err.value.field == "run.storage_path"
    if where == "read_only":
        assert str(err.value).startswith("run.storage_path: cannot write the run's folder /sys/diffray-runs/mix: ")
    else:
        assert str(err.value) == (f"run.storage_path: {tmp_path / 'afile'} is a file, not a folder (the run's folder "
                                  f"would be {storage_path}/mix)")
    assert (tmp_path / "afile").read_text() == "not a folder"

