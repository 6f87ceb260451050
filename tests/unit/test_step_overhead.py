"""Per-step pieces of the training loop that must stay cheap without changing what they do: the step's
RNG seed and the rate limit on progress updates (see benchmarks/train_overhead.py)."""

from __future__ import annotations

import torch

from diffray.trainers.progress import Every
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


def test_every_lets_one_update_through_per_interval_and_forced_ones_always():
    every = Every(0.25)
    assert every.due(now=100.0)  # the first update always goes
    assert not every.due(now=100.1) and not every.due(now=100.24)
    assert every.due(now=100.26)
    assert every.due(force=True, now=100.27)  # a held-out loss or the last step
    assert not every.due(now=100.3)  # the interval counts from the forced update
    assert every.due(now=100.53)
