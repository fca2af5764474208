import json

import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tasks.config import DataConfig
from tasks.io.dialogues import DataError, load_prepared, prepare_dataset

CONFIG = DataConfig(source="unused", min_dialogue_chars=20, max_dialogue_chars=200, test_size=0.25)


@pytest.fixture(scope="module")
def tokenizer():
    words = "<pad> </s> <unk> summarize the following conversation summary : hello".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def dialogue(i: int, length: int = 60) -> str:
    text = f"#Person1#: Hello number {i}.\n#Person2#: Hi there, how are you today?"
    return (text * 5)[:length]


def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def good_rows(n):
    return [{"id": f"r{i}", "dialogue": dialogue(i), "summary": f"They greet {i}.", "topic": "greeting"}
            for i in range(n)]


def test_bad_rows_are_counted_and_skipped(tmp_path, tokenizer):
    rows = good_rows(8) + [
        {"id": "empty", "dialogue": "", "summary": "x", "topic": "t"},
        {"id": "short", "dialogue": "#Person1#: Hi.", "summary": "x", "topic": "t"},
        {"id": "long", "dialogue": dialogue(0, 500), "summary": "x", "topic": "t"},
        {"id": "nosummary", "dialogue": dialogue(1), "summary": "", "topic": "t"},
    ]
    source = write_csv(tmp_path / "rows.csv", rows)
    prepared = prepare_dataset(CONFIG.model_copy(update={"source": source}), tokenizer, tmp_path / "out")
    assert prepared.rows_read == 12
    assert prepared.skipped == {"empty_dialogue": 1, "too_short": 1, "too_long": 1, "empty_summary": 1}
    assert prepared.train_rows + prepared.test_rows == 8
    splits, record = load_prepared(tmp_path / "out")
    assert record.fingerprint == prepared.fingerprint
    prompt = splits["test"][0]["prompt"]
    assert prompt.startswith("\nSummarize the following conversation.") and prompt.endswith("Summary:\n")
    assert "input_ids" in splits["train"].column_names


def test_split_and_fingerprint_are_deterministic(tmp_path, tokenizer):
    config = CONFIG.model_copy(update={"source": write_csv(tmp_path / "rows.csv", good_rows(20))})
    first = prepare_dataset(config, tokenizer, tmp_path / "a")
    second = prepare_dataset(config, tokenizer, tmp_path / "b")
    assert first.fingerprint == second.fingerprint
    assert load_prepared(tmp_path / "a")[0]["test"]["id"] == load_prepared(tmp_path / "b")[0]["test"]["id"]
    other_seed = prepare_dataset(config.model_copy(update={"split_seed": 7}), tokenizer, tmp_path / "c")
    assert other_seed.fingerprint != first.fingerprint


def test_jsonl_and_parquet_sources(tmp_path, tokenizer):
    frame = pd.DataFrame(good_rows(6))
    frame.to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "rows.parquet")
    for name in ("rows.jsonl", "rows.parquet"):
        config = CONFIG.model_copy(update={"source": str(tmp_path / name)})
        assert prepare_dataset(config, tokenizer, tmp_path / name.replace(".", "_")).rows_read == 6


def test_missing_columns_are_named(tmp_path, tokenizer):
    source = write_csv(tmp_path / "rows.csv", [{"id": "a", "text": "hello", "topic": "t"}])
    with pytest.raises(DataError, match=r"missing required column\(s\) \['dialogue', 'summary'\]"):
        prepare_dataset(CONFIG.model_copy(update={"source": source}), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nothing_usable_left_is_a_clear_error(tmp_path, tokenizer):
    rows = [{"id": "s", "dialogue": "#Person1#: Hi.", "summary": "x", "topic": "t"}]
    source = write_csv(tmp_path / "rows.csv", rows)
    with pytest.raises(DataError, match="no usable rows left.*too_short"):
        prepare_dataset(CONFIG.model_copy(update={"source": source}), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_and_non_utf8_files(tmp_path, tokenizer):
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        prepare_dataset(CONFIG.model_copy(update={"source": str(tmp_path / "empty.csv")}), tokenizer, tmp_path / "o")
    (tmp_path / "latin1.csv").write_bytes("id,dialogue,summary\n1,caf\xe9 talk,x\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        prepare_dataset(CONFIG.model_copy(update={"source": str(tmp_path / "latin1.csv")}), tokenizer, tmp_path / "o")


def test_failed_rerun_keeps_the_previous_output(tmp_path, tokenizer):
    config = CONFIG.model_copy(update={"source": write_csv(tmp_path / "rows.csv", good_rows(8))})
    prepare_dataset(config, tokenizer, tmp_path / "out")
    before = json.loads((tmp_path / "out" / "prepared.json").read_text())
    broken = CONFIG.model_copy(update={"source": write_csv(tmp_path / "bad.csv", [{"x": 1}])})
    with pytest.raises(DataError):
        prepare_dataset(broken, tokenizer, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "prepared.json").read_text()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
