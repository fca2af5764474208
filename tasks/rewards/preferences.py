"""Human preference rankings → (chosen, rejected) pairs for reward-model training.

A record holds a ``prompt``, its ``responses`` (2 or more; the seeds' ``response`` is
accepted too) and a ``ranking`` of them, in one of two forms:

- ranks, one per response, 1 = best: ``[2, 1, 3]`` prefers response 2, then 1, then 3;
  equal ranks are ties;
- the seeds' binary labels of a pair: two responses, ``[1, 0]`` or ``[0, 1]``,
  1 marking the preferred one (``[1, 1]`` and ``[0, 0]`` are ties).

Every ordered pair that a ranking implies becomes one training pair (a ranking of n
distinct ranks gives n(n-1)/2); ties give none. Malformed records are reported by line
and skipped; if no pair is left, that is an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import pandas as pd

from tasks.errors import InputError

logger = logging.getLogger(__name__)


class PreferenceError(InputError, ValueError):
    """Preference data that cannot be used at all."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    line: int  # where the record came from, for tracing a pair back to its annotation


@dataclass(frozen=True)
class Problem:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class PairSet:
    pairs: list[Pair] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    records: int = 0
    ties: int = 0  # response pairs left out because they were ranked equal


def pairs_from_ranking(responses: list[str], ranking: list) -> list[tuple[int, int]]:
    """(preferred index, other index) for every ordered pair the ranking implies.

    Raises :class:`ValueError` naming what is wrong with the ranking.
    """
    if len(responses) < 2:
        raise ValueError(f"needs at least 2 responses, got {len(responses)}")
    if len(ranking) != len(responses):
        raise ValueError(f"{len(ranking)} ranks for {len(responses)} responses")
    values = [_integer(value) for value in ranking]
    if len(responses) == 2 and set(values) <= {0, 1}:
        scores = values  # binary labels: 1 = preferred
    else:
        if any(value < 1 for value in values):
            raise ValueError(f"unknown rank values {ranking}: ranks are 1 (best), 2, ...; "
                             "0/1 labels are for pairs only")
        scores = [-value for value in values]  # rank 1 is best
    return [(i, j) if scores[i] > scores[j] else (j, i)
            for i, j in combinations(range(len(responses)), 2) if scores[i] != scores[j]]


def build_pairs(records: list[tuple[int, dict]]) -> PairSet:
    """Pairs from ``(line, record)`` items; malformed records land in ``problems``, not in pairs."""
    result = PairSet()
    for line, record in records:
        result.records += 1
        try:
            prompt, responses, ranking = _fields(record)
            ordered = pairs_from_ranking(responses, ranking)
        except ValueError as err:
            result.problems.append(Problem(line, str(err)))
            continue
        result.ties += len(responses) * (len(responses) - 1) // 2 - len(ordered)
        result.pairs.extend(Pair(prompt, responses[i], responses[j], line) for i, j in ordered)
    for problem in result.problems:
        logger.warning("skipped preference record: %s", problem)
    return result


def read_records(path: Path) -> list[tuple[int, dict]]:
    """``(line, record)`` from a local .jsonl, .csv or .parquet file.

    jsonl: the physical line; csv: the data row's line (the header is line 1); parquet:
    the row number from 1. A jsonl line that is not a JSON object becomes a record that
    :func:`build_pairs` reports. In csv files, ``responses`` and ``ranking`` are JSON lists.
    """
    path = Path(path)
    if not path.is_file():
        raise PreferenceError(f"preference file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                value = {"__error__": f"not valid JSON ({err.msg})"}
            records.append((number, value if isinstance(value, dict) else {"__error__": "not a JSON object"}))
        return records
    if suffix == ".csv":
        frame, offset = pd.read_csv(path, keep_default_na=False), 2
    elif suffix == ".parquet":
        frame, offset = pd.read_parquet(path), 1
    else:
        raise PreferenceError(f"unsupported preference file type {suffix!r}: use .jsonl, .csv or .parquet")
    return [(index + offset, _decode_lists(row)) for index, row in enumerate(frame.to_dict("records"))]


def load_pairs(source: str, cache_dir: Path | None = None) -> PairSet:
    """Pairs from a local file or an ``s3://`` object; an error if not one usable pair is left."""
    if source.startswith("s3://"):
        import tempfile

        from tasks.io.s3 import download_file

        target = Path(cache_dir or tempfile.mkdtemp(prefix="detox-prefs-")) / Path(source).name
        path = download_file(source, target)
    else:
        path = Path(source).expanduser()
    result = build_pairs(read_records(path))
    if not result.pairs:
        detail = "; ".join(str(problem) for problem in result.problems[:5]) or "every ranking was a tie"
        raise PreferenceError(f"no usable preference pair in {source} ({result.records} records): {detail}")
    logger.info("%d pairs from %d records of %s (%d malformed records skipped, %d tied pairs)",
                len(result.pairs), result.records, source, len(result.problems), result.ties)
    return result


def _fields(record: dict) -> tuple[str, list[str], list]:
    if "__error__" in record:
        raise ValueError(record["__error__"])
    responses = record.get("responses", record.get("response"))
    missing = [name for name, value in (("prompt", record.get("prompt")), ("responses", responses),
                                        ("ranking", record.get("ranking"))) if value is None]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    prompt, ranking = record["prompt"], record["ranking"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("empty prompt")
    if not isinstance(responses, list) or not isinstance(ranking, list):
        raise ValueError("responses and ranking must be lists")
    empty = [index + 1 for index, text in enumerate(responses) if not isinstance(text, str) or not text.strip()]
    if empty:
        raise ValueError(f"empty response text (response {', '.join(map(str, empty))})")
    return prompt, responses, ranking


def _integer(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"unknown rank value {value!r}: ranks are whole numbers")
    return int(value)


def _decode_lists(row: dict) -> dict:
    decoded = dict(row)
    for key in ("responses", "response", "ranking"):
        value = decoded.get(key)
        if isinstance(value, str):
            try:
                decoded[key] = json.loads(value)
            except json.JSONDecodeError:
                decoded["__error__"] = f"{key} is not a JSON list: {value[:40]!r}"
        elif value is not None and hasattr(value, "tolist"):  # parquet list columns arrive as arrays
            decoded[key] = value.tolist()
    return decoded
