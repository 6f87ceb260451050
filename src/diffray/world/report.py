"""Scoring of rendered eval images and their report: per-image records, accuracy tables and metrics per
variant (base, adapter), a text table, JSON, a Markdown table and a grid PNG that frames each image green
(every stated field right) or red. Pure: never imports torch or ray.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from diffray.world.reader import read_scene
from diffray.world.scores import FIELDS, accuracy_table, edge_f1, jpeg_kb, score, shape_iou, subject_fidelity
from diffray.world.suites import SUITES, EvalItem

METRICS = ("edge_f1", "shape_iou", "fidelity", "jpeg_kb", "drift")
FRAME = {True: (40, 180, 60), False: (220, 40, 40), None: (160, 160, 160)}
GRID_COLUMNS = 16


@dataclass
class EvalResult:
    """What `evaluate` measured. `records`: one dict per image (id, variant, prompt, seed, checks, right,
    reading, metrics); `tables`: {variant: accuracy_table}; `metrics`: {variant: {name: {mean, sem, n}}}."""

    suite: str
    settings: dict
    variants: list[str]
    records: list[dict]
    tables: dict[str, dict]
    metrics: dict[str, dict]
    wall_s: float
    images: dict = field(default_factory=dict, repr=False)  # (variant, id) -> PIL image

    def accuracy(self, variant: str, name: str = "all") -> float | None:
        row = self.tables.get(variant, {}).get(name)
        return None if row is None else row["accuracy"]

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("suite", "settings", "variants", "tables", "metrics", "wall_s",
                                               "records")}


def mean_sem(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "sem": sem, "n": int(len(v))}


def score_image(suite: str, item: EvalItem, img: Image.Image) -> dict:
    """Checks, reading and metrics of one rendered image."""
    reading = read_scene(img)
    checks = score(img, item.prompt, reading)
    metrics = {"jpeg_kb": jpeg_kb(img)}
    if suite == "controlnet":
        control = Image.open(io.BytesIO(item.control)).convert("RGB")
        metrics.update(edge_f1=edge_f1(control, img), shape_iou=shape_iou(control, img, reading))
    if suite == "subject":
        metrics["fidelity"] = subject_fidelity(img)
    return {"checks": checks, "right": all(checks.values()) if checks else None, "reading": reading.fields(),
            "metrics": metrics}


def _drift(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference in [0, 1]."""
    return float(np.mean(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32))) / 255.0)


def _metric_summary(records: list[dict]) -> dict:
    out = {}
    for name in METRICS:
        vals = [r["metrics"][name] for r in records if name in r["metrics"]]
        if vals:
            out[name] = mean_sem(vals)
    if any("fidelity" in r["metrics"] for r in records):  # subject: instance and class prompts apart
        for name in ("fidelity", "drift"):
            for prompt in sorted({r["prompt"] for r in records}, reverse=True):
                vals = [r["metrics"][name] for r in records if r["prompt"] == prompt and name in r["metrics"]]
                if vals:
                    out[f"{name}: {prompt}"] = mean_sem(vals)
    if any("drift" in r["metrics"] for r in records):
        out["identical_to_base"] = mean_sem([float(r["metrics"].get("drift", 1.0) == 0.0) for r in records])
    return out


def score_rows(suite: str, settings: dict, variants: list[str], items: list[EvalItem],
               images_png: dict[tuple[str, int], bytes], wall_s: float) -> EvalResult:
    """Score every rendered image; an adapted variant's images also get their drift from the base's."""
    images = {k: Image.open(io.BytesIO(v)).convert("RGB") for k, v in images_png.items()}
    images.update({("control", it.id): Image.open(io.BytesIO(it.control)).convert("RGB") for it in items if it.control})
    records = []
    for variant in variants:
        for it in items:
            rec = {"id": it.id, "variant": variant, "prompt": it.prompt, "seed": it.seed,
                   "rendered_prompt": it.prompt if variant == "base" else it.adapter_prompt,
                   **score_image(suite, it, images[(variant, it.id)])}
            if variant != "base" and ("base", it.id) in images:
                rec["metrics"]["drift"] = _drift(images[(variant, it.id)], images[("base", it.id)])
            records.append(rec)
    tables = {v: accuracy_table([r["checks"] for r in records if r["variant"] == v and r["checks"]]) for v in variants}
    metrics = {v: _metric_summary([r for r in records if r["variant"] == v]) for v in variants}
    return EvalResult(suite, settings, variants, records, tables, metrics, wall_s, images)


def table_rows(result: EvalResult) -> list[list[str]]:
    """Rows [what, variant 1, variant 2, ...]: accuracy per field ("87.5% (56/64)"), then metrics (mean +- sem)."""
    rows = [["field"] + result.variants]
    for name in FIELDS + ("all",):
        cells = [result.tables[v].get(name) for v in result.variants]
        if any(cells):
            rows.append([name] + [f"{c['accuracy']:.1%} ({c['right']}/{c['total']})" if c else "-" for c in cells])
    names = list(dict.fromkeys(k for v in result.variants for k in result.metrics[v]))
    for name in names:
        cells = [result.metrics[v].get(name) for v in result.variants]
        rows.append([name] + [f"{c['mean']:.3f} ± {c['sem']:.3f}" if c else "-" for c in cells])
    return rows


def format_table(result: EvalResult) -> str:
    rows = table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    s = result.settings
    spacing = f" ({s['timestep_spacing']})" if s.get("timestep_spacing") else ""
    head = (f"suite {result.suite} ({SUITES[result.suite]}): {s['num']} prompts x {len(result.variants)} "
            f"variant(s), model {s['model']}, {s['steps']} steps{spacing}, guidance {s['guidance']}, "
            f"{s['resolution']}px, seed {s['seed']}, {result.wall_s:.1f}s")
    return "\n".join([head, lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def markdown(result: EvalResult, grid_name: str) -> str:
    rows = table_rows(result)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |"
                                                                               for r in rows[1:]]
    settings = ", ".join(f"{k}={v}" for k, v in result.settings.items() if v is not None)
    return (f"# diffray eval: {result.suite}\n\n{SUITES[result.suite]}.\n\nSettings: {settings}; wall time "
            f"{result.wall_s:.1f}s.\n\n" + "\n".join(lines) + f"\n\n![grid]({grid_name}) (frame: green = every "
            "stated field right, red = some wrong, grey = nothing to check)\n")


def grid(result: EvalResult) -> Image.Image:
    """Rows of framed images, GRID_COLUMNS per row, variant by variant (a control row first for ControlNet)."""
    from diffray.images import make_grid

    rows, labels = [], []
    by_id = {(r["variant"], r["id"]): r for r in result.records}
    ids = sorted({r["id"] for r in result.records})
    controls = ["control"] if ("control", ids[0]) in result.images else []
    for variant in controls + result.variants:
        right = [None if variant == "control" else by_id[(variant, i)]["right"] for i in ids]
        framed = [ImageOps.expand(result.images[(variant, i)], border=2, fill=FRAME[r]) for i, r in zip(ids, right)]
        for k in range(0, len(framed), GRID_COLUMNS):
            row = framed[k:k + GRID_COLUMNS]
            rows.append(row + [Image.new("RGB", row[0].size, "white")] * (GRID_COLUMNS - len(row)))
            labels.append(variant if k == 0 else "")
    return make_grid(rows, labels)


def write_report(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and grid.png into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "grid": out / "grid.png"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n")
    paths["markdown"].write_text(markdown(result, paths["grid"].name))
    grid(result).save(paths["grid"])
    return paths
