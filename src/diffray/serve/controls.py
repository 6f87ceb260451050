"""The ControlNet pipelines a replica keeps: one per ControlNet a request names (a configured one or a registry
entry), sharing the base pipeline's modules, so resident LoRAs apply to them too. `ImageEngine` holds them in an
LRU bounded by `generator.max_controlnets_per_replica`; `stale` names the registry ones to drop because their
entry was deleted, broke or was replaced since they were built.
"""

from __future__ import annotations

import logging

from diffray.errors import RequestError

log = logging.getLogger(__name__)


def build(pipe, name: str, path: str, sub: str | None, flux: bool, device: str):
    """A ControlNet pipeline over `pipe`'s modules with the ControlNet at `path` (`sub`folder).

    Raises:
        RequestError: naming `control.model` (422) when it cannot be loaded or was made for another base model.
    """
    from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline,
                           StableDiffusionXLPipeline)

    try:
        if flux:
            raise RequestError("ControlNets are not served with a Flux model yet", param="control.model", status=422)
        cn = ControlNetModel.from_pretrained(path, subfolder=sub, use_safetensors=True, dtype=pipe.unet.dtype)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the artifact's
        log.warning("ControlNet %s failed to load: %s: %s", name, type(exc).__name__, exc)
        raise RequestError(f"ControlNet {name!r} cannot be loaded ({type(exc).__name__})", param="control.model",
                           status=422) from None
    for key in ("cross_attention_dim", "addition_embed_type", "in_channels"):  # made for another base model
        if cn.config.get(key) != pipe.unet.config.get(key):
            raise RequestError(f"ControlNet {name!r} does not fit this model: its {key} is {cn.config.get(key)!r}, "
                               f"the model's {pipe.unet.config.get(key)!r}", param="control.model", status=422)
    cls = (StableDiffusionXLControlNetPipeline if isinstance(pipe, StableDiffusionXLPipeline)
           else StableDiffusionControlNetPipeline)
    cp = cls.from_pipe(pipe, controlnet=cn.to(device))
    cp.set_progress_bar_config(disable=True)
    return cp


def stale(pipes: dict[str, tuple], registry) -> list[str]:
    """The names in `pipes` (name -> (key, pipeline)) built from a registry entry (key `("registry",
    fingerprint)`) that is gone, broken or holds other content now."""
    out = []
    for name, (key, _) in pipes.items():
        if key[0] == "registry":
            info = registry.inspect(name)
            if info is None or info.problem is not None or info.fingerprint != key[1]:
                out.append(name)
    return out
