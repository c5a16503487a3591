"""Progress of every rank on the driver's terminal: one bar per rank, fed by polling the actors.

    bars = RankBars(total=30, ranks=4, desc="detail", enabled=True)
    bars.update([3, 4, 3, 2])   # steps done, by rank
    bars.close()

Bars go to stderr (the summary goes to stdout) and vanish when closed; when stderr is not a terminal (a Ray job's
log) every rank prints plain lines at each 10 % instead ("detail stage rank 2: step 5/30 (17%), 3.1 s/step, ETA
77 s"; ``pipeline.progress``). With ``enabled=False`` nothing is drawn but :attr:`done` still records the last
counts (the driver uses it for its timeout messages).
"""

from __future__ import annotations

import sys
from typing import Sequence, TextIO


class RankBars:
    """One bar per rank (tqdm positions 0..ranks-1 on a terminal, plain lines elsewhere), labelled with the rank."""

    def __init__(
        self, total: int, ranks: int, desc: str, unit: str = "step", enabled: bool = True, stream: TextIO | None = None
    ):
        from ..pipeline.progress import progress_bar

        self.total, self.done = total, [0] * ranks
        self.bars = [
            progress_bar(
                total,
                f"{desc} rank {r}",
                unit,
                enabled=enabled,
                stream=sys.stderr if stream is None else stream,
                position=r,
            )
            for r in range(ranks)
        ]

    def update(self, done: Sequence[int | None]) -> None:
        """Set each rank's count (None: that rank did not answer this time; its bar keeps its count)."""
        for r, n in enumerate(done):
            if n is None or r >= len(self.bars):
                continue
            self.done[r] = min(int(n), self.total)
            self.bars[r].n = self.done[r]
            self.bars[r].refresh()

    def finish(self) -> None:
        self.update([self.total] * len(self.bars))

    def slowest(self) -> tuple[int, int]:
        """(rank, steps done) of the rank furthest behind."""
        r = min(range(len(self.done)), key=lambda i: (self.done[i], i))
        return r, self.done[r]

    def close(self) -> None:
        for b in self.bars:
            b.close()
