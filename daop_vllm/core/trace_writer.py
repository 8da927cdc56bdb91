"""Writing routing traces as requests finish (`trace_path`): the format that offline/traces.py
reads (../shared/traces/FORMAT.md)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


class TraceWriter:
    """Appends sequences to a trace file as they finish. Each sequence goes out in one write
    (a gzip member of its own for `.gz` files) and is flushed, so a run stopped at any point
    leaves only complete lines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._compress = self.path.suffix == ".gz"

    def append(self, sequence: dict) -> None:
        data = (json.dumps(sequence, separators=(",", ":")) + "\n").encode()
        if self._compress:
            data = gzip.compress(data)
        with open(self.path, "ab") as out:
            out.write(data)
            out.flush()
