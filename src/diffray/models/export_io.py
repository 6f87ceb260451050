"""What `diffray export` writes besides the weights: its output folder (checked, then replaced whole and
atomically), the kohya file's name and the card that leaves the machine with the export.

An export is made to be shared: its card never carries a local absolute path (only the folder's name) or
the credentials and query of a URI. A card is untrusted input: a field that would name a file outside OUT
is refused, naming the card and the field. Never imports ray or torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from diffray.config import RUN_NAME_PATTERN
from diffray.errors import AdapterError, ConfigError, StorageError
from diffray.models.adapters import CARD

EXPORT_MARK = "export_format"  # the card field that says a folder is an export (so it may be replaced)
LOCAL = "<local>/"  # what stands for the folders of a local path in an exported card
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*@)?([^?#]*)([?#].*)?$", re.S)


def read_card_file(card_file: Path) -> dict:
    """The artifact's card ({} when it has none); AdapterError naming the file when it is not a JSON object."""
    if not card_file.is_file():
        return {}
    try:
        card = json.loads(card_file.read_text())
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise AdapterError(f"{card_file}: not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise AdapterError(f"{card_file}: not a JSON object (an adapter card)")
    return card


def kohya_name(card: dict, source: str | Path = CARD) -> str:
    """The kohya file's stem: the card's `config.run.name` ('lora' without one).

    Raises:
        AdapterError: naming `source` and the field, when `config`/`config.run` is not an object or the name
            is not a run name (a '/' or '..' in it would write outside OUT).
    """
    config = card.get("config", {})
    run = config.get("run", {}) if isinstance(config, dict) else None
    if not isinstance(run, dict):
        where = "config" if not isinstance(config, dict) else "config.run"
        raise AdapterError(f"{source}: {where} must be a JSON object, not {json.dumps(run or config)[:40]}")
    name = run.get("name", "lora")
    if not isinstance(name, str) or not re.fullmatch(RUN_NAME_PATTERN, name):
        raise AdapterError(f"{source}: config.run.name {name!r} is not a run name (letters, digits, '.', '_', "
                           "'-', at most 100): the kohya file is named after it")
    return name


def public_value(value: Any) -> Any:
    """`value` (a card, or any part of it) without local absolute paths (kept: the last folder's name, after
    `<local>/`) and without the user:password@ and ?query of URIs (s3://KEY:SECRET@bucket, ?secret_key=...)."""
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_value(v) for v in value]
    if not isinstance(value, str):
        return value
    uri = _URI.match(value)
    if uri and uri.group(1).lower() == "file://":
        return LOCAL + PurePosixPath(uri.group(3)).name
    if uri:
        return uri.group(1) + uri.group(3)
    if value.startswith(("/", "~")):
        return LOCAL + PurePosixPath(value).name
    if re.match(r"^([A-Za-z]:)?\\|^[A-Za-z]:/", value):
        return LOCAL + PureWindowsPath(value).name
    return value


def write_export_card(out_dir: Path, card: dict, fmt: str) -> Path:
    """The exported card: the artifact's, made public (`public_value`), saying which format this folder is."""
    path = out_dir / CARD
    path.write_text(json.dumps({**public_value(card), EXPORT_MARK: fmt}, indent=2, default=str))
    return path


def check_out(src: Path, out: Path) -> None:
    """Refuse, before any work, an OUT that the export cannot replace without losing something: the artifact,
    a folder holding it, a file, or a non-empty folder that is not an earlier export (its card says so).

    Raises:
        ConfigError: naming `OUT` and the path.
    """
    s, o = src.resolve(), out.resolve()
    if o == s:
        raise ConfigError(f"{out} is the artifact itself: name another folder (the source is never written to)",
                          field="OUT")
    if o in s.parents:
        raise ConfigError(f"{out} holds the artifact {src}; the export replaces OUT, so name a folder outside it",
                          field="OUT")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder", field="OUT")
    if out.is_dir() and next(out.iterdir(), None) is not None and not _is_export(out):
        raise ConfigError(f"{out}: folder exists, is not empty and is not an export (no {CARD} with "
                          f"{EXPORT_MARK}); it would be replaced, so name a new or empty folder", field="OUT")


def _is_export(folder: Path) -> bool:
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and EXPORT_MARK in card


@contextmanager
def replaced_dir(out: Path, what: str) -> Iterator[Path]:
    """A fresh temporary sibling of `out` to fill; on success it takes `out`'s place (an earlier export there
    is removed only then), so a failed export leaves `out` as it was and no folder made for it.

    Raises:
        StorageError: an OSError while writing, naming `out` and `what`.
    """
    target = out.resolve()
    created = next((p for p in reversed([target, *target.parents]) if not p.exists()), None)
    tmp = old = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is made to be shared
        yield tmp
        if target.exists():
            old = tmp.with_name(tmp.name + "-old")
            os.replace(target, old)  # a folder cannot be renamed onto a non-empty one
        os.replace(tmp, target)
    except BaseException as exc:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # the swap failed half-way: the earlier export comes back
        if created is not None and created != target:  # parents made for OUT
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(exc, OSError):
            raise StorageError(f"{out}: cannot write the {what} ({exc.strerror or exc})") from None
        raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
