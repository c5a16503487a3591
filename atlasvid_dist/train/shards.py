"""Prepared training data: a dataset encoded once (VAE latents of the proxy and detail clips, text embeddings)
into sharded safetensors, so training runs neither the VAE nor the text encoder.

Layout of a prepared folder::

    index.json               {"format": 1, "geometry": {...}, "records": N, "shards": [...], "sources": [...]}
    shard-00000.safetensors  "proxy" (n, C, f, h, w), "detail" (stage 2), "text" (n, L, D); float32
    shard-00001.safetensors  ...

``geometry`` holds every TrainConfig field the latents depend on (stage, size, frames, fps, scales, text length,
model); training refuses a folder prepared with other values (ConfigError naming the field). Shards are written
under a temporary name and renamed; the index is written last, so a folder with an index is complete. Each
shard's size and sha256 are in the index and checked before training reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, InputError, check
from .config import TrainConfig
from .data import clip_starts, cut_clip, scan_dataset

INDEX = "index.json"
FORMAT = 1
GEOMETRY = ("stage", "width", "height", "frames", "fps", "temporal_scale", "spatial_scale", "text_len", "model")
"""TrainConfig fields the prepared tensors depend on."""


@dataclass(frozen=True)
class PrepareOptions:
    """How a dataset is cut and sharded."""

    clips_per_video: int = 1
    """Clips taken from every video, their starts spread evenly over it."""
    shard_size: int = 64
    """Clips per shard file."""
    encode_batch: int = 1
    """Clips per VAE call. On CPU a batch above one takes oneDNN's conv3d, about twice as fast per clip (8 clips of
    256 x 256 x 65: 32 s instead of 73 s); a batch holds that many clips' activations at once."""

    def __post_init__(self) -> None:
        for name in ("clips_per_video", "shard_size", "encode_batch"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "must be an integer >= 1")


def is_prepared(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a prepared dataset (an index)."""
    return (Path(folder) / INDEX).is_file()


def geometry(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in GEOMETRY}


# -- writing ----------------------------------------------------------------------------------------------------
def prepare(
    cfg: TrainConfig,
    output: str | os.PathLike,
    opts: PrepareOptions = PrepareOptions(),
    *,
    log=print,
    progress: bool = True,
) -> dict:
    """Encode ``cfg.data`` (videos + captions.jsonl) into shards under ``output``; returns the index.

    With ``progress``, stderr shows clips done/total, seconds per clip and the ETA (pipeline/progress.py: a bar on
    a terminal, else a plain line at every 10 % of the clips)."""
    from ..models.loading import load_components
    from ..pipeline.progress import progress_bar
    from .data import LatentEncoder

    out = Path(output)
    if out.resolve() == Path(cfg.data).resolve():
        raise ConfigError("output", str(output), "must differ from the data folder")
    data = scan_dataset(cfg.data, cfg)  # bad data: skipped with a count, or stop (cfg.bad_data)
    todo = [(rec, start) for rec in data.records for start in clip_starts(rec, cfg, opts.clips_per_video)]
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # incomplete until the new index is written
    comp = load_components(cfg.model, device="cpu")
    enc = LatentEncoder(comp.vae, comp.tokenizer, comp.text_encoder, cfg.text_len, "cpu", torch.float32)
    bar = progress_bar(total=len(todo), desc="prepare-data", unit="clip", enabled=progress)
    shards, sources, buf = [], [], []
    try:
        for batch in chunked(todo, opts.encode_batch):
            for (rec, start), item in zip(batch, _encode_clips(enc, batch, cfg)):
                buf.append(item)
                sources.append({"video": str(rec.path), "caption": rec.caption, "start": start})
                if len(buf) == opts.shard_size:
                    shards.append(_write_shard(out, len(shards), buf))
                    buf = []
                bar.update(1)
    finally:
        bar.close()
    if buf:
        shards.append(_write_shard(out, len(shards), buf))
    index = {
        "format": FORMAT,
        "geometry": geometry(cfg),
        "records": len(sources),
        "shards": shards,
        "sources": sources,
        "skipped": [list(s) for s in data.skipped],
    }
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(out / INDEX)
    log(
        f"prepared {len(sources)} clips from {len(data.records)} videos into {len(shards)} shard(s) at {out}"
        + (f"; skipped {len(data.skipped)} bad entries" if data.skipped else "")
    )
    return index


def chunked(items: list, size: int) -> list[list]:
    """``items`` in consecutive lists of ``size`` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def _encode_clips(enc, batch: list, cfg: TrainConfig) -> list[dict]:
    """The tensors of the clips (rec, start) of ``batch``, each without a batch dim: proxy, text (and detail,
    stage 2); one VAE call per kind of clip."""
    clips = [cut_clip(rec, start, cfg) for rec, start in batch]
    proxy = enc.video(torch.stack([c.proxy for c in clips]))  # (B, C, f, h, w)
    items = [{"proxy": p, "text": enc.text(c.caption)[0]} for p, c in zip(proxy, clips)]
    if cfg.stage == 2:
        for item, detail in zip(items, enc.video(torch.stack([c.detail for c in clips]))):
            item["detail"] = detail
    return items


def _write_shard(out: Path, n: int, items: list[dict]) -> dict:
    from ..pipeline.outputs import save_safetensors

    name = f"shard-{n:05d}.safetensors"
    tensors = {k: torch.stack([it[k] for it in items]).float().contiguous() for k in items[0]}  # (n, ...)
    tmp = out / f".{name}.tmp"
    save_safetensors(tensors, tmp)
    tmp.replace(out / name)
    return {"file": name, "count": len(items), "bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- reading ----------------------------------------------------------------------------------------------------
class PreparedData:
    """A prepared folder checked against the training config; ``get(j)`` loads clip j's tensors."""

    def __init__(self, folder: str | os.PathLike, cfg: TrainConfig):
        self.root = Path(folder)
        self.index = _read_index(self.root / INDEX)
        for k, want in geometry(cfg).items():
            have = self.index["geometry"].get(k)
            if have != want:
                raise ConfigError(
                    k,
                    want,
                    f"the prepared data at {self.root} was made with {k} = {have!r}; "
                    f"prepare it again with this config or train with {k} = {have!r}",
                )
        self.starts = []  # first record of every shard
        total = 0
        for shard in self.index["shards"]:
            _check_shard(self.root / shard["file"], shard)
            self.starts.append(total)
            total += shard["count"]
        if total != self.index["records"] or total == 0:
            raise InputError(f"{self.root / INDEX}: {self.index['records']} records, shards hold {total}")

    def __len__(self) -> int:
        return self.index["records"]

    def get(self, j: int) -> dict[str, torch.Tensor]:
        """Clip j: {'proxy', 'text', 'detail' (stage 2)} each with a batch dim of 1, float32."""
        from safetensors import safe_open

        check(0 <= j < len(self), "record", j, f"must be in [0, {len(self)})")
        s = max(i for i, first in enumerate(self.starts) if first <= j)
        path, i = self.root / self.index["shards"][s]["file"], j - self.starts[s]
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_slice(k)[i : i + 1] for k in f.keys()}
        except Exception as e:  # safetensors raises its own types on damaged files
            raise InputError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable index of prepared data ({e})") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT or "shards" not in index:
        raise InputError(f"{path}: not a prepared-data index of format {FORMAT}")
    return index


def _check_shard(path: Path, shard: dict) -> None:
    if not path.is_file():
        raise InputError(f"{path}: shard missing (listed in the index)")
    if path.stat().st_size != shard["bytes"] or _sha256(path) != shard["sha256"]:
        raise InputError(f"{path}: shard differs from the index (size or checksum): damaged or replaced")
