"""Reward models from human preferences: (chosen, rejected) pairs → a one-output classifier.

Training is TRL's ``RewardTrainer`` (loss −log σ(r_chosen − r_rejected), Bradley–Terry)
on a sequence classifier with ``num_labels=1``. The pairs are tokenized here, not by
TRL, with the very call that scores texts during PPO (:class:`tasks.io.models.RewardModel`):
prompt + response as one text, cut on the left when too long. So the model is trained,
evaluated and used as reward on identical inputs.

A trained model is a ``save_pretrained`` folder holding :data:`REWARD_MARKER`; registered
in MLflow (see :mod:`tasks.rewards.serving`), it is named as the reward of
``detox_retrain`` by its registry URI, ``models:/<name>@champion``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tasks.config import RewardTrainingSettings
from tasks.io.fsutil import replace_dir
from tasks.io.models import RewardModel, load_reward_tokenizer
from tasks.io.s3 import mirrored_model
from tasks.rewards.preferences import Pair

logger = logging.getLogger(__name__)

REWARD_MARKER = "detox_reward.json"
# The pyfunc a registered reward model is logged with ("models from code": logged as a file, never imported here).
SERVING_CODE = Path(__file__).with_name("serving.py")


def split_pairs(pairs: Sequence[Pair], test_size: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A deterministic train/test split by record: the pairs of one ranking never straddle it.

    At least one record goes to each side; fewer than two records is an error.
    """
    lines = sorted({pair.line for pair in pairs})
    if len(lines) < 2:
        raise ValueError(f"{len(lines)} usable preference record(s): a held-out evaluation needs at least 2")
    random.Random(seed).shuffle(lines)
    held_out = set(lines[: min(len(lines) - 1, max(1, round(test_size * len(lines))))])
    train = [pair for pair in pairs if pair.line not in held_out]
    test = [pair for pair in pairs if pair.line in held_out]
    return train, test


def write_pairs(pairs: Sequence[Pair], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(pair)) + "\n" for pair in pairs), encoding="utf-8")


def read_pairs(path: Path) -> list[Pair]:
    return [Pair(**json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_length: int):
    """A ``datasets.Dataset`` of ``chosen_ids`` / ``rejected_ids``: RewardTrainer's tokenized form."""
    from datasets import Dataset

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    return Dataset.from_dict({
        "chosen_ids": ids([pair.prompt + pair.chosen for pair in pairs]),
        "rejected_ids": ids([pair.prompt + pair.rejected for pair in pairs]),
    })


@dataclass(frozen=True)
class PairwiseEvaluation:
    pairs: int
    accuracy: float  # share of pairs with r(chosen) > r(rejected)
    margin_mean: float  # mean of r(chosen) - r(rejected)
    margin_std: float
    reward_mean: float
    reward_std: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_pairs(model_dir: str | Path, pairs: Sequence[Pair], device: str | torch.device = "cpu",
                   max_length: int = 512, batch_size: int = 64,
                   trust_remote_code: bool = False) -> tuple[PairwiseEvaluation, torch.Tensor]:
    """Held-out pairwise accuracy and margin, scored the way PPO scores; also the per-pair margins."""
    if not pairs:
        raise ValueError("no held-out pairs to evaluate")
    scorer = RewardModel(str(model_dir), batch_size=batch_size, device=device, max_length=max_length,
                         trust_remote_code=trust_remote_code)
    if not scorer.scalar:
        raise ValueError(f"{model_dir} has {scorer.model.config.num_labels} outputs; a reward model has one")
    prompts = [pair.prompt for pair in pairs]
    chosen = scorer.reward([pair.chosen for pair in pairs], prompts)
    rejected = scorer.reward([pair.rejected for pair in pairs], prompts)
    margins = chosen - rejected
    rewards = torch.cat([chosen, rejected])
    summary = PairwiseEvaluation(
        pairs=len(pairs),
        accuracy=float((margins > 0).float().mean()),
        margin_mean=float(margins.mean()),
        margin_std=float(margins.std()) if len(pairs) > 1 else 0.0,
        reward_mean=float(rewards.mean()),
        reward_std=float(rewards.std()),
    )
    return summary, margins


LogFn = Callable[[dict[str, float], int], None]


def train_reward_model(
    settings: RewardTrainingSettings,
    train_pairs: Sequence[Pair],
    out_dir: Path,
    device: str = "auto",
    trust_remote_code: bool = False,
    on_log: LogFn | None = None,
) -> dict:
    """Fine-tune ``settings.base_model`` on the pairs with TRL's RewardTrainer; save it to ``out_dir``.

    The model is written beside ``out_dir`` and renamed into place, so ``out_dir`` holds a
    complete model or nothing. ``on_log(metrics, step)`` receives the trainer's logs
    (loss, accuracy, margin, ...). Returns the final training metrics.
    """
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    if not train_pairs:
        raise ValueError("no training pairs")
    tokenizer = load_reward_tokenizer(settings.base_model, trust_remote_code)
    dataset = encode_pairs(tokenizer, train_pairs, settings.max_length)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))

    class Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log is not None and logs:
                on_log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, state.global_step)

    args = RewardConfig(
        output_dir=str(staging / "trainer"),
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_train_epochs=settings.epochs,
        weight_decay=settings.weight_decay,
        center_rewards_coefficient=settings.center_rewards_coefficient,
        seed=settings.seed,
        max_length=None,  # encode_pairs truncated already, keeping each response
        model_init_kwargs={"use_safetensors": True},
        trust_remote_code=trust_remote_code,
        use_cpu=device == "cpu",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    try:
        trainer = RewardTrainer(model=mirrored_model(settings.base_model), args=args, train_dataset=dataset,
                                processing_class=tokenizer, callbacks=[Forward()])
        result = trainer.train()
        model_dir = staging / "model"
        trainer.model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        marker = {"input": "prompt + response", "max_length": settings.max_length,
                  "base_model": settings.base_model, "train_pairs": len(train_pairs)}
        (model_dir / REWARD_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        replace_dir(model_dir, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("reward model trained on %d pairs in %.0f s: loss %.4f", len(train_pairs),
                result.metrics.get("train_runtime", 0.0), result.training_loss)
    return {"train_loss": result.training_loss, **result.metrics}


def resolve_reward_model(reference: str, dest: Path) -> tuple[str, dict]:
    """A loadable reward model for ``reference``: a Hub name or local folder as given, or a registry
    URI (``models:/<name>@<alias>``, ``models:/<name>/<version>``) downloaded to ``dest``.

    The version a URI resolved to is pinned in ``<dest>.json``: a retried task of the same run
    trains against the same reward even if the alias has moved since. Returns the name or
    folder to load and what it was resolved from (for the run's tags).
    """
    if not reference.startswith("models:/"):
        return reference, {"reward.model": reference}
    from tasks.registry.model_registry import download_model_dir, resolve_version

    pin = dest.with_name(f"{dest.name}.json")
    if pin.is_file():
        pinned = json.loads(pin.read_text(encoding="utf-8"))
        if pinned["reward.model"] == reference and (Path(pinned["path"]) / REWARD_MARKER).is_file():
            logger.info("reward %s: this run uses %s, as before", reference, pinned["reward.model_uri"])
            return pinned["path"], {key: pinned[key] for key in ("reward.model", "reward.model_uri")}
    version = resolve_version(reference, default_name="")
    folder = download_model_dir(version.name, str(version.version), dest, REWARD_MARKER, "a reward model")
    tags = {"reward.model": reference, "reward.model_uri": f"models:/{version.name}/{version.version}"}
    pin.write_text(json.dumps({**tags, "path": str(folder)}, indent=2), encoding="utf-8")
    logger.info("reward %s is %s version %s, downloaded to %s", reference, version.name, version.version, folder)
    return str(folder), tags
