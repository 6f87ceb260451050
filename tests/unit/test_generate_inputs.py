"""`diffray generate` and `diffray eval` on hostile or mistaken input: an adapter folder that is missing, broken,
of another kind or of another model, values the pipeline would take and draw wrong with, and outputs that
cannot be written. Each is one line naming the option and its limit, exit 2, before any model (or Ray) starts,
and leaves no output behind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from testkit.cli import diffray

PROMPT = ["-p", "a red circle"]


def lora_dir(root, card: dict | None = None, card_text: str | None = None):
    """A folder with a well-formed (tiny) LoRA weights file and a card."""
    root.mkdir(parents=True)
    save_file({"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 4)},
              str(root / "pytorch_lora_weights.safetensors"))
    (root / "diffray_card.json").write_text(card_text if card_text is not None else json.dumps(card or {}))
    return root


def broken_adapters(tmp_path) -> dict:
    """name -> (folder, what the error says about it)."""
    (tmp_path / "a_file").write_text("not a folder")
    cn = tmp_path / "controlnet"
    cn.mkdir()
    (cn / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(cn / "diffusion_pytorch_model.safetensors"))
    truncated = lora_dir(tmp_path / "truncated")
    weights = truncated / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    return {
        "missing": (tmp_path / "nope", "no such folder"),
        "file": (tmp_path / "a_file", "not a folder"),
        "controlnet": (cn, "holds none of pytorch_lora_weights.safetensors, adapter_model.safetensors, "
                           "learned_embeds.safetensors (it holds a ControlNet: give it with --controlnet)"),
        "truncated": (truncated, "pytorch_lora_weights.safetensors: truncated or padded"),
        "card_not_json": (lora_dir(tmp_path / "card", card_text="{not json"), "diffray_card.json: not valid JSON"),
        "other_family": (lora_dir(tmp_path / "xl", {"family": "stable-diffusion-xl", "method": "lora"}),
                         "trained for a stable-diffusion-xl model, but the base model is a stable-diffusion model"),
    }


@pytest.mark.parametrize("name", ["missing", "file", "controlnet", "truncated", "card_not_json", "other_family"])
def test_generate_refuses_an_adapter_folder_it_cannot_use(tmp_path, name, monkeypatch, capsys):
    folder, why = broken_adapters(tmp_path)[name]
    out_png = tmp_path / "out" / "grid.png"
    code, out = diffray(["generate", *PROMPT, "--model", "builtin:tiny", "--adapter", folder, "--out", out_png],
                        monkeypatch, capsys)
    assert code == 2, out
    assert out == f"diffray: error: --adapter: {folder}: {why}" + out.split(why, 1)[1]
    assert out.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "--seed: -1 must be in [0, 2^63 - 1] (image j uses seed + j)"),
    (["--seed", str(2**64), "--num-images", "2"], f"--seed: {2**64} must be in [0, 2^63 - 2]"),
    (["-p", "  "], "--prompt: prompt 2 is empty"),
    (["-p", "red " * 300], "--prompt: prompt 2 has 1200 characters; at most 1000"),
    (["--lora-scale", "nan"], "--lora-scale: must be a finite number, got nan"),
    (["--controlnet", "cn", "--control-image", "c.png", "--control-scale", "inf"],
     "--control-scale: must be a finite number, got inf"),
])
def test_generate_refuses_values_it_would_draw_wrong_with(tmp_path, args, message, monkeypatch, capsys):
    code, out = diffray(["generate", *PROMPT, *args, "--out", tmp_path / "grid.png"], monkeypatch, capsys)
    assert code == 2 and out.startswith(f"diffray: error: {message}") and out.count("\n") == 1, out
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_an_output_it_cannot_write_before_loading_a_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("keep me")
    for path, message in ((tmp_path, f"{tmp_path} is a folder; give a file name, e.g. {tmp_path / 'grid.png'}"),
                          (tmp_path / "grid.txt", f"{tmp_path / 'grid.txt'}: .txt is not an image format"),
                          (tmp_path / "a_file" / "grid.png", f"{tmp_path / 'a_file'} is a file, not a folder")):
        code, out = diffray(["generate", *PROMPT, "--model", "builtin:nope", "--out", path], monkeypatch, capsys)
        assert code == 2 and out.startswith(f"diffray: error: --out: ") and message in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_generate_names_a_lora_of_another_shape_in_one_line(tiny_model_path, tmp_path, monkeypatch, capsys):
    from testkit.adapters import random_lora

    lora = random_lora(tiny_model_path, tmp_path / "lora", seed=0)  # tiny-random: cross-attention 32 wide
    code, out = diffray(["generate", *PROMPT, "--model", "builtin:tiny", "--adapter", lora, "--steps", "1",
                         "--out", tmp_path / "grid.png"], monkeypatch, capsys)
    assert code == 2, out
    assert out.startswith(f"diffray: error: --adapter: {lora}: cannot load LoRA into this base model: size mismatch")
    assert out.endswith("(and 7 more): a LoRA of a model of another shape\n") and out.count("\n") == 1
    assert not (tmp_path / "grid.png").exists()


def test_generate_replaces_an_existing_grid_whole(tiny_model_path, tmp_path, monkeypatch, capsys):
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"an older grid")
    code, out = diffray(["generate", *PROMPT, "--model", tiny_model_path, "--steps", "1", "--out", grid],
                        monkeypatch, capsys)
    assert code == 0 and out == f"wrote {grid}\n"
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary sibling left


def test_generate_says_when_the_disk_refuses_the_grid(tiny_model_path, monkeypatch, capsys):
    code, out = diffray(["generate", *PROMPT, "--model", tiny_model_path, "--steps", "1", "--out", "/proc/x.png"],
                        monkeypatch, capsys)
    assert code == 2 and out == "diffray: error: --out: /proc/x.png: cannot write (No such file or directory)\n"


def no_ray(monkeypatch) -> None:
    """Fail the test if the eval gets as far as Ray (`connect_ray`, its first step there): a session's other
    tests may have started Ray in this process already, so `ray.is_initialized()` says nothing."""
    def connect():
        raise AssertionError("the eval reached Ray before refusing its input")

    monkeypatch.setattr("diffray.cluster.connect_ray", connect)


@pytest.mark.parametrize("name", ["truncated", "card_not_json", "other_family", "controlnet"])
def test_eval_refuses_an_adapter_folder_before_ray_starts(tmp_path, name, monkeypatch, capsys):
    no_ray(monkeypatch)
    folder, why = broken_adapters(tmp_path)[name]
    code, out = diffray(["eval", "--adapter", folder, "--model", "builtin:tiny", "--num", "1", "--steps", "1",
                         "--out", tmp_path / "eval"], monkeypatch, capsys)
    assert code == 2 and out.startswith(f"diffray: error: adapter: {folder}: {why}") and out.count("\n") == 1, out
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("args,message", [
    (["--guidance", "inf"], "guidance: bad value inf (must be a finite number >= 0)"),
    (["--steps", "100000"], "steps: bad value 100000 (must be in [1, 500])"),
    (["--resolution", "12"], "resolution: bad value 12 (must be a multiple of 8 in [8, 2048])"),
    (["--num", "100000000"], "num: must be in [1, 100000], got 100000000"),
    (["--num", "0"], "num: must be in [1, 100000], got 0"),
    (["--lora-scale", "nan"], "lora_scale: bad value nan (must be a finite number)"),
])
def test_eval_refuses_values_before_ray_starts(tmp_path, args, message, monkeypatch, capsys):
    no_ray(monkeypatch)
    code, out = diffray(["eval", "--num", "1", *args, "--out", tmp_path / "eval"], monkeypatch, capsys)
    assert code == 2 and out == f"diffray: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_eval_keeps_a_users_folder_and_refuses_it(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "eval" / "prompts"
    mine.mkdir(parents=True)
    (mine / "grid.png").write_bytes(b"my own grid")
    (tmp_path / "a_file").write_text("keep me")
    code, out = diffray(["eval", "--num", "1", "--out", tmp_path / "eval"], monkeypatch, capsys)
    assert code == 2 and out.startswith(f"diffray: error: out: {mine}: folder holds files but no results.json"), out
    assert (mine / "grid.png").read_bytes() == b"my own grid" and [p.name for p in mine.iterdir()] == ["grid.png"]
    code, out = diffray(["eval", "--num", "1", "--out", tmp_path / "a_file"], monkeypatch, capsys)
    assert code == 2 and out == (f"diffray: error: out: {tmp_path / 'a_file' / 'prompts'}: {tmp_path / 'a_file'} "
                                 "is a file, not a folder\n")


def test_an_error_a_renderer_raised_comes_back_as_ours():
    """A Ray actor that dies in __init__ keeps its error only as text: the diffray error is rebuilt from it."""
    from diffray.errors import AdapterError, ModelError
    from diffray.world.evaluate import diffray_cause

    remote = RuntimeError("The actor died because of an error raised in its creation task\nTraceback ...\n"
                          "diffray.errors.AdapterError: /a: cannot load LoRA into this base model: size mismatch\n")
    found = diffray_cause(remote)
    assert type(found) is AdapterError and str(found) == "/a: cannot load LoRA into this base model: size mismatch"
    wrapped = RuntimeError("wrapper")
    wrapped.cause = ModelError("/m: cannot load pipeline")
    assert str(diffray_cause(wrapped)) == "/m: cannot load pipeline" and diffray_cause(ValueError("x")) is None
