"""LoRA file layouts: diffusers (`pytorch_lora_weights.safetensors`), kohya/A1111/ComfyUI (`lora_unet_*`,
`lora_te_*`, `.lora_down/.lora_up/.alpha`) and a PEFT adapter folder, read into and written from one
neutral form: module path -> (down, up, alpha).

The neutral form keeps each layer's own alpha, so a kohya file read and written again is unchanged in
keys and values. Kohya names flatten module paths ('.' -> '_'); they are resolved against the module
names of the model the adapter is for (`module_names`), never guessed. Files are safetensors only.
Never imports ray.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffray.errors import ConfigError
from diffray.models.adapters import CARD, LORA_WEIGHTS, PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS
from diffray.models.export_io import (check_out, kohya_base_version, kohya_name, model_name, modelspec, read_card_file,
                                      replaced_dir, sd_base, what_is_at, write_export_card)
from diffray.models.ti_formats import export_ti_artifact, is_ti_artifact

FORMATS = ("diffusers", "kohya", "peft")
COMPONENTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}  # SD 1.x/2.x kohya prefixes
# What the kohya and PEFT exports hold of each family's LoRA: SDXL's two text encoders (kohya's lora_te1_/
# lora_te2_) and Flux's transformer have no writer here, so a LoRA with them is refused, never cut short.
EXPORTABLE = {"stable-diffusion": ("unet", "text_encoder"), "stable-diffusion-xl": ("unet",), "flux": ()}
_SUFFIXES = {  # (down, up) key suffixes of each layout
    "diffusers": (".lora.down.weight", ".lora.up.weight"),
    "diffusers_te": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    "peft": (".lora_A.weight", ".lora_B.weight"),
    "kohya": (".lora_down.weight", ".lora_up.weight"),
}


@dataclass
class LoraLayer:
    """One adapted module: delta W = up @ down * alpha / rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


LoraWeights = dict[str, LoraLayer]  # "unet.<module path>" / "text_encoder.<module path>" -> layer


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; ConfigError naming the file when it is not one."""
    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(f"{path}: not a .safetensors file (only safetensors adapters are read)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for one cause: a bad file
        raise ConfigError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None


def layout_of(keys: list[str] | set[str]) -> str:
    """'kohya' | 'diffusers' | 'peft' from the key names; ConfigError when no LoRA layout fits."""
    keys = list(keys)
    if keys and all(k.startswith(tuple(COMPONENTS.values())) for k in keys):
        return "kohya"
    if any(k.endswith(_SUFFIXES["peft"]) for k in keys):
        return "peft"
    if any(k.endswith(_SUFFIXES["diffusers"] + _SUFFIXES["diffusers_te"]) for k in keys):
        return "diffusers"
    raise ConfigError("not a LoRA file: its keys follow no known layout (diffusers, PEFT or kohya)")


def _alphas(metadata: dict[str, str]) -> tuple[dict[str, float], set[str]]:
    """(component -> lora_alpha, components trained as rsLoRA) from diffusers' `lora_adapter_metadata`
    (absent: alpha = rank, plain LoRA)."""
    try:
        meta = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        meta = {}
    alphas = {c: float(meta[f"{c}.lora_alpha"]) for c in COMPONENTS if meta.get(f"{c}.lora_alpha") is not None}
    return alphas, {c for c in COMPONENTS if meta.get(f"{c}.use_rslora")}


def _plain_alpha(alpha: float, rank: int, rslora: bool) -> float:
    """The alpha that gives plain LoRA's scale (alpha / rank) the adapter's own: rsLoRA scales by
    alpha / sqrt(rank), which kohya and PEFT-LoRA files can only carry as alpha x sqrt(rank)."""
    return alpha * rank ** 0.5 if rslora else alpha


def from_prefixed(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraWeights:
    """A diffusers-saved file (`unet.`/`text_encoder.` keys in diffusers or PEFT naming) in neutral form."""
    (alphas, rslora), out = _alphas(metadata), {}
    for down_sfx, up_sfx in (_SUFFIXES["diffusers"], _SUFFIXES["diffusers_te"], _SUFFIXES["peft"]):
        for key in [k for k in sd if k.endswith(down_sfx)]:
            module = key[: -len(down_sfx)]
            if module + up_sfx not in sd:
                raise ConfigError(f"LoRA file: {key} has no matching up weight")
            down = sd[key]
            component, rank = module.split(".")[0], down.shape[0]
            alpha = _plain_alpha(alphas.get(component, float(rank)), rank, component in rslora)
            out[module] = LoraLayer(down, sd[module + up_sfx], alpha)
    # anything else (a DoRA magnitude, a LoHa/LoKr factor) has no place in these layouts: refuse, not drop
    unknown = sorted(set(sd) - {m + s for m in out for pair in _SUFFIXES.values() for s in pair})
    if unknown:
        raise ConfigError(f"LoRA file: unsupported key {unknown[0]} (plain LoRA down/up weights only)")
    return out


def from_kohya(sd: dict[str, torch.Tensor], module_names: list[str]) -> LoraWeights:
    """Kohya keys resolved against `module_names` ("unet.<path>", "text_encoder.<path>").

    Raises:
        ConfigError: a key names no module of the model, or lacks its up weight.
    """
    flat = {_kohya_stem(n): n for n in module_names}
    flat.update({_kohya_stem(n, legacy=False): n for n in module_names})
    down_sfx, up_sfx = _SUFFIXES["kohya"]
    out = {}
    for key in sorted(k for k in sd if k.endswith(down_sfx)):
        stem = key[: -len(down_sfx)]
        if stem not in flat:
            raise ConfigError(f"kohya LoRA: {stem} names no module of this model (another base model?)")
        if stem + up_sfx not in sd:
            raise ConfigError(f"kohya LoRA: {key} has no matching up weight")
        down = sd[key]
        alpha = float(sd[stem + ".alpha"]) if stem + ".alpha" in sd else float(down.shape[0])
        out[flat[stem]] = LoraLayer(down, sd[stem + up_sfx], alpha)
    unknown = [k for k in sd if not k.endswith((down_sfx, up_sfx, ".alpha"))]
    if unknown:
        raise ConfigError(f"kohya LoRA: unsupported key {unknown[0]} (only lora_down/lora_up/alpha are read)")
    return out


def to_kohya(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """The kohya/A1111 layout; alpha as a 0-d float tensor, as sd-scripts writes it."""
    out = {}
    for module, layer in sorted(weights.items()):
        stem = _kohya_stem(module)
        out[stem + ".lora_down.weight"] = layer.down.contiguous()
        out[stem + ".lora_up.weight"] = layer.up.contiguous()
        out[stem + ".alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return out


def _kohya_stem(module: str, legacy: bool = True) -> str:
    """The kohya name of "unet.<path>" / "text_encoder.<path>". Text-encoder paths are written under
    `text_model.` (transformers < 5 nested CLIP's layers there, and A1111/ComfyUI/diffusers read those
    names); `legacy=False` gives the name without it, which is also read."""
    component, path = module.split(".", 1)
    if legacy and component == "text_encoder" and not path.startswith("text_model."):
        path = "text_model." + path
    return COMPONENTS[component] + path.replace(".", "_")


def kohya_metadata(weights: LoraWeights, card: dict) -> dict[str, str]:
    """The `ss_*` fields kohya files carry (rank, alpha, base model), so A1111/ComfyUI and their tools show
    them, and the SAI ModelSpec keys (`export_io.modelspec`). `ss_v2` is what A1111 picks an SD 2.x base by."""
    first, family, name = weights[min(weights)], lora_family(weights, card), kohya_name(card)
    v2 = family == "stable-diffusion" and sd_base(card)[0] == 2
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank),
            "ss_network_alpha": f"{first.alpha:g}", "ss_v2": str(v2),
            "ss_base_model_version": kohya_base_version(card, family),
            "ss_output_name": name,
            "ss_training_comment": f"diffray {card.get('method', 'lora')}",
            "ss_steps": str(card.get("steps", ""))}
    if model_name(card.get("base_model")):  # kohya's: a hub id as is, a local path by its folder's name
        meta["ss_sd_model_name"] = model_name(card.get("base_model"))
    return {**meta, **modelspec(card, family, name)}


def lora_family(weights: LoraWeights, card: dict) -> str:
    """The base-model family of a LoRA: its card's `family` (training writes it), else what its components
    tell (`transformer.` layers are Flux's, `text_encoder_2.` SDXL's, anything else Stable Diffusion's)."""
    family = card.get("family")
    if isinstance(family, str) and family:
        return family
    components = {k.split(".", 1)[0] for k in weights}
    return "flux" if "transformer" in components else \
        "stable-diffusion-xl" if "text_encoder_2" in components else "stable-diffusion"


def check_exportable(weights: LoraWeights, card: dict, fmt: str) -> None:
    """ConfigError (naming `format`, the family and the components) when `fmt` cannot hold every layer."""
    family = lora_family(weights, card)
    allowed = EXPORTABLE.get(family, ())
    extra = sorted({k.split(".", 1)[0] for k in weights} - set(allowed))
    if extra:
        what = (f"holds the {' and '.join(allowed)} layers of a {family} LoRA only, not its {', '.join(extra)}"
                if allowed else f"cannot hold a {family} LoRA (its {', '.join(extra)} layers)")
        raise ConfigError(f"a {fmt} export {what}; "
                          "the artifact itself (diffusers layout) is the file to use", field="format")


def module_names(unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None = None) -> list[str]:
    """"unet.<path>" / "text_encoder.<path>" of every module of the given models (kohya name resolution)."""
    names = []
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is not None:
            names += [f"{component}.{n}" for n, _ in model.named_modules() if n]
    return names


def split(weights: LoraWeights, component: str) -> LoraWeights:
    """The layers of one component, keyed by module path within it."""
    return {k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == component}


# ------------------------------------------------------------------------------------- reading any source


def read_peft_dir(folder: Path) -> LoraWeights:
    """A folder written by `write_peft` (or PEFT's `save_pretrained`) per component: <component>/adapter_*."""
    out: LoraWeights = {}
    for component in COMPONENTS:
        sub = folder / component
        if not (sub / PEFT_WEIGHTS).is_file():
            continue
        cfg = json.loads((sub / PEFT_CONFIG).read_text()) if (sub / PEFT_CONFIG).is_file() else {}
        sd, _ = read_safetensors(sub / PEFT_WEIGHTS)
        sd = {f"{component}.{k.removeprefix(PEFT_PREFIX)}": v for k, v in sd.items()}
        meta = {"lora_adapter_metadata": json.dumps({f"{component}.lora_alpha": cfg.get("lora_alpha")})}
        layers = from_prefixed(sd, meta)
        for module, layer in layers.items():  # per-module alphas PEFT keeps in alpha_pattern
            layer.alpha = float(cfg.get("alpha_pattern", {}).get(module.split(".", 1)[1], layer.alpha))
        out.update(layers)
    return out


def read_adapter(path: str | Path, names: list[str]) -> LoraWeights:
    """A LoRA in any layout: a diffusers artifact dir, a PEFT adapter dir, or a .safetensors file
    (diffusers, PEFT or kohya keys). `names` (see `module_names`) resolves kohya keys.

    Raises:
        ConfigError: nothing LoRA-shaped at `path`, or a file that is not safetensors.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "pytorch_lora_weights.safetensors").is_file():
            p = p / "pytorch_lora_weights.safetensors"
        elif any((p / c / PEFT_WEIGHTS).is_file() for c in COMPONENTS):
            return _nonempty(read_peft_dir(p), p)
        else:
            raise ConfigError(f"{p}: holds no pytorch_lora_weights.safetensors or PEFT adapter folder")
    elif not p.exists():
        raise ConfigError(f"{p}: no such LoRA file or folder")
    sd, metadata = read_safetensors(p)
    layers = from_kohya(sd, names) if layout_of(sd.keys()) == "kohya" else from_prefixed(sd, metadata)
    return _nonempty(layers, p)


def _nonempty(weights: LoraWeights, path: Path) -> LoraWeights:
    if not weights:
        raise ConfigError(f"{path}: holds no LoRA layers")
    return weights


# ------------------------------------------------------------------------------------------------ writing


def write_kohya(weights: LoraWeights, out_dir: Path, card: dict) -> Path:
    """`<run name>.safetensors` in the kohya layout with `ss_*` metadata."""
    meta = kohya_metadata(weights, card)
    path = out_dir / f"{meta['ss_output_name']}.safetensors"
    save_file(to_kohya(weights), str(path), metadata=meta)
    return path


def write_peft(weights: LoraWeights, out_dir: Path) -> Path:
    """One PEFT adapter folder per component (`PeftModel.from_pretrained(unet, OUT/unet)` loads it)."""
    from peft import LoraConfig

    for component in COMPONENTS:
        layers = split(weights, component)
        if not layers:
            continue
        first = layers[min(layers)]
        config = LoraConfig(r=first.rank, lora_alpha=first.alpha, target_modules=sorted(layers),
                            rank_pattern={m: v.rank for m, v in layers.items() if v.rank != first.rank},
                            alpha_pattern={m: v.alpha for m, v in layers.items() if v.alpha != first.alpha})
        sub = out_dir / component
        config.save_pretrained(str(sub))
        sd = {}
        for module, layer in sorted(layers.items()):
            sd[f"{PEFT_PREFIX}{module}.lora_A.weight"] = layer.down.contiguous()
            sd[f"{PEFT_PREFIX}{module}.lora_B.weight"] = layer.up.contiguous()
        save_file(sd, str(sub / PEFT_WEIGHTS), metadata={"format": "pt"})
    return out_dir


def export_artifact(artifact: str | Path, fmt: str, out_dir: str | Path) -> Path:
    """Write a LoRA artifact dir (`pytorch_lora_weights.safetensors`) in `fmt` into out_dir, with its card made
    public (`export_io.public_value`); a Textual Inversion artifact goes to `ti_formats.export_ti_artifact`.
    Everything is checked before anything is written; the export is built in a temporary sibling that replaces
    out_dir (an earlier export) only when complete.

    Raises:
        ConfigError: unknown format or one that cannot hold this LoRA (or TI), `artifact` holds no LoRA or TI,
            or out_dir is the artifact, holds it, is a file or a non-empty folder that is not an export.
        AdapterError: the artifact's card is not a JSON object, or names the kohya file outside out_dir (or a TI
            token that names no file).
        StorageError: out_dir cannot be created or written.
    """
    src = Path(artifact).expanduser()
    weights_file = src / LORA_WEIGHTS
    if not weights_file.is_file() and is_ti_artifact(src):
        return export_ti_artifact(src, fmt, Path(out_dir).expanduser())
    if fmt not in FORMATS:
        raise ConfigError(f"{fmt!r} is not one of {', '.join(FORMATS)}", field="format")
    if not weights_file.is_file():
        raise ConfigError(f"{src}: not a LoRA artifact but {what_is_at(src)}; export takes the artifact folder of "
                          f"a LoRA run (lora, dreambooth lora mode, ...: one with {LORA_WEIGHTS}) or of a Textual "
                          "Inversion run (learned_embeds.safetensors)", field="ARTIFACT")
    out = Path(out_dir).expanduser()
    check_out(src, out)
    card = read_card_file(src / CARD)
    if fmt == "kohya":
        kohya_name(card, src / CARD)
    tensors = read_safetensors(weights_file)  # the diffusers format copies the file: a readable one all the same
    if not tensors[0]:
        raise ConfigError(f"{weights_file}: holds no tensors")
    weights = None if fmt == "diffusers" else _nonempty(from_prefixed(*tensors), weights_file)
    if weights is not None:
        check_exportable(weights, card, fmt)
    with replaced_dir(out, f"{fmt} export") as tmp:
        if fmt == "diffusers":
            shutil.copyfile(weights_file, tmp / weights_file.name)
        else:
            write_kohya(weights, tmp, card) if fmt == "kohya" else write_peft(weights, tmp)
        write_export_card(tmp, card, fmt)
    return out


def load_into(model: torch.nn.Module, layers: LoraWeights, rank: int, alpha: float, source: str) -> int:
    """Copy `layers` (module path -> layer) into `model`'s PEFT LoRA "default" adapter of (rank, alpha),
    rescaling up so each layer's delta equals the loaded one. Returns how many modules were set.

    Raises:
        ConfigError: a layer's module has no LoRA here, or its rank differs (naming `lora.init_from`).
    """
    for path, layer in sorted(layers.items()):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is None or "default" not in getattr(module, "lora_A", {}):
            raise ConfigError(f"{source} adapts {path}, which has no LoRA here (add it to lora.target_modules)",
                              field="lora.init_from")
        if layer.rank != rank:
            raise ConfigError(f"{source} has rank {layer.rank} at {path}; lora.rank is {rank}",
                              field="lora.init_from")
        if layer.down.shape != module.lora_A["default"].weight.shape or \
                layer.up.shape != module.lora_B["default"].weight.shape:
            raise ConfigError(f"{source}: the shapes at {path} do not fit this base model", field="lora.init_from")
        scale = (layer.alpha / layer.rank) / (alpha / rank)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(layer.down)
            module.lora_B["default"].weight.copy_(layer.up * scale)
    return len(layers)


def init_lora_from(path: str, unet: torch.nn.Module, text_encoder: torch.nn.Module, trains_text_encoder: bool,
                   rank: int, alpha: float) -> int:
    """Start the freshly added LoRA of `unet` (and of `text_encoder` when it trains) from the adapter at
    `path`, in any layout, so each layer's delta equals the loaded one. Returns the modules set.

    Raises:
        ConfigError: naming `lora.init_from`: unreadable, another model's, or another rank's adapter.
    """
    try:
        weights = read_adapter(path, module_names(unet, text_encoder))
    except ConfigError as exc:
        raise ConfigError(str(exc), field="lora.init_from") from None
    te_layers = split(weights, "text_encoder")
    if te_layers and not trains_text_encoder:
        raise ConfigError(f"{path} holds text-encoder LoRA: set lora.train_text_encoder: true",
                          field="lora.init_from")
    n = load_into(unet, split(weights, "unet"), rank, alpha, path)
    return n + (load_into(text_encoder, te_layers, rank, alpha, path) if te_layers else 0)
