"""Reading user data from local files: JSONL, or a `datasets` dataset saved with `save_to_disk`.

Every row travels with `where` ("path:line" or "path[row i]") so that an error names its origin.
Nothing is dropped silently: a bad row raises `DataError` naming the file and line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message starts with the file and line (or row) at fault."""


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8-sig") as f:  # a byte-order mark (Excel, Notepad) is not data
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a blank line holds no row
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((where, row))
    if not rows:
        raise DataError(f"{path}: empty file, no rows")
    return rows


def read_hf_disk(path: str | Path) -> list[tuple[str, dict]]:
    """A `datasets.Dataset` saved with `save_to_disk` (one split's directory)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(
            f"{path}: holds a DatasetDict with splits {list(ds)}; point the data path at one split's "
            f"directory, e.g. {Path(path) / next(iter(ds))}"
        )
    if len(ds) == 0:
        raise DataError(f"{path}: empty dataset, no rows")
    # a columnar dataset stores an absent key as None: treat it as absent, so the error says "missing"
    return [(f"{path}[row {i}]", {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(ds)]


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """JSONL file or `datasets` directory, by what the path is."""
    p = Path(path)
    if p.is_dir():
        return read_hf_disk(p)
    return read_jsonl(p)


class FileSource:
    """Train/val/test rows from local files; without a val file, a seeded slice of train is held out. Without a test
    file there is no test split (`splits`): its metrics would come from the split checkpoints are chosen on."""

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        val_fraction: float = 0.05,
        seed: int = 0,
    ):
        if train is None:
            raise ValueError("data.source.train is required: a JSONL file or a saved `datasets` directory")
        self.paths = {"train": train, "val": val, "test": test}
        self.val_fraction, self.seed = val_fraction, seed
        self._cache: dict[str, list[tuple[str, dict]]] | None = None

    def _load(self) -> dict[str, list[tuple[str, dict]]]:
        if self._cache is None:
            splits = {k: read_rows(p) for k, p in self.paths.items() if p is not None}
            if "val" not in splits:
                rows = splits["train"]
                order = list(range(len(rows)))
                random.Random(self.seed).shuffle(order)
                n_val = max(1, int(round(self.val_fraction * len(rows)))) if len(rows) > 1 else 0
                held = set(order[:n_val])
                splits["val"] = [rows[i] for i in sorted(held)]
                splits["train"] = [r for i, r in enumerate(rows) if i not in held]
            self._cache = splits
        return self._cache

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(k for k in ("train", "val", "test") if k != "test" or self.paths["test"] is not None)

    def rows(self, split: str) -> list[tuple[str, dict]]:
        if split not in self.splits:
            raise DataError(f"data.source.{split} is not set: this data has no {split} split (pass a file, e.g. "
                            f"data.source.{split}=FILE; eval.py eval.split=val scores the val split, named val/)")
        return self._load()[split]
