"""The evaluator's inputs: a folder with captions.jsonl (the training-data layout) or one video and its caption.
Every caption is parsed before any video is read, so a bad one is named at once."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..world import parse_caption

CAPTIONS = "captions.jsonl"


def read_captions(folder: str | Path) -> list[tuple[Path, str]]:
    """(video path, caption) per line of ``folder/captions.jsonl``; InputError names a bad line or caption."""
    root = Path(folder)
    file = root / CAPTIONS
    if not file.is_file():
        raise InputError(f"{file}: no captions file (the videos folder needs {CAPTIONS})")
    items = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{file}: line {n} is not JSON ({e})") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("video", "caption")):
            raise InputError(f"{file}: line {n} needs a 'video' path and a 'caption'")
        try:
            parse_caption(obj["caption"])
        except InputError as e:
            raise InputError(f"{file}: line {n}: {e}") from None
        items.append((root / obj["video"], obj["caption"]))
    if not items:
        raise InputError(f"{file}: no entries")
    return items
