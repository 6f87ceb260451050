"""The adapter registry: a folder whose sub-folders are trained artifacts, one per adapter id, and
whose `<id>.safetensors` files are LoRAs as other tools ship them (kohya/A1111/ComfyUI or diffusers keys;
diffusers' loader converts kohya names on load).

Every lookup rescans the folder, so a new artifact copied in is servable without a redeploy (copy it
under a temporary name and rename it into place: a rename is atomic). Ids are validated (`fullmatch`)
before they touch the filesystem; only safetensors files count, and their content is checked
(`artifacts`) before anything loads them. An entry that exists but cannot be served is still listed,
with `available: False` and a client-safe reason, and a lookup of it raises `AdapterError` naming the
id; one broken entry never breaks the listing or another adapter. Each entry carries a fingerprint of
its weights' content, which is how the engine notices a replaced artifact. Never imports ray or torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffray.errors import AdapterError, AdapterNotFound, RequestError
from diffray.models.adapters import LORA_WEIGHTS, PEFT_WEIGHTS
from diffray.models.textual_inversion import SDXL_KEYS, TI_WEIGHTS
from diffray.serve.artifacts import ArtifactProblem, FileChecks, base_mismatch, read_card
from diffray.serve.schemas import RESERVED_IDS

log = logging.getLogger(__name__)

ADAPTER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
CONTROLNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
KINDS = ("lora", "textual_inversion", "controlnet")
MAX_TI_TOKEN_CHARS = 100


@dataclass(frozen=True)
class AdapterInfo:
    """One artifact: id, kind, folder, card, content fingerprint, and why it cannot be served (if so)."""

    id: str
    kind: str
    path: str
    card: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    mtime: float = 0.0
    fingerprint: str = ""
    problem: str | None = None
    tensors: tuple = field(default=(), compare=False, hash=False)
    weights: str = ""  # the weights file's name in `path` ("" = the kind's standard name)

    @property
    def available(self) -> bool:
        return self.problem is None

    @property
    def weights_name(self) -> str:
        return self.weights or WEIGHTS.get(self.kind, "")


def valid_id(adapter_id: Any) -> bool:
    """A plain name (1-64 of `A-Za-z0-9._-`, whole string, not `.`/`..`) that names no base model (`RESERVED_IDS`):
    an entry with another name is never listed, served or published."""
    return isinstance(adapter_id, str) and ADAPTER_ID.fullmatch(adapter_id) is not None \
        and not set(adapter_id) <= {"."} and adapter_id not in RESERVED_IDS


def check_adapter_id(adapter_id: Any, param: str = "model") -> str:
    """The id if it is `valid_id`.

    Raises:
        RequestError: naming `param` (the bad value is not echoed back, but for a reserved name).
    """
    if adapter_id in RESERVED_IDS:
        raise RequestError(f"{adapter_id!r} names the base model, not an adapter: leave the adapter out to draw "
                           "with the base model", param=param)
    if not valid_id(adapter_id):
        raise RequestError("invalid adapter id: use 1-64 of A-Z a-z 0-9 . _ - (no paths, URLs or whitespace)",
                           param=param)
    return adapter_id


def kind_by_names(names) -> str | None:
    """What a folder holding the files `names` is, by its safetensors file; None when it is no artifact at all."""
    if LORA_WEIGHTS in names:
        return "lora"
    if TI_WEIGHTS in names:
        return "textual_inversion"
    return "controlnet" if "config.json" in names and CONTROLNET_WEIGHTS in names else None


def artifact_kind(folder: Path) -> str | None:
    """What a folder holds, by its safetensors file; None when it is no artifact at all."""
    return kind_by_names({n for n in (LORA_WEIGHTS, TI_WEIGHTS, "config.json", CONTROLNET_WEIGHTS)
                          if (folder / n).is_file()})


WEIGHTS = {"lora": LORA_WEIGHTS, "textual_inversion": TI_WEIGHTS, "controlnet": CONTROLNET_WEIGHTS}


def kind_problem(kind: str, tensors: tuple) -> str | None:
    """What a well-formed safetensors file still lacks to be an artifact of `kind`."""
    if not tensors:
        return f"{WEIGHTS[kind]}: holds no tensors"
    if kind == "textual_inversion":
        if {name for name, _ in tensors} == set(SDXL_KEYS):  # SDXL: one matrix per encoder, the token in the card
            shapes = [shape for _, shape in tensors]
            if any(len(sh) != 2 or 0 in sh for sh in shapes) or shapes[0][0] != shapes[1][0]:
                return f"{TI_WEIGHTS}: clip_l and clip_g must be [vectors, dim] matrices of as many vectors"
            return None
        if len(tensors) != 1:
            return f"{TI_WEIGHTS}: must hold exactly one token (or SDXL's clip_l and clip_g), holds {len(tensors)}"
        token, shape = tensors[0]
        if not token or len(token) > MAX_TI_TOKEN_CHARS or any(c.isspace() for c in token):
            return f"{TI_WEIGHTS}: the token name must be 1-{MAX_TI_TOKEN_CHARS} characters without spaces"
        if len(shape) not in (1, 2) or 0 in shape:
            return f"{TI_WEIGHTS}: the embedding must be a [vectors, dim] matrix"
    return None


def _no_artifact(folder: Path) -> str:
    """Why a folder is not servable. A PEFT adapter dir (a LoHa or LoKr) is named as such: the server mixes
    adapters through diffusers' LoRA loader, which cannot read those layers."""
    if (folder / PEFT_WEIGHTS).is_file():
        return (f"a PEFT adapter dir ({PEFT_WEIGHTS}, a LoHa or LoKr): the server serves LoRA, DoRA and rsLoRA "
                f"({LORA_WEIGHTS}) only; load it with `diffray generate --adapter`")
    return f"holds no {LORA_WEIGHTS}, {TI_WEIGHTS} or ControlNet {CONTROLNET_WEIGHTS}"


# A LoRA file's keys: kohya (`lora_unet_...`) or diffusers/PEFT (`unet.` / `text_encoder[_2].` / Flux's
# `transformer.` prefixed)
LORA_FILE_KEY = re.compile(r"(?:lora_unet_|lora_te[12]?_)[A-Za-z0-9_]{1,300}"
                           r"\.(?:lora_down\.weight|lora_up\.weight|alpha)"
                           r"|(?:unet|text_encoder(?:_2)?|transformer)\.[A-Za-z0-9_.]{1,300}"
                           r"\.(?:lora[._][A-Za-z_.]{1,40})?weight")


def lora_file_problem(name: str, tensors: tuple) -> str | None:
    """Why a bare `<id>.safetensors` is not a LoRA file: no tensors, or a key of no LoRA layout."""
    if not tensors:
        return f"{name}: holds no tensors"
    if not all(LORA_FILE_KEY.fullmatch(key) for key, _ in tensors):
        return f"{name}: not a LoRA file (keys must follow the kohya or diffusers layout)"
    return None


def base_problem(info: AdapterInfo, base: dict | None) -> str | None:
    """Why an entry cannot be served on the Stable Diffusion base `base` (`family.base_version`): it was trained on
    another SD version (`artifacts.base_mismatch`: by its card, or a card-less LoRA's shapes). The family check's
    companion: listed as the entry's reason, refused as the family is."""
    mismatch = base_mismatch(info.card, info.tensors if info.kind == "lora" else (), base)
    return f"trained on {mismatch[0]}; this server's model is {mismatch[1]}" if mismatch else None


class AdapterRegistry:
    """Adapters under `root` by id (the folder name). Missing root = empty registry."""

    def __init__(self, root: str | Path, files: FileChecks | None = None):
        self.root = Path(root).expanduser()
        self.files = files or FileChecks()

    def inspect(self, adapter_id: str) -> AdapterInfo | None:
        """The entry `adapter_id` as it is on disk now; None when there is no artifact folder by that name."""
        folder = self.root / adapter_id
        try:
            if not folder.is_dir():
                return self._inspect_file(adapter_id)
            kind = artifact_kind(folder)
            if kind is None:
                return AdapterInfo(adapter_id, "unknown", str(folder), problem=_no_artifact(folder))
            weights = folder / WEIGHTS[kind]
            check = self.files.check(weights, scan=kind != "controlnet")
            mtime = weights.stat().st_mtime
        except OSError as exc:
            log.warning("adapter %s unreadable: %s", adapter_id, exc)
            return AdapterInfo(adapter_id, "unknown", str(folder), problem="artifact files are unreadable")
        problem = check.problem or kind_problem(kind, check.tensors)
        card: dict[str, Any] = {}
        try:
            card = read_card(folder)
        except ArtifactProblem as exc:
            problem = problem or str(exc)
        except OSError:
            problem = problem or "model card is unreadable"
        return AdapterInfo(adapter_id, kind, str(folder), card, mtime, check.digest, problem, check.tensors)

    def _inspect_file(self, adapter_id: str) -> AdapterInfo | None:
        """The entry of a bare `<id>.safetensors` LoRA file in the root; None when there is none."""
        name = f"{adapter_id}.safetensors"
        path = self.root / name
        if not path.is_file() or path.is_symlink():  # a link could publish any file on the host
            return None
        check = self.files.check(path)
        problem = check.problem or lora_file_problem(name, check.tensors)
        return AdapterInfo(adapter_id, "lora", str(self.root), {}, path.stat().st_mtime, check.digest, problem,
                           check.tensors, weights=name)

    def get(self, adapter_id: str, param: str = "model") -> AdapterInfo:
        """The servable artifact `adapter_id`, read fresh from disk.

        Raises:
            RequestError: an invalid id (naming `param`).
            AdapterNotFound: no artifact folder with that id.
            AdapterError: the folder exists but cannot be served (the message names the id and why).
        """
        check_adapter_id(adapter_id, param)
        info = None if adapter_id.startswith(".") else self.inspect(adapter_id)  # hidden: still being copied in
        if info is None:
            raise AdapterNotFound(adapter_id)
        if info.problem is not None:
            raise AdapterError(f"adapter {adapter_id!r} is unavailable: {info.problem}")
        return info

    def list(self) -> list[AdapterInfo]:
        """Every artifact folder with a valid id, sorted by id, broken ones included (`available` False).
        Hidden folders (a leading '.', e.g. one being copied in before its rename) are skipped."""
        try:
            names = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        except OSError as exc:
            log.warning("adapter registry %s unreadable: %s", self.root, exc)
            return []
        out = []
        for name in dict.fromkeys(n.removesuffix(".safetensors") for n in names):
            if listable(str(self.root), name):
                info = self.inspect(name)
                if info is not None:
                    out.append(info)
        return out


_WARNED: set[tuple[str, str]] = set()


def listable(where: str, name: str) -> bool:
    """Whether the registry `where`'s entry `name` is listed: a `valid_id`, not hidden (a leading '.': still being
    copied in). A reserved id (`RESERVED_IDS`) is logged, once per registry and name, and not listed: a client
    asking for it gets the base model, so listing it would show `base` twice and serve it never."""
    if name in RESERVED_IDS:
        _warn_reserved(where, name)
    return valid_id(name) and not name.startswith(".")


def _warn_reserved(where: str, name: str) -> None:
    if (where, name) in _WARNED or len(_WARNED) > 1024:
        return
    _WARNED.add((where, name))
    log.warning("adapter registry %s: entry %r is not served: %s", where, name,
                f"its id names the base model ({', '.join(sorted(RESERVED_IDS))}); rename it")
