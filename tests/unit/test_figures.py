"""The method figures of `make eval` (diffray.world.figures) on hand-made eval results: each figure's value,
its floor's verdict on both sides of the floor, and Spearman's rho against hand-computed ranks. No Ray."""

from __future__ import annotations

import numpy as np
import pytest

from diffray.world.figures import (alignment_figures, concept_figures, controlnet_figures, dreambooth_figures,
                                   jpeg_figures, pairwise_figure, preference_figures, rank_correlation, token_figures,
                                   tune_figures)
from diffray.world.report import EvalResult


def result(suite: str, variant: str, acc: dict[str, dict[str, float]] | None = None,
           metrics: dict[str, dict[str, float]] | None = None, per_item: dict[str, dict[str, list]] | None = None):
    """An EvalResult with accuracy per (variant, field), metric means per variant and per-item metrics."""
    variants = ["base", variant]
    tables = {v: {k: {"accuracy": a, "right": 0, "total": 1} for k, a in (acc or {}).get(v, {}).items()}
              for v in variants}
    mets = {v: {k: {"mean": m, "sem": 0.0, "n": 1} for k, m in (metrics or {}).get(v, {}).items()} for v in variants}
    records = []
    for v in variants:
        items = (per_item or {}).get(v, {})
        n = max((len(x) for x in items.values()), default=0)
        records += [{"id": i, "variant": v, "metrics": {k: x[i] for k, x in items.items()}} for i in range(n)]
    return EvalResult(suite, {}, variants, records, tables, mets, 1.0)


def verdicts(figs) -> list[bool]:
    return [f.met for f in figs]


def test_concept_figures_lora_and_textual_inversion():
    star = result("star", "lora", {"base": {"shape": 0.05}, "lora": {"shape": 0.75}})
    kept = result("prompts", "lora", {"base": {"all": 0.80}, "lora": {"all": 0.76}})
    figs = concept_figures("LoRA", star, kept)
    assert verdicts(figs) == [True, True] and (figs[0].base, figs[0].trained) == ("5.0%", "75.0%")
    dropped = result("prompts", "lora", {"base": {"all": 0.80}, "lora": {"all": 0.74}})
    assert verdicts(concept_figures("LoRA", star, dropped)) == [True, False]  # 6 points > 5
    weak = result("star", "lora", {"base": {"shape": 0.05}, "lora": {"shape": 0.69}})
    assert verdicts(concept_figures("LoRA", weak, None)) == [False]
    knows = result("star", "lora", {"base": {"shape": 0.11}, "lora": {"shape": 0.9}})
    assert verdicts(concept_figures("LoRA", knows, None)) == [False]  # the base must not draw it already
    same = result("prompts", "textual_inversion", metrics={"textual_inversion": {"identical_to_base": 1.0}})
    ti = result("star", "textual_inversion", {"base": {"shape": 0.0}, "textual_inversion": {"shape": 0.5}})
    assert verdicts(concept_figures("TI", ti, same, trained_min=0.5, identical=True)) == [True, True]
    moved = result("prompts", "textual_inversion", metrics={"textual_inversion": {"identical_to_base": 63 / 64}})
    assert verdicts(concept_figures("TI", ti, moved, trained_min=0.5, identical=True)) == [True, False]


def test_token_figures_score_the_token_before_and_after_against_the_word():
    start = result("triangle", "textual_inversion", {"textual_inversion": {"shape": 0.0}})
    trained = result("triangle", "textual_inversion", {"base": {"shape": 1.0}, "textual_inversion": {"shape": 0.5}})
    figs = token_figures("TI control", start, trained)
    assert verdicts(figs) == [True, None] and [(f.base, f.trained) for f in figs] == [("0.0%", "50.0%"), ("-", "100.0%")]
    assert figs[0].name == "triangle prompts with the token: the triangle drawn (shape)"
    low = result("triangle", "textual_inversion", {"base": {"shape": 1.0}, "textual_inversion": {"shape": 0.49}})
    assert verdicts(token_figures("TI control", start, low)) == [False, None]
    drew = result("triangle", "textual_inversion", {"textual_inversion": {"shape": 0.11}})
    assert verdicts(token_figures("TI control", drew, trained)) == [False, None]  # it drew them before training


def test_dreambooth_figures_fidelity_ratio_and_prior_drift():
    inst, cls = "fidelity: a photo of sks widget", "drift: a photo of a widget"
    a = result("subject", "dreambooth", metrics={"base": {inst: 0.1}, "dreambooth": {inst: 0.31, cls: 0.02}})
    b = result("subject", "dreambooth", metrics={"base": {inst: 0.1}, "dreambooth": {inst: 0.4, cls: 0.05}})
    figs = dreambooth_figures("DB", a, b)
    assert verdicts(figs) == [True, True] and "3.1x" in figs[0].trained
    assert verdicts(dreambooth_figures("DB", b, a)) == [True, False]  # prior preservation drifting more: no
    low = result("subject", "dreambooth", metrics={"base": {inst: 0.1}, "dreambooth": {inst: 0.29, cls: 0.0}})
    assert verdicts(dreambooth_figures("DB", low, None)) == [False]


def test_controlnet_figures():
    r = result("controlnet", "controlnet", {"base": {"colour": 1.0}, "controlnet": {"colour": 0.8}},
               {"base": {"edge_f1": 0.4, "shape_iou": 0.5}, "controlnet": {"edge_f1": 0.7, "shape_iou": 0.6}})
    assert verdicts(controlnet_figures("CN", r)) == [True, True, True]
    r = result("controlnet", "controlnet", {"base": {"colour": 1.0}, "controlnet": {"colour": 0.78}},
               {"base": {"edge_f1": 0.4, "shape_iou": 0.5}, "controlnet": {"edge_f1": 0.69, "shape_iou": 0.59}})
    assert verdicts(controlnet_figures("CN", r)) == [False, False, False]


def test_jpeg_figures_use_the_paired_standard_error():
    base = [10.0, 11.0, 12.0, 13.0]
    smaller = [7.0, 8.2, 9.4, 10.2]  # 24.3% smaller; paired differences 3.0, 2.8, 2.6, 2.8
    r = result("prompts", "ddpo", {"base": {"all": 0.8}, "ddpo": {"all": 0.7}},
               per_item={"base": {"jpeg_kb": base}, "ddpo": {"jpeg_kb": smaller}})
    figs = jpeg_figures("DDPO", r)
    diff = np.subtract(base, smaller)
    z = diff.mean() / (diff.std(ddof=1) / 2)
    assert verdicts(figs) == [True, True] and f"{z:.1f} SE" in figs[0].trained and "-24.3%" in figs[0].trained
    noisy = [0.0, 19.0, 0.0, 15.8]  # the same 24.3% drop on average, but noisy pairs: 0.6 SE
    r = result("prompts", "ddpo", {"base": {"all": 0.8}, "ddpo": {"all": 0.69}},
               per_item={"base": {"jpeg_kb": base}, "ddpo": {"jpeg_kb": noisy}})
    assert verdicts(jpeg_figures("DDPO", r)) == [False, False]


def test_alignment_figures():
    r = result("prompts", "ddpo", {"base": {"all": 0.8, "position": 0.4}, "ddpo": {"all": 0.9, "position": 0.6}})
    figs = alignment_figures("DDPO", r)
    assert figs[0].met and [f.name.strip() for f in figs[1:]] == ["of which position"] and figs[1].met is None
    r = result("prompts", "ddpo", {"base": {"all": 0.8}, "ddpo": {"all": 0.89}})
    assert not alignment_figures("DDPO", r)[0].met


def with_rights(res: EvalResult, rights: dict[str, list[bool]]) -> EvalResult:
    """`res` with per-prompt "every field right" records (variant -> one bool per prompt id)."""
    res.records.extend({"id": i, "variant": v, "right": r, "metrics": {}} for v, rs in rights.items()
                       for i, r in enumerate(rs))
    return res


def test_preference_figures_and_the_reward_models_pairwise_accuracy():
    few = result("prompts", "diffusion_dpo", {"base": {"all": 0.266, "colour": 0.47, "position": 0.75},
                                              "diffusion_dpo": {"all": 0.366, "colour": 0.6, "position": 0.7}})
    protocol = result("prompts", "diffusion_dpo", {"base": {"all": 0.988}, "diffusion_dpo": {"all": 0.996}})
    figs = preference_figures("DPO", few, protocol, "2 steps, guidance 1")
    assert verdicts(figs) == [True, None, None, None]  # colour, position (no shape scored), the protocol
    assert (figs[0].base, figs[0].trained, figs[-1].trained) == ("26.6%", "36.6%", "99.6%")
    assert "2 steps, guidance 1" in figs[0].name and [f.name.strip() for f in figs[1:3]] == [
        "of which colour", "of which position"]
    short = result("prompts", "diffusion_dpo", {"base": {"all": 0.266}, "diffusion_dpo": {"all": 0.36}})
    assert verdicts(preference_figures("DPO", short, None, "x")) == [False]  # 9.4 points < 10
    # no floor in points: the paired per-prompt change must be >= 2 standard errors
    base = [False] * 12 + [True] * 4
    up = with_rights(result("prompts", "ddpo", {"base": {"all": 0.25}, "ddpo": {"all": 0.75}}),
                     {"base": base, "ddpo": [True] * 8 + [False] * 4 + [True] * 4})
    fig = preference_figures("DDPO", up, None, "x", None)[0]
    d = np.array([1.0] * 8 + [0.0] * 8)  # the per-prompt changes
    z = d.mean() / (d.std(ddof=1) / 4)
    assert fig.met and fig.trained == f"75.0% (+50.0 points, {z:.1f} SE)" and fig.floor == "rises >= 2 SE (paired)"
    noise = with_rights(result("prompts", "ddpo", {"base": {"all": 0.25}, "ddpo": {"all": 0.3125}}),
                        {"base": base, "ddpo": [True] + [False] * 11 + [True] * 4})  # one prompt more: 1.0 SE
    assert preference_figures("DDPO", noise, None, "x", None)[0].met is False
    flat = result("prompts", "ddpo", {"base": {"all": 0.266}, "ddpo": {"all": 0.266}})
    assert verdicts(preference_figures("DDPO", flat, None, "x", None)) == [False]  # no records: nothing shown
    fig = pairwise_figure("RM", {"pairs": 297, "right": 254, "accuracy": 254 / 297, "skipped": 203})
    assert fig.met and fig.trained == "85.5%" and "297 held-out pairs" in fig.name
    assert not pairwise_figure("RM", {"pairs": 10, "right": 7, "accuracy": 0.7, "skipped": 0}).met


def test_rank_correlation_and_tune_figures():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks of x: 0, 1.5, 1.5, 3 (a tie); of y: 1, 0, 2, 3
    rx, ry = np.array([0, 1.5, 1.5, 3]), np.array([1, 0, 2, 3])
    assert rank_correlation([0.1, 0.2, 0.2, 0.3], [5, 1, 7, 9]) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert np.isnan(rank_correlation([1.0], [2.0])) and np.isnan(rank_correlation([1, 1], [2, 3]))
    trials = [{"val_loss": 0.1, "accuracy": 0.80}, {"val_loss": 0.2, "accuracy": 0.70},
              {"val_loss": 0.3, "accuracy": 0.6}]
    figs = tune_figures("Tune", trials, best_accuracy=0.76)
    assert figs[0].trained == "-1.00" and verdicts(figs) == [None, True]
    assert not tune_figures("Tune", trials, best_accuracy=0.74)[1].met
