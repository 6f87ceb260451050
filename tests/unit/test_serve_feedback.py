"""The feedback store without Ray: request checks (4xx naming the field), images re-encoded as clean PNG,
idempotent ids, concurrent writers in several processes, a writer SIGKILLed mid-stream losing nothing it
acknowledged, and the Pick-a-Pic-style Parquet export read back by pyarrow and HF datasets."""

from __future__ import annotations

import base64
import io
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from testkit.wait import wait_until

from diffray.errors import RequestError
from diffray.serve.config import FeedbackSection, Limits
from diffray.serve.feedback import FeedbackRequest, feedback_record
from diffray.serve.feedback_store import FeedbackStore, export_parquet

LIMITS, CFG = Limits(), FeedbackSection(max_image_bytes=50_000, max_image_side=128)


def b64_png(color=(200, 30, 30), size=(16, 16), extra: bytes = b"") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue() + extra).decode()


def body(**kw) -> dict:
    return {"prompt": "a red circle", "images": [{"b64_json": b64_png(), "model": "base", "seed": 1},
                                                 {"b64_json": b64_png((20, 20, 220)), "model": "lora-a", "seed": 1}],
            "choice": "left", **kw}


def record(user="u1", **kw):
    return feedback_record(FeedbackRequest(**body(**kw)), LIMITS, CFG, user)


@pytest.mark.parametrize("patch,field", [
    ({"choice": "middle"}, "choice"), ({"images": []}, "images"),
    ({"prompt": "x\ud800"}, "prompt"), ({"id": "short"}, "id"), ({"id": "has space 123"}, "id"),
    ({"colour": "red"}, "colour"), ({"prompt": 5}, "prompt"),
])
def test_malformed_bodies_name_the_field(patch, field):
    with pytest.raises(ValidationError) as err:
        FeedbackRequest(**body(**patch))
    assert err.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("image,param,status", [
    ({"b64_json": "!!!"}, "images.1.b64_json", 400),
    ({"b64_json": base64.b64encode(b"not an image").decode()}, "images.1.b64_json", 400),
    ({"b64_json": b64_png(size=(256, 8))}, "images.1.b64_json", 400),
    ({"b64_json": base64.b64encode(os.urandom(70_000)).decode()}, "images.1.b64_json", 413),
    ({"b64_json": b64_png(), "model": "../etc"}, "images.1.model", 400),
    ({"b64_json": b64_png(), "model": ""}, "images.1.model", 400),
])
def test_bad_images_and_ids_are_4xx_naming_them(image, param, status):
    req = FeedbackRequest(**body(images=[{"b64_json": b64_png()}, image]))
    with pytest.raises(RequestError) as err:
        feedback_record(req, LIMITS, CFG, None)
    assert (err.value.param, err.value.status) == (param, status)


def test_names_the_images_api_maps_to_the_base_model_are_recorded_as_base():
    for name in ("base", "dall-e-2", "dall-e-3", "gpt-image-1"):
        rec = record(images=[{"b64_json": b64_png(), "model": name}, {"b64_json": b64_png(), "model": "lora-a"}])
        assert rec.models == ("base", "lora-a")


def test_images_are_stored_as_clean_png():
    rec = record(images=[{"b64_json": b64_png(extra=b"<script>trailing payload</script>")},
                         {"b64_json": b64_png((1, 2, 3))}])
    assert all(img.startswith(b"\x89PNG") and b"script" not in img for img in rec.images)
    assert np.asarray(Image.open(io.BytesIO(rec.images[1])))[0, 0].tolist() == [1, 2, 3]


def test_ids_make_retries_idempotent(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    first = store.add(record(id="client-id-0001"))
    again = store.add(record(id="client-id-0001"))
    assert again == (first[0], first[1], True) and store.count() == 1
    with pytest.raises(RequestError) as err:
        store.add(record(id="client-id-0001", choice="right"))
    assert err.value.status == 409 and err.value.param == "id"
    assert store.add(record())[0] != first[0] and store.count() == 2


def _writer(path: str, start: int, count: int, acks: str) -> None:
    store = FeedbackStore(path)
    with open(acks, "a") as out:  # a file per writer: a killed process cannot wedge a shared channel
        for i in range(start, start + count):
            store.add(record(id=f"writer-{i:06d}", prompt=f"prompt {i}"))
            out.write(f"{i}\n")  # only after the commit returned
            out.flush()


def _acked(path) -> list[int]:
    lines = path.read_text().split("\n") if path.exists() else []
    return [int(x) for x in lines[:-1]]  # the last piece may be a line cut short by the kill


def test_concurrent_writers_and_a_killed_writer_lose_nothing_acknowledged(tmp_path):
    path = str(tmp_path / "fb.db")
    FeedbackStore(path)
    ctx = mp.get_context("spawn")
    acks = [tmp_path / f"acks-{k}.txt" for k in range(4)]
    procs = [ctx.Process(target=_writer, args=(path, k * 1000, 40, str(acks[k]))) for k in range(3)]
    victim = ctx.Process(target=_writer, args=(path, 9000, 100_000, str(acks[3])))
    for p in [*procs, victim]:
        p.start()

    def victim_alive() -> None:
        assert victim.is_alive(), "the victim writer ended before it was killed"

    # the victim is mid-stream: wait on its acknowledgements
    wait_until(lambda: len(_acked(acks[3])) >= 20, "20 acknowledged writes by the victim", timeout=300,
               interval=0.01, alive=victim_alive)
    os.kill(victim.pid, signal.SIGKILL)
    for p in [*procs, victim]:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    ids = {r["id"] for r in FeedbackStore(path).rows()}
    acked = [i for a in acks for i in _acked(a)]
    assert {f"writer-{i:06d}" for i in acked} <= ids  # every acknowledged write survived the kill
    assert all(f"writer-{k * 1000 + i:06d}" in ids for k in range(3) for i in range(40))


def test_export_is_pickapic_and_reads_back(tmp_path):
    import pyarrow.parquet as pq

    store = FeedbackStore(tmp_path / "fb.db")
    choices = ["left", "right", "tie", "both_bad"]
    for i, choice in enumerate(choices):
        store.add(record(id=f"export-{i:04d}", choice=choice, prompt=f"<script>{i}</script>"))
    n = export_parquet(tmp_path / "fb.db", tmp_path / "out" / "pairs.parquet")
    table = pq.read_table(tmp_path / "out" / "pairs.parquet")
    assert n == 4 and table.num_rows == 4
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "ranking_id", "created_at", "model_0",
            "model_1", "user_id"} <= set(table.column_names)
    rows = table.to_pylist()
    assert [r["ranking_id"] for r in rows] == [f"export-{i:04d}" for i in range(4)]
    assert [(r["label_0"], r["label_1"]) for r in rows] == [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.0, 0.0)]
    assert [r["has_label"] for r in rows] == [True, True, True, False]
    assert rows[0]["caption"] == "<script>0</script>" and rows[0]["model_1"] == "lora-a"
    left = np.asarray(Image.open(io.BytesIO(rows[0]["jpg_0"])))
    assert Image.open(io.BytesIO(rows[0]["jpg_0"])).format == "JPEG" and abs(int(left[8, 8, 0]) - 200) < 8
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "pairs.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 4 and ds[1]["label_0"] == 0.0


def test_export_of_an_empty_store_and_a_missing_one(tmp_path):
    from diffray.errors import DiffrayError

    FeedbackStore(tmp_path / "fb.db")
    assert export_parquet(tmp_path / "fb.db", tmp_path / "e.parquet") == 0
    with pytest.raises(DiffrayError, match="no feedback store"):
        export_parquet(tmp_path / "none.db", tmp_path / "e.parquet")
