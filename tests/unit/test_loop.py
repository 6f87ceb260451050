"""`diffray feedback train` without Ray: the export it trains on, the configs it plans (run names, data.path,
the DDPO job's learned reward and prompts), refusals before anything runs, and the atomic publish into the
serve registry (a broken artifact never appears, a taken id is refused unless replacing). The training itself
is tests/e2e/test_feedback_loop.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as st_save
from testkit.wait import wait_until

from diffray.errors import ConfigError, DiffrayError
from diffray.loop import plan_configs, publish_adapter, run_loop, summarize_export
from diffray.serve.artifacts import sha256_file
from diffray.serve.config import FeedbackSection, Limits
from diffray.serve.feedback import FeedbackRequest, feedback_record
from diffray.serve.feedback_store import FeedbackStore
from diffray.serve.registry import AdapterRegistry
from diffray.trainers.runner import RunResult

REPO = Path(__file__).resolve().parents[2]
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAEklEQVR4nGP4z8CAFWEXHbQSACj/P8Fu7N9hAAAAAElFTkSuQmCC")


def lora_artifact(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    a = np.random.default_rng(seed).standard_normal((4, 32)).astype(np.float32)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(
        st_save({"unet.down.lora.down.weight": a, "unet.down.lora.up.weight": np.zeros((32, 4), np.float32)}))
    (folder / "diffray_card.json").write_text(json.dumps({"method": "diffusion_dpo", "base_model": "builtin:tiny"}))
    return folder


def store_with(db: Path, choices: list[str]) -> Path:
    store = FeedbackStore(db)
    for i, choice in enumerate(choices):
        req = FeedbackRequest.model_validate({"id": f"post-{i:04d}", "prompt": f"a red circle {i}", "choice": choice,
                                              "images": [{"b64_json": PNG, "model": "base", "seed": i},
                                                         {"b64_json": PNG, "model": "v1", "seed": i}]})
        store.add(feedback_record(req, Limits(), FeedbackSection(), None))
    return db


def test_publish_is_atomic_checked_and_refuses_a_taken_id(tmp_path):
    registry = tmp_path / "adapters"
    art = lora_artifact(tmp_path / "run" / "artifact")
    out = publish_adapter(str(art), registry, "aligned-v1", card_extra={"feedback": {"pairs": 3}})
    assert out == str((registry / "aligned-v1").resolve())
    info = AdapterRegistry(registry).get("aligned-v1")
    assert info.kind == "lora" and info.card["feedback"] == {"pairs": 3} and info.card["method"] == "diffusion_dpo"
    assert sorted(p.name for p in registry.iterdir()) == ["aligned-v1"], "no temporary folder is left behind"
    with pytest.raises(ConfigError, match="already exists.*--replace"):
        publish_adapter(str(lora_artifact(tmp_path / "run2" / "artifact", seed=1)), registry, "aligned-v1")
    before = (registry / "aligned-v1" / "pytorch_lora_weights.safetensors").read_bytes()
    assert before == (art / "pytorch_lora_weights.safetensors").read_bytes(), "the refused publish changed nothing"
    publish_adapter(str(tmp_path / "run2" / "artifact"), registry, "aligned-v1", replace=True)
    assert AdapterRegistry(registry).get("aligned-v1").fingerprint != info.fingerprint
    assert sorted(p.name for p in registry.iterdir()) == ["aligned-v1"]


def _watch(folder: str, stop: str, out: str) -> None:
    missing = looks = 0
    Path(f"{out}.ready").touch()
    while not os.path.exists(stop):
        looks, missing = looks + 1, missing + (not os.path.isdir(folder))
    Path(out).write_text(f"{missing} {looks}")


def test_a_replaced_adapter_is_never_missing_to_a_reader(tmp_path):
    import multiprocessing as mp

    registry = tmp_path / "adapters"
    arts = [lora_artifact(tmp_path / f"art{i}", seed=i) for i in range(2)]
    publish_adapter(str(arts[0]), registry, "v1")
    stop, out = tmp_path / "stop", tmp_path / "seen"
    reader = mp.get_context("spawn").Process(target=_watch, args=(str(registry / "v1"), str(stop), str(out)))
    reader.start()
    wait_until(lambda: Path(f"{out}.ready").exists(), "the reader started", timeout=120)
    for i in range(60):  # a server replica looking the adapter up while it is replaced must find one
        publish_adapter(str(arts[(i + 1) % 2]), registry, "v1", replace=True)
    stop.touch()
    reader.join(60)
    missing, looks = map(int, out.read_text().split())
    assert looks > 0 and missing == 0, f"{missing} of {looks} looks found no adapter"
    assert sorted(p.name for p in registry.iterdir()) == ["v1"]


@pytest.mark.parametrize("bad", ["../x", "base", ".hidden", "a b", "x" * 65])
def test_publish_refuses_ids_that_are_no_adapter_ids(tmp_path, bad):
    with pytest.raises(ConfigError) as err:
        publish_adapter(str(lora_artifact(tmp_path / "a")), tmp_path / "adapters", bad)
    assert err.value.field == "publish"
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())


def test_an_artifact_the_server_cannot_serve_is_never_published(tmp_path):
    art = lora_artifact(tmp_path / "a")
    (art / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # truncated
    with pytest.raises(DiffrayError, match="cannot serve"):
        publish_adapter(str(art), tmp_path / "adapters", "broken")
    assert list((tmp_path / "adapters").iterdir()) == []


def test_export_summary_counts_pairs_with_a_preference(tmp_path):
    from diffray.serve.feedback_store import export_parquet

    db = store_with(tmp_path / "fb.db", ["left", "right", "tie", "both_bad", "left"])
    export_parquet(db, tmp_path / "fb.parquet", "png")
    s = summarize_export(tmp_path / "fb.parquet")
    assert (s.pairs, s.preferred) == (5, 3)
    assert s.prompts == ["a red circle 0", "a red circle 1", "a red circle 4"]


def test_plans_name_runs_after_the_adapter_and_train_on_the_export(tmp_path):
    export = tmp_path / "fb.parquet"
    first, second = plan_configs(REPO / "configs/diffusion_dpo.yaml", ["train.max_steps=3"], None, [], export, "v2")
    assert (first.run.name, first.data.path, first.train.max_steps, second) == ("v2", str(export), 3, None)
    first, second = plan_configs(REPO / "configs/reward_model.yaml", [], REPO / "configs/ddpo.yaml",
                                 ["train.max_steps=2"], export, "v3", reward_path="/runs/v3-reward/artifact")
    assert (first.run.name, first.method, first.data.path) == ("v3-reward", "reward_model", str(export))
    assert (second.run.name, second.method, second.train.max_steps) == ("v3", "ddpo", 2)
    assert second.ddpo.reward.name == "learned" and second.ddpo.reward.options == {"path": "/runs/v3-reward/artifact"}


@pytest.mark.parametrize("config, then, match", [
    ("lora.yaml", None, "method 'lora'; feedback trains diffusion_dpo or reward_model"),
    ("reward_model.yaml", None, "needs --then"),
    ("diffusion_dpo.yaml", "ddpo.yaml", "--then is for a reward_model job"),
    ("reward_model.yaml", "lora.yaml", "--then takes a ddpo job"),
])
def test_wrong_job_kinds_are_refused_before_anything_runs(tmp_path, config, then, match):
    with pytest.raises(ConfigError, match=match):
        plan_configs(REPO / "configs" / config, [], then and REPO / "configs" / then, [], tmp_path / "x", "v")


@pytest.mark.parametrize("overrides, then_overrides, field", [
    (["data.path=other.parquet"], [], "data.path"),  # the export is what the loop trains on
    ([], ["train.max_steps=1"], "then-set"),  # --then-set without a --then job
])
def test_overrides_the_loop_would_drop_are_refused(tmp_path, overrides, then_overrides, field):
    with pytest.raises(ConfigError) as err:
        plan_configs(REPO / "configs/diffusion_dpo.yaml", overrides, None, then_overrides, tmp_path / "x", "v")
    assert err.value.field == field


def test_run_loop_exports_trains_then_ddpo_with_the_feedback_prompts_and_publishes(tmp_path):
    db = store_with(tmp_path / "fb.db", ["left", "right", "tie"])
    trained = []

    def train(cfg):  # a finished run of that name is resumed: its artifact as it is
        trained.append(cfg)
        art = tmp_path / "runs" / cfg.run.name / "artifact"
        if not art.exists():
            lora_artifact(art, seed=len(trained))
        return RunResult(str(art.parent), str(art), str(art.parent / "logs"), 2, 0.7, 0.6, 1.0, {})

    result = run_loop(db, tmp_path / "adapters", "v2", REPO / "configs/reward_model.yaml", [],
                      then=REPO / "configs/ddpo.yaml", then_overrides=["train.max_steps=1"],
                      export=tmp_path / "fb.parquet", train=train, echo=lambda _: None)
    reward_cfg, ddpo_cfg = trained
    digest = sha256_file(tmp_path / "fb.parquet")[:8]
    assert reward_cfg.data.path == str(tmp_path / "fb.parquet") and reward_cfg.run.name == f"v2-{digest}-reward"
    assert ddpo_cfg.run.name == f"v2-{digest}"
    assert ddpo_cfg.ddpo.reward.options == {"path": str(tmp_path / f"runs/v2-{digest}-reward/artifact")}
    assert Path(ddpo_cfg.ddpo.prompts_file).read_text().splitlines() == ["a red circle 0", "a red circle 1"]
    card = AdapterRegistry(tmp_path / "adapters").get("v2").card
    assert card["feedback"]["pairs"] == 3 and card["feedback"]["preferred"] == 2
    assert (tmp_path / "adapters/v2/pytorch_lora_weights.safetensors").read_bytes() == \
        (tmp_path / f"runs/v2-{digest}/artifact/pytorch_lora_weights.safetensors").read_bytes()
    assert result.adapter_id == "v2" and len(result.runs) == 2

    # the same feedback again (replacing): the same runs, which resume; new feedback: new runs
    run_loop(db, tmp_path / "adapters", "v2", REPO / "configs/diffusion_dpo.yaml", [], replace=True,
             export=tmp_path / "fb.parquet", train=train, echo=lambda _: None)
    assert trained[-1].run.name == f"v2-{digest}"
    store_with(tmp_path / "fb.db", ["left", "right", "tie", "right"])
    run_loop(db, tmp_path / "adapters", "v2", REPO / "configs/diffusion_dpo.yaml", [], replace=True,
             export=tmp_path / "fb.parquet", train=train, echo=lambda _: None)
    assert trained[-1].run.name.startswith("v2-") and trained[-1].run.name != f"v2-{digest}"


def test_run_loop_refuses_feedback_without_preferences_and_taken_ids_before_training(tmp_path, monkeypatch):
    db = store_with(tmp_path / "fb.db", ["tie", "both_bad"])

    def train(cfg):
        raise AssertionError("nothing may train")

    with pytest.raises(DiffrayError, match="no pair prefers one image"):
        run_loop(db, tmp_path / "adapters", "v2", REPO / "configs/diffusion_dpo.yaml", [],
                 export=tmp_path / "fb.parquet", train=train, echo=lambda _: None)
    assert (tmp_path / "fb.parquet").is_file()  # a file the user named is theirs
    monkeypatch.chdir(tmp_path)  # the round's own file goes under ./outputs/feedback: left behind for nothing
    with pytest.raises(DiffrayError, match="no pair prefers one image"):
        run_loop(db, tmp_path / "adapters", "v2", REPO / "configs/diffusion_dpo.yaml", [], train=train,
                 echo=lambda _: None)
    assert list((tmp_path / "outputs" / "feedback").iterdir()) == []
    lora_artifact(tmp_path / "adapters" / "v1")
    with pytest.raises(ConfigError, match="already exists"):
        run_loop(db, tmp_path / "adapters", "v1", REPO / "configs/diffusion_dpo.yaml", [], train=train)
    with pytest.raises(DiffrayError, match="no feedback store"):
        run_loop(tmp_path / "missing.db", tmp_path / "adapters", "v3", REPO / "configs/diffusion_dpo.yaml", [],
                 export=tmp_path / "x.parquet", train=train)


def test_ddpo_prompts_file_keeps_each_feedback_prompt_whole(tmp_path):
    from diffray.trainers.components.prompts import read_prompts

    db = store_with(tmp_path / "fb.db", ["left"])
    for i, prompt in enumerate(["a red\rcircle", "a blue\u2028square", "a green\r\ntriangle"]):
        req = FeedbackRequest.model_validate({"prompt": prompt, "choice": "right", "id": f"line-{i:04d}",
                                              "images": [{"b64_json": PNG}, {"b64_json": PNG}]})
        FeedbackStore(db).add(feedback_record(req, Limits(), FeedbackSection(), None))
    trained = []

    def train(cfg):
        trained.append(cfg)
        return RunResult(str(tmp_path), str(lora_artifact(tmp_path / f"art{len(trained)}")), "", 1, 0, 0, 1, {})

    run_loop(db, tmp_path / "adapters", "v2", REPO / "configs/reward_model.yaml", [], then=REPO / "configs/ddpo.yaml",
             export=tmp_path / "fb.parquet", train=train, echo=lambda _: None)
    assert read_prompts([], trained[1].ddpo.prompts_file, "ddpo.prompts_file") == [
        "a red circle 0", "a red circle", "a blue square", "a green triangle"]


@pytest.mark.parametrize("adapter_id", ["_v1", "-v1"])
def test_an_id_no_run_can_be_named_after_is_refused_naming_publish(tmp_path, monkeypatch, capsys, adapter_id):
    from testkit.cli import diffray

    db = store_with(tmp_path / "fb.db", ["left"])
    code, text = diffray(["feedback", "train", REPO / "configs/diffusion_dpo.yaml", f"--publish={adapter_id}",
                          "--db", db, "--adapters-dir", tmp_path / "adapters"], monkeypatch, capsys)
    assert code == 2 and text.startswith("diffray: error: publish:") and "run.name" not in text, text
    exports = [p for g in (f"{adapter_id}-*.parquet", f".{adapter_id}.export-*")
               for p in (REPO / "outputs/feedback").glob(g)]
    assert not (tmp_path / "adapters").exists() and not exports


def test_each_rounds_default_export_is_its_own_file_so_an_earlier_run_keeps_its_data(tmp_path, monkeypatch):
    """A --replace round on new feedback once overwrote outputs/feedback/<id>.parquet: the earlier run's config and
    the adapter card it published then named a file holding the later round's pairs."""
    monkeypatch.chdir(tmp_path)  # the default export goes under ./outputs/feedback
    db = store_with(tmp_path / "fb.db", ["left", "right"])
    trained = []

    def train(cfg):
        trained.append(cfg)
        art = tmp_path / "runs" / cfg.run.name / "artifact"
        if not art.exists():
            lora_artifact(art, seed=len(trained))
        return RunResult(str(art.parent), str(art), str(art.parent / "logs"), 2, 0.7, 0.6, 1.0, {})

    def round_(replace: bool):
        run_loop(db, tmp_path / "adapters", "v2", REPO / "configs/diffusion_dpo.yaml", [], replace=replace,
                 train=train, echo=lambda _: None)
        return trained[-1], AdapterRegistry(tmp_path / "adapters").get("v2").card["feedback"]["export"]

    first, first_card_export = round_(False)
    first_data = Path(first.data.path)
    first_bytes = first_data.read_bytes()
    again, _ = round_(True)  # the same feedback: the same run, trained on the same file (it resumes)
    assert (again.run.name, again.data.path) == (first.run.name, first.data.path)
    store_with(db, ["left", "right", "tie", "right"])
    later, later_card_export = round_(True)  # new feedback: a new run on a new file
    assert first_data.read_bytes() == first_bytes and summarize_export(first_data).pairs == 2
    assert later.run.name != first.run.name and summarize_export(Path(later.data.path)).pairs == 4
    assert (first_card_export, later_card_export) == (first.data.path, later.data.path)
    folder = tmp_path / "outputs" / "feedback"
    assert first_data == folder / f"{first.run.name}.parquet"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{r.run.name}.parquet" for r in (first, later))


@pytest.mark.parametrize("linked", [False, True])
def test_replacing_a_bare_lora_file_publishes_the_folder_and_leaves_no_file_behind(tmp_path, linked):
    """A local --replace over `<id>.safetensors` once left the file beside the new `<id>/` folder (object storage
    removed it): the old LoRA served again as soon as the folder went. Nothing is removed without --replace, nor
    by a replace that fails its checks; a link is removed, never its target."""
    registry = tmp_path / "adapters"
    registry.mkdir()
    weights = (lora_artifact(tmp_path / "kohya", seed=5) / "pytorch_lora_weights.safetensors").read_bytes()
    bare = registry / "v1.safetensors"
    if linked:
        (tmp_path / "elsewhere.safetensors").write_bytes(weights)
        bare.symlink_to(tmp_path / "elsewhere.safetensors")
    else:
        bare.write_bytes(weights)
        assert AdapterRegistry(registry).get("v1").weights == "v1.safetensors"
    new = lora_artifact(tmp_path / "run" / "artifact", seed=1)
    with pytest.raises(ConfigError, match="already exists.*--replace"):
        publish_adapter(str(new), registry, "v1")
    broken = lora_artifact(tmp_path / "broken", seed=2)
    (broken / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(DiffrayError, match="cannot serve"):
        publish_adapter(str(broken), registry, "v1", replace=True)
    assert [p.name for p in registry.iterdir()] == ["v1.safetensors"] and bare.read_bytes() == weights

    out = publish_adapter(str(new), registry, "v1", replace=True)
    assert sorted(p.name for p in registry.iterdir()) == ["v1"]
    info = AdapterRegistry(registry).get("v1")
    assert info.path == out and info.weights_name == "pytorch_lora_weights.safetensors"
    assert (Path(out) / info.weights_name).read_bytes() == (new / "pytorch_lora_weights.safetensors").read_bytes()
    assert [a.id for a in AdapterRegistry(registry).list()] == ["v1"]
    if linked:
        assert (tmp_path / "elsewhere.safetensors").read_bytes() == weights
