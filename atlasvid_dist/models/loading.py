"""Loading a Wan2.1 text-to-video model: the built-in tiny one, a local diffusers-format folder, or a Hugging Face
id already in the local cache (never downloaded here).

A folder is validated completely before any weight is read (``validate_model_dir``): layout, configs, every
safetensors header against its file size, sharded indexes, the shapes the parts must agree on, and the weight names
against the model each config builds. Weights are read from safetensors only (never pickle), and code shipped in a
folder is never run (``auto_map`` is refused; every loader gets ``trust_remote_code=False``). Every failure is a
:class:`ModelLoadError` naming the file or field.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.model import ModelSpec
from ..errors import ModelLoadError

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_CONFIG_FILE = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model")
_WEIGHTED = ("transformer", "vae", "text_encoder")
_CLASS_NAMES = {"transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan"}
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers too


@dataclass
class WanComponents:
    """The five parts of a Wan2.1 text-to-video model, ready to run."""

    transformer: torch.nn.Module
    """diffusers WanTransformer3DModel."""
    vae: torch.nn.Module
    """diffusers AutoencoderKLWan."""
    text_encoder: torch.nn.Module
    """transformers UMT5EncoderModel."""
    tokenizer: object
    """transformers tokenizer of the text encoder."""
    scheduler: object
    """diffusers flow-matching scheduler (template; stages make fresh copies with their own shift)."""
    source: str
    """"tiny" or the folder the parts were read from."""


# --- safetensors files ---------------------------------------------------------------------------------------


def check_safetensors_file(path: str | os.PathLike) -> dict:
    """Parse a safetensors header and check it against the file; returns the header (tensor name -> info).

    Catches truncated files (data shorter than the header says), garbage (no valid header) and inconsistent
    headers (tensor byte ranges that overlap, leave gaps or do not match dtype x shape).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: weight file missing")
    size = path.stat().st_size
    if size < 8:
        raise ModelLoadError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ModelLoadError(
                f"{path}: not a safetensors file or truncated (header length {header_len} bytes, file has {size} bytes)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_len = _tensor_data_length(path, header)
    if 8 + header_len + data_len != size:
        raise ModelLoadError(
            f"{path}: truncated or corrupt: header declares {data_len} bytes of tensor data, the "
            f"file holds {size - 8 - header_len}"
        )
    return header


def _tensor_data_length(path: Path, header: dict) -> int:
    """Total tensor bytes the header declares; the byte ranges must tile [0, total) exactly."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise ModelLoadError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from None
        nbytes = _DTYPE_BYTES.get(dtype)
        if nbytes is not None and end - begin != nbytes * math.prod(shape):
            raise ModelLoadError(
                f"{path}: tensor {name!r} has {end - begin} bytes, dtype {dtype} x shape "
                f"{shape} needs {nbytes * math.prod(shape)}"
            )
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos or end < begin:
            raise ModelLoadError(f"{path}: tensor {name!r} byte range {begin}..{end} does not follow {pos}")
        pos = end
    return pos


def _check_weights(folder: Path) -> None:
    """Every safetensors file (and sharded index) in ``folder`` is readable; at least one exists."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found only pickle files {pickles}; convert them to safetensors)" if pickles else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weight file{hint}")
    for f in files:
        check_safetensors_file(f)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: field weight_map missing or empty")
        for shard in sorted(set(weight_map.values())):
            if not (folder / str(shard)).is_file():
                raise ModelLoadError(f"{index}: weight_map names shard {shard!r}, which is missing from {folder}")


# --- where a model lives: a folder, or a Hugging Face id in the local cache ----------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (HF_HUB_CACHE, else HF_HOME/hub, else the
    library's default), so a variable set after huggingface_hub was imported still counts."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def is_hub_id(model: str | os.PathLike) -> bool:
    """``org/name`` that is not an existing path (a local folder always wins)."""
    text = str(model)
    return bool(_HUB_ID.match(text)) and ".." not in text and not Path(text).exists()


BUILTIN_FOLDERS = {"shapes": Path(__file__).parent / "shapes"}
"""Models shipped inside the package as diffusers-format folders (name -> folder). ``shapes`` is the project's own
model of the shapes world, made by `atlasvid-dist world train` (docs/shapes.md)."""
DEFAULTS_FILE = "atlasvid_model.json"
"""A model folder's own defaults (base size, window, generate options), next to model_index.json."""


def model_folder(model: str | os.PathLike) -> Path:
    """The folder to read for ``model``: a built-in name (:data:`BUILTIN_FOLDERS`), a local path as given, or a
    Hugging Face id (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``) resolved in the local cache without any network access;
    ModelLoadError names the id and the cache folder when the id is not cached."""
    if str(model) in BUILTIN_FOLDERS:
        return BUILTIN_FOLDERS[str(model)]
    if not is_hub_id(model):
        return Path(model)
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(str(model), cache_dir=str(cache), local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, or a damaged cache entry
        raise ModelLoadError(
            f"model={str(model)!r}: not a local folder, and this Hugging Face id is not in the "
            f"local cache {cache} (HF_HUB_CACHE); download it into that cache once (e.g. `hf "
            f"download {model}`) or pass a folder ({type(e).__name__})"
        ) from None


def read_model_defaults(model: str | os.PathLike) -> dict:
    """The model folder's :data:`DEFAULTS_FILE` as a dict ({} for the built-in tiny model, a preset name or a folder
    without one). ModelLoadError names the file when it is not a JSON object."""
    if str(model) == "tiny" or (str(model) not in BUILTIN_FOLDERS and not Path(str(model)).is_dir()):
        return {}
    path = model_folder(model) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object")
    return data


# --- folder layout and configs -------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path}: file missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_configs(root: Path) -> dict[str, dict]:
    """model_index.json and the config of every part; checks the layout (no weights read)."""
    if not root.is_dir():
        raise ModelLoadError(f"{root}: model folder does not exist (or is not a folder)")
    index = _read_json(root / "model_index.json")
    configs: dict[str, dict] = {}
    for name in COMPONENTS:
        if name not in index:
            raise ModelLoadError(f"{root / 'model_index.json'}: field {name!r} missing")
        sub = root / name
        if not sub.is_dir():
            raise ModelLoadError(f"{sub}: component folder missing")
        if name == "tokenizer":
            if not any((sub / f).is_file() for f in _TOKENIZER_FILES):
                raise ModelLoadError(f"{sub}: no tokenizer file (expected one of {list(_TOKENIZER_FILES)})")
            if (sub / "tokenizer_config.json").is_file():
                _refuse_custom_code(sub / "tokenizer_config.json", _read_json(sub / "tokenizer_config.json"))
            continue
        configs[name] = _read_json(sub / _CONFIG_FILE[name])
        _refuse_custom_code(sub / _CONFIG_FILE[name], configs[name])
    for name, cls in _CLASS_NAMES.items():
        got = configs[name].get("_class_name", cls)
        if got != cls:
            raise ModelLoadError(f"{root / name / 'config.json'}: field _class_name is {got!r}, expected {cls!r}")
    return configs


def _refuse_custom_code(path: Path, config: dict) -> None:
    """A config that maps classes to code shipped in the folder (``auto_map``) is refused: model folders are data,
    their Python files are never imported (every loader below also gets ``trust_remote_code=False``)."""
    if "auto_map" in config:
        raise ModelLoadError(
            f"{path}: field auto_map declares custom code ({config['auto_map']!r}); code from a "
            f"model folder is never run - remove auto_map to load the built-in classes"
        )


def _field(configs: dict, part: str, key: str, source: str) -> int:
    value = configs[part].get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelLoadError(f"{source}/{part} config: field {key} is {value!r}, expected an integer")
    return value


def check_compatible(configs: dict[str, dict], source: str) -> None:
    """The parts agree: transformer in/out channels == VAE z_dim, transformer text_dim == text encoder d_model."""
    z_dim = _field(configs, "vae", "z_dim", source)
    for key in ("in_channels", "out_channels"):
        ch = _field(configs, "transformer", key, source)
        if ch != z_dim:
            raise ModelLoadError(
                f"{source}: transformer config field {key}={ch} does not match vae config field "
                f"z_dim={z_dim} (latent channels must agree)"
            )
    text_dim = _field(configs, "transformer", "text_dim", source)
    d_model = _field(configs, "text_encoder", "d_model", source)
    if text_dim != d_model:
        raise ModelLoadError(
            f"{source}: transformer config field text_dim={text_dim} does not match text_encoder "
            f"config field d_model={d_model}"
        )


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files a loader reads: the shards a sharded index names, else every *.safetensors file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return sorted({folder / str(s) for i in indexes for s in _read_json(i)["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


def _meta_model(folder: Path, name: str, config: dict) -> torch.nn.Module:
    """The module the config describes, built on the meta device (no memory, no weights) to list its keys."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        if name == "text_encoder":
            return UMT5EncoderModel(UMT5Config.from_dict({k: v for k, v in config.items() if k != "auto_map"}))
        cls = WanTransformer3DModel if name == "transformer" else AutoencoderKLWan
        return cls.from_config(config)


def _ignored(key: str, patterns) -> bool:
    return any(re.search(p, key) for p in patterns or ())


def check_weight_names(folder: Path, name: str, config: dict) -> None:
    """The weight files hold exactly the tensors the config's model has: a config declaring fewer (or more) layers
    than the weights is refused instead of running a truncated model. Compares names from the safetensors headers
    with the state dict of the model built on the meta device; tied weights and the patterns the library itself
    ignores on load are allowed."""
    model = _meta_model(folder, name, config)
    expected = set(model.state_dict())
    where = {k: f for f in _weight_files(folder) for k in check_safetensors_file(f) if k != "__metadata__"}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    unexpected = sorted(
        k for k in set(where) - expected if not _ignored(k, getattr(model, "_keys_to_ignore_on_load_unexpected", None))
    )
    missing = sorted(
        k
        for k in expected - set(where)
        if not (tied.get(k) in where or _ignored(k, getattr(model, "_keys_to_ignore_on_load_missing", None)))
    )
    if unexpected:
        raise ModelLoadError(
            f"{where[unexpected[0]]}: {len(unexpected)} unexpected weight(s) that the model of "
            f"{folder / 'config.json'} does not have, e.g. {unexpected[:5]} (config and weights "
            f"disagree, e.g. on num_layers)"
        )
    if missing:
        raise ModelLoadError(
            f"{folder}: {len(missing)} weight(s) of the model of {folder / 'config.json'} are "
            f"missing from {[f.name for f in _weight_files(folder)]}, e.g. {missing[:5]}"
        )


def _validate(root: Path) -> dict[str, dict]:
    """Layout, configs, compatibility, weight files and weight names; returns the configs."""
    configs = _read_configs(root)
    check_compatible(configs, str(root))
    for name in _WEIGHTED:
        _check_weights(root / name)
        check_weight_names(root / name, name, configs[name])
    return configs


def validate_model_dir(path: str | os.PathLike) -> None:
    """Check a diffusers-format Wan2.1 folder (or a cached Hugging Face id) completely without loading weights;
    raises ModelLoadError."""
    _validate(model_folder(path))


def read_model_spec(path: str | os.PathLike) -> ModelSpec:
    """Transformer shapes of a model folder, from its configs only (for planning before anything loads); its VAE's
    decode cost traced from the VAE config (``vae_cost.trace_decode``: meta tensors, no weights)."""
    from .vae_cost import trace_decode

    root = model_folder(path)
    configs = _read_configs(root)
    cfg = configs["transformer"]
    try:
        return ModelSpec(
            name=str(root),
            num_layers=cfg["num_layers"],
            num_heads=cfg["num_attention_heads"],
            head_dim=cfg["attention_head_dim"],
            ffn_dim=cfg["ffn_dim"],
            in_channels=cfg["in_channels"],
            text_dim=cfg["text_dim"],
            freq_dim=cfg.get("freq_dim", 256),
            patch=tuple(cfg.get("patch_size", (1, 2, 2))),
            vae_decode=_vae_decode_cost(configs["vae"], trace_decode),
            **_part_sizes(root),
        )
    except KeyError as e:
        raise ModelLoadError(f"{root / 'transformer' / 'config.json'}: field {e.args[0]} missing") from None


def _vae_decode_cost(config: dict, trace):
    try:
        return trace(config)
    except Exception as e:  # diffusers refuses a config it cannot build (TypeError, ValueError, RuntimeError)
        raise ModelLoadError(f"vae/config.json: cannot build the VAE it describes ({type(e).__name__}: {e})") from e


def _part_sizes(root: Path) -> dict:
    """text_encoder_params / vae_params counted from the safetensors headers (no weights read), so a small model's
    plan is not costed as UMT5-XXL; a part without readable weight files keeps ModelSpec's default."""
    out = {}
    for part, key in (("text_encoder", "text_encoder_params"), ("vae", "vae_params")):
        try:
            headers = [check_safetensors_file(f) for f in _weight_files(root / part)]
        except ModelLoadError:
            continue
        count = sum(math.prod(info["shape"]) for h in headers for k, info in h.items() if k != "__metadata__")
        if count > 0:
            out[key] = count
    return out


# --- loading -------------------------------------------------------------------------------------------------


def _load_part(where: Path, load):
    """Run a library loader; turn its failures into ModelLoadError naming the folder."""
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as e:  # libraries raise many types (OSError, ValueError, SafetensorError, RuntimeError)
        raise ModelLoadError(f"{where}: could not load ({type(e).__name__}: {e})") from e


def _scheduler_class(root: Path, cfg: dict):
    import diffusers

    name = cfg.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(name, str) and name.endswith("Scheduler") and isinstance(cls, type)):
        raise ModelLoadError(
            f"{root / 'scheduler' / 'scheduler_config.json'}: field _class_name={name!r} is not a diffusers scheduler"
        )
    return cls


def _load_folder(root: Path, dtype: torch.dtype, vae_dtype: torch.dtype) -> WanComponents:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    configs = _validate(root)
    scheduler_cls = _scheduler_class(root, configs["scheduler"])
    return WanComponents(
        transformer=_load_part(
            root / "transformer",
            lambda: WanTransformer3DModel.from_pretrained(
                root,
                subfolder="transformer",
                torch_dtype=dtype,
                use_safetensors=True,
                local_files_only=True,
                trust_remote_code=False,
            ),
        ),
        vae=_load_part(
            root / "vae",
            lambda: AutoencoderKLWan.from_pretrained(
                root,
                subfolder="vae",
                torch_dtype=vae_dtype,
                use_safetensors=True,
                local_files_only=True,
                trust_remote_code=False,
            ),
        ),
        text_encoder=_load_part(
            root / "text_encoder",
            lambda: UMT5EncoderModel.from_pretrained(
                root / "text_encoder", dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False
            ),
        ),
        tokenizer=_load_part(
            root / "tokenizer",
            lambda: AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True, trust_remote_code=False),
        ),
        scheduler=_load_part(
            root / "scheduler",
            lambda: scheduler_cls.from_pretrained(
                root, subfolder="scheduler", local_files_only=True, trust_remote_code=False
            ),
        ),
        source=str(root),
    )


def _build_tiny(dtype: torch.dtype, vae_dtype: torch.dtype) -> WanComponents:
    """Tiny model in memory (float32), checked like a folder; other dtypes go through a saved temporary folder
    so the libraries' casting rules (modules kept in float32) apply exactly as for a real folder."""
    from .tiny import build_tiny_components, save_tiny_pipeline

    if dtype != torch.float32 or vae_dtype != torch.float32:
        with tempfile.TemporaryDirectory(prefix="atlasvid-tiny-") as tmp:
            parts = _load_folder(save_tiny_pipeline(Path(tmp) / "tiny"), dtype, vae_dtype)
        parts.source = "tiny"
        return parts
    parts = build_tiny_components()
    configs = {
        "transformer": dict(parts["transformer"].config),
        "vae": dict(parts["vae"].config),
        "text_encoder": parts["text_encoder"].config.to_dict(),
    }
    check_compatible(configs, "tiny")
    return WanComponents(**parts, source="tiny")


def load_components(
    model: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    vae_dtype: torch.dtype = torch.float32,
    offload_encoders: bool = False,
) -> WanComponents:
    """Load ``"tiny"`` (built in memory), a diffusers-format Wan2.1 folder, or a Hugging Face id found in the local
    cache (see :func:`model_folder`) onto ``device`` in eval mode (with ``offload_encoders`` the text encoder and
    the VAE stay in host memory: :func:`on_device` brings each onto ``device`` while it works).

    ``dtype`` applies to the transformer and the text encoder; the VAE stays in ``vae_dtype`` (float32 by
    default, as Wan's reference code decodes). Weights come back frozen (``requires_grad=False``); LoRA adapters
    added later (peft) are trainable. The name ``"tiny"`` always means the built-in model, never a folder.
    """
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ModelLoadError(f"model={model!r}: expected 'tiny', the path of a model folder or a Hugging Face id")
    parts = (
        _build_tiny(dtype, vae_dtype) if str(model) == "tiny" else _load_folder(model_folder(model), dtype, vae_dtype)
    )
    for module in (parts.transformer, parts.vae, parts.text_encoder):
        home = "cpu" if offload_encoders and module is not parts.transformer else device
        module.to(home).eval().requires_grad_(False)
        if torch.device(home).type == "cpu":
            _own_memory(module)
    return parts


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device, offload: bool):
    """``module`` on ``device`` for the ``with`` block. ``offload``: it lives in host memory (see
    :func:`load_components`), comes onto ``device`` for the block and goes back after it, the device's cached
    blocks released; otherwise it already lives on ``device`` and nothing moves."""
    if not offload or torch.device(device).type == "cpu":
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def _own_memory(module: torch.nn.Module) -> None:
    """Copy weights that still live in a memory-mapped safetensors file into ordinary (aligned) memory.

    diffusers leaves CPU weights mapped from the file at 8-byte offsets; BLAS then takes other code paths than for
    aligned memory and results differ in the last bit from the same weights built in memory. Copying also means a
    later change to the file cannot crash a run (SIGBUS). Costs one tensor's extra memory at a time.
    """
    for p in module.parameters():
        p.data = p.data.clone()
    for name, buf in list(module.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, buf.clone())
