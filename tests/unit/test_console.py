"""The CLI's plain progress lines (no terminal): one for the first step seen past each multiple of `every`
and one for the last step, whichever steps the driver happens to see."""

from __future__ import annotations

import io

from diffray.console import TrainProgress


def lines(total: int, every: int, steps) -> list[int]:
    out = io.StringIO()
    progress = TrainProgress(total, stream=out, tty=False, every=every)
    for step in steps:
        progress({"step": step, "loss": 0.5, "lr": 1e-4, "samples_per_s": 2.0})
    return [int(line.split()[1].split("/")[0]) for line in out.getvalue().splitlines()]


def test_every_step_seen_prints_each_multiple_and_the_last():
    assert lines(25, 10, range(1, 26)) == [10, 20, 25]
    assert lines(12, 1, range(1, 13)) == list(range(1, 13))


def test_a_multiple_the_driver_never_saw_still_gets_its_line():
    # the driver looks once a while: steps 10 and 20 were superseded before it looked
    assert lines(30, 10, [3, 7, 12, 25, 26, 30]) == [12, 25, 30]


def test_a_resumed_run_starts_at_its_next_multiple_and_a_restart_repeats_nothing():
    assert lines(100, 10, range(41, 61)) == [50, 60]
    # a worker-group restart from the step-10 checkpoint: steps 11-15 come again
    assert lines(20, 10, [*range(1, 16), *range(11, 21)]) == [10, 20]
