"""The adapters resident in one pipeline: loading, sharing, noticing changes on disk, unloading.

Every LoRA is a named PEFT adapter on the one UNet (switched with `set_adapters`), or, with a hotswap slot
(`hotswap.Slot`, for a compiled UNet), factors held beside it and copied into the slot per call; every
Textual Inversion adds its tokens to the one tokenizer. A TI's token is added under a name of its own (`hidden_token`:
control characters, which a request's text cannot hold), and only the prompts of jobs that ask for that TI
have its public token rewritten to that name (`prompt_texts`): every other prompt is tokenized as on a
replica without it, so a tenant's TI never reaches another's prompt and an image never depends on what the
replica holds. A record made at load time remembers what was added
(the PEFT name, the exact tokens) and the content fingerprint that was loaded, so unloading never reads
the disk (the folder may be gone or replaced) and a replaced artifact is told apart by content, not by
name. `sweep` unloads whatever was removed or replaced on disk since it was loaded. Loading failures of
any type become `AdapterError` naming the adapter, after undoing what the failed load left behind;
unloading never raises. Callers hold the engine's lock. Never imports ray.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from diffray.errors import AdapterError, RequestError
from diffray.serve.artifacts import stat_key
from diffray.serve.registry import AdapterInfo, AdapterRegistry

log = logging.getLogger(__name__)


def peft_name(adapter_id: str) -> str:
    """A PEFT-safe adapter name for an id ('.' would split module paths); a hash keeps them distinct."""
    return re.sub(r"[^A-Za-z0-9_]", "_", adapter_id) + "_" + hashlib.sha1(adapter_id.encode()).hexdigest()[:6]


def hidden_token(adapter_id: str) -> str:
    """The name a resident TI's token is loaded under: lower case (the tokenizer matches lower-cased text)
    between two unit separators, a control character `schemas.check_text` refuses in requests."""
    return "\x1f" + peft_name(adapter_id).lower() + "\x1f"


@dataclass
class Loaded:
    """What loading one adapter put into the pipeline."""

    id: str
    kind: str
    fingerprint: str  # "" when the files changed while loading: reload on next use
    tokens: list[str] = field(default_factory=list)
    token: str = ""  # a TI's public token, as prompts write it (loaded as `hidden_token(id)`)
    factors: object = None  # with a hotswap slot: a LoRA's denoiser layers (`hotswap.Factors`)


def _load_failure(adapter_id: str, exc: Exception) -> AdapterError:
    text = str(exc)
    if "size mismatch" in text or "shape" in text:
        why = "its tensor shapes do not match this base model"
    elif "made for another base model" in text:
        why = text
    elif "already in tokenizer" in text:
        why = "its token is already in this model's vocabulary"
    elif "hotswap" in text:
        why = text
    else:
        why = f"it does not fit this base model ({type(exc).__name__})"
    return AdapterError(f"adapter {adapter_id!r} cannot be loaded: {why}")


class ResidentAdapters:
    """Adapters held by a pipeline, reference-counted by the adapter sets (multiplexed models) using them."""

    def __init__(self, pipe, registry: AdapterRegistry, slot=None):
        self.pipe, self.registry, self.slot = pipe, registry, slot
        self.loaded: dict[str, Loaded] = {}
        self.refs: dict[str, int] = {}
        self.version = 0  # +1 on every load and unload: what was derived from the pipeline's layers is stale

    def acquire(self, ids: list[str]) -> None:
        """Make `ids` resident and count one more holder of each; all or nothing."""
        done: list[str] = []
        try:
            for adapter_id in ids:
                self.ensure(adapter_id)
                self.refs[adapter_id] = self.refs.get(adapter_id, 0) + 1
                done.append(adapter_id)
        except BaseException:
            self.release(done)
            raise

    def release(self, ids: list[str]) -> None:
        """One holder fewer; adapters nobody holds are removed from the pipeline."""
        for adapter_id in ids:
            self.refs[adapter_id] = max(0, self.refs.get(adapter_id, 0) - 1)
        self.trim()

    def trim(self) -> None:
        for adapter_id in [a for a in self.loaded if not self.refs.get(a)]:
            self.unload(adapter_id)
            self.refs.pop(adapter_id, None)

    def ensure(self, adapter_id: str) -> Loaded:
        """The adapter loaded as it is on disk now (reloaded when its content changed).

        Raises:
            AdapterNotFound, AdapterError: gone or broken on disk, or it does not fit the model.
            RequestError: a ControlNet or an invalid id.
        """
        info = self.registry.get(adapter_id, param="adapters")
        old = self.loaded.get(adapter_id)
        if old is not None and old.fingerprint == info.fingerprint:
            return old
        if old is not None:
            self.unload(adapter_id)
        rec = self._load(info)
        self.loaded[adapter_id] = rec
        return rec

    def sweep(self) -> list[str]:
        """Unload every resident adapter that was removed, broken or replaced on disk; returns their ids."""
        stale = []
        for adapter_id, rec in list(self.loaded.items()):
            info = self.registry.inspect(adapter_id)
            if info is None or info.problem is not None or info.fingerprint != rec.fingerprint:
                stale.append(adapter_id)
                self.unload(adapter_id)
        return stale

    def _load(self, info: AdapterInfo) -> Loaded:
        self.version += 1
        if info.kind not in ("lora", "textual_inversion"):
            raise RequestError(f"{info.id!r} is a {info.kind}, not a LoRA or Textual Inversion adapter",
                               param="adapters")
        weights = Path(info.path) / info.weights_name
        before = stat_key(weights)
        rec = Loaded(info.id, info.kind, info.fingerprint)
        try:
            if info.kind == "lora":
                if self.slot is not None:
                    self.slot.precheck(info.tensors)
                self.pipe.load_lora_weights(info.path, weight_name=info.weights_name,
                                            adapter_name=peft_name(info.id), use_safetensors=True)
                if not any(peft_name(info.id) in names for names in self.pipe.get_list_adapters().values()):
                    # a loader that skips every key (a UNet LoRA given to Flux's transformer) loads nothing
                    raise ValueError("none of its layers is in this base model (made for another base model)")
                if self.slot is not None:
                    rec.factors = self.slot.take(peft_name(info.id))
            else:
                self._load_ti(info, rec)
        except Exception as exc:  # noqa: BLE001 - loaders raise many types for one cause: a bad artifact
            self._remove(rec)
            log.warning("adapter %s failed to load: %s: %s", info.id, type(exc).__name__, exc)
            raise _load_failure(info.id, exc) from None
        try:
            changed = stat_key(weights) != before
        except OSError:
            changed = True
        if changed:  # replaced while we read it: what we loaded may not be what we fingerprinted
            rec.fingerprint = ""
        return rec

    def _load_ti(self, info: AdapterInfo, rec: Loaded) -> None:
        """Load a TI and record exactly the tokens it added (also when it fails halfway)."""
        from diffray.models.textual_inversion import load_textual_inversion, stored_token

        vocab = set(self.pipe.tokenizer.get_vocab())
        rec.token = stored_token(info.path)
        if rec.token.lower() in vocab:  # what stock diffusers refuses: the word would stop meaning itself
            raise ValueError(f"Token {rec.token} already in tokenizer vocabulary")
        try:  # one encoder, or SDXL's two (refused on the other)
            load_textual_inversion(self.pipe, info.path, as_token=hidden_token(info.id))
        finally:
            rec.tokens = [t for t in self.pipe.tokenizer.get_vocab() if t not in vocab]

    def unload(self, adapter_id: str) -> None:
        """Take the adapter out of the pipeline using only the load record; never raises."""
        rec = self.loaded.pop(adapter_id, None)
        if rec is not None:
            self._remove(rec)

    def _remove(self, rec: Loaded) -> None:
        """Delete the record's LoRA from every component that has it (after a failed load, what it
        half-injected) or its tokens."""
        from diffusers import ModelMixin

        self.version += 1
        try:
            if rec.kind == "lora":  # from each component that has it (with a slot the denoiser has none)
                for part, names in self.pipe.get_list_adapters().items():
                    if peft_name(rec.id) in names:
                        model = getattr(self.pipe, part)
                        if isinstance(model, ModelMixin):  # a UNet or transformer; else a text encoder
                            model.delete_adapters(peft_name(rec.id))
                        else:
                            model.delete_adapter(peft_name(rec.id))
            elif rec.tokens:
                second = getattr(self.pipe, "text_encoder_2", None)
                for tokenizer, encoder in ((self.pipe.tokenizer, self.pipe.text_encoder),
                                           (getattr(self.pipe, "tokenizer_2", None), second)):
                    present = [t for t in rec.tokens if encoder is not None and t in tokenizer.get_vocab()]
                    if present:
                        self.pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)
        except Exception as exc:  # noqa: BLE001 - an unload must not fail an unrelated request
            log.warning("unloading adapter %s: %s: %s", rec.id, type(exc).__name__, exc)

    def lora_names(self, adapters: tuple[tuple[str, float], ...]) -> list[tuple[str, float]]:
        """(PEFT name, weight) of the LoRAs among `adapters` (each made resident first)."""
        return [(peft_name(a), w) for a, w in adapters if self.ensure(a).kind == "lora"]

    def prompt_texts(self, adapters: tuple[tuple[str, float], ...], *texts: str | None) -> list[str | None]:
        """`texts` as this pipeline must read them for a job using `adapters`: the public token of each of its
        TIs (matched as the tokenizer matches an added token: anywhere, in any case) becomes that TI's hidden
        name; the tokens of other resident TIs stay plain text.

        Raises:
            RequestError: two of the job's TIs use the same token.
        """
        tis: dict[str, tuple[str, str]] = {}  # lower-cased public token -> (adapter id, hidden name)
        for adapter_id, _ in adapters:
            rec = self.ensure(adapter_id)
            if rec.kind != "textual_inversion":
                continue
            other = tis.setdefault(rec.token.lower(), (adapter_id, hidden_token(adapter_id)))[0]
            if other != adapter_id:
                raise RequestError(f"{other!r} and {adapter_id!r} both use the token {rec.token!r}: a prompt cannot "
                                   "tell them apart", param="adapters", status=422)
        if not tis:
            return list(texts)
        longest_first = sorted(tis, key=len, reverse=True)  # the tokenizer's leftmost-longest match
        pattern = re.compile("|".join(re.escape(t) for t in longest_first), re.IGNORECASE)
        return [None if text is None else pattern.sub(lambda m: tis[m.group(0).lower()][1], text) for text in texts]

    def any_lora(self) -> bool:
        return any(rec.kind == "lora" for rec in self.loaded.values())

    def activate(self, adapters: tuple[tuple[str, float], ...]) -> None:
        """Point the pipeline at these adapters and weights (LoRA on, TI tokens just resident).

        Raises:
            RequestError: with a slot, LoRAs whose ranks add up to more than it holds.
        """
        loras = self.lora_names(adapters)
        if self.slot is not None:
            from diffray.serve.hotswap import activate_text_encoders

            parts = [(self.loaded[a].factors, w) for a, w in adapters if self.loaded[a].kind == "lora"]
            self.slot.fill(parts, (self.version, tuple(loras)))
            activate_text_encoders(self.pipe, loras, self.slot.part)
        elif not self.any_lora():
            return
        elif loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in loras], [w for _, w in loras])
        else:
            self.pipe.disable_lora()
