"""Where diffray keeps built-on-first-use things (the embedded tiny model, the sample dataset).

`DIFFRAY_CACHE` overrides the location; the default is `~/.cache/diffray`. Configs never depend on it:
they name `builtin:tiny` / `builtin:sample` and these resolve here.
"""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def cache_dir() -> Path:
    """The root cache folder (created on demand)."""
    root = Path(os.environ.get("DIFFRAY_CACHE", Path.home() / ".cache" / "diffray")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def is_builtin(path: str) -> bool:
    return str(path).startswith(BUILTIN_PREFIX)


def pipeline_class_of(path: str) -> str:
    """The pipeline class a local diffusers dir's `model_index.json` names ("" for a hub id or no index)."""
    import json

    index = Path(path) / "model_index.json"
    return json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
