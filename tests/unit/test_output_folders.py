"""Commands that write a folder and replace it when it exists (`data world`, `data sample`, `init-model`,
`pretrain-world`) replace only a folder diffray wrote: a user's folder at that path is refused before any
work, with its name, and keeps every file."""

from __future__ import annotations

import pytest
from testkit.cli import diffray


def user_folder(root):
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "cat.jpg").write_bytes(b"not ours")
    (root / "notes.txt").write_text("keep me")
    return sorted(p.relative_to(root) for p in root.rglob("*"))


@pytest.mark.parametrize("argv", [["data", "world", "--num-images", "1", "--resolution", "8"],
                                  ["data", "sample", "--num-images", "1", "--resolution", "8"],
                                  ["init-model", "tiny-random"], ["pretrain-world"]])
def test_a_folder_diffray_did_not_write_is_refused_and_kept(tmp_path, argv, monkeypatch, capsys):
    mine = tmp_path / "mine"
    files = user_folder(mine)
    args = argv[:2] + [str(mine)] + argv[2:] if argv[0] == "data" else argv + [str(mine)]
    code, out = diffray(args, monkeypatch, capsys)
    assert code == 1, out
    assert f"diffray: error: {mine}: folder exists, is not empty and was not written by diffray" in out
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == files
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary sibling, no work dir


def test_a_file_in_the_way_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "out").write_text("keep me")
    code, out = diffray(["data", "world", tmp_path / "out", "--num-images", "1"], monkeypatch, capsys)
    assert code == 1 and f"diffray: error: {tmp_path / 'out'}: exists and is not a folder" in out
    assert (tmp_path / "out").read_text() == "keep me"


@pytest.mark.parametrize("argv,marker", [(["data", "world", "--num-images", "1", "--resolution", "8"], "dataset.json"),
                                         (["init-model", "tiny-random"], "diffray_model.json")])
def test_an_empty_folder_or_one_diffray_wrote_is_replaced(tmp_path, argv, marker, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    args = argv[:2] + [str(out)] + argv[2:] if argv[0] == "data" else argv + [str(out)]
    assert diffray(args, monkeypatch, capsys)[0] == 0  # empty: written
    (out / "stale.txt").write_text("from an older run")
    code, printed = diffray(args, monkeypatch, capsys)
    assert code == 0, printed  # ours (it has the marker): replaced whole
    assert (out / marker).is_file() and not (out / "stale.txt").exists()
