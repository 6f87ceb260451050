"""Pieces of the training loop that must stay cheap without changing what they do: the step's RNG seed
(see benchmarks/train_overhead.py), and the DeepSpeed engine's start on CPU, which must not compile or
load DeepSpeed's shared-memory inference all-reduce."""

from __future__ import annotations

import torch

from diffray.config import OptimSection, StrategySection
from diffray.trainers.engine import build_engine
from diffray.trainers.session import seed_step


def test_seed_step_draws_what_torch_manual_seed_draws_and_queues_no_cuda_seed():
    calls = torch.cuda._lazy_seed_tracker.get_calls()
    seed_step(3, 7, 1)
    ours = torch.rand(6)
    assert torch.cuda._lazy_seed_tracker.get_calls() == calls  # no formatted stack queued per step
    torch.manual_seed((3 * 1_000_003 + 7) * 1_009 + 1)
    assert torch.equal(ours, torch.rand(6))
    seed_step(3, 8, 1)
    assert not torch.equal(ours, torch.rand(6))  # each step its own dropout stream


def test_the_deepspeed_engine_starts_without_the_inference_all_reduce_op_and_trains(monkeypatch):
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist
    from testkit.net import free_port

    for name, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):  # what Ray Train sets
        monkeypatch.setenv(name, value)
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 2)
        engine = build_engine(module, StrategySection(), OptimSection(lr=0.1), 2, 1, 10, "fp32",
                              torch.device("cpu"))
        assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None  # neither compiled nor loaded
        before = module.weight.detach().clone()
        loss = engine(torch.ones(2, 4)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        assert not torch.equal(before, module.weight.detach())  # ZeRO-2 over gloo still steps
    finally:
        ds_comm.cdb = None
        dist.destroy_process_group()
