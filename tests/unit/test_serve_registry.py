"""AdapterRegistry: ids validated before the filesystem, kinds by safetensors file, rescans on lookup."""

from __future__ import annotations

import json

import pytest

from diffray.errors import AdapterError, AdapterNotFound, RequestError
from diffray.serve.registry import AdapterRegistry, check_adapter_id


def _artifact(root, name, files):
    d = root / name
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_bytes(b"x")
    (d / "diffray_card.json").write_text(json.dumps({"method": "m", "base_model": "builtin:tiny"}))
    return d


@pytest.mark.parametrize("bad", ["", "..", ".", "../x", "a/b", "http://x/y", "s3://b/k", "a b", "x" * 65, "~root",
                                 "a\\b", "é", None, 5])
def test_bad_ids_rejected(bad):
    with pytest.raises(RequestError) as err:
        check_adapter_id(bad, "adapters.0.id")
    assert err.value.param == "adapters.0.id"


@pytest.mark.parametrize("good", ["my-lora", "a", "v1.2_final", "A" * 64, "..a"])
def test_good_ids(good):
    assert check_adapter_id(good) == good


def test_kinds_listing_and_rescan(tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    assert reg.list() == []
    _artifact(tmp_path / "reg", "l", ["pytorch_lora_weights.safetensors"])
    _artifact(tmp_path / "reg", "t", ["learned_embeds.safetensors"])
    _artifact(tmp_path / "reg", "c", ["config.json", "diffusion_pytorch_model.safetensors"])
    _artifact(tmp_path / "reg", "pickled", ["pytorch_lora_weights.bin", "learned_embeds.bin"])  # not safetensors
    _artifact(tmp_path / "reg", "bad name!", ["pytorch_lora_weights.safetensors"])
    assert [(a.id, a.kind) for a in reg.list()] == [("c", "controlnet"), ("l", "lora"), ("t", "textual_inversion")]
    assert reg.get("l").card["method"] == "m"
    with pytest.raises(AdapterNotFound):
        reg.get("new")
    with pytest.raises(AdapterError, match="safetensors"):
        reg.get("pickled")
    _artifact(tmp_path / "reg", "new", ["pytorch_lora_weights.safetensors"])  # appears without a restart
    assert reg.get("new").kind == "lora"


def test_symlink_outside_is_just_a_folder_name(tmp_path):
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(RequestError):
        reg.get("../etc")
