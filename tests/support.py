"""Helpers the test modules import (``from support import ...``; pytest puts ``tests/`` on the path).

- :func:`require`: a test's outside dependency (Postgres binaries, docker-compose, Chromium),
  skipped where it is missing, failed where ``DETOX_REQUIRE`` names it (CI sets it).
- :data:`TEST_CRITIC`: the critic of the end-to-end runs, :data:`TEST_RUN` what they set;
  :data:`PROMOTING_FORM`: the trigger-form values of a short ``detox_retrain`` run that promotes.
- :func:`build_tiny_world`: the embedded default's layout (T5 policy, its SFT LoRA adapter, a
  ``nothate``/``hate`` classifier) filled with models made from a config in about a second, for
  tests that need real model folders but not trained ones.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

REQUIRE_VARIABLE = "DETOX_REQUIRE"

# The critic of the end-to-end runs: a value head on the policy's last state (production's default, at
# the rate the demo gave it before its critic got an adapter of its own). On two cores a demo PPO step
# then takes about 1.9 s instead of 3.4, and the outcomes these tests expect were measured with it. The
# demo's own critic (``ppo.critic="adapter"``) is what tests/test_end_to_end.py's replaced-champion run,
# the PPO fault and multi-process tests and the unit tests in tests/test_ppo.py train.
TEST_CRITIC = {"ppo.critic": "head", "ppo.value_learning_rate": 1e-2}

# What the end-to-end PPO runs set: the tests' critic, and a ROUGE-L tolerance of 10% instead of 5%. A
# run of a few PPO steps lands near 5% (16 steps: -4.9% here, -5.6% with the preference reward), and
# where exactly depends on the CPU that built the embedded default (see PROMOTING_FORM): these runs check
# what a promotion does, so it must not hang on that. tests/test_promotion.py tests the rule itself.
TEST_RUN = {**TEST_CRITIC, "promotion.max_rouge_l_drop": 0.1}

# Form fields (the DAG's Params, as the trigger form sets them) of a run that promotes on the embedded
# default without a champion to beat: 16 PPO steps (the demo runs 70) judged on 120 held-out prompts.
# Their outcome depends on the CPU the embedded default was built on (its float rounding changes the
# trained weights): on an AVX-512 host, toxicity 0.178 -> 0.112 (-37%; PPO seed 1: -23%), where 8 steps
# changed nothing; on the earlier hosts 8 steps took it from 0.229 to 0.130.
PROMOTING_FORM = {"ppo_steps": 16, "eval_samples": 120, "overrides": TEST_RUN}


def required_dependencies() -> set[str]:
    """The dependencies ``DETOX_REQUIRE`` (comma-separated) says must be present; ``all``: every one."""
    return {name.strip() for name in os.environ.get(REQUIRE_VARIABLE, "").split(",") if name.strip()}


def postgres_bin() -> Path | None:
    """The folder holding the PostgreSQL server binaries: ``initdb`` on the PATH, else Debian's
    ``/usr/lib/postgresql/<version>/bin`` (the newest). ``.ci/run`` looks for the same ``initdb``."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def chromium_binary() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


FINDERS: dict[str, tuple[Callable[[], object], str]] = {
    "postgres": (postgres_bin, "PostgreSQL server binaries (initdb) not installed"),
    "compose": (lambda: shutil.which("docker-compose"), "docker-compose client not installed"),
    "chromium": (chromium_binary, "chromium not installed"),
}


def require(dependency: str, found: object = None, missing: str | None = None):
    """What was found for ``dependency``; otherwise the calling test is skipped, or failed when
    ``DETOX_REQUIRE`` names ``dependency`` (or ``all``).

    ``postgres``, ``compose`` and ``chromium`` are looked up by :data:`FINDERS`; any other
    dependency passes what the caller found as ``found`` (None or false: missing). Call it in
    the test or in a fixture, e.g. ``chromium = require("chromium")``.
    """
    if found is None and dependency in FINDERS:
        finder, default_reason = FINDERS[dependency]
        found = finder()
        missing = missing or default_reason
    if found:
        return found
    reason = missing or f"{dependency} not available"
    required = required_dependencies()
    if dependency in required or "all" in required:
        pytest.fail(f"{reason}, and {REQUIRE_VARIABLE}={os.environ[REQUIRE_VARIABLE]} requires {dependency}",
                    pytrace=False)
    pytest.skip(reason)


def shared_root(config) -> Path:
    """A folder every process of this test session sees: the base temporary folder, or under
    pytest-xdist the controller's, which holds each worker's."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


def copy_embedded_builds(source: Path, home: Path, names: tuple[str, ...] | None = None) -> None:
    """The embedded builds of ``source`` (those in ``names``, default all) into ``home``, their
    adapters pointed at the copied base models."""
    for build in source.glob("embedded*"):
        if build.is_dir() and (names is None or build.name in names) and not (home / build.name).exists():
            shutil.copytree(build, home / build.name)
    for adapter_config in home.glob("embedded*/**/adapter_config.json"):
        config = json.loads(adapter_config.read_text())
        parts = Path(config["base_model_name_or_path"]).parts
        start = next(i for i, part in enumerate(parts) if part.startswith("embedded"))
        config["base_model_name_or_path"] = str(home.joinpath(*parts[start:]))
        adapter_config.write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------
# Tiny models made from a config
# ---------------------------------------------------------------------------------------------

WORDS = ("summarize the following conversation summary : # person1 person2 hi hello a an is you are "
         "stupid idiot moron thanks for help with boxes car rome trip book fix friday game").split()


def _word_tokenizer(special: list[str], template: str | None, **roles: str):
    """A word-level fast tokenizer: ``special`` first (their ids in that order), then :data:`WORDS`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*special, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=roles["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(token, vocab[token]) for token in special if token in template])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=512, **roles)


def tiny_t5(folder: Path) -> Path:
    """A T5 policy (one layer each side, d_model 16) with T5's token conventions (pad 0, eos 1, unk 2)."""
    import torch
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>",
                                unk_token="<unk>")
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                      num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                               max_new_tokens=8)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_sft_adapter(base: Path, folder: Path) -> Path:
    """A LoRA adapter (r=4 on q and v) of ``base`` with non-zero weights, naming ``base`` as its base model."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(1)
    model = get_peft_model(T5ForConditionalGeneration.from_pretrained(base),
                           LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, lora_alpha=8, target_modules=["q", "v"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a merge would change nothing
                parameter.normal_(0, 0.02)
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_classifier(folder: Path, labels: tuple[str, ...] | None = ("nothate", "hate")) -> Path:
    """A RoBERTa sequence classifier with the labels ``nothate``/``hate`` (the reward's label names),
    or with ``labels=None`` one output, as a preference reward model starts."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tokenizer = _word_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", bos_token="<s>",
                                pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2)
    if labels is None:
        config.num_labels = 1
    else:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: index for index, label in enumerate(labels)}
    torch.manual_seed(2)
    RobertaForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_world(home: Path):
    """The embedded default's folders under ``home/embedded`` (see :func:`tasks.embedded.builds.embedded_paths`),
    holding tiny untrained models instead of the built ones; no data set. The demo profile, with
    ``DETOX_HOME=home``, names them."""
    from tasks.embedded.builds import embedded_paths

    paths = embedded_paths(home)
    paths.root.mkdir(parents=True)
    tiny_t5(paths.policy_base)
    tiny_sft_adapter(paths.policy_base, paths.sft_adapter)
    tiny_classifier(paths.reward_model)
    return paths
