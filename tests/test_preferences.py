import json

import pandas as pd
import pytest

from tasks.rewards.preferences import PreferenceError, build_pairs, load_pairs, pairs_from_ranking, read_records


def texts(pairs):
    return [(p.chosen, p.rejected) for p in pairs]


@pytest.mark.parametrize(
    ("ranking", "expected"),
    [
        ([1, 2], [(0, 1)]),
        ([2, 1], [(1, 0)]),
        ([2, 1, 3], [(1, 0), (0, 2), (1, 2)]),
        ([4, 1, 3, 2], [(2, 0), (1, 0), (3, 0), (1, 2), (1, 3), (3, 2)]),
    ],
)
def test_every_ordered_pair_of_a_ranking(ranking, expected):
    pairs = pairs_from_ranking([f"r{i}" for i in range(len(ranking))], ranking)
    assert sorted(pairs) == sorted(expected)
    assert len(pairs) == len(ranking) * (len(ranking) - 1) // 2


def test_ties_give_no_pair():
    assert sorted(pairs_from_ranking(["a", "b", "c", "d"], [1, 1, 2, 2])) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert pairs_from_ranking(["a", "b"], [2, 2]) == []


@pytest.mark.parametrize(("labels", "expected"), [([1, 0], [(0, 1)]), ([0, 1], [(1, 0)]), ([1, 1], []), ([0, 0], [])])
def test_binary_labels_of_a_pair_as_in_the_seeds(labels, expected):
    assert pairs_from_ranking(["a", "b"], labels) == expected


def test_records_become_prompt_chosen_rejected():
    result = build_pairs([
        (1, {"prompt": "Summarize: A and B talk.", "responses": ["A asks B.", "A, an idiot, asks B."],
             "ranking": [1, 2]}),
        (2, {"prompt": "Summarize: C and D talk.", "response": ["C, a fool, asks D.", "C asks D."],
             "ranking": [0, 1]}),
        (3, {"prompt": "p", "responses": ["x", "y", "z"], "ranking": [1, 1, 1]}),
    ])
    assert texts(result.pairs) == [("A asks B.", "A, an idiot, asks B."), ("C asks D.", "C, a fool, asks D.")]
    assert [p.prompt for p in result.pairs] == ["Summarize: A and B talk.", "Summarize: C and D talk."]
    assert result.records == 3 and result.ties == 3 and result.problems == []


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2]}, "2 ranks for 3 responses"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2, 3]}, "3 ranks for 2 responses"),
        ({"prompt": "p", "responses": ["a"], "ranking": [1]}, "at least 2 responses"),
        ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]}, "unknown rank values"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [-1, 2]}, "unknown rank values"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [1.5, 2]}, "unknown rank value 1.5"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": ["best", "worst"]}, "unknown rank value 'best'"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}, "unknown rank value True"),
        ({"prompt": "p", "responses": ["a", "  "], "ranking": [1, 2]}, "empty response text (response 2)"),
        ({"prompt": "", "responses": ["a", "b"], "ranking": [1, 2]}, "empty prompt"),
        ({"prompt": "p", "ranking": [1, 2]}, "missing field(s) ['responses']"),
        ({"prompt": "p", "responses": "a b", "ranking": [1, 2]}, "must be lists"),
    ],
)
def test_malformed_records_are_reported_by_line_and_skipped(record, reason):
    good = {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2]}
    result = build_pairs([(1, good), (7, record)])
    assert texts(result.pairs) == [("a", "b")]
    assert len(result.problems) == 1
    assert result.problems[0].line == 7
    assert reason in str(result.problems[0])
    assert str(result.problems[0]).startswith("line 7: ")


def test_jsonl_lines_are_numbered_as_in_the_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [2, 1]})
    path.write_text(f"{good}\n\n{{not json\n[1, 2]\n{good}\n")
    result = build_pairs(read_records(path))
    assert [(p.line, p.chosen) for p in result.pairs] == [(1, "b"), (5, "b")]
    reasons = [(p.line, p.reason.split(" (")[0]) for p in result.problems]
    assert reasons == [(3, "not valid JSON"), (4, "not a JSON object")]


def test_csv_and_parquet_carry_lists(tmp_path):
    frame = pd.DataFrame({"prompt": ["p", "q"], "responses": [["a", "b", "c"], ["d", "e"]],
                          "ranking": [[3, 1, 2], [1, 0]]})
    frame.to_parquet(tmp_path / "prefs.parquet")
    frame.assign(responses=frame["responses"].map(json.dumps), ranking=frame["ranking"].map(json.dumps)).to_csv(
        tmp_path / "prefs.csv", index=False)
    for name in ("prefs.parquet", "prefs.csv"):
        result = load_pairs(str(tmp_path / name))
        assert sorted(texts(result.pairs)) == [("b", "a"), ("b", "c"), ("c", "a"), ("d", "e")]
    assert sorted({p.line for p in load_pairs(str(tmp_path / "prefs.csv")).pairs}) == [2, 3]  # header is line 1


def test_no_usable_pair_is_a_clear_error(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 1]}) + "\n"
                    + json.dumps({"prompt": "p", "responses": ["a"], "ranking": [1]}) + "\n")
    with pytest.raises(PreferenceError, match=r"no usable preference pair in .*prefs.jsonl \(2 records\): "
                                              r"line 2: needs at least 2 responses"):
        load_pairs(str(path))
    with pytest.raises(PreferenceError, match="does not exist"):
        load_pairs(str(tmp_path / "missing.jsonl"))
    with pytest.raises(PreferenceError, match="unsupported preference file type '.txt'"):
        (tmp_path / "prefs.txt").write_text("x")
        load_pairs(str(tmp_path / "prefs.txt"))
