"""Where diffray keeps built-on-first-use things (the embedded tiny model, the sample dataset).

`DIFFRAY_CACHE` overrides the location; the default is `~/.cache/diffray`. Configs never depend on it:
they name `builtin:tiny` / `builtin:sample` and these resolve here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def cache_dir() -> Path:
    """The root cache folder (created on demand)."""
    root = Path(os.environ.get("DIFFRAY_CACHE", Path.home() / ".cache" / "diffray")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def check_replaceable(out: str | Path, marker: str) -> None:
    """Refuse, before any work, to replace a folder diffray did not write. A writer that replaces its output
    folder calls this first: `out` may be missing, an empty folder, or a folder holding `marker` (the file
    that writer leaves in every folder it writes).

    Raises:
        StorageError: `out` is a file, or a non-empty folder without `marker` (naming both).
    """
    from diffray.errors import StorageError

    out = Path(out).expanduser()
    if not out.exists():
        return
    if not out.is_dir():
        raise StorageError(f"{out}: exists and is not a folder; give a new folder to write to")
    if (out / marker).is_file() or next(out.iterdir(), None) is None:
        return
    raise StorageError(f"{out}: folder exists, is not empty and was not written by diffray (it has no {marker}); "
                       "it would be replaced, so give a new or empty folder")


def is_builtin(path: str) -> bool:
    return str(path).startswith(BUILTIN_PREFIX)


def looks_like_hub_id(path: str) -> bool:
    """A Hugging Face hub id is exactly "name" or "org/name"; anything else is a local path."""
    path = str(path)
    return not (path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path or is_builtin(path))


def pipeline_class_of(path: str) -> str:
    """The pipeline class a diffusers model's `model_index.json` names: a local dir's, or a hub id's (read
    through the Hugging Face cache: downloaded where the hub is reachable, the cached copy offline). ""
    for a local dir or a hub repo without the index.

    Raises:
        ModelError: a hub id whose index cannot be read (offline and not cached, no such repo, no access); a
            local `model_index.json` that is not a JSON object.
    """
    import json

    from diffray.errors import ModelError

    index = Path(path) / "model_index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise ModelError(f"{index}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ModelError(f"{index}: must be a JSON object, got {type(data).__name__}")
        return str(data.get("_class_name", ""))
    if Path(path).expanduser().exists() or not looks_like_hub_id(path):
        return ""
    hub_index = _hub_index(str(path))
    return json.loads(Path(hub_index).read_text()).get("_class_name", "") if hub_index else ""


@functools.lru_cache(maxsize=16)
def _hub_index(repo_id: str) -> str:
    """The local path of a hub repo's `model_index.json` ("" where the repo has none)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    from diffray.errors import ModelError

    try:
        return hf_hub_download(repo_id, "model_index.json")
    except RemoteEntryNotFoundError:
        return ""
    except LocalEntryNotFoundError:
        raise ModelError(f"{repo_id}: a hub id whose model_index.json is not in the Hugging Face cache and the hub "
                         "is not reachable (offline); download the model first (hf download "
                         f"{repo_id}) or name a local diffusers dir") from None
    except (OSError, ValueError) as exc:  # no such repo, gated, an HTTP error, an invalid id
        raise ModelError(f"{repo_id}: cannot read its model_index.json from the Hugging Face hub: "
                         f"{str(exc).strip().splitlines()[0]}") from None
