"""Pieces of the training loop that must stay cheap without changing what they do: the step's RNG seed
(see benchmarks/train_overhead.py), and the DeepSpeed engine's start on CPU, which must not compile or
load DeepSpeed's shared-memory inference all-reduce."""

from __future__ import annotations

import pytest
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


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo process group, as Ray Train sets one up for a single worker (DeepSpeed caches its
    groups, so the module's tests share one)."""
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist
    from testkit.net import free_port

    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):  # what Ray Train sets
            mp.setenv(name, value)
        store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            ds_comm.cdb = None
            dist.destroy_process_group()


def test_the_deepspeed_engine_starts_without_the_inference_all_reduce_op_and_trains(one_rank):
    import deepspeed.comm.comm as ds_comm

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 2)
    engine = build_engine(module, StrategySection(), OptimSection(lr=0.1), 2, 1, 10, "fp32", torch.device("cpu"))
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None  # neither compiled nor loaded
    before = module.weight.detach().clone()
    loss = engine(torch.ones(2, 4)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    assert not torch.equal(before, module.weight.detach())  # ZeRO-2 over gloo still steps


def test_zero2_with_gradients_in_place_steps_as_with_contiguous_buckets(one_rank):
    """The adapter layout (`contiguous_gradients`/`reduce_scatter` off) trains the same weights as the
    contiguous one: same model, data, clipping and AdamW, five steps."""
    import deepspeed

    from diffray.trainers.components.zero import build_deepspeed_config

    weights, start = {}, None
    for size in (None, 100):  # None: contiguous buckets; 100 elements: in place
        cfg = build_deepspeed_config(2, 2, 1, 1, 0.05, trainable_elements=size)
        assert cfg["zero_optimization"]["contiguous_gradients"] is (size is None)
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        start = [p.detach().clone() for p in module.parameters()]
        opt = torch.optim.AdamW(module.parameters(), lr=0.05)
        engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=cfg, dist_init_required=False)
        data = torch.Generator().manual_seed(1)
        for _ in range(5):
            loss = engine(torch.randn(2, 4, generator=data)).pow(2).mean()
            engine.backward(loss)
            engine.step()
        weights[size] = [p.detach().clone() for p in module.parameters()]
    for a, b in zip(weights[None], weights[100]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(weights[100], start)) > 0.1  # it trained


def test_a_checkpoint_written_with_contiguous_buckets_resumes_with_gradients_in_place(one_rank, tmp_path):
    """A ZeRO-2 checkpoint from before adapters kept their gradients in place (`contiguous_gradients` on)
    resumes under today's layout and continues exactly as an uninterrupted run: the layout changes how
    gradients are reduced, not the flat optimizer partition the checkpoint holds."""
    from diffray.trainers.components import zero

    batches = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]

    def engine():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        return module, build_engine(module, StrategySection(), OptimSection(lr=0.05, warmup_steps=2), 2, 1, 5,
                                    "fp32", torch.device("cpu"))

    def train(eng, xs):
        for x in xs:
            eng.backward(eng(x).pow(2).mean())
            eng.step()

    module, whole = engine()
    assert whole.ds.optimizer.contiguous_gradients is False  # today's adapter layout
    train(whole, batches)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zero, "SMALL_GRADIENTS", 0)  # the layout every ZeRO-2 run had before
        _, old = engine()
        assert old.ds.optimizer.contiguous_gradients is True
        train(old, batches[:3])
        old.save(tmp_path)
    resumed_module, resumed = engine()
    assert resumed.ds.optimizer.contiguous_gradients is False
    resumed.load(tmp_path)
    assert resumed.lr == old.lr  # the warmup schedule resumes at step 3
    train(resumed, batches[3:])
    for a, b in zip(module.parameters(), resumed_module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
