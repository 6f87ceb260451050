"""Preference pairs from a model, labelled by the world reader: the simulated labeller of Diffusion-DPO and
the reward model. For each prompt of a suite the model draws two images (two generator seeds, the eval
protocol's sampler); the reader scores both against the prompt, and the image it finds right (every
stated field) is preferred. Both right is a tie (0.5/0.5), both wrong "both bad" (0/0), as the playground's
export writes them; the trainers skip those. The output is one Parquet file in Pick-a-Pic's columns plus
`right_0`/`right_1`. The Ray edge: rendering is `diffray eval`'s batch-inference job.
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from pathlib import Path

from PIL import Image

from diffray.errors import ConfigError
from diffray.world.report import score_image
from diffray.world.scenes import scene_at
from diffray.world.suites import (CONCEPT_SUITES, EVAL_SEED, SEED_STRIDE, SUITE_SPLIT, EvalItem, build_suite,
                                  check_suite)

LABELS = {(True, False): (1.0, 0.0), (False, True): (0.0, 1.0), (True, True): (0.5, 0.5), (False, False): (0.0, 0.0)}


def label_pairs(out: str | Path, model: str | None = None, suite: str = "prompts", num: int = 1000, seed: int = 1,
                steps: int = 25, guidance: float = 5.0, resolution: int = 64, batch_size: int = 8,
                images_per_prompt: int = 2, position_p: float | None = None) -> dict:
    """Write `num` labelled pairs of `suite`'s prompts (suite seed `seed`; `diffray eval` scores seed 0, so
    the default seed draws other prompts) drawn by `model` to the Parquet file `out`. With
    `images_per_prompt` > 2 the pair is a right and a wrong image of the prompt when it has both (else its
    first two); `position_p` is the chance a prompt states a position (None: the split's own, 0.25).
    Returns the counts {pairs, first, second, ties, both_bad, accuracy (of all images), wall_s}."""
    from diffray.models.loading import resolve_model_path
    from diffray.world.evaluate import absolute, check_inputs, render_images
    from diffray.world.pairs import write_pairs

    t0 = time.time()
    base_ref = check_inputs(model, None, None, steps, guidance, resolution, batch_size)
    check_suite(suite, num, None)
    if suite in CONCEPT_SUITES or suite == "controlnet":
        raise ConfigError(f"{suite!r}: pairs are drawn from prompt suites (prompts, heldout)", field="suite")
    k_max = images_per_prompt
    if not 2 <= k_max <= 16:
        raise ConfigError(f"must be 2 to 16, got {k_max}", field="images_per_prompt")
    if num * k_max >= SEED_STRIDE:
        raise ConfigError(f"num x images_per_prompt must be below {SEED_STRIDE}, got {num * k_max}", field="num")
    if position_p is not None and not 0 <= position_p <= 1:
        raise ConfigError(f"must be in [0, 1], got {position_p}", field="position_p")
    items = build_suite(suite, num, seed, resolution)
    if position_p is not None:
        scenes = [scene_at(EVAL_SEED + seed, SUITE_SPLIT[suite], i, position_p=position_p) for i in range(num)]
        items = [EvalItem(it.id, s.caption, s.caption, it.seed) for it, s in zip(items, scenes)]
    twins = [EvalItem(k_max * it.id + k, it.prompt, it.prompt, it.seed + k * (SEED_STRIDE // k_max))
             for it in items for k in range(k_max)]
    settings = dict(steps=steps, guidance=guidance, resolution=resolution, lora_scale=1.0)
    images = render_images(twins, ["base"], absolute(resolve_model_path(base_ref)), None, None, settings, batch_size)
    rows, kinds, right_images = [], Counter(), 0
    for it in items:
        drawn = [images[("base", k_max * it.id + k)] for k in range(k_max)]
        verdicts = [bool(score_image(suite, twins[k_max * it.id + k], Image.open(io.BytesIO(png)).convert("RGB"))
                         ["right"]) for k, png in enumerate(drawn)]
        right_images += sum(verdicts)
        first = next((k for k in range(k_max) if verdicts[k] != verdicts[0]), 1)  # a differing image, if any
        pngs, right = [drawn[0], drawn[first]], (verdicts[0], verdicts[first])
        label_0, label_1 = LABELS[right]
        kinds[right] += 1
        rows.append({"caption": it.prompt, "jpg_0": pngs[0], "jpg_1": pngs[1], "label_0": label_0,
                     "label_1": label_1, "right_0": right[0], "right_1": right[1]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    write_pairs(rows, tmp, extra=("right_0", "right_1"))
    os.replace(tmp, out)
    return {"pairs": num, "first": kinds[(True, False)], "second": kinds[(False, True)], "ties": kinds[(True, True)],
            "both_bad": kinds[(False, False)], "accuracy": right_images / (k_max * num), "wall_s": time.time() - t0,
            "model": base_ref, "suite": suite, "seed": seed}
