"""The embedded default's preference data and reward-model starting point, what the
``reward_model_train`` DAG needs on the demo profile. :func:`build_embedded_reward` writes under
``<home>/embedded-reward`` synthetic human rankings of summaries (from
:func:`tasks.embedded.world.preference_records`, on a stream no other model saw) and an untrained
tiny RoBERTa with a one-output head on the hate classifier's tokenizer, built once per seed into a
folder renamed into place like the embedded default it depends on.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from tasks.embedded.builds import build_once, embedded_paths, resolve_home, substream, torch_settings
from tasks.embedded.world import preference_records

logger = logging.getLogger(__name__)

REWARD_BUILD_VERSION = 1
PREFERENCE_RECORDS = 500


@dataclass(frozen=True)
class RewardPaths:
    """What ``reward_model_train`` needs on the embedded default: preferences and an encoder to start from."""

    root: Path
    preferences: Path
    reward_base: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def reward_paths(home: Path | None = None) -> RewardPaths:
    root = resolve_home(home) / "embedded-reward"
    return RewardPaths(root=root, preferences=root / "preferences.jsonl", reward_base=root / "reward-base")


def build_embedded_reward(home: Path | None = None, seed: int = 0, force: bool = False) -> RewardPaths:
    """Synthetic human preferences and an untrained tiny RoBERTa under ``<home>/embedded-reward``.

    ``preferences.jsonl`` holds :data:`PREFERENCE_RECORDS` rankings of summaries of
    dialogues from a stream no other model saw: the polite summary is always preferred to
    one that insults, and more insults rank lower. Records come in the three shapes the
    format allows: binary labels of a pair (the seeds' form), ranks of three responses, and
    ranks of four with a tie between two polite ones.

    ``reward-base`` is a RoBERTa-architecture encoder with a one-output head and random
    weights, using the hate classifier's tokenizer (so build the embedded default first):
    it plays the part of ``roberta-base``, which the production profile fine-tunes.
    """
    paths = reward_paths(home)
    tokenizer_dir = embedded_paths(home).reward_model
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer: build the embedded default first")
    build_once(paths.root, REWARD_BUILD_VERSION, seed, [paths.reward_base / "config.json"], force,
                lambda staging: _build_reward_into(staging, tokenizer_dir, seed))
    return paths


def _build_reward_into(staging: Path, tokenizer_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    records = preference_records(random.Random(substream(seed, "preferences")), PREFERENCE_RECORDS)
    with open(staging / "preferences.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = 512
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=514,  # roberta-base's: 512 tokens after the padding offset
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    with torch_settings():
        torch.manual_seed(seed + 4)
        model = RobertaForSequenceClassification(config)
    model.save_pretrained(staging / "reward-base", safe_serialization=True)
    tokenizer.save_pretrained(staging / "reward-base")
    pairs = sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in records)
    manifest = {"build_version": REWARD_BUILD_VERSION, "seed": seed, "records": len(records),
                "response_pairs": pairs, "parameters": {"reward_base": model.num_parameters()}}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("embedded preferences and reward base built: %s", json.dumps(manifest))
