"""Experiment trackers (`diffray.trainers.tracking`) driven in-process, as rank 0's `MetricsLogger` drives
them: MLflow's default local store and W&B offline read back with their own clients, a failing tracking
server that only warns, the config section and its errors. (The tracked Ray training run and Tune search
are in tests/integration: test_lora_train.py and test_tune.py.)"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import threading

import pytest
from PIL import Image

from diffray.config import TrackingSection, validate_as
from diffray.errors import ConfigError
from diffray.trainers import tracking
from diffray.trainers.session import MetricsLogger
from testkit import wandb_offline

PARAMS = {"method": "lora", "lora": {"rank": 4, "target_modules": ["to_q", "to_k"]}, "optim": {"lr": 1e-4}}
STEPS = {1: {"loss": 0.5, "lr": 1e-4}, 2: {"loss": 0.25, "lr": 1e-4, "val_loss": 0.3}, 3: {"loss": 0.125, "lr": 2e-5}}


def drive(logger: MetricsLogger, tmp_path) -> None:
    """What the loop sends over a 3-step run: every step's metrics, a grid at step 2, the artifact + card."""
    for step, metrics in STEPS.items():
        logger.step(step, metrics)
        if step == 2:
            logger.image("validation", step, Image.new("RGB", (16, 8), (255, 0, 0)))
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model_card.json").write_text(json.dumps({"method": "lora", "steps": 3}))
    logger.artifact(artifact)
    logger.close()


def test_mlflow_default_store_holds_params_every_step_images_and_the_artifact(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    section = validate_as(TrackingSection, {"mlflow": {"experiment": "exp"}})
    log_dir = tmp_path / "logs"
    drive(MetricsLogger(str(log_dir), True, 0, tracking.open_trackers(section, "run-a", PARAMS, str(log_dir))), tmp_path)

    uri = f"sqlite:///{log_dir / 'mlflow.db'}"  # the default store: in the run's log dir
    runs = mlflow.search_runs(experiment_names=["exp"], output_format="list")
    assert mlflow.get_tracking_uri() == uri and len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params["lora.rank"] == "4" and run.data.params["optim.lr"] == "0.0001"
    assert run.data.params["lora.target_modules"] == "['to_q', 'to_k']"
    client = MlflowClient(uri)
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history == [(1, 0.5), (2, 0.25), (3, 0.125)]  # every step, TensorBoard's names
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/val_loss")] == [(2, 0.3)]
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"artifact", "images"} <= paths
    assert [a.path for a in client.list_artifacts(run.info.run_id, "artifact")] == ["artifact/model_card.json"]
    card = client.download_artifacts(run.info.run_id, "artifact/model_card.json", str(tmp_path))
    assert json.loads(open(card).read()) == {"method": "lora", "steps": 3}
    assert any(p.endswith(".png") for p in _walk(client, run.info.run_id, "images"))
    assert (log_dir / "mlflow-artifacts").is_dir()  # artifacts beside the store, not in the working dir


def _walk(client, run_id: str, path: str) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _walk(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_wandb_offline_run_has_the_same_metrics_and_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")  # the section's mode must win over the environment
    section = validate_as(TrackingSection, {"wandb": {"project": "p", "mode": "offline"}})
    log_dir = tmp_path / "logs"
    drive(MetricsLogger(str(log_dir), True, 0, tracking.open_trackers(section, "run-w", PARAMS, str(log_dir))), tmp_path)

    run = wandb_offline.run_file(log_dir)
    rows = wandb_offline.history(run)
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert [r.get("train/val_loss") for r in rows] == [None, 0.3, None]
    assert rows[1]["validation/_type"] == "image-file" and (rows[1]["validation/width"], rows[1]["validation/height"]) == (16, 8)
    config = wandb_offline.config(run)
    assert config["lora"] == {"rank": 4, "target_modules": ["to_q", "to_k"]} and config["method"] == "lora"
    arts = [r.artifact for r in wandb_offline.records(run) if r.WhichOneof("record_type") == "artifact"]
    assert [(a.name, a.type) for a in arts] == [("run-w-artifact", "model")]
    card_md5 = base64.b64encode(hashlib.md5((tmp_path / "artifact" / "model_card.json").read_bytes()).digest()).decode()
    assert [(e.path, e.digest) for e in arts[0].manifest.contents] == [("model_card.json", card_md5)]


class FailingServer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(503)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_failing_tracking_server_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        section = validate_as(TrackingSection, {"mlflow": {"tracking_uri": f"http://127.0.0.1:{server.server_port}"}})
        log_dir = tmp_path / "logs"
        with caplog.at_level(logging.WARNING, logger="diffray.trainers.tracking"):
            logger = MetricsLogger(str(log_dir), True, 0, tracking.open_trackers(section, "r", PARAMS, str(log_dir)))
            drive(logger, tmp_path)
    finally:
        server.shutdown()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow tracking is off") and "503" in warnings[0]
    steps = [e["step"] for e in map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3]  # the local log (and TensorBoard) carry on


def test_tracking_config_defaults_off_and_errors_name_the_field():
    assert TrackingSection().mlflow is None and TrackingSection().wandb is None  # TensorBoard alone, as before
    assert validate_as(TrackingSection, {"wandb": {}}).wandb.mode == "offline"
    with pytest.raises(ConfigError, match=r"wandb\.mode: Input should be 'offline' or 'online'"):
        validate_as(TrackingSection, {"wandb": {"mode": "cloud"}})
    with pytest.raises(ConfigError, match=r"mlflow\.experment: unknown key \(allowed: experiment, tracking_uri\)"):
        validate_as(TrackingSection, {"mlflow": {"experment": "x"}})


def test_a_missing_tracker_library_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # what an install without the extra looks like
    with pytest.raises(ConfigError, match=r"tracking\.wandb needs the wandb package: pip install 'diffray\[tracking\]'"):
        tracking.check(validate_as(TrackingSection, {"wandb": {}}))
    tracking.check(TrackingSection())  # nothing asked, nothing imported


def test_flatten_gives_dotted_keys():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
