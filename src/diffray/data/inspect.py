"""`diffray data inspect`: what a dataset holds before training on it: row counts, image sizes and
modes, caption lengths, what validation would quarantine (each row by file, with its reason, also
written as the `quarantine.jsonl` training writes), and a contact sheet of a sample.

One Ray Data pass over the raw rows returns a small record per row (no pixels); the contact sheet
decodes only the sampled rows.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from diffray.data.validate import Rules, as_bytes, caption_of, check_row

SIZE_EDGES = (0, 64, 128, 256, 512, 768, 1024, 2048)


def describe_batch(batch: dict, rules: Rules) -> dict:
    """map_batches: per row {sample_id, source, width, height, mode, caption_chars, caption_words, reason}."""
    out: dict[str, list] = {k: [] for k in ("sample_id", "source", "width", "height", "mode", "caption_chars",
                                            "caption_words", "reason")}
    for i, (sid, src, img, cap) in enumerate(zip(batch["sample_id"], batch["source"], batch["image"],
                                                  batch["caption"])):
        w = h = -1
        mode = ""
        img = as_bytes(img)
        if img is not None:
            try:
                with Image.open(io.BytesIO(img)) as im:
                    (w, h), mode = im.size, im.mode
                    if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF-rotated by 90 degrees: displayed h x w
                        w, h = h, w
            except Exception:  # undecodable: validation gives the reason
                pass
        text = caption_of(cap, rules) or ""
        out["sample_id"].append(int(sid))
        out["source"].append(str(src))
        out["width"].append(w)
        out["height"].append(h)
        out["mode"].append(mode)
        out["caption_chars"].append(len(text))
        out["caption_words"].append(len(text.split()))
        out["reason"].append(check_row(batch, i, rules) or "")
    return {k: np.array(v, dtype=object if k in ("source", "mode", "reason") else np.int64) for k, v in out.items()}


def size_bucket(side: int) -> str:
    """'256-511' style label of the shorter image side."""
    for lo, hi in zip(SIZE_EDGES, SIZE_EDGES[1:]):
        if side < hi:
            return f"{lo}-{hi - 1}"
    return f">={SIZE_EDGES[-1]}"


@dataclass
class Inspection:
    source: str
    rows: list[dict]
    sheet: str | None = None
    report: str | None = None  # the quarantine.jsonl written, if any
    quarantine_reasons: Counter = field(default_factory=Counter)
    buckets: list[tuple[int, int]] | None = None

    @property
    def good(self) -> list[dict]:
        return [r for r in self.rows if not r["reason"]]

    def summary(self) -> dict:
        good, bad = self.good, [r for r in self.rows if r["reason"]]
        chars = np.array([r["caption_chars"] for r in good] or [0])
        words = np.array([r["caption_words"] for r in good] or [0])
        return {
            "source": self.source, "rows": len(self.rows), "usable": len(good), "quarantined": len(bad),
            "shorter_side_histogram": dict(sorted(Counter(size_bucket(min(r["width"], r["height"]))
                                                          for r in good).items(),
                                                  key=lambda kv: int(kv[0].lstrip(">=").split("-")[0]))),
            "modes": dict(Counter(r["mode"] for r in good)),
            "caption_chars": {"min": int(chars.min()), "mean": round(float(chars.mean()), 1), "max": int(chars.max())},
            "caption_words": {"min": int(words.min()), "mean": round(float(words.mean()), 1), "max": int(words.max())},
            "quarantine_reasons": dict(Counter(r["reason"].split(" (")[0] for r in bad).most_common()),
            "quarantined_rows": [{"sample_id": r["sample_id"], "source": r["source"], "reason": r["reason"]}
                                 for r in bad],
            "quarantine_report": self.report,
            "contact_sheet": self.sheet,
            **({"aspect_buckets": self.bucket_histogram()} if self.buckets else {}),
        }

    def bucket_histogram(self) -> dict[str, int]:
        """Usable rows per aspect bucket ('WxH'), in bucket order (narrowest first)."""
        from diffray.data.transforms import nearest_bucket

        counts = Counter(nearest_bucket(r["width"], r["height"], self.buckets) for r in self.good)
        return {f"{w}x{h}": counts[(w, h)] for w, h in self.buckets}


def contact_sheet(images: list[tuple[bytes, str]], out: Path, cell: int = 128, columns: int = 4,
                  max_pixels: int = 89_478_485) -> Path:
    """A grid PNG of (image bytes, caption) pairs, each fitted into a cell with its caption below."""
    from PIL import ImageDraw

    from diffray.data.transforms import decode_image

    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (data, caption) in enumerate(images):
        img = decode_image(data, "contact sheet", max_pixels)
        img.thumbnail((cell, cell))
        x, y = (i % columns) * cell, (i // columns) * (cell + 16)
        sheet.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
        draw.text((x + 2, y + cell + 2), caption[: cell // 6], fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def inspect_dataset(path: str, data, sheet: Path | None, sample: int = 16,
                    report_dir: str | Path | None = None) -> Inspection:
    """Describe every row of the source at `path` (`data`: the config's data section) and write a
    contact sheet of the first `sample` usable rows to `sheet`, and with `report_dir` the
    `quarantine.jsonl` a training run would write. With `data.aspect_buckets` the summary also counts
    usable rows per bucket."""
    from diffray.data.pipeline import read_source, write_quarantine

    rules = Rules.of(data)
    raw, _ = read_source(path, data)
    rows = raw.map_batches(describe_batch, fn_kwargs={"rules": rules}, batch_format="numpy").take_all()
    rows = sorted(({k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in rows),
                  key=lambda r: r["sample_id"])
    from diffray.data.pipeline import bucket_sizes

    result = Inspection(path, rows, buckets=bucket_sizes(data))
    if report_dir is not None:
        result.report = write_quarantine([r for r in rows if r["reason"]], report_dir)
    if sheet is not None and result.good:
        want = {r["sample_id"] for r in result.good[:sample]}
        from ray.data.expressions import col

        picked = raw.filter(expr=col("sample_id").is_in(sorted(want))).take_all()
        picked.sort(key=lambda r: int(r["sample_id"]))
        result.sheet = str(contact_sheet([(r["image"], caption_of(r["caption"], rules) or "") for r in picked], sheet,
                                         max_pixels=rules.max_image_pixels))
    return result


def inspect_section(path: str, caption_column: str, image_column: str, min_image_size: int, buckets: int | None,
                    bucket_step: int):
    """The data section `diffray data inspect`'s options describe (`buckets`: the aspect-bucket resolution, or
    None). Raises ConfigError naming the option the user typed (--bucket-step), not the field behind it."""
    import re

    from diffray.config import DataSection, validate_as
    from diffray.errors import ConfigError

    if buckets is not None and (bucket_step % 8 or buckets % bucket_step):
        raise ConfigError(f"--buckets {buckets} must be a multiple of --bucket-step {bucket_step}, itself a "
                          "multiple of 8")
    try:
        return validate_as(DataSection, {"path": path, "caption_column": caption_column, "image_column": image_column,
                                         "min_image_size": min_image_size, "aspect_buckets": buckets is not None,
                                         "resolution": buckets or 64, "bucket_step": bucket_step if buckets else 64})
    except ConfigError as exc:
        raise ConfigError(re.sub(r"(?:^|(?<=; ))(\w+):", lambda m: "--" + {"resolution": "buckets"}.get(
            m.group(1), m.group(1)).replace("_", "-") + ":", str(exc))) from None


def check_outputs(sheet: Path | None, report_dir: str | Path | None) -> None:
    """The paths `inspect_dataset` writes at its end (the contact sheet, the quarantine report's folder),
    checked before the pass over the rows. Raises DatasetError naming the option."""
    from diffray import storage
    from diffray.errors import DatasetError

    if sheet is not None and sheet.suffix.lower() not in Image.registered_extensions():
        raise DatasetError(f"--out {sheet}: not an image file name (give .png, .jpg or .webp)")
    if report_dir is not None and not storage.is_uri(report_dir) and Path(report_dir).expanduser().is_file():
        raise DatasetError(f"--report-dir {report_dir}: is a file, not a folder")


def format_summary(summary: dict) -> str:
    """Human-readable lines (the JSON form is `json.dumps(summary)`)."""
    lines = [f"{summary['source']}: {summary['rows']} rows, {summary['usable']} usable, "
             f"{summary['quarantined']} would be quarantined"]
    lines.append("shorter side: " + ", ".join(f"{k}px: {v}" for k, v in summary["shorter_side_histogram"].items()))
    lines.append("modes: " + ", ".join(f"{k}: {v}" for k, v in summary["modes"].items()))
    c, w = summary["caption_chars"], summary["caption_words"]
    lines.append(f"captions: {c['min']}-{c['max']} chars (mean {c['mean']}), {w['min']}-{w['max']} words "
                 f"(mean {w['mean']})")
    if "aspect_buckets" in summary:
        lines.append("aspect buckets: " + ", ".join(f"{k}: {v}" for k, v in summary["aspect_buckets"].items()))
    for reason, n in summary["quarantine_reasons"].items():
        lines.append(f"  quarantine: {n} x {reason}")
    for r in summary["quarantined_rows"]:
        lines.append(f"  quarantined: {r['source']}: {r['reason']}")
    if summary["quarantine_report"]:
        lines.append(f"quarantine report: {summary['quarantine_report']}")
    if summary["contact_sheet"]:
        lines.append(f"contact sheet: {summary['contact_sheet']}")
    return "\n".join(lines)

