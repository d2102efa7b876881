"""The clean stage's quarantine file, written as its rows come.

Contract: `QuarantineSink(target)` takes quarantine rows (QUARANTINE_SCHEMA dicts, in the
order they should appear), holds at most QUARANTINE_ROWS of them, and writes each full batch
as a row group of a temporary file beside `target`; `commit()` writes the rest and renames
the file onto `target` (the same bytes `write_table` gives for up to QUARANTINE_ROWS rows).
Leaving the `with` block without a commit removes the temporary file: the previous
quarantine stays. It counts the rows by reason and keeps the labels of `label_not_allowed`
rows, which is all the report and the nothing-kept message need, so memory does not grow
with the number of rows quarantined.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from synthloop.dataset import QUARANTINE_SCHEMA

QUARANTINE_ROWS = 65_536  # rows held before they are written as a row group


class QuarantineSink:
    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.reasons: Counter[str] = Counter()
        self.not_allowed_labels: set[str] = set()
        self._rows: list[dict] = []
        self._tmp: Path | None = None
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> QuarantineSink:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent)
        os.close(fd)
        self._tmp = Path(name)
        self._writer = pq.ParquetWriter(self._tmp, QUARANTINE_SCHEMA)
        return self

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.reasons[row["reason"]] += 1
            if row["reason"] == "label_not_allowed":
                self.not_allowed_labels.add(str(row["label"]))
        self._rows.extend(rows)
        if len(self._rows) >= QUARANTINE_ROWS:
            self._flush()

    def commit(self) -> None:
        """Write the rows held and put the file in place of the target."""
        if self._rows or not self.total:
            self._flush()  # an empty quarantine is a file with its schema, as write_table's
        self._writer.close()
        self._writer = None
        if self.target.exists():  # a replaced file keeps its permissions (mkstemp: 0600)
            os.chmod(self._tmp, self.target.stat().st_mode & 0o7777)
        os.replace(self._tmp, self.target)
        self._tmp = None

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def _flush(self) -> None:
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=QUARANTINE_SCHEMA))
        self._rows = []

    def __exit__(self, *_: object) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
