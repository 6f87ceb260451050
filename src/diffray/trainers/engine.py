"""One data-parallel training-step API over DeepSpeed ZeRO or torch DDP (worker side).

Trainers call `engine(...)`, `engine.backward(loss)` and `engine.step()` once per micro-batch; the
engine knows where accumulation boundaries are, clips, steps the optimizer and LR schedule, and
saves/loads its own state. This is an edge module: it imports deepspeed and torch.distributed.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file

from diffray.config import OptimSection, StrategySection
from diffray.errors import TrainingError
from diffray.trainers.components.ema import Ema
from diffray.trainers.components.zero import build_deepspeed_config

DS_TAG = "state"
EMA_FILE = "ema.safetensors"


def build_optimizer(params: list[torch.nn.Parameter], optim: OptimSection, max_steps: int):
    """AdamW over the trainable parameters plus the configured LR schedule."""
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay, **({"fused": True} if optim.fused else {}))
    scheduler = get_scheduler(optim.lr_scheduler, optimizer, num_warmup_steps=optim.warmup_steps,
                              num_training_steps=max_steps)
    return optimizer, scheduler


class Engine:
    """Common surface of the two strategies."""

    collective_forward = False  # True where a forward pass needs every rank (ZeRO-3)

    def __init__(self, module: torch.nn.Module, grad_accum_steps: int):
        self.module = module
        self.grad_accum_steps = grad_accum_steps
        self.micro_step = 0
        self.last_grad_norm: float | None = None
        self._trainable: list[torch.nn.Parameter] | None = None

    def is_boundary(self) -> bool:
        """True when the next `step()` ends an optimizer step."""
        return (self.micro_step + 1) % self.grad_accum_steps == 0

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that train (fixed once the engine is built; looked up once, not every step)."""
        if self._trainable is None:
            self._trainable = [p for p in self.module.parameters() if p.requires_grad]
        return self._trainable

    # --- EMA of the trainable weights (ZeRO 0-2 / DDP: every rank holds them whole)
    ema: Ema | None = None

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def attach_ema(self, decay: float, on_cpu: bool) -> None:
        """Keep an EMA of the trainable weights, updated after every optimizer step."""
        self.ema = Ema(self.named_trainable(), decay, on_cpu)

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update(self.named_trainable())

    def ema_weights(self):
        """Context in which the module holds the EMA weights (no-op without EMA)."""
        return self.ema.swapped(self.named_trainable()) if self.ema is not None else nullcontext()

    def save_ema(self, ckpt_dir: Path, is_main: bool) -> None:
        if self.ema is not None and is_main:  # identical on every rank
            tensors, metadata = self.ema.state_dict()
            save_file(tensors, str(ckpt_dir / EMA_FILE), metadata=metadata)

    def load_ema(self, ckpt_dir: Path) -> None:
        """Restore the EMA; a checkpoint without one (EMA turned on for a resumed run) starts it from the
        restored weights."""
        if self.ema is None:
            return
        if not (ckpt_dir / EMA_FILE).is_file():
            self.attach_ema(self.ema.decay, self.ema.on_cpu)
            return
        from safetensors import safe_open

        with safe_open(str(ckpt_dir / EMA_FILE), "pt") as f:
            metadata = f.metadata()
        self.ema.load_state_dict(load_file(str(ckpt_dir / EMA_FILE)), metadata)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def skip_inference_comm_op() -> None:
    """On CPU, DeepSpeed's comm backend loads its shared-memory all-reduce (`deepspeed_shm_comm`) when it
    starts, JIT-compiling it first where no build is cached: about 90 s of both cores on a fresh node, and
    again whenever a process with another compile command (a plain Python process vs a Ray worker) loaded it
    last. Only `inference_all_reduce` uses that op; training's collectives are torch.distributed's. So it is
    marked unavailable before the backend starts (deepspeed.ops keeps its probe of compatible ops in one
    dict for edits like this one). GPUs' accelerators have no such op: nothing to do there."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine(Engine):
    def __init__(self, module, optim: OptimSection, strategy: StrategySection, micro_batch_size: int,
                 grad_accum_steps: int, max_steps: int, precision: str):
        import deepspeed

        skip_inference_comm_op()
        super().__init__(module, grad_accum_steps)
        world = dist.get_world_size() if dist.is_initialized() else 1
        ds_config = build_deepspeed_config(strategy.zero_stage, micro_batch_size, grad_accum_steps, world,
                                           optim.max_grad_norm, precision, strategy.offload_optimizer,
                                           strategy.offload_params,
                                           sum(p.numel() for p in self.trainable_parameters()))
        optimizer, scheduler = build_optimizer(self.trainable_parameters(), optim, max_steps)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        self.zero_stage = strategy.zero_stage

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # DeepSpeed divides by grad_accum_steps itself

    def step(self) -> bool:
        boundary = self.is_boundary()
        self.ds.step()
        self.micro_step += 1
        if boundary:
            self.update_ema()
            norm = self.ds.get_global_grad_norm()
            self.last_grad_norm = float(norm) if norm is not None else None
        return boundary

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def collective_forward(self) -> bool:
        """ZeRO-3 gathers partitioned weights inside forward: all ranks must run every forward together."""
        return self.zero_stage == 3

    def gathered(self):
        """Context in which ZeRO-3 partitioned trainable weights are whole on every rank."""
        if self.zero_stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.trainable_parameters(), modifier_rank=None)

    def save(self, ckpt_dir: Path) -> None:
        # Every rank writes its own optimizer shard; frozen base weights are not saved.
        self.ds.save_checkpoint(str(ckpt_dir), tag=DS_TAG, exclude_frozen_parameters=True)

    def load(self, ckpt_dir: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(ckpt_dir), tag=DS_TAG, load_module_strict=False)
        if path is None:
            raise TrainingError(f"checkpoint {ckpt_dir} has no DeepSpeed state for this rank "
                                "(was it written with another num_workers or zero_stage?)")


class DDPEngine(Engine):
    def __init__(self, module, optim: OptimSection, grad_accum_steps: int, max_steps: int, precision: str,
                 device: torch.device):
        super().__init__(module, grad_accum_steps)
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer, self.scheduler = build_optimizer(self.trainable_parameters(), optim, max_steps)
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.wrapped = (torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda"
                                                                  else None)
                        if distributed else module)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def __call__(self, *args, **kwargs):
        if isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel):
            # What `no_sync()` toggles: all-reduce gradients only on the accumulation boundary.
            self.wrapped.require_backward_grad_sync = self.is_boundary()
        amp = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else nullcontext())
        with amp:
            return self.wrapped(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum_steps
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> bool:
        boundary = self.is_boundary()
        self.micro_step += 1
        if not boundary:
            return False
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = self.trainable_parameters()
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema()
        return True

    def gathered(self):
        return nullcontext()

    def save(self, ckpt_dir: Path) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return  # DDP replicas are identical; rank 0 writes
        named = {n: p.detach().cpu().contiguous() for n, p in self.module.named_parameters() if p.requires_grad}
        save_file(named, str(ckpt_dir / "trainable.safetensors"))
        # Optimizer/scheduler state: tensors and numbers only, loaded back with weights_only=True.
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   ckpt_dir / "optimizer.pt")
        (ckpt_dir / "ddp.json").write_text(json.dumps({"trainable": sorted(named)}))

    def load(self, ckpt_dir: Path) -> None:
        weights = load_file(str(ckpt_dir / "trainable.safetensors"))
        missing = {n for n, p in self.module.named_parameters() if p.requires_grad} - set(weights)
        if missing:
            raise TrainingError(f"checkpoint {ckpt_dir} lacks trainable weights: {sorted(missing)[:3]}...")
        self.module.load_state_dict(weights, strict=False)
        state = torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_engine(module: torch.nn.Module, strategy: StrategySection, optim: OptimSection, micro_batch_size: int,
                 grad_accum_steps: int, max_steps: int, precision: str, device: torch.device) -> Engine:
    """Wrap `module` (only its requires_grad parameters train) in the configured strategy."""
    if strategy.name == "deepspeed":
        return DeepSpeedEngine(module, optim, strategy, micro_batch_size, grad_accum_steps, max_steps, precision)
    return DDPEngine(module, optim, grad_accum_steps, max_steps, precision, device)
