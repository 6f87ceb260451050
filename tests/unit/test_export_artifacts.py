"""`diffray export` on hostile or careless input, as a user drives it: a card is untrusted (a run name that
would write outside OUT is refused), OUT is replaced whole by the new export (never a mix of two adapters),
and the card that leaves the machine carries no local absolute path and no credentials."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from testkit.cli import diffray

from diffray.errors import AdapterError, ConfigError
from diffray.models import lora_formats


def artifact(folder, components=("unet",), card=None, rank=2):
    """A diffusers-layout LoRA artifact with one layer per component and its card, as real files."""
    folder.mkdir(parents=True)
    sd = {}
    for c in components:
        sd[f"{c}.blocks.0.to_q.lora.down.weight"] = torch.ones(rank, 8)
        sd[f"{c}.blocks.0.to_q.lora.up.weight"] = torch.ones(8, rank)
    save_file(sd, str(folder / "pytorch_lora_weights.safetensors"))
    if card is not None:
        (folder / "diffray_card.json").write_text(json.dumps(card))
    return folder


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("card,field", [
    ({"config": {"run": {"name": "../../escaped"}}}, "config.run.name '../../escaped'"),
    ({"config": {"run": {"name": "sub/escaped"}}}, "config.run.name 'sub/escaped'"),
    ({"config": {"run": {"name": ""}}}, "config.run.name ''"),
    ({"config": None}, "config must be a JSON object, not null"),
    ({"config": {"run": ["x"]}}, "config.run must be a JSON object"),
])
def test_a_card_naming_the_kohya_file_outside_out_is_refused_and_nothing_is_written(card, field, tmp_path,
                                                                                  monkeypatch, capsys):
    src = artifact(tmp_path / "runs" / "x" / "artifact", card=card)
    out = tmp_path / "exports" / "kohya"
    with pytest.raises(AdapterError, match=f"artifact/diffray_card.json: {field}"):
        lora_formats.export_artifact(src, "kohya", out)
    code, err = diffray(["export", src, out, "-f", "kohya"], monkeypatch, capsys)
    assert code == 1 and err.startswith("diffray: error: ") and err.count("\n") == 1, err
    assert files(tmp_path) == ["runs/x/artifact/diffray_card.json", "runs/x/artifact/pytorch_lora_weights.safetensors"]


def test_an_export_replaces_an_earlier_export_whole_and_never_a_users_folder(tmp_path):
    from peft import PeftConfig

    both = artifact(tmp_path / "a", ("unet", "text_encoder"), {"config": {"run": {"name": "a"}}}, rank=2)
    unet_only = artifact(tmp_path / "b", ("unet",), {"config": {"run": {"name": "b"}}}, rank=4)
    out = tmp_path / "out"
    lora_formats.export_artifact(both, "peft", out)
    lora_formats.export_artifact(unet_only, "peft", out)  # the same OUT again: b's export, none of a's
    assert files(out) == ["diffray_card.json", "unet/adapter_config.json", "unet/adapter_model.safetensors"]
    assert PeftConfig.from_pretrained(str(out / "unet")).r == 4
    assert json.loads((out / "diffray_card.json").read_text())["config"]["run"]["name"] == "b"
    lora_formats.export_artifact(both, "kohya", out)  # another format into an export: replaced too
    assert files(out) == ["a.safetensors", "diffray_card.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary sibling left

    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "photos" / "cat.jpg").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match="OUT: .*mine: folder exists, is not empty and is not an export"):
        lora_formats.export_artifact(both, "diffusers", mine)
    assert files(mine) == ["photos/cat.jpg"]
    with pytest.raises(ConfigError, match="OUT: .*holds the artifact .*artifact; the export replaces OUT"):
        lora_formats.export_artifact(artifact(tmp_path / "run" / "artifact", card={}), "diffusers", tmp_path / "run")
    assert files(tmp_path / "run") == ["artifact/diffray_card.json", "artifact/pytorch_lora_weights.safetensors"]


def test_the_exported_card_and_kohya_metadata_carry_no_local_path_or_credentials(tmp_path, tiny_model_path):
    from diffray.trainers.lora import LoraTrainConfig
    from diffray.trainers.session import card

    home = str(tmp_path / "home" / "alice")
    cfg = LoraTrainConfig.model_validate({
        "run": {"name": "sks-lora", "storage_path": "s3://AKIAEXAMPLE:wJalrSECRET@bucket/runs?region=eu"},
        "model": {"path": "builtin:tiny"}, "data": {"path": f"{home}/photos/sks", "image_roots": ["~/pics"]},
        "tracking": {"mlflow": {"tracking_uri": "https://alice:mlflow-token@mlflow.example.com/ml"}}})
    trained_card = card(cfg, tiny_model_path, {"step": 7, "train_time_s": 1.0}, {"loss": 0.1})
    # a card written by hand or by an older diffray: credential-named fields were copied into the export as is
    trained_card.update({"hub_token": "hf_abcdefSECRET", "publish": {"aws_secret_access_key": "wJalrSECRET2"}})
    src = artifact(tmp_path / "artifact", card=trained_card)
    assert home in (src / "diffray_card.json").read_text()  # what training writes, on its own machine
    for fmt in lora_formats.FORMATS:
        out = lora_formats.export_artifact(src, fmt, tmp_path / "exports" / fmt)
        text = (out / "diffray_card.json").read_text()
        for leak in (str(tmp_path), "/home", "~/", tiny_model_path, "AKIAEXAMPLE", "wJalrSECRET", "mlflow-token",
                     "alice:", "region=", "hf_abcdef"):
            assert leak not in text, (fmt, leak)
        exported = json.loads(text)
        assert exported["hub_token"] == "<redacted>" and exported["publish"] == {"aws_secret_access_key": "<redacted>"}
        assert exported["base_model"] == "builtin:tiny" and exported["steps"] == 7 and exported["export_format"] == fmt
        assert exported["config"]["data"]["path"] == "<local>/sks"
        assert exported["config"]["run"]["storage_path"] == "s3://bucket/runs"
        assert exported["config"]["tracking"]["mlflow"]["tracking_uri"] == "https://mlflow.example.com/ml"
    with safe_open(str(tmp_path / "exports" / "kohya" / "sks-lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and not any(str(tmp_path) in v for v in meta.values())


def test_the_artifacts_own_card_holds_no_credentials_and_keeps_what_the_project_reads_back(tmp_path,
                                                                                            tiny_model_path):
    """The card written beside a trained artifact held the config's credentials (s3://KEY:SECRET@..., a
    user:token@ tracking URI). It keeps its local paths: `diffray generate` loads `base_model` and a reward
    model `base_model_resolved` from it, and a Textual Inversion's `placeholder_token`/`tokens` are read back."""
    from diffray.models.adapters import read_card, write_card
    from diffray.trainers.lora import LoraTrainConfig
    from diffray.trainers.session import card

    home = str(tmp_path / "home" / "alice")
    cfg = LoraTrainConfig.model_validate({
        "run": {"name": "sks-lora", "storage_path": "s3://AKIAEXAMPLE:wJalrSECRET@bucket/runs?region=eu&"
                                                    "secret_key=wJalrSECRET2&X-Amz-Security-Token=FwoGSECRET"},
        "model": {"path": tiny_model_path}, "data": {"path": f"{home}/photos/sks", "trigger_word": "sks"},
        "tracking": {"mlflow": {"tracking_uri": "https://alice:mlflow-token@mlflow.example.com/ml?token=t0k"}}})
    own = {**card(cfg, tiny_model_path, {"step": 7}, {"loss": 0.1}), "placeholder_token": "<sks>",
           "tokens": ["<sks>", "<sks>_1"], "hub_token": "hf_abcdefSECRET", "api_keys": [],
           "publish": {"aws_secret_access_key": "wJalrSECRET3", "accessToken": "SECRETtok"}}
    folder = artifact(tmp_path / "artifact")
    write_card(folder, own)
    text = (folder / "diffray_card.json").read_text()
    for leak in ("AKIAEXAMPLE", "SECRET", "mlflow-token", "alice:", "t0k"):
        assert leak not in text, leak
    back = read_card(folder)
    assert back["base_model"] == back["base_model_resolved"] == tiny_model_path  # what generate / reward load
    assert back["config"]["data"]["path"] == f"{home}/photos/sks" and back["config"]["data"]["trigger_word"] == "sks"
    assert back["config"]["run"]["storage_path"] == "s3://bucket/runs?region=eu"  # the region still reaches it
    assert back["config"]["tracking"]["mlflow"]["tracking_uri"] == "https://mlflow.example.com/ml"
    assert (back["placeholder_token"], back["tokens"], back["api_keys"]) == ("<sks>", ["<sks>", "<sks>_1"], [])
    assert back["hub_token"] == "<redacted>"
    assert back["publish"] == {"aws_secret_access_key": "<redacted>", "accessToken": "<redacted>"}
    write_card(folder, back)  # the runner rewrites the card (wall_time_s): unchanged by a second pass
    assert read_card(folder) == back
    exported = json.loads((lora_formats.export_artifact(folder, "kohya", tmp_path / "k") / "diffray_card.json")
                          .read_text())
    assert exported["base_model"] == f"<local>/{tiny_model_path.rstrip('/').rsplit('/', 1)[-1]}"
    assert exported["config"]["run"]["storage_path"] == "s3://bucket/runs"


@pytest.mark.parametrize("content,why", [(b"", "not a readable safetensors file"),
                                         (b"\x80\x04\x95pickle bytes", "not a readable safetensors file"),
                                         (None, "holds no tensors")])
def test_the_diffusers_format_refuses_a_weights_file_that_is_no_safetensors(tmp_path, content, why):
    """`--format diffusers` copied the weights file unread: a truncated file or pickle bytes named
    .safetensors were exported "successfully"."""
    src = artifact(tmp_path / "a")
    weights = src / "pytorch_lora_weights.safetensors"
    if content is None:
        save_file({}, str(weights))
    else:
        weights.write_bytes(content)
    with pytest.raises(ConfigError, match=why):
        lora_formats.export_artifact(src, "diffusers", tmp_path / "out")
    assert not (tmp_path / "out").exists()
