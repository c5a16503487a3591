"""Progress that suits where it goes: tqdm bars on a terminal, plain periodic lines anywhere else.

    bar = progress_bar(total=30, desc="detail stage", unit="step", enabled=True)
    bar.update(1) ... bar.close()

A Ray job's log, a CI log or a file cannot redraw a line: tqdm's carriage returns pile up there as fragments. When
the stream is not a terminal, :class:`LineProgress` prints one complete line each time the count crosses the next
10 % of the total (and when it completes), so a run of S steps prints at most ``min(S, 10)`` lines per bar,
whatever the machine's speed:

    detail stage rank 2: step 5/30 (17%), 3.1 s/step, ETA 77 s
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def is_terminal(stream: TextIO) -> bool:
    """True when ``stream`` is an interactive terminal (a closed or odd stream counts as not one)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(
    total: int,
    desc: str,
    unit: str = "step",
    initial: int = 0,
    enabled: bool = True,
    stream: TextIO | None = None,
    position: int | None = None,
):
    """A tqdm bar on a terminal, a :class:`LineProgress` elsewhere; a disabled tqdm when not ``enabled``."""
    from tqdm.auto import tqdm

    stream = sys.stderr if stream is None else stream
    if enabled and not is_terminal(stream):
        return LineProgress(total, desc, unit, initial, stream)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=not enabled,
        file=stream,
        leave=False,
        position=position,
    )


class LineProgress:
    """The part of tqdm's interface the runs use (``n``, ``update``, ``refresh``, ``close``), printing plain lines
    at every 10 % of ``total`` crossed and at completion (see the module docstring)."""

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, stream: TextIO | None = None):
        self.total, self.desc, self.unit = max(0, int(total)), desc, unit
        self.n = self.start = int(initial)
        self.stream = sys.stderr if stream is None else stream
        self.t0 = time.perf_counter()
        self.shown = self._decile(self.n)

    def _decile(self, n: int) -> int:
        """How many tenths of the total ``n`` has reached (10 when complete)."""
        return 10 if self.total == 0 or n >= self.total else math.floor(10 * n / self.total)

    def update(self, k: int = 1) -> None:
        self.n += k
        self.refresh()

    def refresh(self) -> None:
        """Print a line when ``n`` reached a new tenth of the total since the last line."""
        if self._decile(self.n) > self.shown:
            self.shown = self._decile(self.n)
            print(self.line(time.perf_counter() - self.t0), file=self.stream, flush=True)

    def line(self, elapsed: float) -> str:
        """'desc: unit n/total (p%), x s/unit, ETA y s' for ``elapsed`` seconds since the start."""
        done = min(self.n, self.total)
        pct = 100 if self.total == 0 else round(100 * done / self.total)
        text = f"{self.desc}: {self.unit} {done}/{self.total} ({pct}%)"
        ran = done - self.start
        if ran > 0:
            per = elapsed / ran
            text += f", {per:.1f} s/{self.unit}, ETA {per * (self.total - done):.0f} s"
        return text

    def close(self) -> None:
        """Nothing to erase (the lines stay in the log)."""
