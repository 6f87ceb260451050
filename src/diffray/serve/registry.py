"""The adapter registry: a folder whose sub-folders are trained artifacts, one per adapter id.

Every lookup rescans the folder, so a new artifact copied in is servable without a redeploy (copy it
under a temporary name and rename it into place: a rename is atomic). Ids are validated before they
touch the filesystem; only safetensors files count. Never imports ray or torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffray.errors import AdapterError, AdapterNotFound, RequestError
from diffray.models.adapters import CARD, LORA_WEIGHTS, read_card
from diffray.models.textual_inversion import TI_WEIGHTS

ADAPTER_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CONTROLNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
KINDS = ("lora", "textual_inversion", "controlnet")


@dataclass(frozen=True)
class AdapterInfo:
    """One artifact: its id, kind, folder and card (base model, method, steps, metrics)."""

    id: str
    kind: str
    path: str
    card: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    mtime: float = 0.0


def check_adapter_id(adapter_id: Any, param: str = "model") -> str:
    """The id if it is a plain name (`^[A-Za-z0-9._-]{1,64}$`, not `.`/`..`, no path or URL).

    Raises:
        RequestError: naming `param`.
    """
    if not isinstance(adapter_id, str) or not ADAPTER_ID.match(adapter_id) or set(adapter_id) <= {"."}:
        shown = str(adapter_id)[:80]
        raise RequestError(f"invalid adapter id {shown!r}: use 1-64 of A-Z a-z 0-9 . _ - (no paths or URLs)",
                           param=param)
    return adapter_id


def artifact_kind(folder: Path) -> str | None:
    """What a folder holds, by its safetensors file; None when it is no servable artifact."""
    if (folder / LORA_WEIGHTS).is_file():
        return "lora"
    if (folder / TI_WEIGHTS).is_file():
        return "textual_inversion"
    if (folder / "config.json").is_file() and (folder / CONTROLNET_WEIGHTS).is_file():
        return "controlnet"
    return None


class AdapterRegistry:
    """Adapters under `root` by id (the folder name). Missing root = empty registry."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def get(self, adapter_id: str, param: str = "model") -> AdapterInfo:
        """The artifact `adapter_id`, read fresh from disk.

        Raises:
            RequestError: an invalid id (naming `param`).
            AdapterNotFound: no artifact folder with that id.
            AdapterError: the folder exists but holds no safetensors artifact.
        """
        check_adapter_id(adapter_id, param)
        folder = self.root / adapter_id
        if not folder.is_dir():
            raise AdapterNotFound(adapter_id, str(self.root))
        kind = artifact_kind(folder)
        if kind is None:
            raise AdapterError(f"adapter {adapter_id!r}: {folder} holds no {LORA_WEIGHTS}, {TI_WEIGHTS} or "
                               f"ControlNet {CONTROLNET_WEIGHTS}")
        return AdapterInfo(adapter_id, kind, str(folder.resolve()), _safe_card(folder), _mtime(folder))

    def list(self) -> list[AdapterInfo]:
        """Every servable artifact, sorted by id (folders with bad names or no artifact are skipped)."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and ADAPTER_ID.match(folder.name) and not set(folder.name) <= {"."}:
                kind = artifact_kind(folder)
                if kind is not None:
                    out.append(AdapterInfo(folder.name, kind, str(folder.resolve()), _safe_card(folder),
                                           _mtime(folder)))
        return out


def _mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.iterdir() if p.is_file()), default=0.0)


def _safe_card(folder: Path) -> dict[str, Any]:
    try:
        return read_card(folder)
    except (OSError, ValueError):
        return {"error": f"unreadable {CARD}"}
