"""Search spaces in YAML (no cluster): parsing, validation against the method's config, and the
variants Ray Tune's own generator resolves from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffray.config import read_yaml
from diffray.errors import ConfigError
from diffray.tune.space import check_space, param_space, parse_space, resolve_params, trial_config

REPO = Path(__file__).resolve().parents[2]

SPACE = yaml.safe_load("""
lora.rank: {grid: [4, 8, 16, 32]}
optim.lr: {grid: [1.0e-4, 1.0e-3]}
lora.alpha: {same_as: lora.rank}
lora.dropout: {uniform: [0.0, 0.2]}
train.micro_batch_size: {choice: [2, 4]}
""")


def test_space_resolves_to_trial_configs_through_tune():
    from ray.tune.search.variant_generator import generate_variants

    base = read_yaml(REPO / "configs" / "lora.yaml")
    domains = parse_space(SPACE)
    check_space(base, domains)
    variants = [v for _, v in generate_variants(param_space(domains))]
    assert len(variants) == 8  # the grid: 4 ranks x 2 learning rates; the rest sampled per trial
    assert sorted({(v["lora.rank"], v["optim.lr"]) for v in variants}) == [
        (r, lr) for r in (4, 8, 16, 32) for lr in (1e-4, 1e-3)]
    for v in variants:
        cfg = trial_config(base, resolve_params(domains, v))
        assert cfg.lora.rank == v["lora.rank"] and cfg.lora.alpha == cfg.lora.rank  # tied by the rule
        assert 0.0 <= cfg.lora.dropout <= 0.2 and cfg.train.micro_batch_size in (2, 4)
        assert cfg.optim.lr == v["optim.lr"] and cfg.data.path == base["data"]["path"]


@pytest.mark.parametrize("space, message", [
    ({"lora.rnk": {"choice": [4]}}, r"tune\.space\.lora\.rnk: value 4: lora\.rnk: unknown key \(allowed: alpha"),
    ({"lora.rank": {"choice": [0, 4]}}, r"tune\.space\.lora\.rank: value 0: lora\.rank: Input should be greater"),
    ({"optim.lr": {"loguniform": [0, 1e-3]}}, r"tune\.space\.optim\.lr: loguniform needs low > 0"),
    ({"optim.lr": {"uniform": [1e-3, 1e-4]}}, r"uniform takes \[low, high\] with low < high"),
    ({"optim.lr": {"loguniform": [1e-5, 2.0]}}, r"value 2\.0: optim\.lr: Input should be less than or equal to 1"),
    ({"lora.rank": {"randint": [2, 8.5]}}, r"randint takes integers"),
    # Tune samples floats inside a range written in integers: every trial failed once Ray ran it
    ({"lora.rank": {"uniform": [4, 32]}}, r"tune\.space\.lora\.rank: value 22\.46: lora\.rank: Input should be a "
     r"valid integer, got a number with a fractional part \(uniform samples floats: use randint or choice"),
    ({"train.micro_batch_size": {"loguniform": [1, 8]}}, r"tune\.space\.train\.micro_batch_size: value 2\.828: "
     r".*\(loguniform samples floats"),
    ({"lora.rank": [4, 8]}, r"tune\.space\.lora\.rank: must be a mapping with one of choice, grid"),
    ({"lora.rank": {"choice": []}}, r"choice takes a non-empty list"),
    ({"lora.alpha": {"same_as": "lora.rank"}}, r"same_as 'lora\.rank' is not a path of the space"),
    ({}, r"tune\.space: needs at least one"),
])
def test_bad_spaces_name_the_path(space, message):
    base = read_yaml(REPO / "configs" / "lora.yaml")
    with pytest.raises(ConfigError, match=message):
        check_space(base, parse_space(space))


def test_shuffled_grid_is_the_same_points_in_a_seeded_order():
    from ray.tune.search.variant_generator import generate_variants

    domains = parse_space(SPACE)
    key = lambda p: (p["lora.rank"], p["optim.lr"])  # noqa: E731

    def order(seed=None):
        return [resolve_params(domains, v) for _, v in generate_variants(param_space(domains, seed))]

    written, first, again, other = order(), order(0), order(0), order(1)
    assert len(first) == 8 and sorted(map(key, first)) == sorted(map(key, written))
    assert list(map(key, first)) == list(map(key, again))  # the seed fixes the order
    assert list(map(key, first)) != list(map(key, written)) and list(map(key, first)) != list(map(key, other))
    assert all(p["lora.alpha"] == p["lora.rank"] and 0.0 <= p["lora.dropout"] <= 0.2 for p in first)
