"""README.md's command blocks, run as written from a fresh folder holding configs/, so the docs cannot
drift; and `diffray demo` (what `make demo` runs after setup) in a terminal, where it must stay quiet.

Every ```bash block in the README carries a comment line right above it that this test reads:
`<!-- test: default, id=NAME -->` (run in the default suite), `<!-- test: slow, id=NAME -->` (slow
suite), `<!-- test: slow, server, id=NAME -->` (a server: started in the background until the next
blocks are done) or `<!-- test: skip (why) -->` (not runnable here, e.g. needs a running cluster).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from testkit.procs import interrupt_group
from testkit.wait import wait_until

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARKER = re.compile(r"<!--\s*test:\s*(.*?)\s*-->", re.S)
SERVER = "http://127.0.0.1:8000"  # configs/serve.yaml, as the README's requests use it

# What must exist after a block ran (paths under the work folder), beyond every command exiting 0.
EXPECT = {
    "data": ["models/tiny-sd/model_index.json", "data/sample/train/metadata.jsonl", "outputs/contact_sheet.png",
             "data/pairs/metadata.jsonl", "data/pairs/conditioning/00000000.png"],
    "train": ["outputs/demo_grid.png", "runs/lora-star/artifact/pytorch_lora_weights.safetensors",
              "runs/my-lora/artifact/pytorch_lora_weights.safetensors", "outputs/generated.png",
              "runs/diffusion-dpo/artifact/pytorch_lora_weights.safetensors",
              "outputs/eval/prompts/results.json", "outputs/eval/star/grid.png", "outputs/kohya/lora-star.safetensors"],
    "methods": ["runs/dreambooth-sample/artifact", "runs/textual-inversion-sample/artifact/learned_embeds.safetensors",
                "runs/controlnet-sample/artifact/config.json", "outputs/generated.png"],
    "world": ["data/world/dataset.json", "data/world/part-00000.parquet", "data/stars/dataset.json"],
    "requests": ["adapters/my-lora/pytorch_lora_weights.safetensors", "outputs/generated-0-0.png"],
}

# What a block must print (regular expressions over its stdout): the data commands' counts.
SAYS = {
    "data": [r": 32 rows, 32 usable, 0 would be quarantined", r"train: latent cache (\S+)",
             r"wrote 32 pairs to \S*data/pairs \(0 quarantined\)", r"rank: 16"],
}


@dataclass
class Block:
    line: int  # of the opening fence in README.md
    marker: str | None
    script: str

    @property
    def kind(self) -> str:
        m = (self.marker or "").split("(")[0]
        return ("skip" if m.startswith("skip") else "eval" if "eval" in m else "slow" if "slow" in m
                else "default" if "default" in m else "?")

    @property
    def server(self) -> bool:
        return "server" in (self.marker or "").split("(")[0]

    @property
    def id(self) -> str:
        m = re.search(r"id=([\w-]+)", self.marker or "")
        return m.group(1) if m else f"line{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """Every ```bash block with the test marker (if any) on the last non-empty line above it."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            above = "\n".join(lines[max(0, i - 3):i])
            markers = MARKER.findall(above)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append(Block(i + 1, markers[-1] if markers else None, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks((REPO / "README.md").read_text())


def test_every_command_block_says_where_it_runs():
    assert BLOCKS and all(b.kind in ("default", "slow", "eval", "skip") for b in BLOCKS), \
        [(b.line, b.marker) for b in BLOCKS if b.kind == "?"]
    assert {b.id for b in BLOCKS if b.kind != "skip"} >= set(EXPECT) | {"serve"}
    planted = readme_blocks("text\n\n```bash\ndiffray demo\n```\n")
    assert [b.kind for b in planted] == ["?"], "an unmarked block is caught"


@pytest.fixture()
def workdir(tmp_path) -> Path:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    return tmp_path


def block_env(ray_address: str | None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address  # the session's cluster: no start-up per command
    return env


# Ray's, Ray Data's, Ray Train's and DeepSpeed's own output: never on a diffray terminal unless --verbose.
NOISE = ("Execution plan", "Starting execution of Dataset", "TrainingReport", "(RayTrainWorker",
         "(SplitCoordinator", "(TrainController", "Started a local Ray instance", "DeepSpeed", "Setting accelerator",
         "RayDeprecationWarning")


# Appended to the README's `diffray demo` line (as test_tune.py appends shorter rungs to the tune line): the
# demo's path in 40 of its 400 steps, scored on 4 star prompts (what the 400 steps learn: configs/demo.yaml).
DEMO_STEPS = 40
DEMO_SHORT = f"--num 4 train.max_steps={DEMO_STEPS}"
# Appended to every `diffray eval` line: 8 prompt/seed pairs instead of 64 (the command's path is the same;
# tests/integration/test_eval.py checks what the eval reads, make eval scores 64).
EVAL_SHORT = "--num 8"


def appended(line: str, args: str) -> str:
    """A README command line without its comment, `args` appended."""
    return f"{line.split('#')[0].rstrip()} {args}"


def shortened(script: str) -> str:
    """The block with EVAL_SHORT appended to its `diffray eval` lines."""
    return "\n".join(appended(line, EVAL_SHORT) if line.startswith("diffray eval ") else line
                     for line in script.splitlines())


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> None:
    script = block.script
    if block.id == "train":  # its first line, `diffray demo`, runs in a terminal: what `make demo` shows a person
        demo, script = script.split("\n", 1)
        assert demo.startswith("diffray demo "), demo
        demo_in_a_terminal(appended(demo, DEMO_SHORT), cwd, env)
    proc = subprocess.run(["bash", "-euxo", "pipefail", "-c", shortened(script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, f"README.md:{block.line} failed:\n{proc.stderr[-4000:]}"
    noise = [n for n in NOISE if n in proc.stdout + proc.stderr]
    assert not noise, f"README.md:{block.line}: library output on the terminal: {noise}\n{proc.stderr[-3000:]}"
    missing = [p for p in EXPECT.get(block.id, []) if not (cwd / p).exists()]
    assert not missing, f"README.md:{block.line}: {missing} not written"
    unsaid = [r for r in SAYS.get(block.id, []) if not re.search(r, proc.stdout)]
    assert not unsaid, f"README.md:{block.line}: {unsaid} not printed:\n{proc.stdout[-3000:]}"
    if block.id == "data":  # the latent cache it printed holds every row
        folder = cwd / re.search(SAYS["data"][1], proc.stdout).group(1)
        assert json.loads((folder / "cache.json").read_text())["rows"] == 32


def start_server(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(cwd / f"server-{block.id}.log", "w")
    proc = subprocess.Popen(["bash", "-c", f"exec {block.script.strip()}"], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def alive() -> None:
        assert proc.poll() is None, (cwd / f"server-{block.id}.log").read_text()[-3000:]

    def healthy() -> bool:
        with urllib.request.urlopen(f"{SERVER}/healthz", timeout=5) as r:
            return r.status == 200

    wait_until(healthy, f"README.md:{block.line}: an answer on {SERVER}/healthz", timeout=300, interval=1, alive=alive)
    return proc


def run_readme(kinds: set[str], cwd: Path, ray_address: str, skip: frozenset[str] = frozenset()) -> list[str]:
    """Run the blocks of `kinds` (but the ids in `skip`) in README order; servers stay up until the end.
    Returns the ids run."""
    servers, ran = [], []
    try:
        for block in BLOCKS:
            if block.kind not in kinds or block.id in skip:
                continue
            if block.server:
                servers.append(start_server(block, cwd, block_env(None)))  # its own cluster: its own HTTP port
            else:
                run_block(block, cwd, block_env(ray_address))
            ran.append(block.id)
    finally:
        for proc in servers:
            interrupt_group(proc)
    return ran


def test_readme_default_blocks(ray_cluster, workdir):
    import ray

    ran = run_readme({"default"}, workdir, ray.get_runtime_context().gcs_address)
    assert ran == ["world"], ran


@pytest.mark.slow
def test_readme_all_blocks(ray_cluster, workdir):
    import ray

    # `world` is the default suite's; nothing here reads ./data/world.
    ran = run_readme({"slow"}, workdir, ray.get_runtime_context().gcs_address)
    assert ran[0] == "data" and {"train", "serve", "requests"} <= set(ran), ran
    pairs = [json.loads(x) for x in (workdir / "data" / "pairs" / "metadata.jsonl").read_text().splitlines()]
    assert len(pairs) == 32 and all(p["conditioning_image"].startswith("conditioning/") for p in pairs)
    answer = json.loads((workdir / "outputs" / "openai.json").read_text())
    assert answer["data"][0]["b64_json"]
    assert json.loads((workdir / "outputs" / "generate.json").read_text())["images"]


@pytest.mark.slow
@pytest.mark.eval  # CI trains these configs in tests/integration/test_<method>_train.py (each loads its shipped file)
def test_readme_method_blocks(ray_cluster, workdir):
    """The other methods' lines (DreamBooth, Textual Inversion, ControlNet, full), after the data block."""
    import ray

    ran = run_readme({"default", "slow", "eval"}, workdir, ray.get_runtime_context().gcs_address,
                     skip=frozenset({"train", "serve", "requests"}))
    assert ran == ["data", "methods", "world"], ran


def read_pty(fd: int, proc: subprocess.Popen, timeout: float) -> bytes:
    """Everything the process writes to its terminal until it exits."""
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def demo_in_a_terminal(line: str, cwd: Path, env: dict[str, str]) -> None:
    """`diffray demo` as a person sees it in a terminal: at most 40 lines, the bar redrawn in place, none
    of the libraries' output (the demo's steps; the eval after them)."""
    parent, child = pty.openpty()
    proc = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdin=child, stdout=child, stderr=child,
                            start_new_session=True)
    os.close(child)
    try:
        out = read_pty(parent, proc, 1800).decode(errors="replace")
    finally:
        os.close(parent)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    lines = out.replace("\r\n", "\n").split("\n")
    assert proc.returncode == 0, out[-3000:]
    assert len(lines) <= 40, f"{len(lines)} lines:\n" + "\n".join(lines)
    redraws = [part for part in out.split("\r") if part.startswith("train ")]
    last = f"{DEMO_STEPS}/{DEMO_STEPS}"
    assert len(redraws) >= 10 and last in redraws[-1] and "samples/s" in redraws[-1], redraws[-3:]
    assert any(line.startswith(f"demo: steps={DEMO_STEPS} ") for line in lines)
    noise = [n for n in NOISE if n in out]
    assert not noise, f"{line}: library output on the terminal: {noise}\n{out[-3000:]}"
