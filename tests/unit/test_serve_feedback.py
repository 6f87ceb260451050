"""The feedback store without Ray: request checks (4xx naming the field), images re-encoded as clean PNG,
idempotent ids, concurrent writers in several processes, a writer SIGKILLed mid-stream losing nothing it
acknowledged, a store locked past its busy timeout answering 503, and the Pick-a-Pic-style Parquet export read
back by pyarrow and HF datasets (never onto the store, no partial file after a failure, bounded row groups,
no temp copy of the store)."""

from __future__ import annotations

import base64
import io
import multiprocessing as mp
import os
import signal
from contextlib import closing

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


def test_an_export_onto_the_store_itself_is_refused_and_the_store_kept(tmp_path, monkeypatch, capsys):
    from testkit.cli import diffray

    db = tmp_path / "fb.db"
    FeedbackStore(db).add(record(id="kept-0001"))
    for out in (db, tmp_path / "fb.db-wal"):
        code, text = diffray(["feedback", "export", out, "--db", db], monkeypatch, capsys)
        assert code == 2 and "the feedback store itself" in text and "Traceback" not in text
    assert [r["id"] for r in FeedbackStore(db).rows()] == ["kept-0001"]


def test_a_failed_export_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import sqlite3

    from testkit.cli import diffray

    FeedbackStore(tmp_path / "fb.db").add(record(id="kept-0001"))
    (tmp_path / "notes.txt").write_text("not a database " * 100)
    (tmp_path / "folder").mkdir()
    damaged = FeedbackStore(tmp_path / "damaged.db")
    damaged.add(record(id="fine-0001"))
    damaged.add(record(id="damaged-1"))
    with closing(sqlite3.connect(damaged.path)) as db:  # a blob damaged on disk: fails mid-write
        db.execute("UPDATE feedback SET image_1 = x'00ff' WHERE id = 'damaged-1'")
        db.commit()
    for db, out, says in [(tmp_path / "notes.txt", tmp_path / "o.parquet", "notes.txt is not a SQLite database"),
                          (tmp_path / "fb.db", tmp_path / "folder", "folder is a folder"),
                          (damaged.path, tmp_path / "d.parquet", "record 'damaged-1' is damaged (image_1")]:
        code, text = diffray(["feedback", "export", out, "--db", db], monkeypatch, capsys)
        assert code == 2 and says in text and text.count("\n") == 1 and "internal error" not in text, text
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".parquet"]
    assert list((tmp_path / "folder").iterdir()) == []


def test_exporting_a_database_that_is_no_feedback_store_changes_nothing(tmp_path):
    import sqlite3

    from diffray.errors import DiffrayError

    other = tmp_path / "app.db"
    with closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.commit()
    before = other.read_bytes()
    with pytest.raises(DiffrayError, match="app.db is not a feedback store"):
        export_parquet(other, tmp_path / "o.parquet")
    assert other.read_bytes() == before and not (tmp_path / "o.parquet").exists()


def test_a_store_locked_past_the_busy_timeout_answers_503_and_the_retry_is_stored(tmp_path, monkeypatch):
    import sqlite3

    from diffray.serve import feedback_store

    monkeypatch.setattr(feedback_store, "BUSY_TIMEOUT_MS", 200)  # the 30 s wait, shortened
    store = FeedbackStore(tmp_path / "fb.db")
    with closing(sqlite3.connect(store.path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another replica (or a stuck process) holds the write lock
        with pytest.raises(RequestError) as err:
            store.add(record(id="locked-0001"))
        other.execute("ROLLBACK")
    assert (err.value.status, err.value.retry_after) == (503, 1) and "retry" in err.value.message
    assert store.add(record(id="locked-0001"))[2] is False and store.count() == 1


def test_export_row_groups_are_bounded_in_bytes_not_only_rows(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from diffray.serve import feedback_store

    monkeypatch.setattr(feedback_store, "EXPORT_BATCH_BYTES", 128 << 10)  # 64 MiB scaled down to 128 KiB
    noise = np.random.default_rng(0).integers(0, 256, (6, 128, 128, 3), dtype=np.uint8)
    store, cfg = FeedbackStore(tmp_path / "fb.db"), FeedbackSection(max_image_bytes=200_000, max_image_side=128)
    for i in range(6):  # ~50 KB of noise PNG per image, 2 per row: the 256-row batch would hold all in one
        pngs = []
        for k in range(2):
            buf = io.BytesIO()
            Image.fromarray(np.roll(noise[i], k, axis=0)).save(buf, format="PNG")
            pngs.append({"b64_json": base64.b64encode(buf.getvalue()).decode()})
        req = FeedbackRequest(**body(id=f"big-{i:04d}", images=pngs))
        store.add(feedback_record(req, LIMITS, cfg, None))
    assert export_parquet(tmp_path / "fb.db", tmp_path / "o.parquet", "png") == 6
    meta = pq.ParquetFile(tmp_path / "o.parquet").metadata
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    assert len(groups) == 3 and all(g.total_byte_size < 256 << 10 for g in groups)
    assert pq.read_table(tmp_path / "o.parquet").column("ranking_id").to_pylist() == [f"big-{i:04d}" for i in range(6)]


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's per-process I/O counters")
def test_export_streams_the_store_without_copying_it_through_a_sort(tmp_path):
    import pyarrow.parquet as pq

    def written() -> int:
        return int(next(x for x in open("/proc/self/io") if x.startswith("wchar")).split()[1])

    noise = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    store, cfg = FeedbackStore(tmp_path / "fb.db"), FeedbackSection(max_image_bytes=300_000, max_image_side=256)
    for i in range(40):  # ~15 MB of images: far past what SQLite sorts in memory
        pngs = []
        for k in range(2):
            buf = io.BytesIO()
            Image.fromarray(np.roll(noise, 2 * i + k, axis=1)).save(buf, format="PNG")
            pngs.append({"b64_json": base64.b64encode(buf.getvalue()).decode()})
        store.add(feedback_record(FeedbackRequest(**body(id=f"row-{39 - i:04d}", images=pngs)), LIMITS, cfg, None))
    before = written()
    assert export_parquet(tmp_path / "fb.db", tmp_path / "o.parquet", "png") == 40
    size = os.path.getsize(tmp_path / "o.parquet")
    assert written() - before < 1.2 * size, "the export wrote the store out twice (a temp sort of every image)"
    ids = pq.read_table(tmp_path / "o.parquet", columns=["ranking_id"]).column("ranking_id").to_pylist()
    assert ids == [f"row-{39 - i:04d}" for i in range(40)], "oldest first, not by id"


def test_an_adapters_strength_and_controlnet_are_stored_with_the_preference(tmp_path):
    """A comparison drawn at adapter strength 0.3 or with a ControlNet was stored as a plain adapter comparison
    (no field for either): the pair then read as the adapter at full strength. Sent, both are kept per image and
    exported; a record without them keeps its old shape; out of the generation API's bounds is refused."""
    import json

    import pyarrow.parquet as pq

    images = [{"b64_json": b64_png(), "model": "base", "seed": 1, "control_model": "canny", "control_scale": 0.8},
              {"b64_json": b64_png((1, 2, 3)), "model": "lora-a", "seed": 1, "adapter_scale": 0.3}]
    rec = record(id="made-with-0001", images=images)
    assert rec.params[0] == {"seed": 1, "steps": None, "guidance": None, "scheduler": None, "control_model": "canny",
                             "control_scale": 0.8}
    assert rec.params[1]["adapter_scale"] == 0.3 and "control_model" not in rec.params[1]
    assert record().params[0] == {"seed": 1, "steps": None, "guidance": None, "scheduler": None}
    store = FeedbackStore(tmp_path / "fb.db")
    store.add(rec)
    export_parquet(tmp_path / "fb.db", tmp_path / "pairs.parquet")
    row = pq.read_table(tmp_path / "pairs.parquet").to_pylist()[0]
    assert json.loads(row["params_1"])["adapter_scale"] == 0.3 and json.loads(row["params_0"])["control_scale"] == 0.8
    for bad, field in (({"adapter_scale": 9.0}, "adapter_scale"), ({"control_scale": -1}, "control_scale"),
                       ({"control_model": "x" * 65}, "control_model")):
        with pytest.raises(ValidationError) as err:
            FeedbackRequest(**body(images=[{**images[1], **bad}, images[0]]))
        assert err.value.errors()[0]["loc"] == ("images", 0, field)
