"""Streaming loader for Criteo-format TSV files (the public CTR benchmark layout).

Each line: ``label \\t I1..I13 \\t C1..C26`` - a 0/1 click label, 13 integer features (may be
empty or negative) and 26 categorical features as hex strings (may be empty). Files are read
line by line (no loading into memory); categorical values are hashed into ``hash_buckets``
rows with a stable hash (not Python's salted ``hash``), so ids are the same in every process.

Malformed lines raise `CriteoFormatError` naming the file, the line number and what was
wrong, or, with ``on_error="skip"``, are skipped and counted (``stream.skipped``). The
position (file, line) is checkpointable like the synthetic stream's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batch import Batch
from .config import RankerConfig, criteo_config

N_INT, N_CAT = 13, 26
N_FIELDS = 1 + N_INT + N_CAT
_LINE_BITS = 40  # example id = file index << 40 | line number


class CriteoFormatError(ValueError):
    """A malformed line: ``path:line: what was wrong``."""


@dataclass
class ParsedLine:
    label: float
    dense: list[float]
    sparse: list[int]


# Strict forms: Python's int() also takes " 7 ", "1_000", "0x1f" and non-ASCII digits ("١٢"),
# none of which is a Criteo value; 18 digits keep every integer exact in int64 and finite.
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_HEX = re.compile(r"[0-9a-fA-F]{1,64}")


def hash_category(value: str, column: int, buckets: int) -> int:
    """Stable id in [1, buckets) for a hex category of ``column``; 0 is reserved for empty."""
    if not value:
        return 0
    if not _HEX.fullmatch(value):
        raise ValueError(f"{value!r} is not hexadecimal")
    mixed = (int(value, 16) * 2654435761 + (column + 1) * 1_000_003) % 2_147_483_647
    return 1 + mixed % (buckets - 1)


def parse_line(line: str, buckets: int) -> ParsedLine:
    """One TSV line -> ParsedLine; ValueError saying what was wrong (without the location)."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != N_FIELDS:
        raise ValueError(f"expected {N_FIELDS} tab-separated fields, got {len(fields)}")
    if fields[0] not in ("0", "1"):
        raise ValueError(f"label must be 0 or 1, got {fields[0]!r}")
    dense = []
    for j, value in enumerate(fields[1 : 1 + N_INT]):
        if value and not _INTEGER.fullmatch(value):
            raise ValueError(f"integer column I{j + 1} has {value[:40]!r}, not an integer of at most 18 "
                             "ASCII digits")
        dense.append(float(int(value)) if value else 0.0)
    sparse = []
    for j, value in enumerate(fields[1 + N_INT :]):
        try:
            sparse.append(hash_category(value, j, buckets))
        except ValueError:
            raise ValueError(f"categorical column C{j + 1} has {value[:40]!r}, not hexadecimal") from None
    return ParsedLine(float(fields[0]), dense, sparse)


@dataclass
class CriteoStream:
    """Batches of ``batch_size`` from Criteo TSV ``paths`` in order (the last may be short).

    on_error: "fail" (raise CriteoFormatError) or "skip" (count in ``skipped``).
    Batches match ``criteo_config(size, hash_buckets)``: dense [B, 13], sparse [B, 26],
    no multi-hot, no history, one task (ctr).
    """

    paths: list[str | os.PathLike]
    batch_size: int = 1024
    hash_buckets: int = 100_000
    on_error: str = "fail"
    file_index: int = 0
    line_number: int = 0  # lines of the current file already consumed
    skipped: int = 0
    _handle: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.on_error not in ("fail", "skip"):
            raise ValueError("on_error must be 'fail' or 'skip'.")
        if self.batch_size <= 0 or self.hash_buckets < 2:
            raise ValueError("batch_size must be >= 1 and hash_buckets >= 2.")
        self.paths = [Path(p) for p in ([self.paths] if isinstance(self.paths, (str, Path)) else self.paths)]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise ValueError(f"Criteo files not found: {missing}")

    def config(self, size: str = "small") -> RankerConfig:
        return criteo_config(size, self.hash_buckets)

    def state_dict(self) -> dict:
        return {"file_index": self.file_index, "line_number": self.line_number, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self._close()
        self.file_index, self.line_number = state["file_index"], state["line_number"]
        self.skipped = state["skipped"]

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _next_line(self) -> tuple[str, int] | None:
        while self.file_index < len(self.paths):
            if self._handle is None:
                self._handle = open(self.paths[self.file_index], encoding="utf-8", errors="replace")
                for _ in range(self.line_number):  # resume inside the file
                    self._handle.readline()
            line = self._handle.readline()
            if line:
                self.line_number += 1
                return line, self.line_number
            self._close()
            self.file_index, self.line_number = self.file_index + 1, 0
        return None

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        rows, ids = [], []
        while len(rows) < self.batch_size:
            got = self._next_line()
            if got is None:
                break
            line, number = got
            if not line.strip():
                continue
            try:
                rows.append(parse_line(line, self.hash_buckets))
                ids.append((self.file_index << _LINE_BITS) | number)
            except ValueError as exc:
                if self.on_error == "fail":
                    raise CriteoFormatError(f"{self.paths[self.file_index]}:{number}: {exc}") from None
                self.skipped += 1
        if not rows:
            raise StopIteration
        return _to_batch(rows, ids)


def _to_batch(rows: list[ParsedLine], ids: list[int]) -> Batch:
    b = len(rows)
    items, actions, gaps, mask = Batch.empty_history(b)
    labels = torch.tensor([[r.label] for r in rows])
    return Batch(dense=torch.tensor([r.dense for r in rows]),
                 sparse=torch.tensor([r.sparse for r in rows], dtype=torch.int64),
                 multi_hot=torch.zeros(b, 0, 1, dtype=torch.int64),
                 multi_hot_mask=torch.zeros(b, 0, 1, dtype=torch.bool),
                 hist_items=items, hist_actions=actions, hist_gaps=gaps, hist_mask=mask,
                 labels=labels, label_weights=torch.ones_like(labels),
                 example_ids=torch.tensor(ids, dtype=torch.int64))
