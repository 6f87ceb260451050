"""`make eval` (evals/methods.py) runs end to end at a smoke size, so it cannot rot: CI runs the ControlNet row
(2 training steps, 2 prompts); `make test-eval` runs every row. The figures are checked against the eval
reports the script wrote (the machinery), not against their floors (that is `make eval`'s EVALS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "evals"))
from methods import ROW_NAMES  # noqa: E402


def run_evals(tmp_path: Path, rows: str, num: int) -> tuple[subprocess.CompletedProcess, Path]:
    """The script at smoke size on the session's cluster (it runs on the one in RAY_ADDRESS, as the CLI does)."""
    import ray

    out = tmp_path / "EVALS.md"
    proc = subprocess.run([sys.executable, str(REPO / "evals" / "methods.py"), "--smoke", "--rows", rows, "--num",
                           str(num), "--work-dir", str(tmp_path / "work"), "--out", str(out), "--img-dir",
                           str(tmp_path / "img")], cwd=tmp_path,
                          env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, out


def test_controlnet_row_writes_its_figures_table_and_grid(ray_cluster, tmp_path):
    """A partial rerun keeps the other rows of the record beside the report (EVALS.json), as a fresh clone holds
    it with no work dir: here a LoRA row measured before."""
    kept = {"row": "lora", "wall_s": 600.0, "commands": ["diffray train configs/demo.yaml"], "trainings": [],
            "figures": [{"row": "LoRA", "name": "star prompts: the star drawn (shape)", "base": "0.0%",
                         "trained": "53.1%", "floor": "base <= 10%, trained >= 70%", "met": False}]}
    (tmp_path / "EVALS.json").write_text(json.dumps([kept]))
    proc, out = run_evals(tmp_path, "controlnet", 2)
    figures = json.loads((tmp_path / "EVALS.json").read_text())
    assert [r["row"] for r in figures] == ["lora", "controlnet"] and figures[0] == kept
    figs = figures[1]["figures"]
    assert [f["name"] for f in figs] == ["edge F1, output vs held-out control map", "shape IoU with the control's shape",
                                        "the prompt's shape colour right"]
    report = json.loads((tmp_path / "work" / "eval" / "controlnet" / "controlnet" / "results.json").read_text())
    assert report["variants"] == ["base", "controlnet"] and report["settings"]["num"] == 2
    for fig, name in zip(figs, ("edge_f1", "shape_iou")):  # the figures are the report's means, base and trained
        assert fig["base"] == f"{report['metrics']['base'][name]['mean']:.3f}"
        assert fig["trained"] == f"{report['metrics']['controlnet'][name]['mean']:.3f}"
    missed = sum(f["met"] is False for f in figs)
    assert (f"{missed} figure(s) below their floor" in proc.stdout) == (missed > 0)
    text = out.read_text()
    for f in figs:  # one table row per figure, with its verdict
        assert f"| ControlNet (canny) | {f['name']} | {f['base']} | {f['trained']} |" in text
    assert ("| LoRA | star prompts: the star drawn (shape) | 0.0% | 53.1% | base <= 10%, trained >= 70% | **no** |"
            in text)
    assert "for the rows controlnet; the other rows are as an earlier run measured them" in text
    assert "diffray train configs/controlnet.yaml" in text and "diffray eval --suite controlnet --num 2" in text
    assert "![controlnet](img/controlnet.png)" in text
    grid = Image.open(tmp_path / "img" / "controlnet.png")
    assert grid.width > 64 * 2 and grid.height >= 3 * 64  # control, base and controlnet rows
    assert np.asarray(grid.convert("L")).std() > 10, "the grid holds drawn images"
    assert "wrote" in proc.stdout and "| ControlNet (canny) |" in proc.stdout


def test_preference_rows_draw_their_pairs_once_and_score_at_few_steps(ray_cluster, tmp_path):
    """Issue 19's rows: the labeller's pairs are drawn at 2 steps without guidance, once (the reward model and DDPO
    with it reuse the file and the reward run), and the aligned models are scored there; DDPO samples and is scored
    at 2 trailing steps, where it can explore."""
    proc, out = run_evals(tmp_path, "diffusion_dpo,reward_model,ddpo_learned", 2)
    figures = {r["row"]: r for r in json.loads((tmp_path / "EVALS.json").read_text())}
    assert list(figures) == ["diffusion_dpo", "reward_model", "ddpo_learned"]
    assert sorted(p.name for p in (tmp_path / "work").glob("pairs-*.parquet")) == [
        "pairs-held-seed2-16.parquet", "pairs-train-seed1-16.parquet"]
    assert proc.stdout.count("pairs train:") == 1 and "reward_model-" in proc.stdout
    dpo = figures["diffusion_dpo"]["figures"]
    assert dpo[0]["name"] == "held-out prompt accuracy, 2 steps, guidance 1 (every field right)"
    assert dpo[-1]["name"].strip() == "the same prompts at the eval's 25 steps, guidance 5"
    report = json.loads((tmp_path / "work" / "eval" / "diffusion_dpo" / "prompts" / "results.json").read_text())
    assert (report["settings"]["steps"], report["settings"]["guidance"]) == (2, 1.0)
    assert dpo[0]["base"] == f"{report['tables']['base']['all']['accuracy']:.1%}"
    rm = figures["reward_model"]["figures"]
    assert len(rm) == 1 and rm[0]["floor"] == ">= 80%" and "held-out pairs" in rm[0]["name"]
    learned = figures["ddpo_learned"]["figures"]
    assert learned[0]["floor"] == "rises >= 2 SE (paired)"
    assert learned[0]["name"] == "held-out prompt accuracy, 2 trailing steps, guidance 1 (every field right)"
    report = json.loads((tmp_path / "work" / "eval" / "ddpo_learned" / "prompts" / "results.json").read_text())
    assert [report["settings"][k] for k in ("steps", "guidance", "timestep_spacing")] == [2, 1.0, "trailing"]
    text = out.read_text()
    assert "diffray data rank-pairs" in text and "--steps 2 --guidance 1.0" in text
    assert "ddpo.timestep_spacing=trailing ddpo.min_step_std=0.1" in text and "--timestep-spacing trailing" in text
    assert "![reward_model]" not in text and "![ddpo_learned](img/ddpo_learned.png)" in text


@pytest.mark.eval
def test_every_row_runs_at_smoke_size(ray_cluster, tmp_path):
    proc, out = run_evals(tmp_path, ",".join(ROW_NAMES), 2)
    figures = json.loads((tmp_path / "EVALS.json").read_text())
    assert [r["row"] for r in figures] == list(ROW_NAMES)
    assert all(r["figures"] for r in figures)
    text = out.read_text()
    assert all(f"![{name}](img/{name}.png)" in text for name in ROW_NAMES if name != "reward_model")  # draws nothing
    # a rerun reuses the finished runs instead of training again
    proc2, _ = run_evals(tmp_path, "lora", 2)
    assert "reusing the finished run" in proc2.stdout


def test_unknown_row_is_refused_by_name(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "evals" / "methods.py"), "--rows", "lora,nope"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown row(s) nope" in proc.stderr


def test_position_probe_runs_and_the_shipped_model_uses_the_position_words(tmp_path):
    """evals/position_probe.py at smoke size (2 oracle and 2 joint steps): every comparison is printed, and the
    shipped model's loss depends on the position word: 2.79x with it swapped at t >= 600, 1.46x over all
    timesteps (the first world model, whose text encoder had collapsed the position words: 1.001 and 1.000;
    docs/world.md, "Where position is lost")."""
    import re

    proc = subprocess.run([sys.executable, str(REPO / "evals" / "position_probe.py"), "--oracle-steps", "2",
                           "--joint-steps", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ratios = {(name, band): float(ratio) for name, band, ratio in re.findall(
        r"^(words|oracle|joint): t in \[(\d+, \d+)\): .* ratio ([\d.]+)$", proc.stdout, flags=re.M)}
    assert sorted({name for name, _ in ratios}) == ["joint", "oracle", "words"] and len(ratios) == 9, proc.stdout
    assert ratios[("words", "600, 1000")] >= 2.0 and ratios[("words", "0, 1000")] >= 1.2, ratios
    example = re.search(r"772 held out with a position \(e\.g\. '(.*)' -> '(.*)'\)", proc.stdout)
    words = {w for w in example.groups()[0].split() if w in ("left", "right", "top", "bottom")}
    assert words and example.groups()[1] == re.sub(r"\b(left|right|top|bottom)\b", lambda m: {
        "left": "right", "right": "left", "top": "bottom", "bottom": "top"}[m.group(1)], example.groups()[0])
