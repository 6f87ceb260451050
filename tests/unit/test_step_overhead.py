"""Per-step pieces of the training loop that must stay cheap without changing what they do: the step's
RNG seed (see benchmarks/train_overhead.py)."""

from __future__ import annotations

import torch

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
