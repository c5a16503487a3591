"""Committed step checkpoints (docs/reliability.md): a step is loadable only once its marker, written last, exists.

Layout of ``run_dir``::

    step-000005/tensors.safetensors   tensors (safetensors: no pickle)
    step-000005/meta.json             {"step": 5, "meta": {...}}
    step-000005/COMMITTED             {"step": 5, "files": {name: {"bytes": n, "sha256": hex}},
                                       "run_id": id, "config_sha256": hex}

A checkpointer opened with a ``run_id`` and ``config_sha256`` (the run folder's manifest) writes both into every
marker and only sees steps that carry the same two values: steps of another run or another configuration left in
the folder are never resumed from nor outrank this run's steps when pruning. Steps of successive stages use
:func:`step_key` (stage, step) so a later stage's steps always sort after an earlier stage's.

A commit writes and fsyncs both files, then writes the marker to a temporary name, fsyncs it and renames it
(atomic), then fsyncs the folder. A crash at any point leaves either the previous committed steps untouched or
the new step fully committed. Older committed steps beyond ``keep`` are removed only after the new commit
(marker first, so a crash while pruning never leaves a committed-looking partial step).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import struct
from pathlib import Path

import torch

from ..errors import InputError, check

MARKER = "COMMITTED"
TENSORS = "tensors.safetensors"
META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
STAGE_SPAN = 100000
"""Steps per stage in :func:`step_key`: stage ``k``'s step ``s`` is committed as ``k * STAGE_SPAN + s``."""


def step_key(stage: int, step: int) -> int:
    """The committed step number of (stage index, step): ordered by stage first, then step; never crosses stages."""
    check(
        isinstance(step, int) and 0 <= step < STAGE_SPAN,
        "steps",
        step,
        f"a checkpointed stage runs at most {STAGE_SPAN - 1} steps",
    )
    return stage * STAGE_SPAN + step


def config_checksum(config: dict, ignore: tuple[str, ...] = ()) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``config`` without the keys in ``ignore``."""
    kept = {k: v for k, v in config.items() if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class StepCheckpointer:
    """Commits, finds and loads step checkpoints in one run folder (one writer per folder)."""

    def __init__(
        self, run_dir: str | os.PathLike, keep: int = 2, run_id: str | None = None, config_sha256: str | None = None
    ):
        check(
            isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1,
            "keep",
            keep,
            "must be an integer >= 1 (committed steps kept)",
        )
        self.run_dir, self.keep = Path(run_dir), keep
        self.identity = {"run_id": run_id, "config_sha256": config_sha256}
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def step_dir(self, step: int) -> Path:
        return self.run_dir / f"step-{step:06d}"

    # ------------------------------------------------------------------------------------------------ write
    def commit(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Write step ``step`` and commit it; then prune older steps. Returns the step folder."""
        check(
            isinstance(step, int) and not isinstance(step, bool) and step >= 0, "step", step, "must be an integer >= 0"
        )
        tensors = _cpu_tensors(tensors)
        try:
            meta_text = json.dumps({"step": step, "meta": meta}, indent=1)
        except (TypeError, ValueError) as e:
            raise InputError(f"checkpoint meta for step {step}: not JSON-serialisable ({e})") from e
        d = self.step_dir(step)
        d.mkdir(exist_ok=True)
        (d / MARKER).unlink(missing_ok=True)  # re-committing a step: it is uncommitted while rewritten
        from .outputs import save_safetensors

        save_safetensors(tensors, d / TENSORS)
        _fsync(d / TENSORS)
        _write_synced(d / META, meta_text.encode())
        files = {name: {"bytes": (d / name).stat().st_size, "sha256": _sha256(d / name)} for name in (TENSORS, META)}
        tmp = d / f".{MARKER}.tmp"
        _write_synced(tmp, json.dumps({"step": step, "files": files, **self.identity}).encode())
        tmp.replace(d / MARKER)
        _fsync(d)
        _fsync(self.run_dir)
        self._prune(step)
        return d

    def _prune(self, newest: int) -> None:
        committed = self.committed_steps()
        for step in committed[: -self.keep]:
            self._remove(step)
        for step in self._all_steps():  # leftovers of interrupted writes, older than the newest commit
            if step < newest and step not in committed:
                self._remove(step)

    def _remove(self, step: int) -> None:
        d = self.step_dir(step)
        (d / MARKER).unlink(missing_ok=True)  # uncommitted first: a crash mid-delete leaves no committed partial
        shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ read
    def _all_steps(self) -> list[int]:
        steps = []
        for p in self.run_dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def committed_steps(self) -> list[int]:
        """Steps whose marker exists and whose files have the recorded sizes, oldest first."""
        return [s for s in self._all_steps() if self._marker_ok(s)]

    def _marker_ok(self, step: int) -> bool:
        try:
            marker = self._read_marker(step)
        except InputError:
            return False
        if any(marker.get(k) != v for k, v in self.identity.items() if v is not None):
            return False  # another run's (or another configuration's) step
        d = self.step_dir(step)
        return all((d / n).is_file() and (d / n).stat().st_size == f["bytes"] for n, f in marker["files"].items())

    def latest(self) -> int | None:
        """The newest committed step, or None (uncommitted or visibly truncated steps are skipped)."""
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def intact_steps(self, on_skip=None) -> list[int]:
        """Committed steps whose files match their checksums, oldest first; ``on_skip(step, reason)`` is called
        for every committed-looking step that fails the check (a corrupt step is never resumed from)."""
        steps = []
        for step in self.committed_steps():
            try:
                self.verify(step)
            except InputError as e:
                if on_skip is not None:
                    on_skip(step, str(e))
                continue
            steps.append(step)
        return steps

    def newest_loadable(self, on_skip=None, device: str | torch.device = "cpu"):
        """(step, tensors, meta) of the newest committed step that loads, or None; older steps are tried when a
        newer one is damaged, and ``on_skip(step, reason)`` tells which steps were passed over and why."""
        for step in reversed(self.committed_steps()):
            try:
                return (step, *self.load(step, device))
            except InputError as e:
                if on_skip is not None:
                    on_skip(step, str(e))
        return None

    def verify(self, step: int) -> None:
        """Raise InputError (naming the file) unless step ``step`` is committed and its files match the marker."""
        marker = self._read_marker(step)
        d = self.step_dir(step)
        for key, want in self.identity.items():
            if want is not None and marker.get(key) != want:
                raise InputError(
                    f"checkpoint {d / MARKER}: {key}={marker.get(key)!r}, this run has {want!r} "
                    f"(a step of another run or configuration)"
                )
        for name, f in marker["files"].items():
            path = d / name
            if not path.is_file():
                raise InputError(f"checkpoint {path}: missing (step {step} is committed but incomplete)")
            size = path.stat().st_size
            if size != f["bytes"]:
                raise InputError(f"checkpoint {path}: {size} bytes, {f['bytes']} were committed (truncated)")
            if _sha256(path) != f["sha256"]:
                raise InputError(f"checkpoint {path}: content differs from the committed checksum (corrupt)")

    def load(self, step: int, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) of a committed step; files are checked against the marker (size and sha256)."""
        self.verify(step)
        d = self.step_dir(step)
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(d / TENSORS), device=str(device))
            meta = json.loads((d / META).read_text())
        except Exception as e:  # safetensors raises its own error types on damaged headers
            raise InputError(f"checkpoint {d}: cannot be read ({type(e).__name__}: {e})") from e
        if meta.get("step") != step:
            raise InputError(f"checkpoint {d / META}: holds step {meta.get('step')!r}, expected {step}")
        return tensors, meta["meta"]

    def _read_marker(self, step: int) -> dict:
        path = self.step_dir(step) / MARKER
        if not path.is_file():
            raise InputError(f"checkpoint {self.step_dir(step)}: step {step} is not committed (no {MARKER})")
        try:
            marker = json.loads(path.read_text())
            files = marker["files"]
            ok = marker["step"] == step and set(files) == {TENSORS, META}
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"checkpoint {path}: unreadable marker ({e})") from e
        if not ok:
            raise InputError(f"checkpoint {path}: marker does not describe step {step}")
        return marker


# ------------------------------------------------------------------------------------------------ RNG states
def generator_state(gen: torch.Generator) -> torch.Tensor:
    """A torch.Generator's state as a uint8 CPU tensor (CPU or CUDA generator)."""
    return gen.get_state().clone()


def restore_generator(gen: torch.Generator, state: torch.Tensor) -> None:
    """Inverse of :func:`generator_state`."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.ndim != 1:
        raise InputError(
            f"generator state: expected a 1-D uint8 tensor, got "
            f"{getattr(state, 'dtype', type(state).__name__)} {getattr(state, 'shape', '')}"
        )
    try:
        gen.set_state(state.cpu())
    except RuntimeError as e:
        raise InputError(f"generator state: does not fit a {gen.device} generator ({e})") from e


def python_rng_state(rng: random.Random | None = None) -> torch.Tensor:
    """Python ``random`` state (the module's, or ``rng``'s) as an int64 tensor.

    Layout: [version, 624 MT words + position, has_gauss, gauss_next as float64 bits].
    """
    version, words, gauss = (rng or random).getstate()
    gauss_bits = struct.unpack("<q", struct.pack("<d", gauss))[0] if gauss is not None else 0
    return torch.tensor([version, *words, int(gauss is not None), gauss_bits], dtype=torch.int64)


def restore_python_rng(state: torch.Tensor, rng: random.Random | None = None) -> None:
    """Inverse of :func:`python_rng_state`."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.int64 or state.ndim != 1 or state.numel() < 4:
        raise InputError("python RNG state: expected the 1-D int64 tensor python_rng_state() makes")
    values = state.tolist()
    version, words, has_gauss, gauss_bits = values[0], tuple(values[1:-2]), values[-2], values[-1]
    gauss = struct.unpack("<d", struct.pack("<q", gauss_bits))[0] if has_gauss else None
    try:
        (rng or random).setstate((version, words, gauss))
    except (ValueError, TypeError) as e:
        raise InputError(f"python RNG state: rejected by random.setstate ({e})") from e


# ------------------------------------------------------------------------------------------------ files
def _cpu_tensors(tensors: dict) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with storage of their own (safetensors refuses shared storage)."""
    if not isinstance(tensors, dict):
        raise InputError(f"checkpoint tensors: expected a dict of name -> tensor, got {type(tensors).__name__}")
    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise InputError(f"checkpoint tensors: {name!r} -> {type(t).__name__}; expected str -> torch.Tensor")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
