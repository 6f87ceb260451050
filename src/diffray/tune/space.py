"""Search spaces written in YAML: a mapping of dotted config paths to Tune domains.

    lora.rank: {grid: [4, 8, 16, 32]}
    optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
    lora.alpha: {same_as: lora.rank}

Domains: `choice` (random pick from a list), `grid` (every value, one trial each), `loguniform` and
`uniform` ([low, high]), `randint` ([low, high), integers), and `same_as` (tie a path to another
path's sampled value). `check_space` validates every path and every value the space can produce
against the method's config model before any trial starts, so a typo or an out-of-range value is
one error line naming `tune.space.<path>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from diffray.config import deep_copy, set_path
from diffray.errors import ConfigError
from diffray.methods import validate_config

KINDS = ("choice", "grid", "loguniform", "uniform", "randint", "same_as")


@dataclass(frozen=True)
class Domain:
    path: str
    kind: str
    args: tuple

    def probe_values(self) -> list[Any]:
        """Values that stand for the domain in validation: every listed value, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        if self.kind in ("loguniform", "uniform"):
            return [self.args[0], self.args[1], self.inner_value()]
        return []

    def inner_value(self) -> float:
        """A float strictly inside a uniform/loguniform range, never a whole number: Tune samples floats
        there, so a range written in integers over an integer setting (`lora.rank: {uniform: [4, 32]}`) is
        refused before Ray starts instead of failing every trial."""
        low, high = self.args
        mid = math.sqrt(low * high) if self.kind == "loguniform" else (low + high) / 2
        inside = [v for x in (mid, mid + (high - mid) / math.pi) for v in (float(f"{x:.4g}"), float(x))
                  if low < v < high and not v.is_integer()]
        return inside[0] if inside else mid

    def to_tune(self):
        """The Ray Tune domain (`same_as` has none: `resolve_params` fills ties in after sampling)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        raise ValueError(f"{self.path}: same_as is resolved by resolve_params, not by Tune")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_domain(path: str, spec: Any) -> Domain:
    """One `path: {kind: args}` entry; ConfigError naming `tune.space.<path>` when malformed."""
    field = f"tune.space.{path}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        fixed = "" if isinstance(spec, (dict, list)) else (
            f" (one value for every trial is the config's {path}: take the entry out of the space with "
            f"{field}=null and set {path}={spec!r})")
        raise ConfigError(f"must be a mapping with one of {', '.join(KINDS)}, e.g. {{choice: [4, 8]}}; got "
                          f"{spec!r}{fixed}", field=field)
    kind, args = next(iter(spec.items()))
    if kind == "same_as":
        if not isinstance(args, str) or args == path:
            raise ConfigError("same_as takes another path of the space", field=field)
        return Domain(path, kind, (args,))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{kind} takes a non-empty list of values", field=field)
        return Domain(path, kind, tuple(args))
    if not (isinstance(args, list) and len(args) == 2 and all(map(_number, args)) and args[0] < args[1]):
        raise ConfigError(f"{kind} takes [low, high] with low < high; got {args!r}", field=field)
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"loguniform needs low > 0; got {args!r}", field=field)
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"randint takes integers [low, high); got {args!r}", field=field)
    return Domain(path, kind, tuple(args))


def parse_space(space: dict[str, Any]) -> list[Domain]:
    """All domains of a `tune.space` mapping, `same_as` targets checked to be in the space."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("needs at least one `path: {domain}` entry", field="tune.space")
    domains = [parse_domain(str(path), spec) for path, spec in space.items()]
    paths = {d.path for d in domains}
    for d in domains:
        if d.kind == "same_as":
            target = d.args[0]
            if target not in paths:
                raise ConfigError(f"same_as {target!r} is not a path of the space", field=f"tune.space.{d.path}")
            if next(x for x in domains if x.path == target).kind == "same_as":
                raise ConfigError("same_as must point at a sampled path, not another same_as",
                                  field=f"tune.space.{d.path}")
    return domains


def trial_config(base: dict[str, Any], params: dict[str, Any]):
    """The validated training config of one trial: `base` with each `path: value` of `params` set."""
    data = deep_copy(base)
    for path, value in params.items():
        set_path(data, path, value)
    return validate_config(data)


def check_space(base: dict[str, Any], domains: list[Domain]) -> None:
    """Validate every path and every probe value against the method's config (ties follow their target).

    Raises:
        ConfigError: `tune.space.<path>: value V: <what the config says>`.
    """
    ties = {d.path: d.args[0] for d in domains if d.kind == "same_as"}
    for d in domains:
        for value in d.probe_values():
            params = {d.path: value, **{p: value for p, target in ties.items() if target == d.path}}
            try:
                trial_config(base, params)
            except ConfigError as exc:
                hint = ""
                if d.kind in ("uniform", "loguniform") and "integer" in str(exc):
                    hint = f" ({d.kind} samples floats: use randint or choice for a whole-number setting)"
                raise ConfigError(f"value {value!r}: {exc}{hint}", field=f"tune.space.{d.path}") from None


def param_space(domains: list[Domain], shuffle_seed: int | None = None) -> dict[str, Any]:
    """The Tune `param_space` ({path: domain}) of the sampled paths; ties are left to `resolve_params`,
    so any searcher (not only Tune's variant generator) can drive the space.

    With `shuffle_seed`, the grid points (the product of all grid domains) become one grid over
    {path: value} dicts in a seeded random order. Tune runs a grid in the order written, and ASHA's
    asynchronous rungs always promote the first trials to arrive: a grid listed from small to large
    values (often worst to best) would otherwise promote nearly every trial.
    """
    import itertools
    import random

    from ray import tune

    grids = [d for d in domains if d.kind == "grid"] if shuffle_seed is not None else []
    space = {d.path: d.to_tune() for d in domains if d.kind != "same_as" and d not in grids}
    if grids:
        points = [dict(zip((d.path for d in grids), values)) for values in itertools.product(*(d.args for d in grids))]
        random.Random(shuffle_seed).shuffle(points)
        space[GRID_KEY] = tune.grid_search(points)
    return space


GRID_KEY = "grid_point"


def resolve_params(domains: list[Domain], sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's {path: value}: the sampled values plus each `same_as` path set to its target's value."""
    sampled = {**sampled, **sampled.get(GRID_KEY, {})}
    out = {d.path: sampled[d.path] for d in domains if d.kind != "same_as"}
    out.update({d.path: sampled[d.args[0]] for d in domains if d.kind == "same_as"})
    return out
