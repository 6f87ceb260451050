"""`diffray export ARTIFACT` given something that is not a LoRA artifact: the one-line error says what ARTIFACT
is (missing, a file, an empty folder, a full pipeline, a Textual Inversion, a PEFT adapter, a ControlNet, some
other folder) and what export takes, and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from testkit.cli import diffray

from diffray.errors import ConfigError
from diffray.models import lora_formats


def _weights(path):
    save_file({"w": torch.zeros(2, 2)}, str(path))


def _make(kind, at):
    """A folder (or file) laid out as the artifact of `kind` is, with the file names its writer uses."""
    if kind == "missing":
        return at
    if kind == "file":  # e.g. a kohya file given as the artifact
        at.parent.mkdir(parents=True)
        _weights(at.with_suffix(".safetensors"))
        return at.with_suffix(".safetensors")
    at.mkdir(parents=True)
    if kind == "pipeline":  # DreamBooth full / method full: save_pretrained of a pipeline
        (at / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        (at / "unet").mkdir()
    elif kind == "peft":  # a LoHa / LoKr run's artifact
        _weights(at / "adapter_model.safetensors")
        (at / "adapter_config.json").write_text("{}")
    elif kind in ("controlnet", "vae"):
        cls = "ControlNetModel" if kind == "controlnet" else "AutoencoderKL"
        (at / "config.json").write_text(json.dumps({"_class_name": cls}))
        _weights(at / "diffusion_pytorch_model.safetensors")
    elif kind == "other":
        for name in ("a.png", "b.png", "c.png", "d.png", "notes.txt"):
            (at / name).write_bytes(b"x")
    if kind != "empty":
        (at / "diffray_card.json").write_text(json.dumps({"method": kind}))
    return at


@pytest.mark.parametrize("kind,what", [
    ("missing", "no such folder"),
    ("file", "a file, not a folder"),
    ("empty", "an empty folder"),
    ("pipeline", r"a full pipeline folder \(model_index.json"),
    ("peft", r"a PEFT adapter \(adapter_model.safetensors: LoHa or LoKr"),
    ("controlnet", r"a ControlNet \(config.json: ControlNetModel\)"),
    ("vae", r"a diffusers AutoencoderKL \(config.json\)"),
    ("other", "a folder holding a.png, b.png, c.png, d.png and 2 more"),
])
def test_a_folder_that_is_no_lora_artifact_is_named_for_what_it_is(kind, what, tmp_path, monkeypatch, capsys):
    """The error was "ARTIFACT: not a LoRA artifact (no pytorch_lora_weights.safetensors)" whatever it was."""
    src = _make(kind, tmp_path / "runs" / "artifact")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=f"^ARTIFACT: .*artifact(.safetensors)?: not a LoRA artifact but {what}[^;]*; "
                                          "export takes the artifact folder of a LoRA run .*pytorch_lora_weights"):
        lora_formats.export_artifact(src, "kohya", tmp_path / "out")
    code, err = diffray(["export", src, tmp_path / "out", "-f", "diffusers"], monkeypatch, capsys)
    assert code == 2 and err.startswith("diffray: error: ARTIFACT: ") and err.count("\n") == 1, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no OUT, nothing else made


def test_an_adapter_card_that_is_not_json_is_named_by_every_reader(tmp_path):
    """`adapters.read_card` (generate, eval, the reward model, the runner) parsed the card itself: a torn one was an
    internal JSONDecodeError. It reads through export's `read_card_file`: AdapterError naming the file."""
    from diffray.errors import AdapterError
    from diffray.models.adapters import read_card

    assert read_card(tmp_path) == {}
    (tmp_path / "diffray_card.json").write_text('{"method": "lo')
    with pytest.raises(AdapterError, match=rf"^{tmp_path}/diffray_card.json: not valid JSON \("):
        read_card(tmp_path)
    (tmp_path / "diffray_card.json").write_text("[1]")
    with pytest.raises(AdapterError, match="not a JSON object"):
        read_card(tmp_path)
