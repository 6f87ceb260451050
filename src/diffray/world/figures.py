"""Each training method's quality figure on the tiny world (`make eval`, EVALS.md): the numbers a method's
paper reports, computed from `diffray eval` results of the base and the trained model, each beside its
floor. Pure: never imports torch or ray (the runner is `evals/methods.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from diffray.world.report import EvalResult, mean_sem


@dataclass(frozen=True)
class Figure:
    """One measured figure: `base` and `trained` as printed, the floor as a sentence, whether it is met (None:
    reported beside a floored figure, no floor of its own)."""

    row: str
    name: str
    base: str
    trained: str
    floor: str
    met: bool | None

    def to_json(self) -> dict:
        return asdict(self)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def field_accuracy(result: EvalResult, variant: str, name: str) -> float:
    """Accuracy of one field (or "all") for a variant; 0 when nothing was scored."""
    acc = result.accuracy(variant, name)
    return 0.0 if acc is None else acc


def adapted(result: EvalResult) -> str:
    """The adapted variant's name (the one that is not "base")."""
    return next(v for v in result.variants if v != "base")


def metric(result: EvalResult, variant: str, name: str) -> float:
    return float(result.metrics[variant][name]["mean"])


def per_item(result: EvalResult, variant: str, name: str) -> np.ndarray:
    """A metric of every item of `variant`, in item order."""
    recs = sorted((r for r in result.records if r["variant"] == variant), key=lambda r: r["id"])
    return np.asarray([r["metrics"][name] for r in recs], dtype=float)


def concept_figures(row: str, concept: EvalResult, prompts: EvalResult | None, field: str = "shape",
                    base_max: float = 0.10, trained_min: float = 0.70, max_drop: float = 0.05,
                    identical: bool = False) -> list[Figure]:
    """A learned concept (LoRA, Textual Inversion): the concept's field on the concept suite, base vs
    trained; then the base's own prompts, where accuracy may drop by at most `max_drop` (LoRA) or the
    outputs must be bit-identical to the base (`identical`: Textual Inversion, whose prompts without its
    token cannot change)."""
    v = adapted(concept)
    base, trained = field_accuracy(concept, "base", field), field_accuracy(concept, v, field)
    out = [Figure(row, f"{concept.suite} prompts: the {concept.suite} drawn ({field})", pct(base), pct(trained),
                  f"base <= {base_max:.0%}, trained >= {trained_min:.0%}", base <= base_max and trained >= trained_min)]
    if prompts is not None:
        pv = adapted(prompts)
        b, t = field_accuracy(prompts, "base", "all"), field_accuracy(prompts, pv, "all")
        if identical:
            same = metric(prompts, pv, "identical_to_base")
            out.append(Figure(row, "prompts without the token: outputs bit-identical to the base", "-",
                              pct(same), "100% identical", same == 1.0))
        else:
            out.append(Figure(row, "the base's own prompts: every field right", pct(b), pct(t),
                              f"drops <= {max_drop * 100:.0f} points", b - t <= max_drop + 1e-9))
    return out


def token_figures(row: str, start: EvalResult, trained: EvalResult, field: str = "shape", start_max: float = 0.10,
                  trained_min: float = 0.50) -> list[Figure]:
    """A Textual Inversion token learning a concept the base already draws under its own word: the concept's
    field on prompts with the token, before training (`start`: the token's initializer word in its place, which
    is what the untrained token feeds the model) and after; then the same prompts with the word (the base)."""
    before, after = field_accuracy(start, adapted(start), field), field_accuracy(trained, adapted(trained), field)
    word = field_accuracy(trained, "base", field)
    return [Figure(row, f"{trained.suite} prompts with the token: the {trained.suite} drawn ({field})", pct(before),
                   pct(after), f"token before training <= {start_max:.0%}, trained >= {trained_min:.0%}",
                   before <= start_max and after >= trained_min),
            Figure(row, "the same prompts with the word itself (the base model)", "-", pct(word), "(reported)", None)]


def dreambooth_figures(row: str, with_prior: EvalResult, without_prior: EvalResult | None,
                       min_ratio: float = 3.0) -> list[Figure]:
    """Subject fidelity on the instance prompt (trained >= `min_ratio` x base), and the class prompt's
    drift from the base (mean absolute pixel difference) with prior preservation against without it."""
    inst, cls = "fidelity: a photo of sks widget", "drift: a photo of a widget"
    v = adapted(with_prior)
    base, trained = metric(with_prior, "base", inst), metric(with_prior, v, inst)
    out = [Figure(row, "subject fidelity on 'a photo of sks widget'", f"{base:.3f}", f"{trained:.3f} "
                  f"({trained / max(base, 1e-9):.1f}x)", f">= {min_ratio:g}x the base's", trained >= min_ratio * base)]
    if without_prior is not None:
        d_with, d_without = metric(with_prior, v, cls), metric(without_prior, adapted(without_prior), cls)
        out.append(Figure(row, "class-prompt drift from the base (prior preservation on | off)", "-",
                          f"{d_with:.4f} | {d_without:.4f}", "on < off", d_with < d_without))
    return out


def controlnet_figures(row: str, result: EvalResult, min_gain: float = 0.3, min_iou: float = 0.6,
                       min_colour: float = 0.8) -> list[Figure]:
    """Edge F1 of output vs control map (trained >= base + `min_gain`; the base draws without the control),
    shape IoU and the prompt's colours."""
    v = adapted(result)
    f1b, f1t = metric(result, "base", "edge_f1"), metric(result, v, "edge_f1")
    ioub, iout = metric(result, "base", "shape_iou"), metric(result, v, "shape_iou")
    cb, ct = field_accuracy(result, "base", "colour"), field_accuracy(result, v, "colour")
    return [Figure(row, "edge F1, output vs held-out control map", f"{f1b:.3f}", f"{f1t:.3f}",
                   f">= base + {min_gain:g}", f1t >= f1b + min_gain),
            Figure(row, "shape IoU with the control's shape", f"{ioub:.3f}", f"{iout:.3f}", f">= {min_iou:g}",
                   iout >= min_iou),
            Figure(row, "the prompt's shape colour right", pct(cb), pct(ct), f">= {min_colour:.0%}", ct >= min_colour)]


def jpeg_figures(row: str, result: EvalResult, min_drop: float = 0.20, min_se: float = 3.0,
                 max_acc_drop: float = 0.10) -> list[Figure]:
    """DDPO with the JPEG-compressibility reward: the mean JPEG size falls by >= `min_drop`, by >= `min_se`
    standard errors of the paired (same prompt, same seed) difference; prompt accuracy drops <= 10 points."""
    v = adapted(result)
    base, trained = per_item(result, "base", "jpeg_kb"), per_item(result, v, "jpeg_kb")
    diff = mean_sem(list(base - trained))
    se = diff["sem"] if diff["n"] > 1 else float("inf")
    drop = diff["mean"] / float(base.mean())
    z = diff["mean"] / se if se > 0 else float("inf")
    b, t = field_accuracy(result, "base", "all"), field_accuracy(result, v, "all")
    return [Figure(row, "mean JPEG size (kB, quality 95) on held-out prompts", f"{base.mean():.3f}",
                   f"{trained.mean():.3f} ({-drop:+.1%}, {z:.1f} SE)", f">= {min_drop:.0%} smaller, >= {min_se:g} SE",
                   drop >= min_drop and z >= min_se),
            Figure(row, "prompt accuracy (every field right)", pct(b), pct(t),
                   f"drops <= {max_acc_drop * 100:.0f} points", b - t <= max_acc_drop + 1e-9)]


def alignment_figures(row: str, result: EvalResult, min_gain: float = 0.10) -> list[Figure]:
    """DDPO with the world-alignment reward: prompt accuracy on held-out prompts rises >= `min_gain`."""
    v = adapted(result)
    b, t = field_accuracy(result, "base", "all"), field_accuracy(result, v, "all")
    out = [Figure(row, "held-out prompt accuracy (every field right)", pct(b), pct(t),
                  f"rises >= {min_gain * 100:.0f} points", t - b >= min_gain - 1e-9)]
    for name in ("position", "shape"):
        if result.accuracy("base", name) is not None:
            out.append(Figure(row, f"  of which {name}", pct(result.accuracy("base", name)),
                              pct(result.accuracy(v, name)), "(reported)", None))
    return out


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties share theirs); nan below 2 points or for a
    constant side."""
    if len(x) < 2:
        return float("nan")

    def ranks(v) -> np.ndarray:
        v = np.asarray(v, dtype=float)
        r = np.empty(len(v))
        r[v.argsort(kind="stable")] = np.arange(len(v))
        for value in np.unique(v):
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float("nan") if rx.std() == 0 or ry.std() == 0 else float(np.corrcoef(rx, ry)[0, 1])


def tune_figures(row: str, trials: list[dict], best_accuracy: float, max_gap: float = 0.05) -> list[Figure]:
    """Tune: `trials` [{trial_id, val_loss, accuracy}], `best_accuracy` of the exported best adapter. The
    rank correlation of val_loss with accuracy (negative: lower loss, more right), and the export against
    the most accurate trial."""
    rho = rank_correlation([t["val_loss"] for t in trials], [t["accuracy"] for t in trials])
    top = max(t["accuracy"] for t in trials)
    return [Figure(row, f"Spearman rank correlation, val_loss vs accuracy ({len(trials)} trials)", "-",
                   f"{rho:+.2f}", "(reported)", None),
            Figure(row, "exported best (by val_loss) vs most accurate trial", pct(top), pct(best_accuracy),
                   "within 5 points", top - best_accuracy <= max_gap + 1e-9)]


def paired_gain(result: EvalResult, variant: str) -> tuple[float, float]:
    """(mean, standard errors) of the per-prompt change in "every field right" (1/0), variant minus base, over
    the prompts both scored (same prompt, same seed): nan standard errors when nothing varies."""
    right = {(r["variant"], r["id"]): float(r["right"]) for r in result.records if r.get("right") is not None}
    diff = [right[(variant, i)] - right[("base", i)] for v, i in right if v == variant and ("base", i) in right]
    if len(diff) < 2:
        return float("nan"), float("nan")
    d = mean_sem(diff)
    return d["mean"], d["mean"] / d["sem"] if d["sem"] > 0 else float("nan")


def preference_figures(row: str, few: EvalResult, protocol: EvalResult | None, few_label: str,
                       min_gain: float | None = 0.10, min_se: float = 2.0) -> list[Figure]:
    """A model aligned on preference pairs drawn where the base errs (`few`: the suite sampled as the pairs
    were): its prompt accuracy rises >= `min_gain` (None: by >= `min_se` standard errors of the paired
    per-prompt change); `protocol`, the eval's own sampling, is reported beside it."""
    v = adapted(few)
    b, t = field_accuracy(few, "base", "all"), field_accuracy(few, v, "all")
    gain, z = paired_gain(few, v)
    floor = f"rises >= {min_se:g} SE (paired)" if min_gain is None else f"rises >= {min_gain * 100:.0f} points"
    met = z >= min_se if min_gain is None else t - b >= min_gain - 1e-9
    shown = pct(t) if gain != gain else f"{pct(t)} ({gain * 100:+.1f} points, {z:.1f} SE)"
    out = [Figure(row, f"held-out prompt accuracy, {few_label} (every field right)", pct(b), shown, floor,
                  bool(met))]
    for name in ("colour", "shape", "position"):
        if few.accuracy("base", name) is not None:
            out.append(Figure(row, f"  of which {name}", pct(few.accuracy("base", name)), pct(few.accuracy(v, name)),
                              "(reported)", None))
    if protocol is not None:
        pv = adapted(protocol)
        out.append(Figure(row, "  the same prompts at the eval's 25 steps, guidance 5", pct(field_accuracy(
            protocol, "base", "all")), pct(field_accuracy(protocol, pv, "all")), "(reported)", None))
    return out


def pairwise_figure(row: str, ranked: dict, min_accuracy: float = 0.80) -> Figure:
    """A learned reward's pairwise accuracy on held-out pairs (`diffray.models.reward.rank_pairs`)."""
    return Figure(row, f"pairwise accuracy on {ranked['pairs']} held-out pairs (other prompts, other seeds)", "50% "
                  "(chance)", f"{ranked['accuracy']:.1%}", f">= {min_accuracy:.0%}", ranked["accuracy"] >= min_accuracy)
