"""A checkpoint damaged after it was written (a node that lost power before its page cache reached the disk, a
copy stopped half-way) is told apart from a whole one, naming the file, so a rerun resumes from the newest whole
checkpoint instead of failing on the damaged one at every rerun (integration/test_lora_train.py runs it on Ray)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffray.trainers.checkpoints import FILES, listing, problem


def whole_checkpoint(d, with_listing: bool):
    (d / "state").mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(d / "trainable.safetensors"))
    torch.save({"optimizer": {"step": torch.tensor(3.0)}}, d / "state" / "optim.pt")
    (d / "latest").write_text("state")
    state = {"step": 4, **({FILES: listing(d)} if with_listing else {})}
    (d / "trainer_state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("with_listing", [True, False])  # False: written before checkpoints listed their files
@pytest.mark.parametrize("damage, named", [
    (None, None),
    ("trainable.safetensors:cut", "trainable.safetensors is truncated"),
    ("state/optim.pt:empty", "state/optim.pt is empty (0 bytes)"),
    ("state/optim.pt:cut", "state/optim.pt is truncated or not a torch checkpoint"),
    ("trainer_state.json:cut", "trainer_state.json is not valid JSON"),
    ("trainer_state.json:gone", "trainer_state.json is missing"),
])
def test_a_damaged_checkpoint_is_named_by_its_file(tmp_path, with_listing, damage, named):
    whole_checkpoint(tmp_path, with_listing)
    if damage:
        name, how = damage.split(":")
        path = tmp_path / name
        if how == "gone":
            path.unlink()
        else:
            path.write_bytes(b"" if how == "empty" else path.read_bytes()[: path.stat().st_size // 2])
    why = problem(tmp_path)
    if named is None:
        assert why is None
    elif with_listing and damage.startswith(("trainable", "state/")):  # the listing names the size first
        assert why.startswith(f"{damage.split(':')[0]} has ") and why.endswith(" were written"), why
    else:
        assert why.startswith(named), why


def test_a_file_a_rank_wrote_that_is_gone_is_named(tmp_path):
    whole_checkpoint(tmp_path, with_listing=True)
    (tmp_path / "latest").unlink()  # no format check would notice this one
    assert problem(tmp_path) == "latest is missing"
