"""AdapterRegistry: ids validated (whole string) before the filesystem, kinds by safetensors file, content
checked without loading, broken entries listed as unavailable with a client-safe reason, fingerprints
that follow content (a publish-by-rename with the same timestamps is still noticed)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from diffray.errors import AdapterError, AdapterNotFound, RequestError
from diffray.serve.artifacts import parse_header
from diffray.serve.registry import AdapterRegistry, check_adapter_id

LORA = "pytorch_lora_weights.safetensors"
TI = "learned_embeds.safetensors"


def lora_bytes(seed: int = 0, fill: float | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((4, 32)).astype(np.float32)
    if fill is not None:
        a[1, 3] = fill
    return st_save({"unet.down.lora.down.weight": a, "unet.down.lora.up.weight": np.zeros((32, 4), np.float16)})


def _artifact(root, name, files: dict[str, bytes], card: str | None = '{"method": "m", "base_model": "b"}'):
    d = root / name
    d.mkdir(parents=True)
    for f, data in files.items():
        (d / f).write_bytes(data)
    if card is not None:
        (d / "diffray_card.json").write_text(card)
    return d


@pytest.mark.parametrize("bad", ["", "..", ".", "../x", "a/b", "http://x/y", "s3://b/k", "a b", "x" * 65, "~root",
                                 "a\\b", "é", None, 5, "lora\n", "lora\r\n", "\nlora", "lora\x00", "ｌｏｒａ"])
def test_bad_ids_rejected_whole_string(bad):
    with pytest.raises(RequestError) as err:
        check_adapter_id(bad, "adapters.0.id")
    assert err.value.param == "adapters.0.id" and "\n" not in err.value.message


@pytest.mark.parametrize("reserved", ["base", "dall-e-2", "dall-e-3", "gpt-image-1"])
def test_ids_that_name_the_base_model_are_refused_listed_never_and_not_published(tmp_path, reserved, caplog):
    """The images API maps these `model`s to the base model: an adapter by that name could never be asked for,
    and /v1/models would list `base` twice. Refused as ids, skipped (with a warning) in a folder, and publishing
    refuses them."""
    from diffray.errors import ConfigError
    from diffray.loop import publish_adapter

    with pytest.raises(RequestError, match="names the base model") as err:
        check_adapter_id(reserved, "adapter")
    assert err.value.param == "adapter"
    assert check_adapter_id(reserved.upper()) == reserved.upper()  # ids are case-sensitive, as the API's names
    _artifact(tmp_path / "reg", reserved, {LORA: lora_bytes()})
    (tmp_path / "reg" / f"{reserved}.safetensors").write_bytes(lora_bytes())
    _artifact(tmp_path / "reg", "fine", {LORA: lora_bytes()})
    reg = AdapterRegistry(tmp_path / "reg")
    with caplog.at_level("WARNING", logger="diffray.serve.registry"):  # whatever level earlier tests left
        assert [a.id for a in reg.list()] == ["fine"]
    assert f"entry {reserved!r} is not served: its id names the base model" in caplog.text
    with pytest.raises(RequestError):
        reg.get(reserved)
    art = _artifact(tmp_path / "run", "artifact", {LORA: lora_bytes()})
    with pytest.raises(ConfigError) as err:
        publish_adapter(str(art), str(tmp_path / "out"), reserved)
    assert err.value.field == "publish" and not (tmp_path / "out" / reserved).exists()
    assert "none of base, dall-e-2, dall-e-3, gpt-image-1 (they name the base model)" in str(err.value)


@pytest.mark.parametrize("good", ["my-lora", "a", "v1.2_final", "A" * 64, "..a"])
def test_good_ids(good):
    assert check_adapter_id(good) == good


def test_kinds_listing_and_rescan(tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    assert reg.list() == []
    ti = st_save({"<t>": np.ones((1, 32), np.float32)})
    _artifact(tmp_path / "reg", "l", {LORA: lora_bytes()})
    _artifact(tmp_path / "reg", "t", {TI: ti})
    _artifact(tmp_path / "reg", "c", {"config.json": b"{}", "diffusion_pytorch_model.safetensors": lora_bytes()})
    _artifact(tmp_path / "reg", "pickled", {"pytorch_lora_weights.bin": b"x", "learned_embeds.bin": b"x"})
    _artifact(tmp_path / "reg", "bad name!", {LORA: lora_bytes()})
    _artifact(tmp_path / "reg", ".incoming", {LORA: lora_bytes()})
    listed = {a.id: (a.kind, a.available) for a in reg.list()}
    assert listed == {"c": ("controlnet", True), "l": ("lora", True), "t": ("textual_inversion", True),
                      "pickled": ("unknown", False)}
    assert reg.get("l").card["method"] == "m"
    with pytest.raises(AdapterNotFound):
        reg.get("new")
    with pytest.raises(AdapterNotFound):
        reg.get(".incoming")  # a folder being copied in is not servable before its rename
    with pytest.raises(AdapterError, match="'pickled' is unavailable.*safetensors"):
        reg.get("pickled")
    _artifact(tmp_path / "reg", "new", {LORA: lora_bytes()})  # appears without a restart
    assert reg.get("new").kind == "lora"


def _header_bytes(header: dict, data_len: int) -> bytes:
    """A safetensors file with this (possibly malformed) JSON header and `data_len` zero bytes of data."""
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * data_len


def _broken_weights() -> dict[str, tuple[str, bytes]]:
    good = lora_bytes()
    n = int.from_bytes(good[:8], "little")
    return {  # name: (file, bytes)
        "truncated": (LORA, good[: len(good) - 10]),
        "empty": (LORA, b""),
        "seven-bytes": (LORA, b"\x01" * 7),
        "pickle": (LORA, b"\x80\x04\x95" + os.urandom(200)),
        "header-too-long": (LORA, (2**40).to_bytes(8, "little") + b"{}"),
        "header-not-json": (LORA, (5).to_bytes(8, "little") + b"{abc}"),
        "header-list": (LORA, (2).to_bytes(8, "little") + b"[]"),
        "header-deep": (LORA, (4000).to_bytes(8, "little") + b"[" * 2000 + b"]" * 2000),
        "padded": (LORA, good + b"\0" * 16),
        "bad-dtype": (LORA, good[:8] + good[8:8 + n].replace(b'"F32"', b'"Q99"') + good[8 + n:]),
        "dtype-list": (LORA, _header_bytes({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, 4)),
        "dtype-dict": (LORA, _header_bytes({"w": {"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 4]}}, 4)),
        "dtype-null": (LORA, _header_bytes({"w": {"dtype": None, "shape": [1], "data_offsets": [0, 4]}}, 4)),
        "shape-dict": (LORA, _header_bytes({"w": {"dtype": "F32", "shape": {"a": 1}, "data_offsets": [0, 4]}}, 4)),
        "shape-negative": (LORA, _header_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4)),
        "shape-float": (LORA, _header_bytes({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, 4)),
        "offsets-nested": (LORA, _header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [[0], 4]}}, 4)),
        "offsets-three": (LORA, _header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, 4)),
        "offsets-string": (LORA, _header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": "0,4"}}, 4)),
        "nan": (LORA, lora_bytes(fill=float("nan"))),
        "inf": (LORA, lora_bytes(fill=float("inf"))),
        "no-tensors": (LORA, st_save({})),
        "ti-two-tokens": (TI, st_save({"<a>": np.ones((1, 32), np.float32), "<b>": np.ones((1, 32), np.float32)})),
        "ti-spaced-token": (TI, st_save({"a b": np.ones((1, 32), np.float32)})),
        "ti-3d": (TI, st_save({"<a>": np.ones((1, 1, 32), np.float32)})),
    }


@pytest.mark.parametrize("name", sorted(_broken_weights()))
def test_broken_weights_are_listed_unavailable_and_refused_by_name(tmp_path, name):
    file, data = _broken_weights()[name]
    folder = _artifact(tmp_path, name, {file: data})
    _artifact(tmp_path, "fine", {LORA: lora_bytes()})
    reg = AdapterRegistry(tmp_path)
    listed = {a.id: a for a in reg.list()}
    assert listed["fine"].available and not listed[name].available
    reason = listed[name].problem
    assert reason and str(folder) not in reason and str(tmp_path) not in reason and "0x" not in reason
    with pytest.raises(AdapterError, match=f"adapter '{name}' is unavailable") as err:
        reg.get(name)
    assert str(tmp_path) not in str(err.value)


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
@pytest.mark.parametrize("value", [["F32"], {"a": 1}, None, [[0], 4], -1])
def test_a_malformed_header_field_is_a_problem_naming_the_file(tmp_path, field, value):
    """Any JSON value in any header field the parser reads is a reported problem, never a TypeError: a listing
    (and the engine's sweep, which inspects every resident adapter) must survive one hostile artifact."""
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], field: value}
    (tmp_path / "hostile.safetensors").write_bytes(_header_bytes({"w": entry}, 4))
    _artifact(tmp_path, "fine", {LORA: lora_bytes()})
    listed = {a.id: a for a in AdapterRegistry(tmp_path).list()}
    assert listed["fine"].available
    assert listed["hostile"].problem.startswith("hostile.safetensors: ")
    with pytest.raises(AdapterError, match="'hostile' is unavailable: hostile.safetensors: "):
        AdapterRegistry(tmp_path).get("hostile")


CARDS = {"list": "[1, 2]", "string": '"hi"', "number": "5", "null": "null", "deep": "[" * 50_000 + "]" * 50_000,
         "nan": '{"base_model": NaN}', "not-utf8": b"\xff\xfe{", "huge": '{"x": "' + "y" * 70_000 + '"}',
         "truncated": '{"method": "lo'}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_a_broken_card_marks_only_its_adapter_unavailable(tmp_path, name):
    d = _artifact(tmp_path, name, {LORA: lora_bytes()}, card=None)
    card = CARDS[name]
    (d / "diffray_card.json").write_bytes(card if isinstance(card, bytes) else card.encode())
    _artifact(tmp_path, "fine", {LORA: lora_bytes()})
    listed = {a.id: a for a in AdapterRegistry(tmp_path).list()}
    assert listed["fine"].available and listed["fine"].card["method"] == "m"
    assert not listed[name].available and "diffray_card.json" in listed[name].problem


def test_card_fields_shown_are_short_strings_only(tmp_path):
    from diffray.serve.artifacts import card_text

    _artifact(tmp_path, "a", {LORA: lora_bytes()}, card=json.dumps({"base_model": {"x": [1]}, "method": "m" * 500}))
    info = AdapterRegistry(tmp_path).get("a")
    assert card_text(info.card, "base_model") is None and len(card_text(info.card, "method")) == 200


def test_fingerprint_follows_content_not_name_or_time(tmp_path):
    reg = AdapterRegistry(tmp_path)
    d = _artifact(tmp_path, "a", {LORA: lora_bytes(seed=1)})
    first = reg.get("a").fingerprint
    assert reg.get("a").fingerprint == first
    st = (d / LORA).stat()
    tmp = _artifact(tmp_path, ".a-new", {LORA: lora_bytes(seed=2)})
    os.utime(tmp / LORA, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only content differs
    shutil.rmtree(d)
    tmp.rename(d)  # publish-by-rename
    second = reg.get("a").fingerprint
    assert second != first
    same = _artifact(tmp_path, "b", {LORA: lora_bytes(seed=2)})
    assert reg.get("b").fingerprint == second and same.exists()  # same bytes, same fingerprint


def test_unreadable_registry_or_entry_never_raises_from_list(tmp_path):
    (tmp_path / "reg").write_text("a file, not a folder")
    assert AdapterRegistry(tmp_path / "reg").list() == []
    d = _artifact(tmp_path / "r2", "locked", {LORA: lora_bytes()})
    (d / LORA).unlink()
    (d / LORA).mkdir()  # a folder where the weights should be: not an artifact
    assert [(a.id, a.available) for a in AdapterRegistry(tmp_path / "r2").list()] == [("locked", False)]


def test_parse_header_accepts_what_safetensors_writes():
    data = lora_bytes()
    header = parse_header(data, len(data), LORA)
    assert set(header) == {"unet.down.lora.down.weight", "unet.down.lora.up.weight"}


def test_bare_lora_files_are_entries_checked_like_folders(tmp_path):
    """A kohya (or diffusers-keyed) `<id>.safetensors` dropped into the root is a LoRA entry; non-LoRA keys,
    NaN weights, links, bad ids and pickles are not served."""
    root = tmp_path / "reg"
    root.mkdir()
    rng = np.random.default_rng(0)
    kohya = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": rng.standard_normal((4, 32), np.float32),
             "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": np.zeros((32, 4), np.float32),
             "lora_unet_mid_block_attentions_0_proj_in.alpha": np.array(4.0, np.float32),
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((4, 32), np.float32),
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((32, 4), np.float32)}
    (root / "civitai-style.safetensors").write_bytes(st_save(kohya))
    (root / "diffusers-keys.safetensors").write_bytes(lora_bytes())
    (root / "not-lora.safetensors").write_bytes(st_save({"model.diffusion_model.x.weight": np.ones(2, np.float32)}))
    (root / "nan.safetensors").write_bytes(st_save({**kohya, next(iter(kohya)): np.full((4, 32), np.nan, np.float32)}))
    (root / "bad id!.safetensors").write_bytes(st_save(kohya))
    (root / "pickled.ckpt").write_bytes(b"x")
    (root / "link.safetensors").symlink_to(root / "civitai-style.safetensors")
    _artifact(root, "l", {LORA: lora_bytes()})
    (root / "l.safetensors").write_bytes(st_save(kohya))  # a folder of the same id wins
    reg = AdapterRegistry(root)
    listed = {a.id: (a.kind, a.available) for a in reg.list()}
    assert listed == {"civitai-style": ("lora", True), "diffusers-keys": ("lora", True), "l": ("lora", True),
                      "not-lora": ("lora", False), "nan": ("lora", False)}
    info = reg.get("civitai-style")
    assert (info.path, info.weights_name) == (str(root), "civitai-style.safetensors")
    assert reg.get("l").weights_name == LORA
    with pytest.raises(AdapterError, match="'not-lora' is unavailable: not-lora.safetensors: not a LoRA file"):
        reg.get("not-lora")
    with pytest.raises(AdapterError, match="NaN"):
        reg.get("nan")
    with pytest.raises(AdapterNotFound):
        reg.get("link")
