"""`diffray submit` without a cluster: the job's command line, storage path and checks before upload."""

from __future__ import annotations

import io
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from diffray.errors import ConfigError
from diffray.submit import entrypoint, precheck, with_storage_path
from testkit.cli import diffray

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def http_server_that_records():
    """A local HTTP server answering 404 to everything; yields (its URL, the paths it was asked for)."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server hook)
            asked.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("env", ["RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"])
def test_the_address_given_is_the_server_asked_whatever_the_environment_says(env, monkeypatch, capsys, tmp_path):
    """Ray's JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given:
    `--address` named one cluster while the job (and a token meant for a loopback address) went to another."""
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))  # no RAY_AUTH_MODE set behind our back
    with http_server_that_records() as (named, asked_named), http_server_that_records() as (other, asked_other):
        monkeypatch.setenv(env, other)
        code, out = diffray(["submit", "--address", named, "--", "generate", "--prompt", "x"], monkeypatch, capsys)
    assert code != 0 and f"cannot reach the Ray job server at {named}" in out, out
    assert asked_named and not asked_other, (asked_named, asked_other)


def test_an_http_ray_address_is_the_default_as_for_ray_job_submit(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    with http_server_that_records() as (url, asked):
        monkeypatch.setenv("RAY_ADDRESS", url)
        code, out = diffray(["submit", "--", "generate", "--prompt", "x"], monkeypatch, capsys)
    assert code != 0 and f"cannot reach the Ray job server at {url}" in out and asked, out


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


def test_a_working_dir_over_the_job_servers_limit_is_one_line_naming_what_to_leave_out(monkeypatch, capsys, tmp_path):
    """Above the job server's 100 MiB request limit the upload failed after zipping and sending everything, as
    'internal error: RuntimeError: Request failed with status code 413: Maximum request body size 104857600
    exceeded', naming nothing to leave out. Sizes are counted on the files Ray's walk keeps."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "job.yaml").write_text("method: lora\n")
    for folder in ("data", "runs"):  # sparse files: no disk used
        (tmp_path / folder).mkdir()
        with open(tmp_path / folder / "big.bin", "wb") as f:
            f.truncate(101 * 2**20)
    (tmp_path / ".gitignore").write_text("/ignored/\n")
    (tmp_path / "ignored").mkdir()
    with open(tmp_path / "ignored" / "big.bin", "wb") as f:
        f.truncate(101 * 2**20)
    args = ["submit", "--working-dir", str(tmp_path), "--address", "http://127.0.0.1:9"]
    code, out = diffray([*args, "--", "generate", "--prompt", "x"], monkeypatch, capsys)
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "at least 101 MiB to upload, over the Ray job server's limit of 100 MiB; largest counted: data (101 MiB)" \
        in out, out
    assert "--exclude" in out and "ignored" not in out.split("largest counted:")[1]
    code, out = diffray([*args, "--exclude", "data", "--", "generate", "--prompt", "x"], monkeypatch, capsys)
    assert code == 1 and "cannot reach the Ray job server at http://127.0.0.1:9" in out, out


def test_counting_the_upload_stops_at_the_limit(monkeypatch, capsys, tmp_path):
    """`diffray submit --working-dir /usr` counted every file (over 100 s) before refusing: the count stops once
    it is over the limit. Each of three folders holds a file over it, so whatever order the walk takes, it meets
    one of them before it reaches a second folder."""
    from diffray.submit import runtime_env, upload_files

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    wd = tmp_path / "wd"
    for folder in ("d1", "d2", "d3"):
        (wd / folder).mkdir(parents=True)
        for i in range(20):
            (wd / folder / f"small{i}.txt").write_text("x")
        with open(wd / folder / "big.bin", "wb") as f:  # sparse: no disk used
            f.truncate(101 * 2**20)
    counted = upload_files(wd, runtime_env(wd, {}, [])["excludes"])
    assert [name.endswith("big.bin") for name in counted].count(True) == 1, sorted(counted)
    assert len({name.split("/")[0] for name in counted}) == 1 and len(counted) <= 21, sorted(counted)
    code, out = diffray(["submit", "--working-dir", str(wd), "--address", "http://127.0.0.1:9", "--", "generate",
                         "--prompt", "x"], monkeypatch, capsys)
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert re.search(r"at least 101 MiB to upload, over the Ray job server's limit of 100 MiB; largest counted: "
                     r"d[123] \(101 MiB\)\. Leave", out), out


def test_local_storage_data_and_model_paths_are_warned_about_not_uris_hub_ids_or_relative_paths():
    """An absolute run.storage_path passed silently, though with more than one node each worker wrote its
    checkpoints to its own disk; so did an absolute data.path or model.path, which the nodes read from their own
    disks too (inside the working dir as well: the nodes unpack the upload elsewhere)."""
    def warnings(*overrides):
        err = io.StringIO()
        precheck(["train", "configs/lora.yaml", *overrides], REPO, err)
        return err.getvalue().splitlines()

    assert warnings("run.storage_path=/mnt/shared/runs") == [
        "diffray: warning: run.storage_path=/mnt/shared/runs is a local path: every node of the cluster must see it "
        "(a shared filesystem); else pass --storage-path (object storage, e.g. s3://bucket/runs)"]
    for storage, kind in [("~/runs", "a local path"), ("runs", "relative")]:  # one line each, never both
        assert [w.split(": ")[2] for w in warnings(f"run.storage_path={storage}")] == [
            f"run.storage_path={storage} is {kind}"]
    data_model = warnings("run.storage_path=s3://b/runs", "data.path=/home/me/data", f"model.path={REPO}/models/sd")
    assert data_model == [
        f"diffray: warning: {field}={path} is an absolute local path: the job reads it on the cluster's nodes, not "
        "from the upload; every node must see it (a shared filesystem), else use object storage (s3://...) or a "
        "path relative to the working dir" for field, path in [("data.path", "/home/me/data"),
                                                              ("model.path", f"{REPO}/models/sd")]]
    for fine in (["data.path=s3://b/data", "model.path=stable-diffusion-v1-5/stable-diffusion-v1-5"],
                 ["data.path=data/shapes", "model.path=models/sd15"]):
        assert warnings("run.storage_path=gs://b/runs", *fine) == [], fine


def test_local_path_warnings_do_not_stop_the_submission(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "lora.yaml").write_text((REPO / "configs" / "lora.yaml").read_text())
    code, out = diffray(["submit", "--working-dir", str(tmp_path), "--address", "http://127.0.0.1:9",
                         "--storage-path", "/mnt/shared/runs", "--", "train", "configs/lora.yaml",
                         "data.path=/srv/data"], monkeypatch, capsys)
    assert code == 1 and "cannot reach the Ray job server at http://127.0.0.1:9" in out, out
    assert "warning: run.storage_path=/mnt/shared/runs is a local path" in out, out
    assert "warning: data.path=/srv/data is an absolute local path" in out, out


def test_a_config_the_upload_leaves_out_is_refused_before_uploading(monkeypatch, capsys, tmp_path):
    """The config was checked here, then the job failed on the cluster, which never got it: a file outside the
    working dir (an absolute path, `../`), or one the upload excludes (`outputs/`, .gitignore, .rayignore)."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    wd = tmp_path / "wd"
    for folder in ("configs", "outputs", "private"):
        (wd / folder).mkdir(parents=True)
        (wd / folder / "lora.yaml").write_text((REPO / "configs" / "lora.yaml").read_text())
    (tmp_path / "lora.yaml").write_text((REPO / "configs" / "lora.yaml").read_text())
    (wd / ".rayignore").write_text("private/\n")
    args = ["submit", "--working-dir", str(wd), "--address", "http://127.0.0.1:9", "--", "train"]
    for config, why in [(str(tmp_path / "lora.yaml"), "outside the working dir"), ("../lora.yaml", "outside"),
                        ("outputs/lora.yaml", "left out of the upload"), ("private/lora.yaml", "left out")]:
        code, out = diffray([*args, config, "run.storage_path=s3://b/runs"], monkeypatch, capsys)
        assert code == 2 and f"diffray: error: {config}: {why}" in out, (config, out)
    code, out = diffray([*args, "configs/lora.yaml", "run.storage_path=s3://b/runs"], monkeypatch, capsys)
    assert code == 1 and "cannot reach the Ray job server at http://127.0.0.1:9" in out, out
    (tmp_path / "link").symlink_to(wd)  # an absolute path through a symlinked dir (macOS's /tmp) is inside
    args[2] = str(tmp_path / "link")
    code, out = diffray([*args, str(tmp_path / "link" / "configs" / "lora.yaml"), "run.storage_path=s3://b/runs"],
                        monkeypatch, capsys)
    assert code == 1 and "cannot reach the Ray job server at http://127.0.0.1:9" in out, out


def test_a_job_server_url_in_ray_address_is_one_line_for_commands_that_join_a_cluster(monkeypatch, capsys, tmp_path):
    """Ray's job docs have users export RAY_ADDRESS=http://127.0.0.1:8265 for `ray job submit`; `diffray train` in
    that shell ended in an 'internal error' from `ray.init` (before any cluster starts: none is started here)."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    code, out = diffray(["train", REPO / "configs" / "lora.yaml", f"run.storage_path={tmp_path}"], monkeypatch, capsys)
    assert code == 2 and out.strip().splitlines()[-1].startswith(
        "diffray: error: RAY_ADDRESS=http://127.0.0.1:9 is a job server URL"), out
    assert "internal error" not in out


def test_diffrays_own_output_folders_are_never_uploaded_even_without_a_gitignore(tmp_path):
    """A job's working dir outside this repository has no .gitignore: runs/ and outputs/ stayed home, but the
    serving feedback store (people's prompts and images) and the logs of URI runs (./runs-logs) were uploaded."""
    from diffray.submit import runtime_env, upload_files

    for name in ("configs/lora.yaml", "runs/a/x.json", "outputs/grid.png", "feedback/feedback.db",
                 "runs-logs/lora/driver.log", "data/feedback/ok.txt", ".venv/bin/python"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    env = runtime_env(tmp_path, {}, [])
    assert sorted(upload_files(tmp_path, env["excludes"])) == ["configs/lora.yaml", "data/feedback/ok.txt"]


def test_dotenv_files_are_never_uploaded_and_the_user_is_told(monkeypatch, capsys, tmp_path):
    """A working dir with a .env (API keys, storage credentials) and no .gitignore had it zipped and uploaded to
    the cluster's object store with the job."""
    from diffray.submit import runtime_env, upload_files

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    wd = tmp_path / "wd"
    for name in ("configs/lora.yaml", ".env", ".env.production", "sub/.env", "envs/a.txt", "environment.yml"):
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text("x")
    assert sorted(upload_files(wd, runtime_env(wd, {}, [])["excludes"])) == [
        "configs/lora.yaml", "environment.yml", "envs/a.txt"]
    args = ["submit", "--working-dir", str(wd), "--address", "http://127.0.0.1:9", "--", "generate", "--prompt", "x"]
    code, out = diffray(args, monkeypatch, capsys)
    assert code == 1 and "cannot reach the Ray job server at http://127.0.0.1:9" in out, out
    assert ("diffray: left out of the upload: .env, .env.production (secrets stay on this machine; give the job "
            "its variables with --env KEY=VALUE)") in out, out
    (wd / ".env").unlink()
    (wd / ".env.production").unlink()
    code, out = diffray(args, monkeypatch, capsys)
    assert code == 1 and "left out of the upload" not in out, out


def test_a_config_only_in_the_clusters_image_is_submitted_with_a_warning(monkeypatch, capsys, tmp_path):
    """`diffray submit -- train /app/configs/lora.yaml` for a config baked into the cluster's image was refused
    ("no such config under the working dir"); one that exists here outside the working dir still is."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    (tmp_path / "wd").mkdir()
    image_config = str(tmp_path / "image" / "configs" / "lora.yaml")
    args = ["submit", "--working-dir", str(tmp_path / "wd"), "--address", "http://127.0.0.1:9", "--", "train"]
    code, out = diffray([*args, image_config, "run.storage_path=s3://b/runs"], monkeypatch, capsys)
    assert code == 1 and "cannot reach the Ray job server at http://127.0.0.1:9" in out, out
    assert (f"diffray: warning: {image_config} is not on this machine: the job reads it from the cluster's nodes "
            "(an image path), so it is not checked here") in out, out
    code, out = diffray([*args, "configs/lora.yaml"], monkeypatch, capsys)
    assert code == 2 and "configs/lora.yaml: no such config under the working dir" in out, out
