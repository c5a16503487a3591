"""A run folder (``--run-dir``): who wrote it, with which configuration, and whether a new run may use it.

Layout::

    config.json   the run's GenerateConfig (GenerateConfig.to_dict())
    run.json      the manifest: {"run_id": hex, "config_sha256": hex, "workers": N or null, "sharding": {...} or null}
    step-*/       one-process checkpoints; rank-*/ and proxy/ hold a distributed run's checkpoints

A fresh run refuses a folder that already holds something (resuming another run's steps under a new prompt gave
wrong results that exited 0); ``overwrite=True`` clears a folder that is a run folder first. A resume checks the
stored configuration against the manifest's checksum, so an edited or damaged config.json is refused (exit 2)
instead of mixing two configurations. Every committed step carries the run id and the checksum too
(:class:`~.checkpoint.StepCheckpointer`), so steps of another run are never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from ..errors import ConfigError, InputError
from .checkpoint import StepCheckpointer, config_checksum

CONFIG_FILE = "config.json"
MANIFEST_FILE = "run.json"
OUTPUT_KEYS = ("out", "save_proxy", "save_latents", "run_dir")
"""Config keys left out of the checksum: where the results go, not what they are (a resume may move them)."""


def checksum(config: dict) -> str:
    """The run's configuration checksum (sha256 of its canonical JSON, outputs left out)."""
    return config_checksum(config, OUTPUT_KEYS)


def start_run(
    run: Path, config: dict, workers: int | None, overwrite: bool = False, sharding: dict | None = None
) -> dict:
    """Make ``run`` the folder of a new run (config.json, run.json); returns the manifest. ``sharding``: how a
    distributed run's windows are cut over its ranks (``{"window_group": g, "window_order": o}``); a rank's
    checkpoints hold its share, so a resume must cut them the same way.

    Refuses (InputError) a folder that already holds files, unless ``overwrite`` and it is a run folder (then its
    contents are removed first)."""
    _claim(run, overwrite)
    manifest = {"run_id": uuid.uuid4().hex, "config_sha256": checksum(config), "workers": workers}
    manifest["sharding"] = sharding
    (run / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    (run / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


def _claim(run: Path, overwrite: bool) -> None:
    """An empty (or new) folder for a fresh run; ``overwrite`` empties a previous run's folder."""
    if run.exists() and not run.is_dir():
        raise InputError(f"run_dir: {run} is a file, not a folder")
    held = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
    if held and not overwrite:
        raise InputError(
            f"run_dir: {run} already holds a run ({', '.join(held[:4])}"
            f"{', ...' if len(held) > 4 else ''}); continue it with --resume {run}, or choose a new "
            f"folder, or pass --overwrite-run-dir to clear it first"
        )
    if held:
        if not ((run / CONFIG_FILE).is_file() or (run / MANIFEST_FILE).is_file()):
            raise InputError(
                f"run_dir: {run} holds files but is not a run folder (no {CONFIG_FILE} or "
                f"{MANIFEST_FILE}); --overwrite-run-dir clears run folders only, choose another folder"
            )
        for p in run.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    run.mkdir(parents=True, exist_ok=True)


def read_config(run: Path) -> dict:
    """The stored config.json of a run folder as a dict; ConfigError / InputError (exit 2) naming the file."""
    path = run / CONFIG_FILE
    if not path.is_file():
        raise ConfigError("resume", str(run), f"is not a run folder (no {CONFIG_FILE})")
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(
            f"{path}: damaged run configuration, not readable JSON ({e}); the run cannot be resumed"
        ) from e
    if not isinstance(stored, dict):
        raise InputError(f"{path}: damaged run configuration (a JSON {type(stored).__name__}, expected an object)")
    return stored


def read_manifest(run: Path) -> dict:
    """run.json of a run folder; InputError (exit 2) naming the file when missing or damaged."""
    path = run / MANIFEST_FILE
    if not path.is_file():
        raise InputError(
            f"resume: {path} not found; {run} was not written by this version (or is not a run "
            f"folder) and cannot be checked; start a new run"
        )
    try:
        manifest = json.loads(path.read_text())
        ok = isinstance(manifest["run_id"], str) and isinstance(manifest["config_sha256"], str)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: damaged run manifest ({type(e).__name__}: {e})") from e
    if not ok:
        raise InputError(f"{path}: damaged run manifest (run_id / config_sha256 are not strings)")
    return manifest


def open_run(run: Path, config: dict, workers: int | None, sharding: dict | None = None) -> dict:
    """Check that ``run`` may be resumed by this run (same kind of run, same sharding, same configuration); its
    manifest."""
    manifest = read_manifest(run)
    stored = manifest.get("workers")
    if stored != workers:
        have = "one process" if stored is None else f"--workers {stored}"
        raise InputError(
            f"resume: {run} was written by a run on {have}; resume it with the same"
            + ("" if stored is None else f" (--workers {stored} or --gpus {stored})")
        )
    _check_sharding(run, manifest.get("sharding"), sharding)
    path = run / CONFIG_FILE
    if checksum(read_config(run)) != manifest["config_sha256"]:
        raise InputError(
            f"resume: {path} was changed after the run started (its sha256 differs from "
            f"config_sha256 in {run / MANIFEST_FILE}); restore it or start a new run"
        )
    if checksum(config) != manifest["config_sha256"]:
        raise InputError(f"resume: the configuration differs from the run's {path} (only outputs may change)")
    return manifest


def _check_sharding(run: Path, stored: dict | None, sharding: dict | None) -> None:
    """The ranks' shares must be cut as when the run started (same --window-group and ownership order): a rank's
    checkpoint of other windows would resume silently wrong when the token counts happen to match."""
    if stored is not None and sharding is not None and stored != sharding:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(stored.items()))
        raise InputError(f"resume: {run} was written by a run with {flags}; resume it with the same")


def run_checkpointer(folder: str | os.PathLike, sub: str | None = None, keep: int = 2) -> StepCheckpointer:
    """A checkpointer in ``folder`` (or its subfolder ``sub``, a rank's) tied to the folder's run id and config
    checksum when the folder has a manifest (a scratch folder has none)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    manifest = read_manifest(folder) if path.is_file() else {}
    return StepCheckpointer(
        folder / sub if sub else folder,
        keep=keep,
        run_id=manifest.get("run_id"),
        config_sha256=manifest.get("config_sha256"),
    )
