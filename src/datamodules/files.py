"""Reading user data: a JSONL file, a `datasets` dataset saved with `save_to_disk`, or anything
`datasets.load_dataset` takes: a hub name (`openai/gsm8k`, with a config name and a split), a local directory of
data files laid out as a hub repository, or one JSON / Parquet / CSV file.

Every row travels with `where` ("path:line" or "name[split row i]") so that an error names its origin.
Nothing is dropped silently: a bad row raises `DataError` naming the file and line. `RowMap` renames a dataset's
columns to ours (`data.columns`), extracts the final answer (`data.answer_pattern`, GSM8K's `#### (.*)`) and
wraps a plain prompt as a chat message (`data.chat`), so a standard dataset needs no preprocessing script.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
from pathlib import Path

# one file that `datasets.load_dataset` reads with a packaged builder
BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


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
    return dataset_rows(ds, str(path))


def dataset_rows(ds, origin: str) -> list[tuple[str, dict]]:
    if len(ds) == 0:
        raise DataError(f"{origin}: empty dataset, no rows")
    # a columnar dataset stores an absent key as None: treat it as absent, so the error says "missing"
    return [(f"{origin}[row {i}]", {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(ds)]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub's endpoint (HF_ENDPOINT) accepts a connection: one try, no retries. Behind a
    proxy (HTTPS_PROXY) a direct connection says nothing: datasets is left to try through it."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def load_dataset_rows(spec: str, name: str | None, split: str, key: str) -> list[tuple[str, dict]]:
    """`datasets.load_dataset(spec, name, split=split)` for a hub name or a local directory of data files (the same
    call), `load_dataset(<builder>, data_files=spec)` for one JSON / Parquet / CSV file. Offline, a hub name fails at
    once (one connection attempt, not datasets' retry loop), saying to pass a local path."""
    import datasets

    path = Path(spec)
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise DataError(f"data.source.{key}={spec}: a file must be .jsonl, {', '.join(BUILDERS)}")
        args, kw = (BUILDERS[path.suffix],), {"data_files": str(path), "split": "train"}
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "")
        if not path.exists() and not offline and not hub_reachable():
            raise DataError(
                f"data.source.{key}={spec!r} is not a local path, and the Hugging Face Hub is unreachable from here: "
                "pass a local path instead (a JSONL / JSON / Parquet / CSV file, a directory of them laid out as the "
                "hub repository, or a save_to_disk directory), or set HF_HUB_OFFLINE=1 to read datasets' cache")
        args, kw = (spec,), {"name": name, "split": split}
    if path.exists():
        # datasets caches a local directory's Arrow build under its folder name and config only: another directory
        # of the same name would be served the first one's rows. A cache directory per content avoids it.
        kw["cache_dir"] = str(Path(datasets.config.HF_DATASETS_CACHE) / "local" / local_fingerprint(path))
    try:
        ds = datasets.load_dataset(*args, **kw)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        where = f"data.source.{key}={spec!r}" + (f" (data.source.name={name!r}, split {split!r})" if not path.is_file() else "")
        raise DataError(f"{where}: datasets.load_dataset failed: {e}") from None
    return dataset_rows(ds, f"{spec}[{kw['split']}]")


def local_fingerprint(path: Path) -> str:
    """A hash of a local file's or directory's files: their paths, sizes and modification times."""
    import hashlib

    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def read_rows(path: str | Path, name: str | None = None, split: str = "train", key: str = "train") -> list[tuple[str, dict]]:
    """A JSONL file (rows named by line), a save_to_disk directory, or anything `load_dataset` reads."""
    p = Path(path)
    if p.is_file() and p.suffix == ".jsonl":
        return read_jsonl(p)
    if p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return read_hf_disk(p)
    if not p.exists() and (p.suffix in (".jsonl", *BUILDERS) or str(path).startswith((".", "/"))):
        raise FileNotFoundError(f"{path}: no such file")
    return load_dataset_rows(str(path), name, split, key)


class FileSource:
    """Train/val/test rows from files or `datasets` (hub names included); without a val source, a seeded slice of
    train is held out. Without a test source there is no test split (`splits`): its metrics would come from the
    split checkpoints are chosen on. `name` is the datasets config (GSM8K's `main`), `split` the datasets split each
    of train / val / test reads (a hub name or a directory; a file is one split)."""

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        val_fraction: float = 0.05,
        seed: int = 0,
        name: str | None = None,
        split: dict | None = None,
    ):
        if train is None:
            raise ValueError("data.source.train is required: a JSONL file, a saved `datasets` directory or a "
                             "datasets name")
        self.paths = {"train": train, "val": val, "test": test}
        self.val_fraction, self.seed, self.name = val_fraction, seed, name
        self.split = {"train": "train", "val": "validation", "test": "test"} | dict(split or {})
        self._cache: dict[str, list[tuple[str, dict]]] | None = None

    def _load(self) -> dict[str, list[tuple[str, dict]]]:
        if self._cache is None:
            splits = {k: read_rows(p, self.name, self.split[k], k) for k, p in self.paths.items() if p is not None}
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


class RowMap:
    """A source's rows in our keys: `columns` maps each of our keys to the dataset's column (`{prompt: question}`;
    the others stay), `answer_pattern` is a regex whose first group (else its whole match) is the row's `answer`
    (GSM8K: `#### (.*)`), `chat` sends a plain `prompt` through the model's chat template as a user message (with
    `system_prompt` before it). Every row is checked: a missing column or an answer the pattern does not match stops,
    naming the row."""

    def __init__(self, source, columns: dict | None = None, answer_pattern: str | None = None, chat: bool = False,
                 system_prompt: str | None = None):
        self.source, self.columns, self.chat, self.system_prompt = source, dict(columns or {}), chat, system_prompt
        try:
            self.pattern = re.compile(answer_pattern) if answer_pattern else None
        except re.error as e:
            raise ValueError(f"data.answer_pattern={answer_pattern!r}: not a regular expression ({e})") from None

    @property
    def splits(self) -> tuple[str, ...]:
        return getattr(self.source, "splits", ("train", "val", "test"))

    def row(self, where: str, row: dict) -> dict:
        out = dict(row)
        for ours, theirs in self.columns.items():
            if theirs not in row:
                raise DataError(f"{where}: data.columns.{ours}={theirs!r}: no such column; the row's columns are "
                                f"{sorted(row)}")
            out[ours] = row[theirs]
        if self.pattern is not None and "answer" in out:
            m = self.pattern.search(str(out["answer"]))
            if m is None:
                raise DataError(f"{where}: data.answer_pattern={self.pattern.pattern!r} matches nothing in the answer "
                                f"{str(out['answer'])[-200:]!r}")
            out["answer"] = (m.group(1) if m.groups() else m.group(0)).strip()
        if self.chat and isinstance(out.get("prompt"), str):
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            out["prompt"] = [*system, {"role": "user", "content": out["prompt"]}]
        return out

    def rows(self, split: str) -> list[tuple[str, dict]]:
        return [(where, self.row(where, row)) for where, row in self.source.rows(split)]
