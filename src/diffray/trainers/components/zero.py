"""Build a DeepSpeed config dict from our typed settings (never a hand-written JSON)."""

from __future__ import annotations

# Trainable elements up to which ZeRO-2 keeps each gradient where autograd put it (an adapter's few MB): copying
# every gradient into a contiguous bucket as it is produced, then reduce-scattering it, guards against memory
# fragmentation of large gradients and costs a Python hook's copy per tensor, which for a LoRA's hundreds of
# small tensors was most of DeepSpeed's per-step cost (BENCHMARKS.md, "DeepSpeed ZeRO-2's own per-step cost").
SMALL_GRADIENTS = 50_000_000


def build_deepspeed_config(
    zero_stage: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    max_grad_norm: float | None,
    precision: str = "fp32",
    offload_optimizer: bool = False,
    offload_params: bool = False,
    trainable_elements: int | None = None,
) -> dict:
    """Return a DeepSpeed config for a client-supplied optimizer and LR scheduler.

    Args:
        precision: "fp32", "fp16" or "bf16" (fp16/bf16 only make sense on GPUs).
        trainable_elements: the trained parameters' total size; up to `SMALL_GRADIENTS` (adapters), ZeRO-2
            without offload neither copies gradients into contiguous buckets nor reduce-scatters them
            (all-reduce instead).
    """
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    zero: dict = {"stage": zero_stage}
    if zero_stage >= 2:
        # Contiguous reduce-scattered gradients (no fragmentation) for large trainable sets; in place for a
        # small set under ZeRO-2 without offload (ZeRO-3 and the offloaded optimizer keep the layout they were
        # tested with). No overlap with backward: it costs bucket memory and pays off only with concurrent
        # compute and communication (GPU + NCCL), not on CPU/gloo.
        small = trainable_elements is not None and trainable_elements <= SMALL_GRADIENTS
        contiguous = not (small and zero_stage == 2 and not offload_optimizer)
        zero.update(overlap_comm=False, contiguous_gradients=contiguous, reduce_scatter=contiguous)
    if zero_stage == 3:
        # Checkpoints keep the partitions; artifacts come from gathered weights (`engine.gathered()`).
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # Our AdamW is a plain torch optimizer; allow it with offload too.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if max_grad_norm is not None:
        config["gradient_clipping"] = float(max_grad_norm)
    if precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config
