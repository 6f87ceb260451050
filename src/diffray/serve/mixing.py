"""Requests for different LoRAs in one pipeline call: PEFT's mixed-adapter batches.

Every LoRA layer of the UNet gets, per call, the PEFT adapter name of each image in the batch (`BASE`
for an image without a LoRA): PEFT computes the base layer once for the whole batch and adds each
sub-batch's own low-rank update (`LoraLayer._mixed_batch_forward`), as `PeftModel(adapter_names=...)`
does. A job can join such a call when it uses at most one LoRA, a plain LoRA with no text-encoder part (the
text encoder encodes all prompts of a call at once, with whatever adapters are set; PEFT mixes no DoRA,
LoHa or LoKr); a PEFT adapter has one scale per call, so the same LoRA at two weights goes to two calls. Never imports ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def can_mix(pipe, name: str) -> bool:
    """Whether PEFT adapter `name` can run in a mixed batch: a plain LoRA (or rsLoRA) on the UNet only.
    PEFT mixes no DoRA, and LoHa/LoKr layers take no per-row adapter names."""
    from diffray.models.adapters import variant_of

    config = getattr(pipe.unet, "peft_config", {}).get(name)
    others = {n for part, names in pipe.get_list_adapters().items() if part != "unet" for n in names}
    return config is not None and variant_of(config) in ("lora", "rslora") and name not in others


def assign(slots: list[dict[str, float]], name: str, weight: float) -> int:
    """The index of the first call (`slots`: PEFT name -> weight of each call so far) that can take an
    image of LoRA `name` at `weight` without giving that LoRA a second scale; a new call when none can."""
    for k, weights in enumerate(slots):
        if name == BASE or weights.get(name, weight) == weight:
            if name != BASE:
                weights[name] = weight
            return k
    slots.append({} if name == BASE else {name: weight})
    return len(slots) - 1


@contextlib.contextmanager
def adapter_names(model, names: list[str]) -> Iterator[None]:
    """While open, every LoRA layer of `model` runs each batch row with the LoRA named for it. `names` has
    one entry per image; a batch of k * len(names) rows (classifier-free guidance stacks the unconditional
    and conditional halves) repeats the list k times, as the pipeline stacks the halves."""
    from peft.tuners.lora import LoraLayer

    def pre_hook(module, args, kwargs):
        rows = (args[0] if args else kwargs["x"]).shape[0]
        if rows % len(names):
            raise RuntimeError(f"a batch of {rows} rows for {len(names)} mixed-adapter images")
        return args, {**kwargs, "adapter_names": names * (rows // len(names))}

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True)
               for m in model.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
