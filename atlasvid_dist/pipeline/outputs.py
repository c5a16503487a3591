"""A run's output files: checked before any work, written under temporary names, put in place together.

* :func:`check_outputs` refuses (InputError, exit 2) two outputs naming one file (through symlinks, relative
  paths or hard links), an output that is an existing folder or lies in the run folder's own files, and an output
  whose folder cannot take the temporary file (probed by creating and removing it: the real name, the real folder).
  It then removes the temporary files that killed runs (dead pids) left in the output folders.
* :class:`PendingOutputs` holds finished files under their temporary names and renames them all only when every
  one was written, so a failed proxy video never leaves the main video at ``--out``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputError, RunFailure

OUTPUTS = ("out", "save_proxy", "save_latents")
_PARTIAL = re.compile(r"^\..+\.(\d+)\.partial(\.mp4|\.safetensors)$")
_RUN_NAMES = re.compile(r"^(config\.json|run\.json|proxy|step-.*|rank-.*|fault-injected-.*)$")


def partial_path(path: str | os.PathLike, pid: int | None = None) -> Path:
    """The temporary name an output is written under: ``.NAME.PID.partial.SUFFIX`` next to it."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid() if pid is None else pid}.partial{p.suffix.lower()}")


def current_umask() -> int:
    """This process's umask, read without changing it (Linux /proc), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, base: int = 0o666) -> None:
    """Give a file made by mkstemp or safetensors (0600), or a folder made by mkdtemp (0700, ``base=0o777``), the
    mode a plain ``open()`` / ``mkdir`` would: ``base & ~umask``. Call before renaming it into place."""
    os.chmod(path, base & ~current_umask())


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, then the umask's mode: safetensors >= 0.8 creates the file 0600 (a temporary file
    renamed), which teammates on shared storage cannot read."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    apply_umask(path)


def check_outputs(cfg) -> None:
    """Refuse, before any work, outputs that would overwrite each other or cannot be written (see module doc)."""
    outs = {k: Path(getattr(cfg, k)) for k in OUTPUTS if getattr(cfg, k, None)}
    for field, p in outs.items():
        if p.is_dir():
            raise InputError(f"{field}: {p} is an existing folder; give a file path ({p.suffix or '.mp4'})")
    _check_distinct(outs)
    if cfg.run_dir:
        _check_outside_run(outs, Path(cfg.run_dir))
    for field, p in outs.items():
        probe_writable(field, p)
    for folder in {p.parent.resolve() for p in outs.values()}:
        remove_stale_partials(folder)


def _check_distinct(outs: dict[str, Path]) -> None:
    """No two outputs may be one file: same resolved path, or the same existing file (hard links)."""
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pa, pb = outs[a], outs[b]
            same = os.path.realpath(pa) == os.path.realpath(pb) or (
                pa.exists() and pb.exists() and os.path.samefile(pa, pb)
            )
            if same:
                raise InputError(
                    f"{a}={str(pa)!r} and {b}={str(pb)!r} name the same file "
                    f"({os.path.realpath(pa)}); one would replace the other: give each its own path"
                )


def _check_outside_run(outs: dict[str, Path], run: Path) -> None:
    """An output may not be the run folder nor one of the files the run keeps in it."""
    root = Path(os.path.realpath(run))
    for field, p in outs.items():
        real = Path(os.path.realpath(p))
        if real == root or any(q.parent == root and _RUN_NAMES.match(q.name) for q in (real, *real.parents)):
            raise InputError(
                f"{field}={str(p)!r}: is the run folder {run} or one of its files (config, manifest, "
                f"checkpoints); write outputs elsewhere"
            )


def probe_writable(field: str, path: Path) -> None:
    """Create and remove the output's temporary file where it will be written; InputError if that fails."""
    tmp = partial_path(path)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(
            f"{field}={str(path)!r}: cannot write in folder {path.parent} ({e.strerror}: "
            f"test file {tmp.name}); choose a writable folder (and a shorter name if too long)"
        ) from e


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove temporary output files (``.NAME.PID.partial.mp4|safetensors``) of processes no longer alive."""
    removed = []
    for p in Path(folder).iterdir():
        m = _PARTIAL.match(p.name)
        if m and p.is_file() and not p.is_symlink() and not pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class PendingOutputs:
    """Finished files under their temporary names; put in place together when the ``with`` block succeeds.

    ``with PendingOutputs() as pending: ...; pending.add(tmp, final)``: on success every tmp is renamed over its
    final path; on an exception (or a failed rename) all temporary files, and outputs already renamed, are removed.
    """

    def __init__(self):
        self.files: list[tuple[Path, Path]] = []

    def add(self, tmp: str | os.PathLike, final: str | os.PathLike) -> None:
        """Register a finished temporary file and the path it is renamed to on commit."""
        self.files.append((Path(tmp), Path(final)))

    def commit(self) -> None:
        """Rename every file into place; if one rename fails, none of the outputs is kept (RunFailure)."""
        done = []
        for tmp, final in self.files:
            try:
                tmp.replace(final)
            except OSError as e:
                for f in done:
                    f.unlink(missing_ok=True)
                self.discard()
                raise RunFailure(f"{final}: could not be put in place ({e}); no output was kept") from e
            done.append(final)
        self.files = []

    def discard(self) -> None:
        """Remove every temporary file still pending."""
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        self.files = []

    def __enter__(self) -> "PendingOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
