"""Command-line options that feed a config section are checked as the section is, and an error names the
option the user typed (one line, exit 2), before Ray starts."""

from __future__ import annotations

from testkit.cli import diffray


def test_inspect_names_its_own_options_when_the_data_section_refuses_them(tmp_path, monkeypatch, capsys):
    code, out = diffray(["data", "inspect", tmp_path, "--buckets", "8192", "--bucket-step", "2048"], monkeypatch,
                        capsys)
    assert code == 2
    assert out == ("diffray: error: --buckets: Input should be less than or equal to 4096; "
                   "--bucket-step: Input should be less than or equal to 1024\n")


def test_generate_refuses_options_the_chosen_side_would_ignore(tmp_path, monkeypatch, capsys):
    remote = ["generate", "-p", "a red circle", "--url", "http://127.0.0.1:9", "--out", tmp_path / "x.png"]
    code, out = diffray([*remote, "--model", "builtin:tiny", "--controlnet", tmp_path], monkeypatch, capsys)
    assert code == 2 and out.startswith("diffray: error: --model, --controlnet: not with --url")
    code, out = diffray(["generate", "-p", "a red circle", "--size", "128", "--out", tmp_path / "x.png"],
                        monkeypatch, capsys)
    assert code == 2 and out == "diffray: error: --size: only with --url (a local grid is drawn at the model's own size)\n"
    assert not (tmp_path / "x.png").exists()


def test_inspect_checks_where_it_will_write_before_reading_a_row(tmp_path, monkeypatch, capsys):
    (tmp_path / "report").write_text("a file")
    for flag, value, why in (("--out", tmp_path / "sheet", "not an image file name (give .png, .jpg or .webp)"),
                             ("--report-dir", tmp_path / "report", "is a file, not a folder")):
        code, out = diffray(["data", "inspect", "builtin:sample", flag, value], monkeypatch, capsys)
        assert (code, out) == (1, f"diffray: error: {flag} {value}: {why}\n")


def test_demo_checks_what_it_writes_after_training_before_it_trains(tmp_path, monkeypatch, capsys):
    """The grid and the eval report are written after the training: a --out-dir holding someone's own files
    there, or a --suite that does not exist, was refused only then, and the minutes of training were lost."""
    (tmp_path / "mine" / "demo_eval").mkdir(parents=True)
    (tmp_path / "mine" / "demo_eval" / "notes.txt").write_text("the user's own")
    (tmp_path / "grid" / "demo_grid.png").mkdir(parents=True)
    for args, why in (
            (["--out-dir", tmp_path / "mine"], f"--out-dir: {tmp_path / 'mine' / 'demo_eval'}: folder holds files "
                                               "but no results.json"),
            (["--out-dir", tmp_path / "grid"], f"--out-dir: {tmp_path / 'grid' / 'demo_grid.png'} is a folder"),
            (["--out-dir", tmp_path / "new", "--suite", "stars"], "suite: unknown suite 'stars'")):
        code, out = diffray(["demo", *args, "train.max_steps=1", f"run.storage_path={tmp_path / 'runs'}"],
                            monkeypatch, capsys)
        assert code == 2 and out.startswith(f"diffray: error: {why}"), out
    assert (tmp_path / "mine" / "demo_eval" / "notes.txt").read_text() == "the user's own"
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()  # nothing trained
