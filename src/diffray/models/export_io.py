"""What `diffray export` writes besides the weights: its output folder (checked, then replaced whole and
atomically), the kohya file's name and the card that leaves the machine with the export.

No card carries credentials (`without_credentials`: the value of a key/secret/token/password-named field,
the user:password@ of a URI, a credential query parameter), the artifact's own card included (`write_card`
calls it). An export is made to be shared: its card also carries no local absolute path (only the folder's
name) and no query of a URI (`public_value`). A card is untrusted input: a field that would name a file
outside OUT is refused, naming the card and the field. Never imports ray or torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from diffray import storage
from diffray.config import RUN_NAME_PATTERN
from diffray.errors import AdapterError, ConfigError, StorageError

CARD = "diffray_card.json"  # every artifact's card (`adapters.write_card`), and an export's
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


REDACTED = "<redacted>"  # what stands for a credential-named field's value in every card
# A field is a credential when a word of its name is one of _SECRET_WORDS, or a key/token word follows one of
# _KEY_OWNERS (api_key, access_token, aws_access_key_id); `placeholder_token` or `keep_tokens` are not.
_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "pwd", "passphrase", "credential", "credentials",
                 "apikey", "auth", "authorization", "bearer", "cookie", "signature"}
_KEY_OWNERS = {"api", "access", "secret", "private", "auth", "session", "security", "bearer", "refresh", "client",
               "hf", "hub", "wandb", "github", "sas", "account", "id"}
_KEY_WORDS = {"key", "keys", "token", "tokens"}
_SECRET_PARAMS = {"key", "token", "sig", "code"}  # bare names that are credentials in a URI query (?sig=: SAS)


def is_credential_name(name: str) -> bool:
    """Whether a field (or URI query parameter) named `name` holds a credential, by the words of its name."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower().replace("-", "_").replace(".", "_")
    parts = [w for w in words.split("_") if w]
    return bool(_SECRET_WORDS & set(parts)) or any(
        a in _KEY_OWNERS and b in _KEY_WORDS for a, b in zip(parts, parts[1:]))


def without_credentials(value: Any) -> Any:
    """`value` (a card, or any part of it) with no credentials: a credential-named field's value becomes
    `REDACTED`, a URI loses its user:password@ and its credential query parameters (region= and the like stay).
    Local paths stay: the project reads them back from an artifact's own card (generate, reward models)."""
    return _sanitized(value, _uri_without_credentials)


def public_value(value: Any) -> Any:
    """`value` made public: `without_credentials`, then without local absolute paths (kept: the last folder's
    name, after `<local>/`) and without any ?query of a URI."""
    return _sanitized(value, _public_string)


def _sanitized(value: Any, string: Callable[[str], str]) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if is_credential_name(k) and _filled(v) else _sanitized(v, string)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitized(v, string) for v in value]
    return string(value) if isinstance(value, str) else value


def _filled(value: Any) -> bool:
    """False for a field left empty (api_keys: []): nothing to hide, and the card shows it was unset."""
    return value is not None and not (isinstance(value, (str, list, tuple, dict)) and not value)


def _uri_without_credentials(value: str) -> str:
    uri = _URI.match(value)
    if not uri or (not uri.group(2) and not uri.group(4)):
        return value
    query, _, fragment = (uri.group(4) or "").partition("#")
    kept = [p for p in query[1:].split("&") if p and not _is_secret_param(p.split("=", 1)[0])] if query else []
    return uri.group(1) + uri.group(3) + ("?" + "&".join(kept) if kept else "") + ("#" + fragment if fragment else "")


def _is_secret_param(name: str) -> bool:
    return is_credential_name(name) or name.lower() in _SECRET_PARAMS or name.lower().startswith("x-amz-")


def _public_string(value: str) -> str:
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


def model_name(value: Any) -> str:
    """How a base model is named outside this machine: a hub id or a URI as is (less credentials and query), a
    local path by its last folder's name (kohya's `ss_sd_model_name`); '' when there is none."""
    return _public_string(value).removeprefix(LOCAL) if isinstance(value, str) else ""


# What an artifact folder is, by a file that only it holds (the first that fits names it)
_ARTIFACT_FILES = (("model_index.json", "a full pipeline folder (model_index.json: DreamBooth full, method full)"),
                   ("learned_embeds.safetensors", "a Textual Inversion embedding (learned_embeds.safetensors)"),
                   ("adapter_model.safetensors", "a PEFT adapter (adapter_model.safetensors: LoHa or LoKr, which "
                                                 "have no diffusers or kohya LoRA layout)"))


def what_is_at(path: Path) -> str:
    """What `path` is, in words, for an error saying it is not what was asked for: missing, a file, an empty
    folder, a full pipeline, a Textual Inversion, a PEFT adapter, a diffusers model (ControlNet, VAE, ...) by
    its config's class, else some of the files it holds."""
    if not path.exists():
        return "no such folder"
    if not path.is_dir():
        return "a file, not a folder"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "an empty folder"
    for name, what in _ARTIFACT_FILES:
        if name in names:
            return what
    if "config.json" in names:
        try:
            cls = json.loads((path / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            cls = None
        if isinstance(cls, str) and cls:
            return f"a ControlNet (config.json: {cls})" if "ControlNet" in cls else f"a diffusers {cls} (config.json)"
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"a folder holding {shown}"


# SAI ModelSpec 1.0 (`modelspec.*` metadata, as kohya sd-scripts writes it) of each family's LoRA
MODELSPEC_ARCH = {"stable-diffusion": "stable-diffusion-v1", "stable-diffusion-xl": "stable-diffusion-xl-v1-base",
                  "flux": "flux-1"}
MODELSPEC_IMPL = {"stable-diffusion": "diffusers",  # sd-scripts' values: diffusers for SD 1.x, SGM for SDXL
                  "stable-diffusion-xl": "https://github.com/Stability-AI/generative-models",
                  "flux": "https://github.com/black-forest-labs/flux"}
# The architecture suffix of each adapter kind (sd-scripts' ADAPTER_*) -> how a description names it
MODELSPEC_ADAPTERS = {"lora": "LoRA", "textual-inversion": "embedding"}
_NATIVE_SIDE = {"stable-diffusion": 512, "stable-diffusion-xl": 1024, "flux": 1024}
# kohya's `ss_base_model_version` of each family's LoRA; SD 1.x/2.x's is made by `kohya_base_version`
KOHYA_BASE_VERSION = {"stable-diffusion-xl": "sdxl_base_v1-0"}
# SD 2.x's text encoder (OpenCLIP ViT-H) uses exact GELU, SD 1.x's (CLIP ViT-L) quick_gelu: the activation, not
# the width (1024 vs 768), tells them apart, so a narrow test model shaped as either says what it is.
SD2_TEXT_ACT = "gelu"


def _section(value: Any, key: str) -> dict:
    """`value[key]` when both are JSON objects, else {} (a card is untrusted input)."""
    found = value.get(key) if isinstance(value, dict) else None
    return found if isinstance(found, dict) else {}


def training_prediction(card: dict) -> str | None:
    """The prediction type a LoRA trained with: its config's `model.prediction_type`, else its base model's
    scheduler's (`base_model_config`, recorded by training since SD 2.x support); None when neither says."""
    for value in (_section(_section(card, "config"), "model").get("prediction_type"),
                  _section(card, "base_model_config").get("prediction_type")):
        if value in ("epsilon", "v_prediction"):
            return value
    return None


def sd_major(config: Any) -> int | None:
    """The Stable Diffusion major version a `base_model_config` (`family.base_model_config`) names: 2 for SD 2.x's
    exact-GELU text encoder, else 1; None when it names no activation (a card written before it was recorded)."""
    act = _section(config, "text_encoder").get("hidden_act")
    return None if not isinstance(act, str) else 2 if act == SD2_TEXT_ACT else 1


def sd_base(card: dict) -> tuple[int, bool]:
    """(major version, v-prediction) of a Stable Diffusion LoRA's base: `sd_major` of its card's
    `base_model_config`, 1 for cards written before it was recorded; v-prediction by `training_prediction`."""
    return sd_major(_section(card, "base_model_config")) or 1, training_prediction(card) == "v_prediction"


def kohya_base_version(card: dict, family: str) -> str:
    """kohya's `ss_base_model_version`: sd-scripts' `sd_v1`/`sd_v2`, with `_v` for a v-prediction LoRA, for
    Stable Diffusion; `KOHYA_BASE_VERSION`'s for other families."""
    if family in KOHYA_BASE_VERSION:
        return KOHYA_BASE_VERSION[family]
    version, v_pred = sd_base(card)
    return f"sd_v{version}" + ("_v" if v_pred else "")


def modelspec_architecture(card: dict, family: str, adapter: str = "lora") -> str:
    """The ModelSpec architecture of an adapter (sd-scripts' `determine_architecture`): the base's, then
    `/<adapter>` (`MODELSPEC_ADAPTERS`). SD 2.x's is `stable-diffusion-v2-768-v` when trained for
    v-prediction, else `stable-diffusion-v2-512`."""
    if family in MODELSPEC_ARCH and family != "stable-diffusion":
        return f"{MODELSPEC_ARCH[family]}/{adapter}"
    version, v_pred = sd_base(card)
    arch = MODELSPEC_ARCH["stable-diffusion"] if version == 1 else \
        "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
    return f"{arch}/{adapter}"


def modelspec(card: dict, family: str, title: str, adapter: str = "lora",
              trigger: str | None = None) -> dict[str, str]:
    """The SAI ModelSpec keys of an adapter file (all strings: safetensors metadata): version, architecture
    (of `adapter`: a `MODELSPEC_ADAPTERS` key), implementation, title, resolution (the training one), date (the
    card's `created`), a description, and the trigger phrase (`trigger`, else `data.trigger_word`, else a
    DreamBooth `instance_prompt`) and prediction type when known."""
    data = _section(_section(card, "config"), "data")
    arch = modelspec_architecture(card, family, adapter)
    native = 768 if arch.startswith("stable-diffusion-v2-768") else _NATIVE_SIDE.get(family, 512)
    side = data.get("resolution") if isinstance(data.get("resolution"), int) else native
    created = card.get("created")
    if not (isinstance(created, str) and re.match(r"^\d{4}-\d{2}-\d{2}", created)):
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    base, steps = model_name(card.get("base_model")), card.get("steps")
    prediction = {"epsilon": "epsilon", "v_prediction": "v"}.get(training_prediction(card))
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
            "modelspec.implementation": MODELSPEC_IMPL.get(family, "diffusers"), "modelspec.title": title,
            "modelspec.resolution": f"{side}x{side}", "modelspec.date": created,
            "modelspec.description": f"diffray {card.get('method', 'lora')} {MODELSPEC_ADAPTERS[adapter]}"
                                     + (f" of {base}" if base else "")
                                     + (f", {steps} steps" if isinstance(steps, int) else ""),
            "modelspec.trigger_phrase": trigger or data.get("trigger_word") or card.get("instance_prompt"),
            "modelspec.prediction_type": prediction}
    return {k: str(v) for k, v in meta.items() if isinstance(v, str) and v}


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
    created = storage.first_missing(target)
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
