"""Inspect an adapter artifact on disk without loading it into a model: is it servable, and what is its
content fingerprint.

A registry entry is untrusted input (anyone who can write the folder can publish), so everything here
reads files defensively: the safetensors header is parsed and checked against the file size by our own
code (the loaders raise types nobody maps to HTTP), float tensors are scanned for NaN/inf, the model card
is size- and depth-bounded JSON that must be an object. A problem is returned as a short reason naming
the file, never a path or a repr. Results are cached per file by (device, inode, size, mtime, ctime), so
a publish-by-rename or an in-place rewrite is noticed and re-read, and an unchanged file is read once.
Never imports ray or torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CARD = "diffray_card.json"
MAX_CARD_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_SCAN_BYTES = 1 << 30  # files above this are fingerprinted but not scanned for NaN/inf (cost)
CARD_FIELD_CHARS = 200

# safetensors dtype -> (bytes per element, the float layout whose all-ones exponent means NaN/inf)
DTYPES: dict[str, tuple[int, tuple[str, int] | None]] = {
    "BOOL": (1, None), "U8": (1, None), "I8": (1, None), "F8_E5M2": (1, None), "F8_E4M3": (1, None),
    "I16": (2, None), "U16": (2, None), "F16": (2, ("<u2", 0x7C00)), "BF16": (2, ("<u2", 0x7F80)),
    "I32": (4, None), "U32": (4, None), "F32": (4, ("<u4", 0x7F800000)),
    "I64": (8, None), "U64": (8, None), "F64": (8, ("<u8", 0x7FF0000000000000)),
}


class ArtifactProblem(Exception):
    """Why an artifact cannot be served: a short, client-safe reason (no paths, no reprs)."""


@dataclass(frozen=True)
class FileCheck:
    """The verdict on one file: its sha256 and the problem, if any."""

    digest: str
    problem: str | None
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()


def stat_key(path: Path) -> tuple:
    """What changes whenever a file's bytes may have changed (ctime cannot be set by a writer)."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def parse_header(raw: bytes, file_size: int, name: str) -> dict[str, Any]:
    """The tensor table of a safetensors file whose first bytes are `raw`, checked against the file size.

    Raises:
        ArtifactProblem: truncated, oversized or malformed header; offsets that do not tile the data.
    """
    if file_size < 8 or len(raw) < 8:
        raise ArtifactProblem(f"{name}: empty or truncated (no safetensors header)")
    n = int.from_bytes(raw[:8], "little")
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise ArtifactProblem(f"{name}: not a safetensors file (header length {n} does not fit the file)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise ArtifactProblem(f"{name}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ArtifactProblem(f"{name}: not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactProblem(f"{name}: safetensors metadata must map strings to strings")
    _check_offsets(header, file_size - 8 - n, name)
    return header


def _no_constant(token: str):
    raise ValueError(f"{token} is not JSON")


def _check_offsets(header: dict[str, Any], data_len: int, name: str) -> None:
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ArtifactProblem(f"{name}: malformed tensor entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or dict here is unhashable: check the type first
            raise ArtifactProblem(f"{name}: unsupported tensor dtype")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_nonneg_int(d) for d in shape):
            raise ArtifactProblem(f"{name}: malformed tensor shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_nonneg_int(o) for o in offsets):
            raise ArtifactProblem(f"{name}: malformed tensor offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype][0]:
            raise ArtifactProblem(f"{name}: a tensor's byte size does not match its shape")
        spans.append((offsets[0], offsets[1]))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise ArtifactProblem(f"{name}: tensor data overlaps or leaves gaps")
        end = stop
    if end != data_len:
        raise ArtifactProblem(f"{name}: truncated or padded (tensor data does not cover the file)")


def _nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**48


def _scan_finite(path: Path, header: dict[str, Any], data_start: int, name: str) -> None:
    """Raise ArtifactProblem when a float tensor holds NaN or inf (by exponent bits: no float decode)."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for entry in header.values():
            layout = DTYPES[entry["dtype"]][1]
            if layout is None:
                continue
            start, stop = (data_start + o for o in entry["data_offsets"])
            bits = mm[start:stop].view(np.dtype(layout[0]))
            if np.any((bits & layout[1]) == layout[1]):
                raise ArtifactProblem(f"{name}: holds NaN or infinite weights")
    finally:
        del mm


def _read_head(path: Path, size: int) -> bytes:
    """The 8-byte length and (when the length is plausible) the JSON header of a safetensors file."""
    with path.open("rb") as f:
        first = f.read(8)
        n = int.from_bytes(first, "little") if len(first) == 8 else 0
        return first + (f.read(n) if 2 <= n <= MAX_HEADER_BYTES and 8 + n <= size else b"")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_safetensors(path: Path, scan: bool = True) -> FileCheck:
    """Header, offsets and (files up to MAX_SCAN_BYTES) NaN/inf scan, plus the content sha256.

    Raises:
        OSError: the file cannot be read (the caller reports it as unreadable).
    """
    size = path.stat().st_size
    head = _read_head(path, size)
    digest = sha256_file(path)
    try:
        header = parse_header(head, size, path.name)
        if scan and size <= MAX_SCAN_BYTES:
            _scan_finite(path, header, len(head), path.name)
    except ArtifactProblem as exc:
        return FileCheck(digest, str(exc))
    return FileCheck(digest, None, tuple((k, tuple(v["shape"])) for k, v in sorted(header.items())))


def read_card(folder: Path) -> dict[str, Any]:
    """The model card as a dict ({} when absent).

    Raises:
        ArtifactProblem: larger than MAX_CARD_BYTES, not UTF-8 JSON, nested beyond the parser, or not an object.
    """
    path = folder / CARD
    if not path.exists():
        return {}
    if not path.is_file() or path.stat().st_size > MAX_CARD_BYTES:
        raise ArtifactProblem(f"{CARD}: not a regular file of at most {MAX_CARD_BYTES} bytes")
    return parse_card(path.read_bytes())


def parse_card(raw: bytes) -> dict[str, Any]:
    """A model card's bytes as a dict. Raises ArtifactProblem as `read_card` does."""
    if len(raw) > MAX_CARD_BYTES:
        raise ArtifactProblem(f"{CARD}: not a regular file of at most {MAX_CARD_BYTES} bytes")
    try:
        card = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise ArtifactProblem(f"{CARD}: not valid JSON") from None
    if not isinstance(card, dict):
        raise ArtifactProblem(f"{CARD}: must be a JSON object")
    return card


def card_text(card: dict[str, Any], key: str) -> str | None:
    """A card field as shown to clients: a short string or None (never a nested value)."""
    value = card.get(key)
    return value[:CARD_FIELD_CHARS] if isinstance(value, str) else None


# a LoRA's cross-attention key/value down-projection (kohya `..._attn2_to_k.lora_down.weight`, diffusers/PEFT
# `...attn2.to_k.lora_A.weight`): its input width is the text states' width, the base's cross-attention dim
CROSS_ATTENTION_DOWN = re.compile(r".*attn2[._](?:processor[._])?to_[kv](?:_lora)?[._]"
                                  r"(?:lora_down|lora_A|lora[._]down|down)[._]weight")


def sd_version(config: Any) -> tuple[int, int | None] | None:
    """(major version, text-encoder width) that a `base_model_config` (`family.base_model_config`) names: the
    version by `export_io.sd_major`; None when it names no activation (a card written before it was recorded, or
    not an object)."""
    from diffray.models.export_io import sd_major

    major = sd_major(config)
    if major is None:
        return None
    width = config["text_encoder"].get("hidden_size")
    return major, (width if type(width) is int and width > 0 else None)


def lora_width(tensors: tuple) -> int | None:
    """The text-state width a LoRA's cross-attention layers take (their down-projection's input), by its header's
    shapes; None when it has no such layer or its layers disagree."""
    widths = {shape[1] for name, shape in tensors if len(shape) == 2 and CROSS_ATTENTION_DOWN.fullmatch(name)}
    return widths.pop() if len(widths) == 1 else None


def _sd_name(version: tuple[int, int | None]) -> str:
    return f"SD {version[0]}.x" + (f" (cross-attention {version[1]})" if version[1] else "")


def base_mismatch(card: dict[str, Any], tensors: tuple, base: dict | None) -> tuple[str, str] | None:
    """(what an adapter was trained on, what the base is) when a Stable Diffusion adapter does not fit the SD base
    `base` (`family.base_version`; None: not SD, or unknown): its card's `base_model_config` names another SD
    version or text-encoder width, or, for a card without it (older exports, a bare LoRA file), its LoRA layers'
    `tensors` (header shapes) take another cross-attention width than the base's. None when it fits or nothing
    says; an adapter of another family is the family check's to refuse."""
    if base is None or card.get("family", "stable-diffusion") != "stable-diffusion":
        return None  # before `sd_version`'s import: a base's config comes from `family`, which has torch loaded
    base_sd = sd_version(base)
    if base_sd is None:
        return None
    base_name = f"SD {base_sd[0]}.x" + (f" ({base_sd[1]})" if base_sd[1] else "")
    trained = sd_version(card.get("base_model_config"))
    if trained is not None:
        if trained[0] != base_sd[0] or (None not in (trained[1], base_sd[1]) and trained[1] != base_sd[1]):
            return _sd_name(trained), base_name
        return None
    width = lora_width(tensors)
    if width is not None and base_sd[1] is not None and width != base_sd[1]:
        return f"a model of cross-attention {width}", base_name
    return None


class FileChecks:
    """`check(path)` with a cache keyed by the file's stat key (thread-safe; bounded)."""

    def __init__(self, max_entries: int = 4096):
        self.cache: dict[tuple, FileCheck] = {}
        self.lock = threading.Lock()
        self.max_entries = max_entries

    def check(self, path: Path, scan: bool = True) -> FileCheck:
        key = (os.fspath(path), scan, *stat_key(path))
        with self.lock:
            hit = self.cache.get(key)
        if hit is not None:
            return hit
        result = check_safetensors(path, scan)
        with self.lock:
            if len(self.cache) >= self.max_entries:
                self.cache.clear()
            self.cache[key] = result
        return result
