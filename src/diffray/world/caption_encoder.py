"""Stage 2 of `diffray pretrain-world`: the text encoder learns to tell every field of a caption apart, alone,
before the UNet trains on it frozen.

Why (docs/world.md, "Where position is lost"): trained jointly with the UNet from random weights, the text
encoder collapsed the position words. In the first world model, swapping "left" for "right" moved its output
by 0.016 of its norm, swapping a colour by 0.35, and no training of the UNet on those states learned to place
a shape. Trained first to name each field of the caption from its output, the encoder keeps them apart
(a position swap moves it by ~0.7), and a UNet trained on it frozen places shapes by the caption. SD's UNet
likewise trains on a frozen text encoder that was trained on another objective (CLIP's).

The objective: from the encoder's output averaged over all `MAX_TOKENS` positions (padding included: the
UNet's cross-attention sees every one), one linear head per field predicts its value (colour, shape, bg,
size, position; "none" when the caption leaves it out), summed cross-entropy. Runs in this process on the
CPU (a few hundred steps of a 2-layer encoder); deterministic for a seed on a given machine.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from diffray.errors import DatasetError

FIELDS = ("colour", "shape", "bg", "size", "position")
HELD_OUT = 0.1  # the last share of the captions, for the accuracy in the card
STAGE_FILE = "diffray_stage.json"


def read_captions(data_dir: Path) -> list[dict]:
    """The captions and their fields of a `diffray data world --format parquet` dir, in row order."""
    import pyarrow.parquet as pq

    parts = sorted(Path(data_dir).glob("*.parquet"))
    if not parts:
        raise DatasetError(f"{data_dir}: no .parquet files (a `diffray data world --format parquet` dir)")
    rows: list[dict] = []
    for part in parts:
        rows += pq.read_table(part, columns=["text", *FIELDS]).to_pylist()
    return rows


def train_caption_encoder(model_dir: Path, data_dir: Path, out_dir: Path, *, steps: int, batch: int, lr: float,
                          seed: int) -> dict:
    """`model_dir` with its text encoder trained on the captions of `data_dir`, written to `out_dir` (skipped
    when `out_dir` holds a finished stage). Returns the stage's figures for the card."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffray.data.transforms import tokenize_captions
    from diffray.world.writers import atomic_dir

    done = Path(out_dir) / STAGE_FILE
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.time()
    rows = read_captions(data_dir)
    values = {f: sorted({str(r[f]) for r in rows}) for f in FIELDS}  # str(None) == "None": field left out
    targets = {f: torch.tensor([values[f].index(str(r[f])) for r in rows]) for f in FIELDS}
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    ids = torch.from_numpy(tokenize_captions(tokenizer, [r["text"] for r in rows]))  # as training tokenizes
    n_train = len(rows) - max(1, int(len(rows) * HELD_OUT))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").train()
        width = encoder.config.hidden_size
        heads = torch.nn.ModuleDict({f: torch.nn.Linear(width, len(values[f])) for f in FIELDS})
        opt = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=lr)
        order = torch.Generator().manual_seed(seed)

        def logits(idx):
            pooled = encoder(ids[idx])[0].mean(dim=1)
            return {f: heads[f](pooled) for f in FIELDS}

        losses = []
        for _ in range(steps):
            idx = torch.randint(0, n_train, (batch,), generator=order)
            out = logits(idx)
            loss = sum(torch.nn.functional.cross_entropy(out[f], targets[f][idx]) for f in FIELDS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        encoder.eval()
        with torch.no_grad():
            held = torch.arange(n_train, len(rows))
            out = logits(held)
            accuracy = {f: round(float((out[f].argmax(1) == targets[f][held]).float().mean()), 4) for f in FIELDS}
    figures = {"method": "caption-fields", "steps": steps, "wall_time_s": round(time.time() - t0, 1),
               "loss_first": sum(losses[:10]) / len(losses[:10]), "loss_last": sum(losses[-10:]) / len(losses[-10:]),
               "heldout_accuracy": accuracy, "captions": len(rows),
               "config": {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "fields": list(FIELDS)},
               "artifact": str(out_dir)}
    with atomic_dir(Path(out_dir), STAGE_FILE) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("text_encoder"))
        encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        (tmp / STAGE_FILE).write_text(json.dumps(figures, indent=2))
    return figures
