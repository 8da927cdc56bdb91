"""The `stats_path` file: the engine's report as JSON, rewritten atomically on a timer."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rank_stats_path(path: str | Path, rank: int) -> Path:
    """Where tensor-parallel rank `rank` writes the stats file asked for at `path`: rank 0 at
    `path` itself, rank r beside it as `<stem>.rank<r><suffix>`."""
    path = Path(path)
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def rank_stats_paths(path: str | Path) -> list[Path]:
    """`path` and the other ranks' files written beside it, rank 0 first."""
    paths = [Path(path)]
    while rank_stats_path(path, len(paths)).exists():
        paths.append(rank_stats_path(path, len(paths)))
    return paths


class StatsFile:
    """Writes `report()` to `path` every `interval_s` seconds on a thread of its own, and once
    more on `close()` (that write alone has `"final": true`). Each write goes to a temporary file
    that is then renamed over `path`, so a reader never sees half a file."""

    def __init__(self, path: str | Path, report: Callable[[], dict[str, Any]], interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self._report = report
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.write()
        self._thread = threading.Thread(target=self._run, name="daop-stats", daemon=True)
        self._thread.start()

    def write(self, final: bool = False) -> None:
        data = {**self._report(), "pid": os.getpid(), "updated_at": time.time(), "final": final}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with self._lock:
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s) and self._write_unless_removed():
            pass

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._write_unless_removed(final=True)

    def _write_unless_removed(self, final: bool = False) -> bool:
        """`write()`, unless the file's directory has been removed meanwhile (the temporary one
        the front end gives for its /metrics goes when the front end exits, which may be before
        the worker's last write): then False, and nothing written."""
        try:
            self.write(final)
        except FileNotFoundError:
            if self.path.parent.is_dir():
                raise
            return False
        return True
