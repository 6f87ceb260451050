"""`diffray publish --replace` into an object-storage registry (the session's S3 endpoint on 127.0.0.1) keeps
a whole adapter there when the upload fails, and a replace leaves only the new adapter's files; Ctrl-C in a
`diffray` command prints one line and exits 130 (a real process, interrupted while it waits on a server)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from diffray import storage
from diffray.errors import DiffrayError
from diffray.loop import publish_adapter
from diffray.serve.artifacts import sha256_file
from diffray.serve.remote_registry import RemoteRegistry

LORA = "pytorch_lora_weights.safetensors"
DIFFRAY = str(Path(sys.executable).parent / "diffray")


def artifact(folder: Path, seed: int, **extra: bytes) -> Path:
    """A servable LoRA artifact; every seed gives weights of the same size (a retrained adapter's)."""
    folder.mkdir(parents=True)
    a = np.random.default_rng(seed).standard_normal((4, 32)).astype(np.float32)
    (folder / LORA).write_bytes(st_save({"unet.down.lora.down.weight": a,
                                         "unet.down.lora.up.weight": np.zeros((32, 4), np.float32)}))
    (folder / "diffray_card.json").write_text(json.dumps({"method": "lora", "base_model": "builtin:tiny"}))
    for name, data in extra.items():
        (folder / name).write_bytes(data)
    return folder


def contents(s3, uri: str) -> dict[str, bytes]:
    return {k: s3.fs.open_input_stream(k).read() for k in s3.keys(uri)}


def test_a_replace_whose_upload_fails_leaves_the_old_adapter_whole_and_served(s3, tmp_path, monkeypatch):
    """`--replace` deleted the old adapter before uploading the new one: an upload the endpoint refused (or a
    killed process) left no adapter, and the replicas polling the registry lost it. The new files now go up
    beside it first; a successful replace then leaves exactly the new adapter (no stale file, no bare file)."""
    monkeypatch.setenv("DIFFRAY_CACHE", str(tmp_path / "cache"))
    bucket = s3.bucket("publish")
    root = f"{bucket}/adapters"
    old = artifact(tmp_path / "old", seed=0, **{"notes.txt": b"round 1"})
    publish_adapter(str(old), root, "v1")
    with s3.fs.open_output_stream(f"{root[5:]}/v1.safetensors") as f:  # a bare file of the id, older still
        f.write((old / LORA).read_bytes())
    before = contents(s3, bucket)
    reg = RemoteRegistry(root, listing_ttl_s=0)
    assert reg.get("v1").fingerprint == sha256_file(old / LORA)

    # a key the endpoint refuses (moto cannot take a newline in a key), uploaded with the adapter's own files
    refused = artifact(tmp_path / "refused", seed=1, **{"bad\nname.txt": b"x"})
    with pytest.raises(DiffrayError, match=r"^cannot publish .*refused to s3://publish-\d+/adapters: ") as err:
        publish_adapter(str(refused), root, "v1", replace=True)
    assert "\n" not in str(err.value), "one line"
    assert contents(s3, bucket) == before, "nothing of the old adapter changed, nothing left behind"
    assert reg.get("v1").fingerprint == sha256_file(old / LORA) and reg.get("v1").available

    new = artifact(tmp_path / "new", seed=2)
    assert publish_adapter(str(new), root, "v1", replace=True) == f"{root}/v1"
    keys = s3.keys(bucket)
    assert keys == [f"{root[5:]}/v1/{n}" for n in sorted(["diffray_card.json", storage.MANIFEST, LORA])], keys
    manifest = json.loads(s3.fs.open_input_stream(f"{root[5:]}/v1/{storage.MANIFEST}").read())
    assert manifest["files"] == {n: (new / n).stat().st_size for n in ("diffray_card.json", LORA)}
    assert reg.get("v1").fingerprint == sha256_file(new / LORA)


def test_ctrl_c_in_a_command_prints_one_line_and_exits_130(tmp_path):
    """Typer turned a KeyboardInterrupt into a silent exit 130, so `main`'s line never showed. The command
    here waits on a server that accepted its request and never answers; SIGINT comes once the request is in."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(60)
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    proc = subprocess.Popen([DIFFRAY, "generate", "-p", "a red circle", "--url", url, "--out", str(tmp_path / "x.png")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conn, _ = server.accept()
        request = b""
        while b"a red circle" not in request:  # the whole request (its JSON body last) is in: it waits for an answer
            chunk = conn.recv(65536)
            assert chunk, "the client closed the connection"
            request += chunk
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 130, err
    # the last line (a progress line of the wait may come before it), and nothing else of the interrupt
    assert err.strip().splitlines()[-1] == "diffray: interrupted" and out == "", (out, err)
    assert "Traceback" not in err and "Aborted" not in err and err.count("interrupted") == 1, err


def test_a_registry_under_a_file_is_one_line_and_a_published_card_holds_no_credentials(tmp_path):
    """The registry's own checks ran outside publish's error handling: a registry folder under a file (or an
    endpoint that cannot be reached) was `internal error: NotADirectoryError`. And the card went out as the
    artifact had it: one written before cards were kept free of credentials kept its keys in the registry."""
    (tmp_path / "file").write_text("x")
    art = artifact(tmp_path / "art", seed=0)
    with pytest.raises(DiffrayError, match=r"^cannot publish .*art to .*file/adapters: .*Not a directory"):
        publish_adapter(str(art), tmp_path / "file" / "adapters", "v1")
    (art / "diffray_card.json").write_text(json.dumps({
        "method": "lora", "base_model": "builtin:tiny",
        "config": {"data": {"path": "s3://AKIAEXAMPLE:wJalrSECRET@bucket/data?region=x&secret_key=k2"},
                   "tracking": {"wandb": {"api_key": "0123abcd"}}}}))
    out = Path(publish_adapter(str(art), tmp_path / "adapters", "v1", card_extra={"feedback": {"pairs": 3}}))
    text = (out / "diffray_card.json").read_text()
    assert not any(s in text for s in ("AKIAEXAMPLE", "wJalrSECRET", "k2", "0123abcd")), text
    card = json.loads(text)
    assert card["config"]["data"]["path"] == "s3://bucket/data?region=x" and card["feedback"] == {"pairs": 3}
    assert card["config"]["tracking"]["wandb"]["api_key"] == "<redacted>" and card["method"] == "lora"


def test_a_missing_or_file_artifact_is_named_and_an_object_storage_artifact_is_copied_whole(s3, tmp_path):
    """A missing artifact was pyarrow's "Failed to open local file"; a file was "Is a directory" about a hidden
    temporary folder. An artifact on object storage is published with all its files (copy_dir, a few at a time;
    pyarrow's copy_files returned on its first failure while other downloads were still being written)."""
    adapters = tmp_path / "adapters"
    with pytest.raises(DiffrayError) as err:
        publish_adapter(str(tmp_path / "nope"), adapters, "v1")
    assert str(err.value) == f"{tmp_path / 'nope'}: no such folder; publish takes an artifact folder " \
                             "(runs/NAME/artifact)"
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(DiffrayError, match=r"weights\.safetensors: a file; publish takes an artifact folder"):
        publish_adapter(str(tmp_path / "weights.safetensors"), adapters, "v1")
    assert not adapters.exists() or not any(adapters.iterdir()), "nothing left behind"
    art = artifact(tmp_path / "art", seed=1, **{f"extra{i}.txt": str(i).encode() for i in range(10)})
    remote = f"{s3.bucket('arts')}/art"
    storage.copy_dir(storage.resolve(str(art))[0], str(art), remote)
    out = Path(publish_adapter(remote, adapters, "v1"))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in art.iterdir())  # no manifest copied
    assert (out / LORA).read_bytes() == (art / LORA).read_bytes()
    assert sorted(p.name for p in adapters.iterdir()) == ["v1"]
