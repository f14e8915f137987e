"""Progress bars and per-epoch metrics files (JSON lines and CSV)."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["Progress", "write_metrics"]


class Progress:
    """A light progress bar on stderr: redrawn in place on a terminal; without one (a log
    file, CI) one line when the loop ends and one every 30 s of a long loop."""

    def __init__(self, iterable: Iterable, total: int, desc: str, enabled: bool = True) -> None:
        self.iterable, self.total, self.desc, self.enabled = iterable, total, desc, enabled
        self.postfix = ""
        self.tty = sys.stderr.isatty()

    def __iter__(self) -> Iterator:
        start = last_shown = time.perf_counter()
        for i, item in enumerate(self.iterable, 1):
            yield item
            if not self.enabled:
                continue
            now = time.perf_counter()
            if self.tty or i == self.total or now - last_shown >= 30.0:
                last_shown = now
                self._show(i, now - start)
        if self.enabled and self.tty:
            sys.stderr.write("\n")

    def _show(self, i: int, elapsed: float) -> None:
        frac = i / max(self.total, 1)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        line = f"{self.desc} [{bar}] {i}/{self.total} {elapsed:5.1f}s<{eta:5.1f}s {self.postfix}"
        sys.stderr.write("\r" + line[:150] if self.tty else line + "\n")
        sys.stderr.flush()


def write_metrics(history: list[dict], out_dir: Path) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from the whole history.

    Rewriting (rather than appending) keeps the files equal to the history held in
    the checkpoint, so a resumed run ends with the same files as an uninterrupted one.
    """
    with open(out_dir / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
