"""The `diffray` CLI as a user drives it: README commands end to end, and a driver killed mid-run
that resumes when the same command is run again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from testkit.wait import wait_until

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
DIFFRAY = str(Path(sys.executable).parent / "diffray")


def run(args: list[str], env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([DIFFRAY, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


@pytest.mark.eval  # CI: the README's train block runs `diffray train` and `generate` through the CLI
def test_readme_commands_end_to_end(tmp_path, tiny_model_path):
    # `init-model`, `data sample` and `config show` run as commands in the README's data block
    # (tests/e2e/test_readme.py); here their outputs come from the same library calls.
    from diffray.data.sample import write_sample_dataset

    model, runs = Path(tiny_model_path), tmp_path / "runs"
    data = write_sample_dataset(tmp_path / "sample")
    assert (model / "controlnet" / "config.json").is_file() and (data / "train" / "metadata.jsonl").is_file()

    # No RAY_ADDRESS: the CLI starts (and stops) its own local cluster.
    env = {"RAY_ADDRESS": ""}
    proc = run(["train", "configs/lora.yaml", f"model.path={model}", f"data.path={data / 'train'}",
                f"run.storage_path={runs}", "train.max_steps=12", "train.checkpoint_every=6",
                "train.validate_every=null", "scaling.num_workers=1"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # No terminal: a plain progress line every max(1, 12 // 10) step, and none of Ray's own output.
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("step ")]
    assert [int(ln.split()[1].split("/")[0]) for ln in progress] == list(range(1, 13)), proc.stderr[-3000:]
    assert all(re.search(r"/12 loss=\d+\.\d{4} lr=\S+ \d+\.\d samples/s eta \d+:\d\d$", ln) for ln in progress)
    assert "Execution plan" not in proc.stderr and "RayTrainWorker" not in proc.stderr
    assert len(proc.stderr.splitlines()) <= 20, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: steps=12 loss first10=") and "artifact=" in summary and "wall=" in summary
    artifact = Path(summary.split("artifact=")[1].split()[0])
    assert (artifact / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((artifact / "diffray_card.json").read_text())["base_model"] == str(model)

    out = tmp_path / "grid.png"
    gen = run(["generate", "--adapter", str(artifact), "-p", "a red circle on a blue background",
               "--compare-base", "--num-images", "2", "--steps", "4", "--out", str(out)])
    assert gen.returncode == 0, gen.stderr[-2000:]
    with Image.open(out) as grid:
        assert grid.height > 2 * 64 and grid.width > 2 * 64  # 2 rows (base, lora) x 2 seeds

    # Controlled generation with the model's own ControlNet on an edge map of a sample image (the data
    # commands, `data inspect/prepare/condition`, are the README's data block: tests/e2e/test_readme.py).
    from diffray.data.conditioning import make_preprocessor

    control = tmp_path / "edges.png"
    first = json.loads((data / "train" / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    with Image.open(data / "train" / first) as img:
        make_preprocessor("canny")(img.convert("RGB")).save(control)
    cn = run(["generate", "--controlnet", str(model / "controlnet"), "--control-image", str(control), "-p", "a circle",
              "--model", str(model), "--steps", "2", "--compare-base", "--out", str(tmp_path / "cn.png")])
    assert cn.returncode == 0 and (tmp_path / "cn.png").is_file(), cn.stderr[-2000:]
    mismatch = run(["generate", "--control-image", str(control), "-p", "x", "--model", str(model)])
    assert mismatch.returncode == 2 and mismatch.stderr.strip() == "diffray: error: --control-image needs --controlnet"

    bad = run(["generate", "--adapter", str(tmp_path), "-p", "x", "--model", str(model)])
    assert bad.returncode == 2 and "holds none of pytorch_lora_weights.safetensors" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow  # default-suite budget; the workers' SIGKILL drills stay in the default suite
def test_driver_killed_and_rerun_resumes(ray_cluster, tmp_path):
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    runs = tmp_path / "runs"
    args = [DIFFRAY, "train", "configs/lora.yaml", f"run.storage_path={runs}", "run.name=driver-kill",
            "train.max_steps=40", "train.checkpoint_every=10", "train.validate_every=null"]
    metrics = runs / "driver-kill" / "logs" / "metrics.jsonl"
    driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def last_step() -> int:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return max((json.loads(x).get("step", 0) for x in lines if '"loss"' in x), default=0)

    def driver_alive() -> None:
        assert driver.poll() is None, "driver ended before it was killed"

    last = wait_until(lambda: (n := last_step()) >= 25 and n, "step 25 in metrics.jsonl", timeout=300,
                      alive=driver_alive)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert last >= 25

    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("done: steps=40 ")
    events = [json.loads(x) for x in metrics.read_text().splitlines()]
    starts = [e["resumed_from_step"] for e in events if e.get("event") == "start"]
    assert starts[0] == 0 and len(starts) == 2
    assert starts[1] >= 10 and starts[1] % 10 == 0 and starts[1] <= last, starts
    after = [e["step"] for e in events[events.index(next(e for e in events if e.get("resumed_from_step") == starts[1]
                                                           and e.get("event") == "start")):] if "loss" in e]
    assert after[0] == starts[1] + 1 and after[-1] == 40


@pytest.mark.slow  # two training runs of the CLI (~100 s); CI's slow suite runs it
def test_ctrl_c_during_training_exits_130_saying_how_to_resume_and_the_rerun_resumes(ray_cluster, tmp_path):
    # Ray Train's SIGINT handler aborts the run and calls sys.exit(0): `diffray train` ended with status 1 and
    # nothing on the terminal, as if it had failed, and its handler stayed on after fit().
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    runs = tmp_path / "runs"
    args = [DIFFRAY, "train", "configs/lora.yaml", f"run.storage_path={runs}", "run.name=ctrl-c", "train.max_steps=30",
            "train.checkpoint_every=5", "train.validate_every=null", "model.path=builtin:tiny-random"]
    metrics = runs / "ctrl-c" / "logs" / "metrics.jsonl"
    driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)

    def steps() -> list[int]:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return [json.loads(x)["step"] for x in lines if '"loss"' in x]

    def driver_alive() -> None:
        assert driver.poll() is None, "driver ended before Ctrl-C"

    wait_until(lambda: len(steps()) >= 12, "step 12 in metrics.jsonl", timeout=300, alive=driver_alive)
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err[-2000:]
    assert "diffray: warning: training run 'ctrl-c' interrupted; its checkpoints are kept: rerun the same command " \
           "to resume" in err
    last = max(steps())
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("done: steps=30 ")
    events = [json.loads(x) for x in metrics.read_text().splitlines()]
    starts = [e["resumed_from_step"] for e in events if e.get("event") == "start"]
    assert len(starts) == 2 and 5 <= starts[1] <= last and starts[1] % 5 == 0, (starts, last)
