"""Does a world model's denoiser use the position words, and could its UNet place a shape at all? (docs/world.md,
"Where position is lost").

    .venv/bin/python evals/position_probe.py                          # the shipped builtin:tiny: words only, ~1 min
    .venv/bin/python evals/position_probe.py --oracle-steps 1500      # + the oracle run, ~8 min on 2 CPUs
    .venv/bin/python evals/position_probe.py --joint-steps 1500       # + UNet and text encoder on the words
    .venv/bin/python evals/position_probe.py --model runs/x/artifact  # any world model dir

Data: the first 6,000 `pretrain` scenes of seed 7 with a position stated in 75% of the captions, encoded by the
model's VAE (posterior mean); scenes 5,000-5,999 that state a position are held out.

1. **Words.** The model's denoising loss on the held-out scenes with their own caption, and with the position
   word swapped (left <-> right, top <-> bottom), at the same noise and timesteps. A model that places shapes
   by the caption does worse with the swapped one (ratio > 1), most at high noise, where the layout is decided.
2. **Oracle** (`--oracle-steps N`): the UNet alone trains on scenes 0-4,999 for N steps (batch 64, AdamW
   5e-4, uniform timesteps, no caption dropout), with one learned vector per position (none, left, right, top,
   bottom; initial norm ~24) appended to the caption's text states as a 78th token. Then the same comparison with
   the oracle token swapped. If the ratio rises well above 1, the UNet can place a shape when its conditioning
   tells the positions apart clearly, and what is missing is in the text states.
3. **Joint** (`--joint-steps N`, the control): from the model's weights again, the UNet and the text encoder
   train together on the captions' own words (as `method: full` with `full.train_text_encoder` does, without
   caption dropout or EMA), same data, steps and optimizer; then the words comparison with the trained encoder.

Runs in this process (no Ray); deterministic for a seed up to CPU float summation order.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tempfile
import time
from pathlib import Path

from diffray.world.grammar import POSITIONS as STATED

SWAP_WORD = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
SWAP_RE = re.compile(rf"\b({'|'.join(SWAP_WORD)})\b")


def swap_position(text: str) -> str:
    """`text` with its position word swapped: left <-> right, top <-> bottom."""
    return SWAP_RE.sub(lambda m: SWAP_WORD[m.group(1)], text)


POSITIONS = [None, *STATED]  # index 0: no position stated
SWAP_INDEX = {i: POSITIONS.index(swap_position(p)) for i, p in enumerate(POSITIONS) if p}
NUM_ROWS, NUM_TRAIN, MAX_TOKENS = 6000, 5000, 77
NOISE_BANDS = ((0, 1000), (600, 1000), (0, 400))


def load_rows(data_dir: Path | None) -> list[dict]:
    import pyarrow.parquet as pq

    from diffray.world.writers import write_world_dataset

    if data_dir is None:
        with tempfile.TemporaryDirectory(prefix="position-probe-") as tmp:
            return load_rows(write_world_dataset(Path(tmp) / "data", "pretrain", NUM_ROWS, 7, fmt="parquet",
                                                 position_p=0.75))
    table = pq.read_table(sorted(data_dir.glob("part-*.parquet"))[0], columns=["image", "text", "position"])
    return table.slice(0, NUM_ROWS).to_pylist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--oracle-steps", type=int, default=0)
    ap.add_argument("--joint-steps", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None, help="a `diffray data world --format parquet` dir "
                    "(default: written to a temp dir)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffray.models.loading import resolve_model_path

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = str(resolve_model_path(args.model))
    rows = load_rows(args.data)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    te = unet = None

    def fresh() -> None:  # the model's own text encoder and UNet (each run starts from them)
        nonlocal te, unet
        te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")

    def token_ids(texts: list[str]) -> torch.Tensor:
        return tok(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids

    def encode_text(ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([te(ids[i:i + 500])[0] for i in range(0, len(ids), 500)])

    fresh()

    with torch.no_grad():
        pixels = np.stack([np.array(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
        x = torch.tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        lat = torch.cat([vae.encode(x[i:i + 500]).latent_dist.mean for i in range(0, len(x), 500)])
        lat = lat * vae.config.scaling_factor
        ids = token_ids([r["text"] for r in rows])
        states = encode_text(ids)
    pos = torch.tensor([POSITIONS.index(r["position"]) for r in rows])
    held = torch.tensor([i for i in range(NUM_TRAIN, len(rows)) if pos[i] > 0])
    swapped = [swap_position(rows[int(i)]["text"]) for i in held]
    if any(a == rows[int(i)]["text"] for a, i in zip(swapped, held)):
        raise SystemExit("a held-out caption has no position word to swap")
    swapped_ids = token_ids(swapped)
    with torch.no_grad():
        swapped_states = encode_text(swapped_ids)

    def loss(cond: torch.Tensor, idx: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        pred = unet(sched.add_noise(lat[idx], noise, t), t, encoder_hidden_states=cond).sample
        return torch.nn.functional.mse_loss(pred, noise)

    def compare(name: str, right_cond, wrong_cond) -> None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for lo, hi in NOISE_BANDS:
                t = torch.randint(lo, hi, (len(held),), generator=g)
                noise = torch.randn(len(held), *lat.shape[1:], generator=g)
                right, wrong = loss(right_cond(), held, t, noise).item(), loss(wrong_cond(), held, t, noise).item()
                print(f"{name}: t in [{lo}, {hi}): held-out loss, own position {right:.5f}, swapped {wrong:.5f}, "
                      f"ratio {wrong / right:.3f}", flush=True)

    def train(name: str, steps: int, extra: list, cond) -> None:
        """The UNet (and `extra` parameters) on scenes 0..NUM_TRAIN-1, conditioned by `cond(indices)`."""
        opt = torch.optim.AdamW(list(unet.parameters()) + extra, lr=5e-4)
        start = time.time()
        for step in range(steps):
            idx = torch.randint(0, NUM_TRAIN, (64,))
            t = torch.randint(0, sched.config.num_train_timesteps, (64,))
            step_loss = loss(cond(idx), idx, t, torch.randn(64, *lat.shape[1:]))
            opt.zero_grad()
            step_loss.backward()
            opt.step()
            if step % 100 == 0:
                print(f"{name} step {step} loss {step_loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)

    print(f"model {args.model}: {len(rows)} scenes, {len(held)} held out with a position "
          f"(e.g. {rows[int(held[0])]['text']!r} -> {swapped[0]!r})", flush=True)
    compare("words", lambda: states[held], lambda: swapped_states)
    if args.oracle_steps:
        oracle = torch.nn.Parameter(torch.randn(len(POSITIONS), states.shape[-1]) * 3)

        def with_oracle(idx: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return torch.cat([states[idx], oracle[p][:, None, :]], 1)

        train("oracle", args.oracle_steps, [oracle], lambda idx: with_oracle(idx, pos[idx]))
        compare("oracle", lambda: with_oracle(held, pos[held]),
                lambda: with_oracle(held, torch.tensor([SWAP_INDEX[int(p)] for p in pos[held]])))
    if args.joint_steps:
        fresh()
        train("joint", args.joint_steps, list(te.parameters()), lambda idx: te(ids[idx])[0])
        compare("joint", lambda: encode_text(ids[held]), lambda: encode_text(swapped_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
