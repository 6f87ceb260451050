"""Small image helpers: tensors -> PIL, labelled grids. Pure PIL/numpy."""

from __future__ import annotations

from PIL import Image, ImageDraw


def make_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Tile images row by row (all rows the same length); optional label strip left of each row."""
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one image")
    w, h = rows[0][0].size
    label_w = 8 * max((len(s) for s in labels), default=0) if labels else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        y = pad + i * (h + pad)
        if labels:
            draw.text((2, y + h // 2 - 5), labels[i], fill="black")
        for j, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((w, h)), (label_w + pad + j * (w + pad), y))
    return grid
