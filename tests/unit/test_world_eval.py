"""Eval suites and the report without Ray or a model: the world's own images stand in for a model that
draws every prompt perfectly, a shuffled copy for one that draws the wrong prompts."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from diffray.errors import ConfigError
from diffray.world import grammar as G
from diffray.world.render import render
from diffray.world.report import format_table, score_rows, write_report
from diffray.world.scenes import scene_at
from diffray.world.scores import edge_f1, outline_coverage
from diffray.world.suites import EVAL_SEED, SUITE_SPLIT, build_suite, write_canny_pairs
from diffray.world.render import png_bytes


def test_suites_are_fixed_and_disjoint_from_training_seeds():
    items = build_suite("prompts")
    assert len(items) == 64 and items == build_suite("prompts")
    assert [it.seed for it in items] == list(range(64)) and build_suite("prompts", seed=1)[0].seed == 100_000
    assert items[5].prompt == scene_at(EVAL_SEED, "base", 5).caption != scene_at(0, "base", 5).caption
    triples = {tuple(G.parse_prompt(it.prompt)[k] for k in ("colour", "shape", "bg")) for it in build_suite("heldout")}
    assert triples <= set(G.HELDOUT) and len(triples) > 10
    subject = build_suite("subject", num=5)
    assert [it.prompt for it in subject] == [G.INSTANCE_PROMPT] * 3 + [G.CLASS_PROMPT] * 2


def test_token_replaces_only_the_concept():
    star = build_suite("star", num=8, token="<star>")
    assert all(it.adapter_prompt == it.prompt.replace(" star ", " <star> ") for it in star)
    cyan = build_suite("cyan", num=4, token="<c>")
    assert all(it.adapter_prompt.startswith(("a <c> ", "a small <c> ", "a large <c> ")) for it in cyan)
    subject = build_suite("subject", num=2, token="<sks-widget>")
    assert [it.adapter_prompt for it in subject] == ["a photo of <sks-widget>", G.CLASS_PROMPT]
    assert all(it.adapter_prompt == it.prompt for it in build_suite("star", num=4))
    for suite, token, match in (("prompts", "<x>", "^token: "), ("star", "two words", "^token: "),
                                ("stars", None, "^suite: unknown suite 'stars'"), ("star", None, "^num: ")):
        with pytest.raises(ConfigError, match=match):
            build_suite(suite, num=0 if match == "^num: " else 4, token=token)


def test_controlnet_items_carry_visible_control_maps(tmp_path):
    items = build_suite("controlnet", num=6)
    for it in items:
        control = Image.open(io.BytesIO(it.control))
        assert control.size == (64, 64) and np.asarray(control).any()
    root = write_canny_pairs(tmp_path / "pairs", 5, seed=0)
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(G.parse_prompt(r["text"]) for r in rows)
    for r in rows:
        img, control = Image.open(root / r["file_name"]), Image.open(root / r["conditioning_image"])
        assert outline_coverage(control, img) >= 0.8 and edge_f1(control, img) == 1.0


def test_sample_set_keeps_scenes_with_visible_control_maps(tmp_path):
    from diffray.data.conditioning import canny
    from diffray.data.sample import write_sample_dataset

    root = write_sample_dataset(tmp_path / "s", num_images=8, subject_images=1)
    kept = json.loads((root / "dataset.json").read_text())["train_scenes"]
    assert len(kept) == 8 and kept == sorted(kept) and kept[-1] > 7  # some pretrain scenes were skipped
    rows = [json.loads(x) for x in (root / "train" / "metadata.jsonl").read_text().splitlines()]
    for i, row in zip(kept, rows):
        img = Image.open(root / "train" / row["file_name"]).convert("RGB")
        assert row["text"] == scene_at(0, "pretrain", i).caption and outline_coverage(canny()(img), img) >= 0.8


def perfect_images(suite: str, items, variants=("base",)):
    """What a model that draws every prompt exactly would render: the suite's own scenes."""
    if suite == "subject":
        scenes = [scene_at(0, "subject", i % 5) for i in range(len(items))]
    elif suite == "controlnet":
        from diffray.world.suites import canny_controls

        scenes = [s for _, (_, s, _, _) in zip(range(len(items)), canny_controls(EVAL_SEED, "pretrain"))]
    else:
        scenes = [scene_at(EVAL_SEED, SUITE_SPLIT[suite], i) for i in range(len(items))]
    return {(v, it.id): png_bytes(render(s)) for v in variants for it, s in zip(items, scenes)}


@pytest.mark.parametrize("suite", ["prompts", "heldout", "star", "cyan", "striped"])
def test_a_perfect_model_scores_everything_right(suite):
    items = build_suite(suite, num=24)
    result = score_rows(suite, {"num": 24}, ["base"], items, perfect_images(suite, items), 1.0)
    table = result.tables["base"]
    assert table["all"]["accuracy"] == 1.0 and table["all"]["total"] == 24, table
    if suite == "striped":
        assert table["texture"]["total"] == 24


def test_wrong_images_score_low_and_drift_is_measured(tmp_path):
    items = build_suite("prompts", num=24)
    good = perfect_images("prompts", items)
    shifted = {("lora", it.id): good[("base", items[(k + 1) % 24].id)] for k, it in enumerate(items)}
    result = score_rows("prompts", {"suite": "prompts", "num": 24, "model": "m", "steps": 2, "guidance": 5.0,
                                    "resolution": 64, "seed": 0}, ["base", "lora"], items, {**good, **shifted}, 2.0)
    assert result.accuracy("base") == 1.0 and result.accuracy("lora") < 0.2
    assert result.metrics["lora"]["drift"]["mean"] > 0.05 and result.metrics["lora"]["identical_to_base"]["mean"] == 0
    text = format_table(result)
    assert "suite prompts" in text and "base" in text.splitlines()[1] and "100.0% (24/24)" in text
    paths = write_report(result, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["tables"]["base"]["all"]["accuracy"] == 1.0 and len(saved["records"]) == 48
    assert "| all | 100.0% (24/24) |" in paths["markdown"].read_text()
    with Image.open(paths["grid"]) as grid:
        assert grid.height == 4 * (68 + 2) + 2  # 2 variants x 2 rows of 16 framed 68 px images


def test_subject_and_controlnet_metrics():
    items = build_suite("subject", num=6)
    result = score_rows("subject", {"num": 6}, ["base"], items, perfect_images("subject", items), 1.0)
    m = result.metrics["base"]
    assert m["fidelity: a photo of sks widget"]["mean"] > 0.8 and result.tables["base"]["subject"]["accuracy"] == 1.0
    cn_items = build_suite("controlnet", num=4)
    cn = score_rows("controlnet", {"num": 4}, ["base"], cn_items, perfect_images("controlnet", cn_items), 1.0)
    assert cn.metrics["base"]["edge_f1"]["mean"] == 1.0 and cn.metrics["base"]["shape_iou"]["mean"] > 0.7
    assert ("control", 0) in cn.images


def test_textual_inversion_token_is_the_one_the_adapter_loads_as(tmp_path):
    """An SDXL embedding file's keys are the encoders' (`clip_l`/`clip_g`): the token is the card's, so eval
    prompts name what `load_textual_inversion` adds; an SD file's one key is its token."""
    import torch
    from safetensors.torch import save_file

    from diffray.models.adapters import write_card
    from diffray.models.textual_inversion import SDXL_KEYS, TI_WEIGHTS
    from diffray.world.evaluate import ti_token

    xl, sd = tmp_path / "xl", tmp_path / "sd"
    for d, tensors in ((xl, {k: torch.zeros(1, 8) for k in SDXL_KEYS}), (sd, {"<cat-toy>": torch.zeros(1, 8)})):
        d.mkdir()
        save_file(tensors, str(d / TI_WEIGHTS))
        write_card(d, {"method": "textual_inversion", "placeholder_token": "<star>" if d == xl else "<cat-toy>"})
    assert ti_token(str(xl)) == "<star>"
    assert ti_token(str(sd)) == "<cat-toy>"
    assert ti_token(None) is None and ti_token(str(tmp_path)) is None  # not a TI adapter
    items = build_suite("star", 2, 0, 64, ti_token(str(xl)))
    assert all("<star>" in i.adapter_prompt and "clip" not in i.adapter_prompt for i in items)
