"""CSV: one row per logged global step; columns ``step`` then ``<source>/<key>``.

The header is the union of every key seen so far: when a new key appears the file is
rewritten with the wider header (earlier rows get empty cells), otherwise a row is appended.
An existing file of the same run (a second `Engine.run`, a resumed run) is continued.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

from betty.logging.base import Record


class CSVLogger:
    """Writes ``<run folder>/metrics.csv``; ``path`` is the file's full name.

    Rows go to disk as they come and none is kept in memory: a run of any length costs the
    same memory. A new column rewrites the file once, streaming it row by row through a
    temporary file; an existing file is continued after reading its header only.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.columns: list[str] = ["step"]
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        if os.path.exists(path):
            with open(path, newline="") as file:
                header = next(csv.reader(file), None)
            self.columns = list(header or self.columns)
        self._rewrite()

    def write(self, records: Sequence[Record], *, global_step: int) -> None:
        """Append one row for ``global_step`` (rewriting the file when a new column
        appears)."""
        row: dict[str, Any] = {"step": global_step}
        for record in records:
            for key, value in record.metrics.items():
                row[f"{record.tag}/{key}"] = value
            if record.step is not None and record.step != global_step:
                row[f"{record.tag}/step"] = record.step
        new = [key for key in row if key not in self.columns]
        if new:
            self.columns.extend(new)
            self._rewrite()
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, self.columns, restval="").writerow(row)

    def _rewrite(self) -> None:
        """The file with the current header, its rows streamed over (empty new cells)."""
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", newline="") as out:
            writer = csv.DictWriter(out, self.columns, restval="")
            writer.writeheader()
            if os.path.exists(self.path):
                with open(self.path, newline="") as old:
                    for row in csv.DictReader(old):
                        writer.writerow(row)
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Nothing to release: each row is written, and the file closed, as it comes."""
