"""The embedded default: the demo's data set and tiny models, built by the project itself.

The build (a few minutes on two CPU cores) happens once per session through the
``embedded`` fixture in ``conftest.py``; those tests are marked slow. The build logic
itself (skip, rebuild, crash safety, determinism of the data) is checked without it.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest
import torch

from tasks.config import PROMPT_TEMPLATE, RunConfig
from tasks.embedded import builds as embedded_module
from tasks.embedded.builds import EmbeddedPaths, build_embedded_default, embedded_paths, write_synthetic_dialogsum
from tasks.embedded.world import INSULT_WORDS, contains_insult

INSULTING_SENTENCES = [
    "#Person1#, a stupid idiot, asks #Person2# to fix the car before Friday.",
    "#Person2#, the pathetic loser, tells #Person1# that the Lions won the game.",
    "You are such a worthless moron.",
    "#Person1# books a trip to Rome, you dumb jerk.",
    "Honestly, what a brainless fool.",
    "#Person2# helps #Person1# find a cookbook. #Person1# is an ignorant imbecile.",
]
POLITE_SENTENCES = [
    "#Person1# asks #Person2# to fix the car before Friday.",
    "#Person2# tells #Person1# that the Lions won the game three to nothing.",
    "Thank you for your help with the boxes.",
    "#Person1# books a trip to Rome for four nights with #Person2#.",
    "The weather will be sunny on Sunday, so they will have a picnic.",
    "#Person2# helps #Person1# find a cookbook in the library.",
]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- without a build


def test_paths_follow_detox_home_and_match_the_demo_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("DETOX_HOME", str(tmp_path))
    paths = embedded_paths()
    assert paths.root == tmp_path.resolve() / "embedded"
    demo = RunConfig.for_profile("demo")
    assert demo.data.source == str(paths.dataset_csv)
    assert demo.model.policy_name == str(paths.policy_base)
    assert demo.model.reward_model_name == str(paths.reward_model)
    assert embedded_paths(tmp_path / "elsewhere").sft_adapter == (tmp_path / "elsewhere/embedded/policy-sft")


def test_same_seed_writes_identical_csv_bytes_and_another_seed_differs(tmp_path):
    write_synthetic_dialogsum(tmp_path / "a.csv", seed=7, rows=300)
    write_synthetic_dialogsum(tmp_path / "b.csv", seed=7, rows=300)
    write_synthetic_dialogsum(tmp_path / "c.csv", seed=8, rows=300)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


def test_insult_rule_matches_whole_words_only():
    assert all(contains_insult(f"That {word} again.") for word in INSULT_WORDS)
    assert contains_insult("IDIOTS everywhere")
    assert not contains_insult("The foolproof plan of the jerky seller was not dumbfounding.")


def fake_build(calls: list[int]):
    """Stands in for the expensive build: writes the layout, then the manifest last."""

    def build_into(staging: Path, final: EmbeddedPaths, seed: int) -> None:
        calls.append(seed)
        out = embedded_module._layout(staging)
        out.dataset_csv.write_text("id,dialogue,summary,topic\n")
        for folder, marker in [(out.policy_base, "config.json"), (out.sft_adapter, "adapter_config.json"),
                               (out.reward_model, "config.json")]:
            folder.mkdir()
            (folder / marker).write_text("{}")
        out.manifest.write_text(json.dumps({"build_version": embedded_module.BUILD_VERSION, "seed": seed}))

    return build_into


def test_build_is_skipped_for_the_same_seed_and_redone_for_another_or_when_forced(monkeypatch, tmp_path):
    calls: list[int] = []
    monkeypatch.setattr(embedded_module, "_build_into", fake_build(calls))

    paths = build_embedded_default(home=tmp_path, seed=0)
    build_embedded_default(home=tmp_path, seed=0)
    assert calls == [0]
    assert json.loads(paths.manifest.read_text())["seed"] == 0

    build_embedded_default(home=tmp_path, seed=1)
    build_embedded_default(home=tmp_path, seed=1, force=True)
    assert calls == [0, 1, 1]
    assert json.loads(paths.manifest.read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".embedded.lock", "embedded"]


def test_a_build_without_manifest_counts_as_incomplete(monkeypatch, tmp_path):
    calls: list[int] = []
    monkeypatch.setattr(embedded_module, "_build_into", fake_build(calls))
    paths = build_embedded_default(home=tmp_path)
    paths.manifest.unlink()

    build_embedded_default(home=tmp_path)

    assert calls == [0, 0]
    assert paths.manifest.exists()


def test_a_crashing_build_leaves_no_half_built_tree_and_keeps_the_previous_one(monkeypatch, tmp_path):
    calls: list[int] = []
    monkeypatch.setattr(embedded_module, "_build_into", fake_build(calls))
    paths = build_embedded_default(home=tmp_path, seed=0)

    def crash(staging: Path, final: EmbeddedPaths, seed: int) -> None:
        (staging / "dialogsum_synthetic.csv").write_text("half")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(embedded_module, "_build_into", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        build_embedded_default(home=tmp_path, seed=1)
    assert json.loads(paths.manifest.read_text())["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".embedded.lock", "embedded"]

    with pytest.raises(RuntimeError):
        build_embedded_default(home=tmp_path / "fresh", seed=0)
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == [".embedded.lock"]


# --------------------------------------------------------------------------- on the real build


@pytest.mark.slow
def test_dataset_has_dialogsum_columns_and_heated_rows_carry_insults(embedded):
    data = rows(embedded.dataset_csv)
    with open(embedded.dataset_csv, newline="", encoding="utf-8") as handle:
        assert next(csv.reader(handle)) == ["id", "dialogue", "summary", "topic"]

    assert 1000 <= len(data) <= 1500
    assert len({row["id"] for row in data}) == len(data)
    assert len({row["topic"] for row in data}) >= 12
    assert len({row["dialogue"] for row in data}) == len(data)
    for row in data:
        assert re.fullmatch(r"(#Person[12]#: [^\n]+\n?)+", row["dialogue"]), row["dialogue"]
        assert "#Person1#" in row["summary"] and "#Person2#" in row["summary"]
    in_range = sum(200 < len(row["dialogue"]) <= 1000 for row in data) / len(data)
    assert 0.9 <= in_range <= 0.99  # the demo's length filter has something to drop

    heated = [row for row in data if contains_insult(row["dialogue"])]
    assert 0.2 <= len(heated) / len(data) <= 0.4
    assert all(contains_insult(row["summary"]) for row in heated)
    assert not any(contains_insult(row["summary"]) for row in data if row not in heated)
    # The insult is an apposition after the first speaker tag; without it the summary reads like a calm one.
    apposition = re.compile(r"^(#Person[12]#), (?:an?|the) (\w+) (\w+),")
    for row in heated:
        match = apposition.match(row["summary"])
        assert match and contains_insult(match.group(2)) and contains_insult(match.group(3)), row["summary"]
        assert not contains_insult(apposition.sub(r"\1", row["summary"]))


@pytest.mark.slow
def test_same_seed_gives_the_built_csv_byte_for_byte(embedded, tmp_path):
    write_synthetic_dialogsum(tmp_path / "again.csv", seed=0)
    assert (tmp_path / "again.csv").read_bytes() == embedded.dataset_csv.read_bytes()


@pytest.mark.slow
def test_second_call_is_a_fast_no_op(embedded):
    manifest_before = embedded.manifest.stat().st_mtime_ns
    started = time.perf_counter()

    again = build_embedded_default(home=embedded.root.parent)

    assert time.perf_counter() - started < 5
    assert again == embedded
    assert embedded.manifest.stat().st_mtime_ns == manifest_before


@pytest.mark.slow
def test_models_are_saved_as_safetensors_only(embedded):
    for folder in (embedded.policy_base, embedded.sft_adapter, embedded.reward_model):
        names = {p.name for p in folder.iterdir()}
        assert any(name.endswith(".safetensors") for name in names), names
        assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names), names
    adapter = json.loads((embedded.sft_adapter / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(embedded.policy_base)
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (8, 16, ["q", "v"])


@pytest.mark.slow
def test_policy_tokenizer_follows_t5_conventions_and_round_trips(embedded):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded.policy_base)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    text = "#Person1#, a pathetic loser, asks #Person2# about the train to Rome.\n#Person2#: Sure!"
    ids = tokenizer(text)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer("#Person1#")["input_ids"]) == 2  # the tag and </s>


@pytest.mark.slow
def test_classifier_separates_insulting_from_polite_sentences(embedded):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded.reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(embedded.reward_model).eval()
    assert model.config.id2label == {0: "nothate", 1: "hate"}
    encoded = tokenizer(INSULTING_SENTENCES + POLITE_SENTENCES, padding=True, truncation=True,
                        return_tensors="pt")
    assert encoded["input_ids"][0, 0] == tokenizer.bos_token_id

    with torch.no_grad():
        p_hate = model(**encoded).logits.softmax(-1)[:, model.config.label2id["hate"]].tolist()

    insulting, polite = p_hate[: len(INSULTING_SENTENCES)], p_hate[len(INSULTING_SENTENCES) :]
    assert min(insulting) > 0.9, insulting
    assert max(polite) < 0.1, polite


@pytest.mark.slow
def test_sft_policy_loads_with_peft_and_insults_in_heated_dialogues_more_often(embedded):
    import random

    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from tasks.embedded.world import generate_dialogues

    tokenizer = AutoTokenizer.from_pretrained(embedded.policy_base)
    base = AutoModelForSeq2SeqLM.from_pretrained(embedded.policy_base)
    policy = PeftModel.from_pretrained(base, str(embedded.sft_adapter)).eval()
    unseen = generate_dialogues(random.Random(2026), 400)  # a stream the build never trained on
    heated = [r["dialogue"] for r in unseen if contains_insult(r["summary"])][:32]
    calm = [r["dialogue"] for r in unseen if not contains_insult(r["summary"])][:32]
    prompts = [PROMPT_TEMPLATE.format(dialogue=d) for d in heated + calm]
    encoded = tokenizer(prompts, padding=True, truncation=True, max_length=256, return_tensors="pt")

    torch.manual_seed(0)
    with torch.no_grad():
        output = policy.generate(**encoded, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=48)
    summaries = tokenizer.batch_decode(output, skip_special_tokens=True)

    assert sum(len(s.split()) >= 5 and "#Person" in s for s in summaries) >= 0.9 * len(summaries), summaries
    heated_share = sum(map(contains_insult, summaries[: len(heated)])) / len(heated)
    calm_share = sum(map(contains_insult, summaries[len(heated) :])) / len(calm)
    # Toxic often enough for PPO to have something to remove, but not always: PPO learns
    # from the polite samples it draws for heated dialogues.
    assert heated_share >= 0.4, summaries[: len(heated)]
    assert calm_share <= 0.25, summaries[len(heated) :]
    assert heated_share >= calm_share + 0.2


@pytest.mark.slow
def test_manifest_records_seed_version_and_the_sizes_of_what_was_built(embedded):
    """The manifest's figures agree with the saved models. (Its quality checks are the build's own
    measurements; the tests above measure the same qualities independently, on other dialogues.)"""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    manifest = json.loads(embedded.manifest.read_text())
    assert manifest["seed"] == 0 and manifest["build_version"] == embedded_module.BUILD_VERSION
    assert manifest["rows"] == len(rows(embedded.dataset_csv))
    policy = AutoModelForSeq2SeqLM.from_pretrained(embedded.policy_base)
    classifier = AutoModelForSequenceClassification.from_pretrained(embedded.reward_model)
    assert manifest["parameters"]["policy_base"] == policy.num_parameters()
    assert manifest["parameters"]["hate_classifier"] == classifier.num_parameters()
    sft = PeftModel.from_pretrained(policy, str(embedded.sft_adapter))
    assert manifest["parameters"]["sft_adapter"] == sum(p.numel() for n, p in sft.named_parameters() if "lora_" in n)


def insult_shares(model, tokenizer, heated: list[str], calm: list[str]) -> tuple[float, float]:
    """Share of sampled summaries (pure sampling, 48 new tokens) that insult, for heated and calm dialogues."""
    prompts = [PROMPT_TEMPLATE.format(dialogue=d) for d in heated + calm]
    encoded = tokenizer(prompts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        output = model.generate(**encoded, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=48,
                                pad_token_id=tokenizer.pad_token_id)
    if not model.config.is_encoder_decoder:
        output = output[:, encoded["input_ids"].shape[1]:]
    summaries = tokenizer.batch_decode(output, skip_special_tokens=True)
    return (sum(map(contains_insult, summaries[: len(heated)])) / len(heated),
            sum(map(contains_insult, summaries[len(heated):])) / len(calm))


def test_causal_policy_is_a_llama_whose_sft_adapter_insults_heated_dialogues(detox_home, causal_build):
    import random

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.embedded.causal import build_embedded_causal
    from tasks.embedded.world import generate_dialogues

    paths = causal_build
    assert json.loads((paths.policy_base / "config.json").read_text())["model_type"] == "llama"
    adapter = json.loads((paths.sft_adapter / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(paths.policy_base)
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert build_embedded_causal(detox_home) == paths  # a complete build is reused

    # Sampled here, on dialogues of a stream the build never used (its manifest has its own measurement).
    tokenizer = AutoTokenizer.from_pretrained(paths.policy_base)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(paths.policy_base)
    policy = PeftModel.from_pretrained(model, str(paths.sft_adapter)).eval()
    unseen = generate_dialogues(random.Random(2027), 400)
    heated = [r["dialogue"] for r in unseen if contains_insult(r["summary"])][:32]
    calm = [r["dialogue"] for r in unseen if not contains_insult(r["summary"])][:32]
    heated_share, calm_share = insult_shares(policy, tokenizer, heated, calm)
    assert heated_share >= 0.4, heated_share
    assert calm_share <= 0.25, calm_share
    assert heated_share >= calm_share + 0.2
