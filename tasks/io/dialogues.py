"""Dataset preparation: dialogues in, tokenized instruction prompts out.

Reads DialogSum-style rows (``id``, ``dialogue``, ``summary``, ``topic``) from a Hub
data set, a local csv/jsonl/parquet file or ``s3://``; drops rows that are empty or
outside the dialogue length bounds (counted per reason, never silently); wraps each
dialogue in the instruction prompt; splits deterministically; tokenizes; and saves
the result atomically with a fingerprint that identifies the evaluation set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict, load_from_disk

from tasks.config import DataConfig
from tasks.errors import InputError
from tasks.io.fsutil import replace_dir

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("dialogue", "summary")
LOCAL_READERS = {
    ".csv": lambda path: pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8"),
    ".jsonl": lambda path: pd.read_json(path, lines=True, dtype=False, encoding="utf-8"),
    ".parquet": pd.read_parquet,
}


class DataError(InputError, ValueError):
    """A data source that cannot be turned into a training set; the message says why."""


@dataclass(frozen=True)
class PreparedDataset:
    path: str
    fingerprint: str
    train_rows: int
    test_rows: int
    rows_read: int
    skipped: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def load_rows(source: str, split: str = "train", cache_dir: Path | None = None) -> pd.DataFrame:
    """Rows of ``source`` as a DataFrame: local file, ``s3://`` object, or Hub data set name."""
    if source.startswith("s3://"):
        from tasks.io.s3 import download_file

        target_dir = Path(cache_dir or tempfile.mkdtemp(prefix="detox-data-"))
        local = download_file(source, target_dir / Path(source).name)
        return load_rows(str(local), split)
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_READERS:
        if not path.is_file():
            raise DataError(f"dataset file {path} does not exist")
        if path.stat().st_size == 0:
            raise DataError(f"dataset file {path} is empty")
        try:
            return LOCAL_READERS[path.suffix.lower()](path)
        except UnicodeDecodeError as err:
            raise DataError(f"dataset file {path} is not valid UTF-8 (byte offset {err.start})") from None
        except (pd.errors.EmptyDataError, pd.errors.ParserError, ValueError) as err:
            raise DataError(f"dataset file {path} cannot be parsed: {err}") from None
    if path.exists():
        raise DataError(f"unsupported dataset file type {path.suffix!r}: use .csv, .jsonl or .parquet")
    from datasets import load_dataset  # Hub path: needs network unless cached

    logger.info("loading Hub data set %s (split %s)", source, split)
    return load_dataset(source, split=split).to_pandas()


def filter_rows(frame: pd.DataFrame, config: DataConfig) -> tuple[pd.DataFrame, Counter]:
    """Keep usable rows; count every dropped row under the reason it was dropped."""
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise DataError(
            f"dataset is missing required column(s) {missing}; found {sorted(map(str, frame.columns))}"
        )
    frame = frame.copy()
    if "id" not in frame.columns:
        frame["id"] = [f"row_{i}" for i in range(len(frame))]
    if "topic" not in frame.columns:
        frame["topic"] = ""
    skipped: Counter = Counter()
    keep = []
    for dialogue, summary in zip(frame["dialogue"], frame["summary"], strict=True):
        reason = _rejection_reason(dialogue, summary, config)
        if reason:
            skipped[reason] += 1
        keep.append(reason is None)
    kept = frame.loc[keep, ["id", "dialogue", "summary", "topic"]].astype(str).reset_index(drop=True)
    duplicated = kept["id"].duplicated()
    if duplicated.any():
        skipped["duplicate_id"] += int(duplicated.sum())
        kept = kept.loc[~duplicated].reset_index(drop=True)
    return kept, skipped


def _rejection_reason(dialogue: object, summary: object, config: DataConfig) -> str | None:
    if not isinstance(dialogue, str) or not dialogue.strip():
        return "empty_dialogue"
    if not isinstance(summary, str) or not summary.strip():
        return "empty_summary"
    if len(dialogue) <= config.min_dialogue_chars:
        return "too_short"
    if len(dialogue) > config.max_dialogue_chars:
        return "too_long"
    return None


def split_rows(frame: pd.DataFrame, test_size: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic split: the same rows and seed always give the same halves."""
    order = np.random.default_rng(seed).permutation(len(frame))
    n_test = max(1, round(len(frame) * test_size))
    if len(frame) - n_test < 1:
        raise DataError(f"only {len(frame)} usable row(s): too few to hold out a test split")
    test = frame.iloc[np.sort(order[:n_test])].reset_index(drop=True)
    train = frame.iloc[np.sort(order[n_test:])].reset_index(drop=True)
    return train, test


def prepare_dataset(config: DataConfig, tokenizer, out_dir: Path, cache_dir: Path | None = None) -> PreparedDataset:
    """Build tokenized train/test splits under ``out_dir`` and return what was done."""
    frame = load_rows(config.source, config.split, cache_dir=cache_dir)
    rows_read = len(frame)
    if rows_read == 0:
        raise DataError(f"dataset {config.source} has no rows")
    kept, skipped = filter_rows(frame, config)
    for reason, count in sorted(skipped.items()):
        logger.warning("skipped %d of %d rows: %s", count, rows_read, reason)
    if kept.empty:
        raise DataError(
            f"no usable rows left in {config.source}: all {rows_read} rows were skipped ({dict(skipped)}); "
            f"dialogue length bounds are ({config.min_dialogue_chars}, {config.max_dialogue_chars}] characters"
        )
    train, test = split_rows(kept, config.test_size, config.split_seed)
    splits = DatasetDict({"train": _tokenize(train, config, tokenizer), "test": _tokenize(test, config, tokenizer)})
    fingerprint = dataset_fingerprint(splits["test"], tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        splits.save_to_disk(str(staging / "splits"))
        prepared = PreparedDataset(
            path=str(out_dir),
            fingerprint=fingerprint,
            train_rows=len(train),
            test_rows=len(test),
            rows_read=rows_read,
            skipped=dict(skipped),
        )
        (staging / "prepared.json").write_text(json.dumps(prepared.to_dict(), indent=2))
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "prepared %d train / %d test prompts from %d rows (fingerprint %s)",
        len(train), len(test), rows_read, fingerprint[:12],
    )
    return prepared


def _tokenize(frame: pd.DataFrame, config: DataConfig, tokenizer) -> Dataset:
    prompts = [config.prompt_template.format(dialogue=d) for d in frame["dialogue"]]
    encoded = tokenizer(prompts, truncation=True, max_length=config.max_prompt_tokens)
    return Dataset.from_dict({**frame.to_dict(orient="list"), "prompt": prompts, "input_ids": encoded["input_ids"]})


def dataset_fingerprint(split: Dataset, tokenizer) -> str:
    """sha256 over ids, prompt tokens and references: equal fingerprints mean the same eval set."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    for row_id, input_ids, summary in zip(split["id"], split["input_ids"], split["summary"], strict=True):
        digest.update(json.dumps([row_id, input_ids, summary]).encode())
    return digest.hexdigest()


def load_prepared(path: str | Path) -> tuple[DatasetDict, PreparedDataset]:
    """The splits and record written by :func:`prepare_dataset`."""
    root = Path(path)
    record = root / "prepared.json"
    if not record.is_file():
        raise DataError(f"{root} holds no prepared dataset (prepared.json missing); run prepare_dataset first")
    return load_from_disk(str(root / "splits")), PreparedDataset(**json.loads(record.read_text()))


