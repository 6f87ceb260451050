"""The adapter registry on object storage, against a real S3 endpoint on 127.0.0.1 (moto's server, the
session's `s3` fixture): what is published is served with the local registry's checks, a half-uploaded
adapter is never listed, the bucket is listed once per `listing_ttl_s` (not per lookup), removals and
replacements show after the next listing, and an unreachable store keeps the last listing."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.fs as pafs
import pytest
from safetensors.numpy import save as st_save

from diffray import storage
from diffray.errors import AdapterError, AdapterNotFound, ConfigError
from diffray.loop import publish_adapter
from diffray.serve.artifacts import sha256_file
from diffray.serve.registry import AdapterRegistry
from diffray.serve.remote_registry import RemoteRegistry, open_registry

LORA = "pytorch_lora_weights.safetensors"
CARD = "diffray_card.json"


def lora_bytes(seed: int = 0) -> bytes:
    a = np.random.default_rng(seed).standard_normal((4, 32)).astype(np.float32)
    return st_save({"unet.down.lora.down.weight": a, "unet.down.lora.up.weight": np.zeros((32, 4), np.float32)})


def artifact(folder, seed: int = 0, method: str = "lora"):
    folder.mkdir(parents=True)
    (folder / LORA).write_bytes(lora_bytes(seed))
    (folder / CARD).write_text(json.dumps({"method": method, "base_model": "builtin:tiny"}))
    return folder


def put(s3, uri: str, data: bytes) -> None:
    with s3.fs.open_output_stream(uri.removeprefix("s3://")) as f:
        f.write(data)


@pytest.fixture()
def bucket(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRAY_CACHE", str(tmp_path / "cache"))  # this test's local copies, not the session's
    return s3.bucket("registry")


def test_a_published_adapter_is_served_from_a_local_copy_with_the_local_checks(s3, bucket, tmp_path):
    root = f"{bucket}/adapters"
    art = artifact(tmp_path / "run" / "artifact")
    where = publish_adapter(str(art), root, "star", card_extra={"feedback": {"pairs": 3}})
    assert where == f"{root}/star"
    keys = s3.keys(root)
    assert keys == [f"{root[5:]}/star/{n}" for n in sorted([CARD, storage.MANIFEST, LORA])]
    manifest = json.loads(s3.fs.open_input_stream(f"{root[5:]}/star/{storage.MANIFEST}").read())
    assert set(manifest["files"]) == {CARD, LORA}

    reg = open_registry(root, listing_ttl_s=3600)
    assert isinstance(reg, RemoteRegistry)
    info = reg.get("star")
    assert info.kind == "lora" and info.available and info.card["feedback"] == {"pairs": 3}
    assert (tmp_path / "cache") in __import__("pathlib").Path(info.path).parents, "served from the local copy"
    assert info.fingerprint == sha256_file(art / LORA), "the same fingerprint the local registry gives"
    [listed] = reg.list()
    assert (listed.id, listed.kind, listed.card["method"], listed.available) == ("star", "lora", "lora", True)
    with pytest.raises(ConfigError, match="already exists"):
        publish_adapter(str(artifact(tmp_path / "run2" / "artifact", seed=1)), root, "star")
    with pytest.raises(AdapterNotFound):
        reg.get("nothing")


def test_a_half_uploaded_adapter_is_never_listed(s3, bucket, tmp_path):
    root = f"{bucket}/adapters"
    art = artifact(tmp_path / "art")
    reg = RemoteRegistry(root, listing_ttl_s=0)
    put(s3, f"{root}/half/{LORA}", (art / LORA).read_bytes())  # files arriving, no manifest yet
    assert reg.list() == [] and reg.inspect("half") is None
    with pytest.raises(AdapterNotFound):
        reg.get("half")
    # The manifest names a file that has not arrived yet (an upload that wrote it too early): still not listed.
    sizes = {LORA: (art / LORA).stat().st_size, CARD: (art / CARD).stat().st_size}
    put(s3, f"{root}/half/{storage.MANIFEST}", json.dumps({"files": sizes}).encode())
    assert reg.list() == [] and reg.inspect("half") is None
    put(s3, f"{root}/half/{CARD}", b'{"method": "x"')  # right name, wrong size: still not whole
    assert reg.list() == []
    put(s3, f"{root}/half/{CARD}", (art / CARD).read_bytes())
    assert [i.id for i in reg.list()] == ["half"] and reg.get("half").available


def test_the_bucket_is_listed_once_per_ttl_and_changes_show_after_it(s3, bucket, tmp_path):
    root = f"{bucket}/adapters"
    publish_adapter(str(artifact(tmp_path / "a")), root, "one")
    reg = RemoteRegistry(root, listing_ttl_s=3600)
    first = reg.get("one")
    for _ in range(20):
        assert reg.get("one").fingerprint == first.fingerprint
        reg.list()
    assert reg.listings == 1, "lookups within the TTL never list the bucket"
    publish_adapter(str(artifact(tmp_path / "b", seed=1)), root, "two")
    publish_adapter(str(artifact(tmp_path / "c", seed=2)), root, "one", replace=True)
    with pytest.raises(AdapterNotFound):
        reg.get("two")  # not seen until the listing expires
    reg.listing_ttl_s = 0
    assert [i.id for i in reg.list()] == ["one", "two"] and reg.listings == 2
    assert reg.get("one").fingerprint != first.fingerprint, "a replaced adapter is noticed by content"
    s3.fs.delete_dir(f"{root[5:]}/two")
    assert [i.id for i in reg.list()] == ["one"]
    with pytest.raises(AdapterNotFound):
        reg.get("two")
    copies = sorted(p.name for p in (tmp_path / "cache" / "registry").glob("*/one@*"))
    assert len(copies) == 2, f"one local copy per version seen: {copies}"


def test_bare_files_broken_entries_and_ids_follow_the_local_rules(s3, bucket, tmp_path):
    root = f"{bucket}/adapters"
    put(s3, f"{root}/kohya-style.safetensors", lora_bytes(3))  # one object: whole once listed
    put(s3, f"{root}/broken/{LORA}", b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # truncated, but completely uploaded
    storage.write_manifest(s3.fs, f"{root[5:]}/broken")
    put(s3, f"{root}/bad id/{LORA}", lora_bytes())
    storage.write_manifest(s3.fs, f"{root[5:]}/bad id")
    reg = RemoteRegistry(root, listing_ttl_s=0)
    assert [i.id for i in reg.list()] == ["broken", "kohya-style"]
    assert reg.get("kohya-style").kind == "lora"
    with pytest.raises(AdapterError, match="'broken' is unavailable"):
        reg.get("broken")
    assert reg.inspect("broken").problem == AdapterRegistry(reg.local_copy(reg.entries()["broken"])).inspect(
        "broken").problem, "the same reason a local registry gives"


def test_an_unreachable_store_keeps_the_last_listing(s3, bucket, tmp_path, caplog):
    root = f"{bucket}/adapters"
    publish_adapter(str(artifact(tmp_path / "a")), root, "one")
    reg = RemoteRegistry(root, listing_ttl_s=0)
    assert [i.id for i in reg.list()] == ["one"]
    reg.fs = pafs.S3FileSystem(access_key="x", secret_key="x", scheme="http", endpoint_override="127.0.0.1:9",
                               connect_timeout=1, request_timeout=1, retry_strategy=pafs.AwsStandardS3RetryStrategy(0))
    with caplog.at_level(logging.WARNING, logger="diffray.serve.remote_registry"):
        assert [i.id for i in reg.list()] == ["one"]
    assert "cannot be listed" in caplog.text


def test_a_key_that_climbs_out_of_its_folder_is_not_part_of_an_entry():
    """S3 keys may hold `..` segments (this endpoint's client normalises them away, so the listing is built here)."""
    from diffray.serve.remote_registry import group

    def f(path):
        return pafs.FileInfo(path, pafs.FileType.File, size=1, mtime_ns=1)

    entries = group([f("b/ad/evil/pytorch_lora_weights.safetensors"), f("b/ad/evil/../../../escaped.txt"),
                     f("b/ad/evil/./x"), f("b/ad/../top.safetensors"), f("b/ad/ok.safetensors")], "b/ad")
    assert {k: [n for n, _, _ in e.files] for k, e in entries.items()} == {
        "evil": ["pytorch_lora_weights.safetensors"], "ok": ["ok.safetensors"]}


def test_a_replacement_that_lists_the_same_is_noticed_while_fresh_and_old_entries_are_downloaded_once(tmp_path):
    """S3 lists mtimes to the second: an adapter replaced by one of the same sizes within that second lists exactly
    as before. Emulated on a file:// store by setting every mtime to the same whole second."""
    import os
    import time

    store = tmp_path / "store"
    root = f"file://{store}"

    def stamp(when: float) -> None:
        for p in (store / "one").iterdir():
            os.utime(p, (when, when))

    second = float(int(time.time()))
    publish_adapter(str(artifact(tmp_path / "a")), root, "one")
    stamp(second)
    reg = RemoteRegistry(root, listing_ttl_s=0, copies=tmp_path / "copies")
    first, listed = reg.get("one"), reg.entries()["one"]
    publish_adapter(str(artifact(tmp_path / "b", seed=2)), root, "one", replace=True)
    stamp(second)
    assert reg.entries()["one"] == listed, "the listing cannot tell the replacement apart"
    assert reg.get("one").fingerprint != first.fingerprint, "a same-size replacement within the second is noticed"
    stamp(second - 60)  # no longer fresh: a rewrite now would list a newer mtime, so one copy serves every listing
    old = reg.get("one").path
    before = sorted((tmp_path / "copies").iterdir())
    for _ in range(3):
        assert reg.get("one").path == old
    assert sorted((tmp_path / "copies").iterdir()) == before, "an old entry is not downloaded again"


HOSTILE_MANIFESTS = {"huge-size": b'{"files": {"x": 1e400}}', "nan-size": b'{"files": {"x": NaN}}',
                     "deep": b"[" * 100_000, "deep-files": b'{"files": ' + b"[" * 100_000 + b"}",
                     "not-utf8": b"\xff\xfe", "files-list": b'{"files": [1]}', "no-files": b"{}"}


@pytest.mark.parametrize("name", sorted(HOSTILE_MANIFESTS))
def test_a_malformed_manifest_is_an_incomplete_entry_not_an_error(tmp_path, name):
    """Anyone who can write the bucket writes manifests: one that overflows int() or the JSON parser's stack
    hides only its own entry, and the listing (GET /v1/models) still answers with the others."""
    raw = HOSTILE_MANIFESTS[name]
    assert storage.incomplete(raw, {"x": 1}) == f"{storage.MANIFEST} is not a JSON object with a files map"
    store = tmp_path / "store"
    publish_adapter(str(artifact(tmp_path / "a")), f"file://{store}", "good")
    (store / "evil").mkdir()
    (store / "evil" / LORA).write_bytes(lora_bytes())
    (store / "evil" / storage.MANIFEST).write_bytes(raw)
    reg = RemoteRegistry(f"file://{store}", listing_ttl_s=0, copies=tmp_path / "copies")
    assert [(i.id, i.available) for i in reg.list()] == [("good", True)]
    assert reg.inspect("evil") is None and reg.get("good").available
    with pytest.raises(AdapterNotFound):
        reg.get("evil")


def test_an_entry_whose_id_names_the_base_model_is_not_listed_from_a_store(tmp_path):
    store = tmp_path / "store"
    publish_adapter(str(artifact(tmp_path / "a")), f"file://{store}", "good")
    (store / "good").rename(store / "dall-e-3")  # published under an allowed name, renamed in the bucket
    publish_adapter(str(artifact(tmp_path / "b")), f"file://{store}", "good")
    reg = RemoteRegistry(f"file://{store}", listing_ttl_s=0, copies=tmp_path / "copies")
    assert [i.id for i in reg.list()] == ["good"] and reg.inspect("dall-e-3") is None
