"""LoRA hotswap for a compiled denoiser (`generator.hotswap`): one LoRA slot, swapped in place.

A compiled UNet (or Flux transformer) is specialised on its PEFT adapters: which are active, and which
exist. Activating another LoRA, or loading one, compiles it again (tens of seconds at SD size, and
torch.compile keeps 8 graphs per function). With a slot, the denoiser holds exactly one PEFT adapter for
its whole life, added before it is first called: `ADAPTER`, of a fixed rank on fixed target layers, with
scale 1 and zero weights (it adds nothing). Loading a LoRA takes its denoiser layers out into `Factors`
(A, and B times the LoRA's scale) and deletes them from the denoiser again, before the next call; a job
copies its LoRAs' factors into the slot's weights in place. Several LoRAs of one job sit side by side in the
slot (their ranks add up): W + sum_i w_i s_i B_i A_i = W + [w_1 s_1 B_1, ...] [A_1; ...]. The graph never
changes, so nothing recompiles. This is diffusers' `enable_lora_hotswap` idea (a fixed-rank adapter whose
weights are replaced) extended to weighted sets of LoRAs.

The slot takes plain LoRAs (and rsLoRA) on linear layers without biases whose layers are among the slot's
targets and whose ranks fit; a text encoder's part of a LoRA stays a PEFT adapter there (the text encoders
are not compiled). A file in the diffusers layout is refused from its keys before anything is loaded
(`precheck`); a kohya file is checked once loaded, and if refused leaves PEFT's empty wrapper on the
layers outside the slot (the same images, one more compile). Never imports ray.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from diffray.errors import RequestError

ADAPTER = "diffray_slot"


@dataclass
class Factors:
    """One LoRA's denoiser layers: layer name -> (A [r, in], B * scale [out, r]), and its largest rank."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int


class Slot:
    """The one adapter of a denoiser that is compiled once for every LoRA."""

    def __init__(self, pipe, part: str, rank: int, targets: list[str]):
        """The slot on `pipe`'s denoiser `part` ("unet" or "transformer"), before the denoiser is compiled."""
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        self.part, self.rank, self.targets = part, rank, list(targets)
        self.denoiser = denoiser = getattr(pipe, part)
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=self.targets, lora_dropout=0.0),
                             adapter_name=ADAPTER)
        denoiser.set_adapter(ADAPTER)  # each layer its own active-adapter list, as after any `take`
        self.layers = {name: m for name, m in denoiser.named_modules()
                       if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}
        self.holds: tuple | None = None  # the key of what the slot's weights hold now (None: unknown)
        self.fill([], ())

    def precheck(self, tensors: tuple) -> None:
        """Refuse, before anything is loaded, a LoRA file whose diffusers-layout keys (`<part>.<layer>.lora...`)
        show it cannot sit in the slot: a refused load leaves no PEFT wrapper on a layer outside the slot,
        which would change the graph. Kohya-layout keys are checked by `take` once loaded.

        Raises:
            ValueError: as `take` does.
        """
        prefix = self.part + "."
        for key, shape in tensors:
            if not key.startswith(prefix) or ".lora" not in key:
                continue
            layer, rest = key[len(prefix):].split(".lora", 1)
            if "magnitude" in rest:
                raise not_plain("dora")
            if layer not in self.layers:
                raise self.outside(layer)
            if rest in ("_A.weight", ".down.weight") and shape and shape[0] > self.rank:
                raise self.beyond(shape[0])

    def outside(self, layer: str) -> ValueError:
        return ValueError(f"it has layers outside the hotswap slot's targets {self.targets} "
                          f"(generator.hotswap.targets), e.g. {layer}")

    def beyond(self, rank: int) -> ValueError:
        return ValueError(f"its rank {rank} is beyond the hotswap slot's rank {self.rank} (generator.hotswap.rank)")

    def take(self, name: str) -> Factors:
        """Move PEFT adapter `name`'s denoiser layers into `Factors` and delete them from the denoiser (which
        then holds the slot alone again, its graph unchanged).

        Raises:
            ValueError: the LoRA cannot sit in the slot (the message says why, naming the setting).
        """
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        from diffray.models.adapters import variant_of

        if name not in getattr(self.denoiser, "peft_config", {}):
            return Factors({}, 0)  # a LoRA of the text encoders alone
        try:
            config = self.denoiser.peft_config[name]
            mine = {n: m for n, m in self.denoiser.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}
            outside = sorted(n for n in mine if n not in self.layers)
            if variant_of(config) not in ("lora", "rslora"):
                raise not_plain(variant_of(config))
            if outside:
                raise self.outside(outside[0])
            if any(not isinstance(m, LoraLinear) or m.lora_B[name].bias is not None for m in mine.values()):
                raise ValueError("hotswap takes LoRAs on linear layers without biases (generator.hotswap)")
            rank = max((m.r[name] for m in mine.values()), default=0)
            if rank > self.rank:
                raise self.beyond(rank)
            layers = {}
            with torch.no_grad():
                for n, m in mine.items():  # PEFT's LoraLayer.set_scale: alpha / r (rsLoRA: / sqrt(r))
                    scale = m.lora_alpha[name] / (m.r[name] ** 0.5 if m.use_rslora.get(name) else m.r[name])
                    layers[n] = (m.lora_A[name].weight.detach().clone(),
                                 (m.lora_B[name].weight.float() * scale).to(m.lora_B[name].weight.dtype))
            return Factors(layers, rank)
        finally:
            if name in getattr(self.denoiser, "peft_config", {}):
                with warnings.catch_warnings():  # diffusers activated it on load; PEFT says so on delete
                    warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                    self.denoiser.delete_adapters(name)
            # Every layer active on the slot alone, each with its own list: the state the graph was traced in
            # (Dynamo guards on whether layers share one list object, and deleting an adapter rebuilds them).
            self.denoiser.set_adapter(ADAPTER)

    def fill(self, loras: list[tuple[Factors, float]], key: tuple) -> None:
        """Copy `loras` (factors, weight) side by side into the slot's weights, in place; zeros elsewhere.
        Nothing is copied when the slot already holds `key`.

        Raises:
            RequestError: their ranks add up to more than the slot's.
        """
        if key == self.holds:
            return
        total = sum(f.rank for f, _ in loras)
        if total > self.rank:
            raise RequestError(f"these LoRAs' ranks add up to {total}, beyond this endpoint's hotswap slot rank "
                               f"{self.rank} (generator.hotswap.rank): ask for fewer together", param="adapters",
                               status=422)
        self.holds = None  # a failure halfway leaves the slot unknown, never stale
        with torch.no_grad():
            for n, m in self.layers.items():
                a, b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
                a.zero_()
                b.zero_()
                at = 0
                for factors, weight in loras:
                    if n in factors.layers:
                        fa, fb = factors.layers[n]
                        a[at:at + fa.shape[0]].copy_(fa)
                        b[:, at:at + fb.shape[1]].copy_(fb * weight if weight != 1.0 else fb)
                    at += factors.rank
        self.holds = key


def not_plain(variant: str) -> ValueError:
    return ValueError(f"hotswap takes plain LoRAs, not {variant} (generator.hotswap)")


def activate_text_encoders(pipe, loras: list[tuple[str, float]], denoiser_part: str) -> None:
    """Point every text encoder at the LoRAs among `loras` ((PEFT name, weight)) it has a part of (the
    denoiser's part is in the slot); a text encoder with none of them runs without LoRA."""
    from diffusers.loaders.lora_base import (
        disable_lora_for_text_encoder,
        enable_lora_for_text_encoder,
        set_adapters_for_text_encoder,
    )

    for part, names in pipe.get_list_adapters().items():
        if part == denoiser_part:
            continue
        encoder = getattr(pipe, part)
        mine = [(n, w) for n, w in loras if n in names]
        if mine:
            enable_lora_for_text_encoder(encoder)
            set_adapters_for_text_encoder([n for n, _ in mine], encoder, [w for _, w in mine])
        else:
            disable_lora_for_text_encoder(encoder)
