"""LoRA adapters on a diffusers WanTransformer3DModel: load and save in diffusers' format, switch per stage.

File format (what diffusers' ``WanPipeline.save_lora_weights`` writes and ``WanPipeline.load_lora_weights``
reads): one safetensors file, keys ``transformer.<module>.lora_A.weight`` (r, in) and
``transformer.<module>.lora_B.weight`` (out, r), and the peft LoraConfig as JSON under the file metadata key
``lora_adapter_metadata`` with every field prefixed ``transformer.``. ``load_lora`` also accepts keys without
the prefix (``transformer.save_lora_adapter`` writes those) and original-Wan / musubi key styles, which
diffusers converts. A folder written by peft's own ``PeftModel.save_pretrained`` (``adapter_model.safetensors`` with
keys ``base_model.model.<module>.lora_A.weight`` and ``adapter_config.json``) is read too.

Every key and shape is checked against the transformer before anything is injected: diffusers itself only warns
about keys that match no module.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError
from ..pipeline.outputs import save_safetensors
from .loading import check_safetensors_file

PREFIX = "transformer"
METADATA_KEY = "lora_adapter_metadata"
"""Metadata key of how an adapter exported by ``train`` was trained (JSON: stage, mode, window, ...)."""
DEFAULT_FILE = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS, PEFT_CONFIG, PEFT_PREFIX = "adapter_model.safetensors", "adapter_config.json", "base_model.model."


def _adapter_file(path: str | os.PathLike) -> Path:
    """A .safetensors file, a folder saved by peft (its adapter_model.safetensors), or a folder holding diffusers'
    default LoRA file name."""
    p = Path(path)
    if p.is_dir():
        return p / PEFT_WEIGHTS if (p / PEFT_CONFIG).is_file() else p / DEFAULT_FILE
    return p


def _peft_config(path: Path) -> dict:
    """adapter_config.json of a peft folder as LoraConfig arguments; only LoRA adapters are accepted."""
    import dataclasses

    from peft import LoraConfig

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict) or str(raw.get("peft_type", "")).upper() != "LORA":
        got = raw.get("peft_type") if isinstance(raw, dict) else raw
        raise ModelLoadError(f"{path}: field peft_type is {got!r}; only LORA adapters are supported")
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    return {k: v for k, v in raw.items() if k in fields}


def _read_adapter(path: str | os.PathLike) -> tuple[Path, dict, dict | None]:
    """(file, state relative to the transformer, LoraConfig metadata or None) of any accepted adapter layout."""
    file = _adapter_file(path)
    if file.name != PEFT_WEIGHTS or not (file.parent / PEFT_CONFIG).is_file():
        return (file, *_unprefixed(file, *_read(file)))
    if not file.is_file() and (file.parent / "adapter_model.bin").is_file():
        raise ModelLoadError(
            f"{file.parent / 'adapter_model.bin'}: pickle adapter files are not read; save with "
            f"safe_serialization=True (adapter_model.safetensors)"
        )
    state, _ = _read(file)
    stray = next((k for k in state if not k.startswith(PEFT_PREFIX)), None)
    if stray is not None:
        raise ModelLoadError(f"{file}: key {stray!r} lacks peft's prefix {PEFT_PREFIX!r}")
    return file, {k[len(PEFT_PREFIX) :]: v for k, v in state.items()}, _peft_config(file.parent / PEFT_CONFIG)


def _read(file: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open

    check_safetensors_file(file)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # SafetensorError for data the header check cannot see
        raise ModelLoadError(f"{file}: not a readable safetensors file ({e})") from e
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}: metadata field {METADATA_KEY} is not JSON ({e})") from None
    return state, metadata


def _unprefixed(file: Path, state: dict, metadata: dict | None) -> tuple[dict, dict | None]:
    """Keys and metadata relative to the transformer (diffusers, original-Wan and musubi styles)."""
    if any(k.startswith(("diffusion_model.", "lora_unet_")) for k in state):
        from diffusers.loaders import WanLoraLoaderMixin

        try:
            state = WanLoraLoaderMixin.lora_state_dict(dict(state))
        except Exception as e:
            raise ModelLoadError(f"{file}: could not convert non-diffusers LoRA keys ({type(e).__name__}: {e})") from e
    if any(k.startswith(PREFIX + ".") for k in state):
        stray = next((k for k in state if not k.startswith(PREFIX + ".")), None)
        if stray is not None:
            raise ModelLoadError(f"{file}: key {stray!r} is not for the transformer (expected prefix '{PREFIX}.')")
        state = {k[len(PREFIX) + 1 :]: v for k, v in state.items()}
    if metadata and any(k.startswith(PREFIX + ".") for k in metadata):
        metadata = {k[len(PREFIX) + 1 :]: v for k, v in metadata.items() if k.startswith(PREFIX + ".")}
    return state, metadata


def _base_linear(transformer: torch.nn.Module, module_name: str) -> torch.nn.Linear | None:
    try:
        module = transformer.get_submodule(module_name)
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)  # already wrapped by another adapter
    return module if isinstance(module, torch.nn.Linear) else None


def _expected_shape(layer: torch.nn.Linear, part: str, rank: int) -> tuple[int, ...] | None:
    return {
        "lora_A.weight": (rank, layer.in_features),
        "lora_B.weight": (layer.out_features, rank),
        "lora_B.bias": (layer.out_features,),
        "lora_magnitude_vector": (layer.out_features,),
    }.get(part)


def check_lora_state(transformer: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every key names a Linear module of ``transformer`` with matching shapes; raises naming the first bad key."""
    if not state:
        raise ModelLoadError(f"{source}: no LoRA tensors in the file")
    ranks = {k.split(".lora_A.")[0]: v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
    for key, value in state.items():
        module_name, sep, part = key.partition(".lora_")
        if not sep:
            raise ModelLoadError(f"{source}: key {key!r} is not a LoRA tensor (no '.lora_' in its name)")
        layer = _base_linear(transformer, module_name)
        if layer is None:
            raise ModelLoadError(f"{source}: key {key!r} matches no Linear module of the transformer")
        if module_name not in ranks:
            raise ModelLoadError(f"{source}: key {key!r} has no matching {module_name}.lora_A.weight")
        want = _expected_shape(layer, "lora_" + part, ranks[module_name])
        if want is None:
            raise ModelLoadError(f"{source}: key {key!r} is not a LoRA tensor (lora_A/lora_B weight or bias)")
        if tuple(value.shape) != want:
            raise ModelLoadError(
                f"{source}: key {key!r} has shape {tuple(value.shape)}, the module {module_name} needs {want}"
            )
    missing_b = sorted(m for m in ranks if f"{m}.lora_B.weight" not in state)
    if missing_b:
        raise ModelLoadError(f"{source}: key {missing_b[0] + '.lora_A.weight'!r} has no matching lora_B.weight")


def adapter_names(transformer: torch.nn.Module) -> list[str]:
    """Names of the adapters loaded into ``transformer``."""
    return list(getattr(transformer, "peft_config", {}) or {})


def load_lora(transformer: torch.nn.Module, path: str | os.PathLike, adapter_name: str) -> None:
    """Load a LoRA as adapter ``adapter_name``; afterwards it is the only active one. ``path``: a diffusers-format
    safetensors file (or folder holding one), or a folder written by peft's ``save_pretrained``.

    Raises ModelLoadError naming the file (and the first offending key) for a missing, non-safetensors,
    corrupt or mismatched adapter, or a name that is already loaded; the transformer is then unchanged.
    """
    file = _adapter_file(path)
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ConfigError("adapter_name", adapter_name, "must be a non-empty string")
    if adapter_name in adapter_names(transformer):
        raise ModelLoadError(
            f"{file}: adapter name {adapter_name!r} is already loaded (loaded: {adapter_names(transformer)})"
        )
    file, state, metadata = _read_adapter(path)
    check_lora_state(transformer, state, str(file))
    try:
        transformer.load_lora_adapter(state, prefix=None, adapter_name=adapter_name, metadata=metadata)
    except Exception as e:
        raise ModelLoadError(f"{file}: diffusers could not load the adapter ({type(e).__name__}: {e})") from e
    set_active_adapter(transformer, adapter_name)


def _json_ready(config_dict: dict) -> dict:
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config_dict.items()}


def save_lora(
    transformer: torch.nn.Module,
    adapter_name: str,
    path: str | os.PathLike,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` as WanPipeline.save_lora_weights does; returns the file written.

    ``path`` is a ``.safetensors`` file name or a folder (then ``pytorch_lora_weights.safetensors`` inside it).
    Written to a temporary name and renamed when complete. ``extra_metadata`` (str -> str) joins the file's
    metadata (training writes the geometry the adapter saw there).
    """
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in adapter_names(transformer):
        raise ConfigError("adapter_name", adapter_name, f"is not loaded (loaded: {adapter_names(transformer)})")
    p = Path(path)
    file = p / DEFAULT_FILE if p.is_dir() or p.suffix != ".safetensors" else p
    file.parent.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    state = {f"{PREFIX}.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}
    config = _json_ready(transformer.peft_config[adapter_name].to_dict())
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True),
    }
    metadata.update(extra_metadata or {})
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    os.close(fd)
    try:
        save_safetensors(state, tmp, metadata=metadata)  # the umask's mode, not mkstemp's / safetensors' 0600
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return file


def set_active_adapter(transformer: torch.nn.Module, name: str | None) -> None:
    """Make ``name`` the only active adapter (weight 1.0), or run the base weights when ``name`` is None."""
    loaded = adapter_names(transformer)
    if name is None:
        if loaded:
            transformer.disable_adapters()
        return
    if name not in loaded:
        raise ConfigError("adapter", name, f"is not loaded (loaded: {loaded})")
    transformer.enable_adapters()
    transformer.set_adapters(name)


def active_adapter(transformer: torch.nn.Module) -> str | None:
    """The active adapter's name, or None when adapters are disabled or none is loaded."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            if module.disable_adapters:
                return None
            active = module.active_adapters
            return active[0] if active else None
    return None
