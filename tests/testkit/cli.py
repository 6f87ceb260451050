"""The `diffray` console entry point run in-process, as a user runs it: exit code and printed text."""

from __future__ import annotations

import sys

import pytest


def diffray(args, monkeypatch, capsys) -> tuple[int, str]:
    """Run `diffray ARGS` through `diffray.cli.main` (which turns errors into one line and an exit code).
    The terminal logging it sets up is undone after the test (conftest's `cli_logging_undone`)."""
    from diffray.cli import main

    monkeypatch.setattr(sys, "argv", ["diffray", *map(str, args)])
    with pytest.raises(SystemExit) as stop:
        main()
    out = capsys.readouterr()
    return stop.value.code or 0, out.out + out.err
