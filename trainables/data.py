"""Load, validate and split labelled text.

Formats: CSV, TSV, JSON Lines, Parquet, or a ``datasets`` folder saved with ``save_to_disk``.
Every problem is raised as :class:`InputError` naming the file, column or row, before any training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from trainables.config import DataSettings
from trainables.errors import InputError

BUILTIN = "builtin:"


@dataclass
class Split:
    """Texts with label indices into :attr:`Dataset.label_names`."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Dataset:
    label_names: list[str]
    train: Split
    eval: Split | None = None
    test: Split | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def splits(self) -> dict[str, Split]:
        return {k: v for k, v in (("train", self.train), ("eval", self.eval), ("test", self.test)) if v}

    def fingerprint(self) -> str:
        """Content hash of texts, labels and label names of all splits (16 hex digits)."""
        h = hashlib.sha256(json.dumps(self.label_names).encode())
        for name, s in self.splits().items():
            h.update(name.encode())
            _hash_split(h, s)
        return h.hexdigest()[:16]

    def split_digest(self, name: str) -> str:
        """Content hash of one split's texts and labels with the label names (16 hex digits)."""
        h = hashlib.sha256(json.dumps(self.label_names).encode())
        _hash_split(h, self.splits()[name])
        return h.hexdigest()[:16]


def _hash_split(h, s: Split) -> None:
    for t, y in zip(s.texts, s.labels):
        h.update(t.encode("utf-8"))
        h.update(b"\x00%d\x01" % y)


def builtin_path(ref: str) -> Path:
    """``builtin:demo/train.csv`` -> the packaged demo file."""
    name = ref[len(BUILTIN):]
    if not name.startswith("demo/"):
        raise InputError(f"{ref}: unknown built-in data set (available: builtin:demo/train.csv, eval.csv, test.csv)")
    p = Path(__file__).resolve().parent / "demo_data" / name[len("demo/"):]
    if not p.is_file():
        raise InputError(f"{ref}: no such built-in file")
    return p


def resolve_path(ref: str) -> Path:
    return builtin_path(ref) if ref.startswith(BUILTIN) else Path(ref)


def _check_utf8(path: Path) -> None:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"{path}: not UTF-8 text (line {line}, byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
        ) from None


def read_table(path: Path) -> pd.DataFrame:
    """Read one file or ``save_to_disk`` folder into a DataFrame (all values as read)."""
    if not path.exists():
        raise InputError(f"{path}: data file not found")
    if path.is_dir():
        return _read_datasets_folder(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv", ".txt"):
            _check_utf8(path)
            sep = "\t" if suffix == ".tsv" else ","
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
        if suffix in (".jsonl", ".json", ".ndjson"):
            _check_utf8(path)
            return _read_jsonl(path)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except InputError:
        raise
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: file is empty") from None
    except Exception as e:  # noqa: BLE001 - parser errors come in many types
        raise InputError(f"{path}: cannot parse ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    raise InputError(f"{path}: unknown format '{suffix}' (use .csv, .tsv, .jsonl, .parquet or a save_to_disk folder)")


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}: line {i}: expected a JSON object per line")
            rows.append(obj)
    if not rows:
        raise InputError(f"{path}: file is empty")
    return pd.DataFrame(rows)


def _read_datasets_folder(path: Path) -> pd.DataFrame:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a datasets folder saved with save_to_disk ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise InputError(
            f"{path}: a DatasetDict with splits {list(ds)}; point data.train/eval/test at "
            f"{path}/<split> folders"
        )
    return ds.to_pandas()


def _column(df: pd.DataFrame, col: str, path: Path, what: str) -> pd.Series:
    if col not in df.columns:
        cols = ", ".join(map(str, df.columns[:20]))
        raise InputError(f"{path}: no {what} column '{col}' (columns: {cols}); set data.{what}_column")
    return df[col]


def _texts(series: pd.Series, path: Path, col: str, max_chars: int) -> list[str]:
    out = []
    for i, v in enumerate(series.tolist(), 1):
        if not isinstance(v, str):
            kind = "missing" if v is None or (isinstance(v, float) and pd.isna(v)) else type(v).__name__
            raise InputError(f"{path}: row {i}: column '{col}' is not text ({kind})")
        if not v.strip():
            raise InputError(f"{path}: row {i}: empty text in column '{col}'")
        if len(v) > max_chars:
            raise InputError(
                f"{path}: row {i}: text of {len(v):,} characters exceeds data.max_text_chars={max_chars:,}"
            )
        out.append(v)
    return out


def _raw_labels(series: pd.Series, path: Path, col: str) -> list[str | int]:
    vals = series.tolist()
    out: list[str | int] = []
    for i, v in enumerate(vals, 1):
        if v is None or (isinstance(v, float) and pd.isna(v)) or (isinstance(v, str) and not v.strip()):
            raise InputError(f"{path}: row {i}: missing label in column '{col}'")
        if isinstance(v, bool) or isinstance(v, float) and not float(v).is_integer():
            raise InputError(f"{path}: row {i}: label {v!r} in column '{col}' is neither text nor an integer")
        if isinstance(v, float):
            v = int(v)
        if hasattr(v, "item"):  # numpy scalars
            v = v.item()
        out.append(v.strip() if isinstance(v, str) else v)
    # integer labels written as text ("0", "1") count as integers when all of them are
    if all(isinstance(v, str) and v.lstrip("-").isdigit() for v in out):
        out = [int(v) for v in out]
    return out


def _read_split(ref: str, cfg: DataSettings) -> tuple[list[str], list[str | int], Path]:
    path = resolve_path(ref)
    df = read_table(path)
    if len(df) == 0:
        raise InputError(f"{path}: no rows")
    texts = _texts(_column(df, cfg.text_column, path, "text"), path, cfg.text_column, cfg.max_text_chars)
    labels = _raw_labels(_column(df, cfg.label_column, path, "label"), path, cfg.label_column)
    return texts, labels, path


def _label_names(cfg: DataSettings, train_labels: list, path: Path) -> list[str]:
    if cfg.label_names:
        names = [str(n) for n in cfg.label_names]
        if len(set(names)) != len(names):
            raise InputError(f"data.label_names: names must be unique, got {names}")
        return names
    uniq = set(train_labels)
    if all(isinstance(v, int) for v in uniq):
        return [str(v) for v in sorted(uniq)]
    return sorted(str(v) for v in uniq)


def _encode(labels: list, names: list[str], cfg: DataSettings, path: Path) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for row, v in enumerate(labels, 1):
        if cfg.label_names and isinstance(v, int):
            if not 0 <= v < len(names):
                raise InputError(
                    f"{path}: row {row}: label {v} outside data.label_names (0..{len(names) - 1})"
                )
            out.append(v)
            continue
        key = str(v)
        if key not in index:
            where = "data.label_names" if cfg.label_names else "the training labels"
            raise InputError(f"{path}: row {row}: label '{key}' is not among {where} {names}")
        out.append(index[key])
    return out


def load_dataset(cfg: DataSettings) -> Dataset:
    """Read, validate and (where eval/test files are absent) split the data deterministically."""
    texts, raw, train_path = _read_split(cfg.train, cfg)
    names = _label_names(cfg, raw, train_path)
    train = Split(texts, _encode(raw, names, cfg, train_path))
    present = sorted(set(train.labels))
    if len(present) < 2:
        raise InputError(f"{train_path}: column '{cfg.label_column}' has fewer than two classes ({[names[i] for i in present]})")
    ds = Dataset(names, train, sources={"train": str(train_path)})
    for split in ("eval", "test"):
        ref = getattr(cfg, split)
        if ref:
            t, r, p = _read_split(ref, cfg)
            enc = _encode(r, names, cfg, p)
            unseen = sorted({names[y] for y in enc} - {names[y] for y in train.labels})
            if unseen:
                row = next(i for i, y in enumerate(enc, 1) if names[y] in unseen)
                raise InputError(f"{p}: row {row}: label '{unseen[0]}' never occurs in the training data {train_path}")
            setattr(ds, split, Split(t, enc))
            ds.sources[split] = str(p)
    _split_missing(ds, cfg)
    return ds


def _split_missing(ds: Dataset, cfg: DataSettings) -> None:
    """Carve absent eval/test splits out of train, stratified and seeded."""
    carved_test = 0.0
    for split, frac in (("test", cfg.split.test), ("eval", cfg.split.eval)):
        if getattr(ds, split) is not None or frac <= 0:
            continue
        from sklearn.model_selection import train_test_split  # about 1 s to import: only where a split is carved

        n = len(ds.train)
        take = frac / (1 - carved_test)  # fractions are of the original file
        if split == "test":
            carved_test = frac
        try:
            tr_x, ho_x, tr_y, ho_y = train_test_split(
                ds.train.texts, ds.train.labels, test_size=min(take, 0.9),
                random_state=cfg.split.seed, stratify=ds.train.labels,
            )
        except ValueError as e:
            raise InputError(
                f"{ds.sources['train']}: cannot split off data.split.{split}={frac} stratified from {n} rows ({e})"
            ) from None
        ds.train = Split(tr_x, tr_y)
        setattr(ds, split, Split(ho_x, ho_y))
        ds.sources[split] = f"{ds.sources['train']} (split {split}={frac}, seed {cfg.split.seed})"
