"""GPU figures, one run (no Ray needed: the model code and `ImageEngine` a Generator replica wraps):

1. LoRA training on `builtin:sd15-shaped` (SD 1.5's architecture, random weights) at 512 px in bf16
   autocast: samples/s and peak memory per accelerator option (`diffray.models.speed`: eager vs SDPA
   attention, channels-last, fused AdamW, gradient checkpointing, torch.compile), and MFU: the FLOPs of
   one step counted by `torch.utils.flop_counter` on the model itself, over the step time, against the
   dense bf16 peak (datasheet) and a bf16 matmul measured here;
2. the latent cache's gain at that size: a step that also encodes its images with the VAE (and captions
   with the text encoder) vs a step on cached latents;
3. serving: `ImageEngine.run` latency at 512 px / 25 steps, eager, with `generator.compile`, and with
   compile and `generator.hotswap` (one LoRA slot: a new LoRA compiles nothing), and switching between
   two resident LoRAs (the first request of each, then alternating).

    python benchmarks/gpu.py                 # on a CUDA machine; writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --dry           # CPU, tiny model, a few steps: checks the script runs

`--dry` runs every section on the tiny random model at 64 px (compile with the aot_eager backend), so
the script cannot rot; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # testkit.adapters: untrained (random) LoRAs
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense, no sparsity
VARIANTS = {  # name -> (Accelerator fields, fused AdamW, gradient checkpointing)
    "eager_attention": ({"attention": "eager"}, False, False),
    "sdpa": ({}, False, False),
    "sdpa+channels_last": ({"channels_last": True}, False, False),
    "sdpa+fused_adamw": ({}, True, False),
    "sdpa+grad_ckpt": ({}, False, True),
    "compile+channels_last+fused": ({"compile": True, "channels_last": True}, True, False),
}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype) -> float | None:
    """FLOP/s of a bf16 8192^3 matmul (mean of 10 after 3 warm-ups); None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0)


def build_unet(model_path: str, device, acc: dict, ckpt: bool, rank: int):
    from diffusers import UNet2DConditionModel

    from diffray.models import speed
    from diffray.models.adapters import add_lora

    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", use_safetensors=True)
    add_lora(unet, rank, float(rank), 0.0, ["to_q", "to_k", "to_v", "to_out.0"], 0)
    if ckpt:
        unet.enable_gradient_checkpointing()
    unet.to(device).train()
    return speed.apply(unet, speed.Accelerator(**acc))


def train_variant(name, args, model_path, device, dtype, batch, flops: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    acc, fused, ckpt = VARIANTS[name]
    if args.dry and acc.get("compile"):
        acc = {**acc, "compile_backend": "aot_eager"}
    unet = build_unet(model_path, device, acc, ckpt, args.rank)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {}))
    noisy, noise, t, ehs = batch

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(noisy, t, encoder_hidden_states=ehs).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if name == "sdpa" and "per_step" not in flops:
        with FlopCounterMode(display=False) as counter:
            step()
        flops["per_step"] = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    out = {"step_s": dt, "samples_per_s": noisy.shape[0] / dt, "warmup_s": warm}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def encode_cost(model_path, device, dtype, batch_size, res, repeats) -> float:
    """Seconds to VAE-encode `batch_size` images and text-encode their captions (what the cache saves)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", use_safetensors=True).to(device, dtype)
    te = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", use_safetensors=True).to(device, dtype)
    px = torch.randn(batch_size, 3, res, res, device=device, dtype=dtype)
    ids = torch.randint(0, 400, (batch_size, 77), device=device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            vae.encode(px).latent_dist.sample()
            te(ids)
            sync(device)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def serve_section(args, model_path, device) -> dict:
    from diffray.serve.config import parse_args
    from diffray.serve.engine import ImageEngine
    from diffray.serve.schemas import Job
    from testkit.adapters import random_lora

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="diffray-gpu-") as reg:
        for k, name in enumerate(("lora-a", "lora-b")):
            random_lora(model_path, Path(reg) / name, seed=k, rank=args.rank, std=0.01)
        for key in ("eager", "compiled", "compiled_hotswap"):
            compiled = key != "eager"
            gen = {"dtype": "float32" if args.dry else "bfloat16", "compile": compiled}
            if key == "compiled_hotswap":  # one LoRA slot, weights replaced in place (diffray.serve.hotswap)
                gen["hotswap"] = {"rank": args.rank}
            if args.dry and compiled:
                gen["compile_backend"] = "aot_eager"
            engine = ImageEngine(parse_args({"model": model_path, "adapters_dir": reg, "generator": gen}),
                                 device=str(device))

            def run(adapters=()):
                job = Job(prompt="a red circle on a blue background", n=1, width=args.resolution,
                          height=args.resolution, steps=args.gen_steps, guidance=7.5, seed=0, adapters=adapters)
                t0 = time.perf_counter()
                res = engine.run([job])[0]
                if isinstance(res, Exception):
                    raise res
                return time.perf_counter() - t0

            first = run()
            lat = [run() for _ in range(args.repeats)]
            out[key] = {"first_s": first, "p50_s": statistics.median(lat)}
            engine.acquire(["lora-a", "lora-b"])
            firsts = {n: run(((n, 1.0),)) for n in ("lora-a", "lora-b")}
            alternating = [run(((("lora-a", "lora-b")[i % 2], 1.0),)) for i in range(2 * args.repeats)]
            out[key].update(first_with_lora_s=firsts, alternating_lora_p50_s=statistics.median(alternating))
            print(f"serve {key}: {out[key]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU, tiny random model, a few steps (checks the script)")
    p.add_argument("--batch", type=int, default=None, help="training micro-batch (8; dry 2)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="timed training steps per variant (20; dry 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (3: compile needs them; dry 1)")
    p.add_argument("--gen-steps", type=int, default=None, help="sampler steps per generation (25; dry 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed generations per case (5; dry 2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="training variants, comma-separated")
    p.add_argument("--sections", default="train,cache,serve")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    args = p.parse_args()
    d = args.dry
    for name, full, dry in (("batch", 8, 2), ("steps", 20, 2), ("warmup", 3, 1), ("gen_steps", 25, 2),
                            ("repeats", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, dry if d else full)
    args.resolution = 64 if d else 512

    import torch

    from diffray.models.loading import resolve_model_path

    if not d and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs CUDA (use --dry to check it on CPU)")
    device = torch.device("cpu" if d else "cuda")
    dtype = torch.float32 if d else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model_path = resolve_model_path("builtin:tiny-random" if d else "builtin:sd15-shaped")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report: dict = {"device": gpu, "torch": torch.__version__, "resolution": args.resolution, "batch": args.batch,
                    "rank": args.rank, "dry": d}
    sections = args.sections.split(",")

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    if "train" in sections or "cache" in sections:
        from diffusers import UNet2DConditionModel

        cfg = UNet2DConditionModel.load_config(model_path, subfolder="unet")
        g = torch.Generator().manual_seed(0)
        lat = args.resolution // 8
        batch = (torch.randn(args.batch, 4, lat, lat, generator=g).to(device),
                 torch.randn(args.batch, 4, lat, lat, generator=g).to(device),
                 torch.randint(0, 1000, (args.batch,), generator=g).to(device),
                 torch.randn(args.batch, 77, cfg["cross_attention_dim"], generator=g).to(device))
        flops: dict = {}
        peak = matmul_peak(device, torch.bfloat16)
        sheet = next((v for k, v in DATASHEET_BF16.items() if k in gpu), None)
        report["train"] = {"matmul_bf16_flops": peak, "datasheet_bf16_flops": sheet, "variants": {}}
        for name in [v for v in args.variants.split(",") if v]:
            res = train_variant(name, args, model_path, device, dtype, batch, flops)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the variant's model and optimizer are gone
            if flops.get("per_step"):
                achieved = flops["per_step"] / res["step_s"]
                res.update(flops_per_step=flops["per_step"], achieved_flops=achieved,
                           mfu_datasheet=achieved / sheet if sheet else None,
                           mfu_measured_matmul=achieved / peak if peak else None)
            report["train"]["variants"][name] = res
            print(f"train {name}: {res}", flush=True)
            save()
        if "cache" in sections and "sdpa" in report["train"]["variants"]:
            step = report["train"]["variants"]["sdpa"]["step_s"]
            enc = encode_cost(model_path, device, dtype, args.batch, args.resolution, args.repeats)
            report["latent_cache"] = {"encode_s": enc, "step_s": step, "gain": (step + enc) / step}
            print(f"latent cache: {report['latent_cache']}", flush=True)
            save()
    if "serve" in sections:
        report["serve"] = serve_section(args, model_path, device)
        save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
