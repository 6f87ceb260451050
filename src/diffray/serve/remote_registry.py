"""The adapter registry on object storage (`s3://bucket/adapters`, `gs://...`): the same ids, kinds and
checks as a local folder (`registry.AdapterRegistry`), so no node needs a shared filesystem.

- **One listing per `listing_ttl_s`.** A recursive listing of the prefix is kept that long and answers every
  lookup in between: requests never list the bucket themselves, and a new or removed adapter shows after
  at most `listing_ttl_s`. When the store cannot be listed, the last listing stays in use (logged).
- **Only whole uploads count.** Object storage has no rename, so a folder counts once its
  `diffray_manifest.json` is there and every file it names is listed at its size (`storage.incomplete`).
  diffray writes the manifest last (training's export, `diffray feedback train --publish`); an adapter
  uploaded half-way, or by hand without a manifest, is not listed. A bare `<id>.safetensors` is one object,
  whole once listed.
- **Used from a local copy.** An entry is downloaded once per version (its files' sizes and mtimes in
  the listing, and its manifest's bytes) into a temporary folder that is renamed into place, then checked
  exactly as a local entry is (safetensors header, kind, card); a copy whose sizes disagree with the
  listing is dropped. The two newest versions of an id are kept. `list()` reads cards only: answering
  /v1/models downloads no weights.
- **Fresh entries are read again.** Listings give mtimes to the second (S3), so an adapter replaced by one
  of the same sizes within that second lists the same. An entry written less than `FRESH_S` ago (by this
  node's clock) has its manifest and copy read again at each listing until it is older; after that a
  rewrite necessarily lists a newer mtime.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from diffray import storage
from diffray.paths import cache_dir
from diffray.serve.artifacts import CARD, ArtifactProblem, parse_card
from diffray.serve.registry import AdapterInfo, AdapterRegistry, kind_by_names, listable, valid_id

log = logging.getLogger(__name__)
KEEP_VERSIONS = 2
FRESH_S = 10.0  # an entry written this recently may be rewritten without its listing changing (1 s mtimes, clock skew)


@dataclass(frozen=True)
class Entry:
    """One id in a listing: its files (path relative to the entry's folder -> (size, mtime ns)); `bare` for a
    `<id>.safetensors` object in the root (its one file is named by the id)."""

    id: str
    files: tuple[tuple[str, int, int], ...]
    bare: bool = False

    @property
    def version(self) -> str:
        return hashlib.sha256(repr(self.files).encode()).hexdigest()[:16]

    @property
    def sizes(self) -> dict[str, int]:
        return {name: size for name, size, _ in self.files}

    @property
    def mtime(self) -> float:
        return max((m for _, _, m in self.files), default=0) / 1e9

    def kind(self) -> str:
        return "lora" if self.bare else kind_by_names(self.sizes) or "unknown"


def group(infos: list[pafs.FileInfo], base: str) -> dict[str, Entry]:
    """A recursive listing of `base` as entries by id (folders and bare `.safetensors` files)."""
    folders: dict[str, list] = {}
    out: dict[str, Entry] = {}
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        rel = i.path[len(base):].lstrip("/")
        if any(part in ("", ".", "..") for part in rel.split("/")):
            continue  # a key that would leave the local copy's folder (`a/../../x`) is no adapter file
        top, _, rest = rel.partition("/")
        stamp = i.mtime_ns or 0
        if rest:
            folders.setdefault(top, []).append((rest, int(i.size), stamp))
        elif top.endswith(".safetensors"):
            out.setdefault(top.removesuffix(".safetensors"), Entry(top.removesuffix(".safetensors"),
                                                                   ((top, int(i.size), stamp),), bare=True))
    out.update({name: Entry(name, tuple(sorted(files))) for name, files in folders.items()})  # a folder wins
    return out


class RemoteRegistry(AdapterRegistry):
    """Adapters under the URI `uri` by id; local copies under `copies` (default: the diffray cache)."""

    def __init__(self, uri: str, listing_ttl_s: float = 5.0, copies: str | Path | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.base = storage.resolve(self.uri)
        key = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        super().__init__(copies if copies is not None else cache_dir() / "registry" / key)
        self.listing_ttl_s = listing_ttl_s
        self.lock = threading.Lock()
        self.listing: dict[str, Entry] | None = None
        self.listed_at = float("-inf")
        self.listings = 0  # how many times the store was listed (the cache's effect, for tests and logs)
        self.manifests: dict[tuple, bytes | None] = {}  # (id, listed version[, listing]) -> manifest bytes

    def entries(self) -> dict[str, Entry]:
        """The listing, at most `listing_ttl_s` old (an older one when the store cannot be listed)."""
        with self.lock:
            if self.listing is not None and time.monotonic() - self.listed_at < self.listing_ttl_s:
                return self.listing
            try:
                infos = self.fs.get_file_info(pafs.FileSelector(self.base, recursive=True, allow_not_found=True))
                self.listing = group(infos, self.base)
                self.listings += 1
            except (OSError, pa.ArrowException) as exc:
                log.warning("adapter registry %s cannot be listed (%s); using the last listing", self.uri, exc)
                self.listing = self.listing or {}
            self.listed_at = time.monotonic()
            return self.listing

    def fresh(self, entry: Entry) -> bool:
        """Written so recently that a rewrite may still list the same (see FRESH_S)."""
        return time.time() - entry.mtime < FRESH_S

    def manifest(self, entry: Entry) -> bytes | None:
        """The folder entry's manifest bytes (None: there is none), read once per listed version, or once
        per listing while the entry is fresh."""
        key = (entry.id, entry.version, self.listings if self.fresh(entry) else 0)
        raw = self.manifests.get(key, b"")  # b"": not read yet
        if raw == b"":
            raw = storage.read_or_none(self.fs, f"{self.base}/{entry.id}/{storage.MANIFEST}") \
                if storage.MANIFEST in entry.sizes else None
            if len(self.manifests) > 4096:
                self.manifests.clear()
            self.manifests[key] = raw  # lookups run in threads: a clear() elsewhere only costs a re-read
        return raw

    def version(self, entry: Entry) -> str:
        """The entry's version for its local copy: the listing, the manifest and, while fresh, the listing's number."""
        raw = b"" if entry.bare else self.manifest(entry) or b""
        fresh = str(self.listings) if self.fresh(entry) else ""
        return hashlib.sha256(f"{entry.version}|{fresh}|".encode() + raw).hexdigest()[:16]

    def whole(self, entry: Entry) -> bool:
        """The entry is complete by its manifest (a bare file always is)."""
        if entry.bare:
            return True
        problem = storage.incomplete(self.manifest(entry), entry.sizes)
        if problem:
            log.debug("adapter %s on %s not listed: %s", entry.id, self.uri, problem)
        return problem is None

    def inspect(self, adapter_id: str) -> AdapterInfo | None:
        entry = self.entries().get(adapter_id)
        if entry is None or not valid_id(adapter_id) or not self.whole(entry):
            return None
        try:
            copy = self.local_copy(entry)
        except (OSError, pa.ArrowException) as exc:
            log.warning("adapter %s on %s cannot be downloaded: %s", adapter_id, self.uri, exc)
            return AdapterInfo(adapter_id, entry.kind(), f"{self.uri}/{adapter_id}",
                               problem="artifact files are unreadable")
        return None if copy is None else AdapterRegistry(copy, self.files).inspect(adapter_id)

    def list(self) -> list[AdapterInfo]:
        out = []
        for name, entry in sorted(self.entries().items()):
            if not listable(self.uri, name) or not self.whole(entry):
                continue
            card, problem = {}, None if entry.kind() != "unknown" else "holds no LoRA, Textual Inversion or ControlNet"
            if CARD in entry.sizes:
                try:
                    card = parse_card(storage.read_or_none(self.fs, f"{self.base}/{name}/{CARD}") or b"")
                except ArtifactProblem as exc:
                    problem = problem or str(exc)
            out.append(AdapterInfo(name, entry.kind(), f"{self.uri}/{name}", card, entry.mtime, self.version(entry),
                                   problem))
        return out

    def local_copy(self, entry: Entry) -> Path | None:
        """The folder holding this version of the entry (`<id>/` or `<id>.safetensors` inside), downloaded
        when missing; None when what was downloaded does not match the listing (replaced meanwhile)."""
        version = self.version(entry)
        dest = Path(self.root) / f"{entry.id}@{version}"
        if dest.is_dir():
            return dest
        tmp = Path(self.root) / f".{entry.id}@{version}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            where = tmp if entry.bare else tmp / entry.id
            src = self.base if entry.bare else f"{self.base}/{entry.id}"
            for name, size, _ in entry.files:  # the listed files only: one added meanwhile waits for the next listing
                target = where / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(f"{src}/{name}") as f, target.open("wb") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
                if target.stat().st_size != size:
                    return None
            try:
                os.replace(tmp, dest)
            except OSError:  # another thread got there first
                if not dest.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            old = sorted(Path(self.root).glob(f"{entry.id}@*"), key=lambda p: p.stat().st_mtime)[:-KEEP_VERSIONS]
        except OSError:  # another thread pruned meanwhile
            old = []
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return dest


def open_registry(root: str | Path, listing_ttl_s: float = 5.0) -> AdapterRegistry:
    """The registry at `root`: a local folder, or a URI on object storage (`RemoteRegistry`)."""
    return RemoteRegistry(str(root), listing_ttl_s) if storage.is_uri(root) else AdapterRegistry(root)
