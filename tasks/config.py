"""One typed description of a detox retraining run.

Every knob the seed notebooks hard-coded is a documented field here. The Airflow
DAG's Params and the ``detox`` command line both map onto :class:`RunConfig`;
unknown fields are rejected with an error that names them.

Profiles:

* ``demo`` — the embedded default: tiny models and a synthetic data set that the
  project builds itself under ``DETOX_HOME`` (see :mod:`tasks.embedded.builds`), an S3
  server on loopback, MLflow on SQLite. Runs on a laptop CPU in minutes.
* ``production`` — the seeds' real models (FLAN-T5 summarizer with its SFT LoRA
  adapter in S3, Meta's RoBERTa hate-speech classifier as reward) on a GPU.
* ``production-tinyllama`` (retraining only) — the third seed's setup: TinyLlama-1.1B-Chat
  loaded in 4-bit NF4 (QLoRA), its SFT adapter kept as a frozen adapter, the same reward.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.errors import InputError

PROMPT_TEMPLATE = "\nSummarize the following conversation.\n\n{dialogue}\n\nSummary:\n"



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where dialogues come from and how they become prompts."""

    source: str = Field(
        "knkarthick/dialogsum",
        description="Hub data set name, local .csv/.jsonl/.parquet file, or s3://bucket/key.",
    )
    split: str = Field("train", description="Split to read when `source` is a Hub data set.")
    prompt_template: str = Field(
        PROMPT_TEMPLATE, description="Instruction wrapped around each dialogue; must contain '{dialogue}'."
    )
    min_dialogue_chars: int = Field(200, ge=0, description="Dialogues of this many characters or fewer are skipped.")
    max_dialogue_chars: int = Field(1000, gt=0, description="Dialogues longer than this are skipped.")
    max_prompt_tokens: int = Field(512, gt=0, description="Prompts are truncated to this many tokens.")
    test_size: float = Field(0.2, gt=0, lt=1, description="Share of rows held out for evaluation.")
    split_seed: int = Field(42, description="Seed of the deterministic train/test split.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if "{dialogue}" not in self.prompt_template:
            raise ValueError("prompt_template must contain the placeholder '{dialogue}'")
        if self.min_dialogue_chars >= self.max_dialogue_chars:
            raise ValueError("min_dialogue_chars must be smaller than max_dialogue_chars")
        return self


class ModelConfig(_Section):
    """The policy, its supervised adapter and the reward model."""

    policy_name: str = Field(
        "marianna13/flan-t5-base-summarization",
        description="Base policy: Hub name or local folder (seq2seq such as FLAN-T5, or causal such as TinyLlama).",
    )
    policy_family: Literal["auto", "seq2seq", "causal"] = Field(
        "auto", description="Model family of the policy; 'auto' reads is_encoder_decoder from its config."
    )
    load_in_4bit: bool = Field(
        False,
        description="Load the base policy in 4-bit NF4 (QLoRA via bitsandbytes; CUDA only). The SFT adapter "
        "then stays a frozen adapter instead of being merged.",
    )
    bnb_4bit_compute_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="Compute dtype of the 4-bit layers."
    )
    eos_token: str | None = Field(
        None,
        description="Token that ends a response, e.g. a chat model's end of turn '<|im_end|>'; None: the "
        "tokenizer's EOS token.",
    )
    sft_adapter_uri: str = Field(
        "s3://detox-adapters/flan-t5-base-dialogsum-sft",
        description="s3://bucket/prefix of the supervised LoRA adapter fine-tuned on dialogue summaries.",
    )
    reward_model_name: str = Field(
        "facebook/roberta-hate-speech-dynabench-r4-target",
        description="The PPO reward: Hub name, local folder, or registry URI models:/<name>@<alias> of a reward "
        "model trained by reward_model_train. A classifier's `reward_label` logit is the reward; a model with "
        "a single output (trained from preferences) scores prompt + response with it.",
    )
    reward_label: str = Field("nothate", description="Label (looked up in id2label) whose logit is the reward.")
    toxicity_model_name: str | None = Field(
        None,
        description="Classifier whose `toxic_label` probability is the evaluation's toxicity; None: the reward "
        "model (which then needs that label).",
    )
    toxic_label: str = Field("hate", description="Label whose probability is the toxicity score.")
    reward_batch_size: int = Field(16, gt=0, description="Texts per forward pass of the reward model.")
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.toxicity_model_name is None and self.reward_model_name.startswith("models:/"):
            raise ValueError(
                f"the reward {self.reward_model_name} is a registered preference reward model, which has no "
                f"'{self.toxic_label}' label to measure toxicity with: set model.toxicity_model_name to a classifier"
            )
        return self

    @property
    def toxicity_scorer(self) -> str:
        """The classifier that measures toxicity in evaluation."""
        return self.toxicity_model_name or self.reward_model_name


class LoraSettings(_Section):
    """LoRA adapter trained by PPO (the seeds: r=32, alpha=32 on q and v)."""

    r: int = Field(32, gt=0, description="Rank of the low-rank update.")
    alpha: int = Field(32, gt=0, description="Scaling numerator (update scale = alpha / r).")
    dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the LoRA input, kept in the saved adapter; PPO runs with dropout off."
    )
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Module names that get adapters; None takes peft's default for the architecture "
        "(T5: q, v; Llama: q_proj, v_proj).",
    )


class GenerationSettings(_Section):
    """Sampling of PPO's rollouts (the seeds: pure sampling, top_k=0, top_p=1).

    Evaluation samples with its own settings (``eval.temperature``, ``eval.top_k``,
    ``eval.top_p``), so that a truncated evaluation never changes what PPO trains on.
    """

    min_new_tokens: int = Field(100, gt=0, description="Lower bound of the sampled response length budget.")
    max_new_tokens: int = Field(400, gt=0, description="Upper bound of the sampled response length budget.")
    top_k: int = Field(
        0, ge=0, description="Must stay 0: PPO's log-probs are those of the untruncated softmax (see eval.top_k)."
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Must stay 1.0: PPO's log-probs are those of the untruncated softmax "
        "(see eval.top_p)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; PPO log-probs use the same one.")

    @model_validator(mode="after")
    def _check(self) -> GenerationSettings:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        truncated = [f"generation.{name}={value}" for name, value, off in
                     (("top_k", self.top_k, 0), ("top_p", self.top_p, 1.0)) if value != off]
        if truncated:
            # Sampling from a truncated softmax while the ratio and the KL use the full one makes
            # PPO off-policy, and the KL to the reference is no longer the KL of what was sampled.
            raise ValueError(
                f"{' and '.join(truncated)} would truncate the rollout's sampling, but PPO's log-probs and KL are "
                "those of the untruncated softmax (the update would be off-policy): leave generation.top_k at 0 "
                "and generation.top_p at 1.0; evaluation's own sampling is eval.top_k / eval.top_p"
            )
        return self


class PPOSettings(_Section):
    """PPO hyperparameters (seeds: lr 1.41e-5, batch 16, mini-batch 4, 1 epoch, 10 steps)."""

    learning_rate: float = Field(1.41e-5, gt=0, description="Adam learning rate of the policy's LoRA adapter.")
    critic: Literal["head", "adapter"] = Field(
        "head",
        description="'head': the value head reads the policy's detached last hidden state (no extra compute). "
        "'adapter': the value head reads the states of the critic's own LoRA adapter on the same base weights, "
        "features it learns for the returns; one more forward and backward pass per mini-batch.",
    )
    value_learning_rate: float = Field(
        1e-3,
        gt=0,
        description="Adam learning rate of the critic (the value head, and the critic's adapter), its own "
        "parameter group: at the policy's rate a zero-started head would stay near 0.",
    )
    batch_size: int = Field(16, gt=0, description="Prompts per rollout (one PPO step), over all processes.")
    mini_batch_size: int = Field(
        4,
        gt=0,
        description="Samples per optimizer step, over all processes: every PPO epoch makes "
        "batch_size / mini_batch_size optimizer steps whatever the number of GPUs (Huang et al.'s nminibatches).",
    )
    gradient_accumulation_steps: int = Field(
        1,
        gt=0,
        description="Micro-batches per mini-batch in each process: each forward/backward sees "
        "mini_batch_size / (processes x this) samples.",
    )
    ppo_epochs: int = Field(1, gt=0, description="Optimization passes over each rollout batch.")
    steps: int = Field(10, gt=0, description="Number of PPO steps (rollout + update).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    cliprange_value: float = Field(0.2, gt=0, description="Value prediction clip range.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    init_kl_coef: float = Field(0.2, ge=0, description="Initial coefficient of the per-token KL penalty.")
    adaptive_kl: bool = Field(True, description="Adapt the KL coefficient towards `target_kl` (Ziegler et al.).")
    target_kl: float = Field(6.0, gt=0, description="KL (nats per sequence) the adaptive controller aims at.")
    kl_horizon: int = Field(10000, gt=0, description="Horizon of the adaptive KL controller.")
    kl_ceiling: float = Field(60.0, gt=0, description="Training stops as failed when mean KL exceeds this.")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the score of responses that end without EOS; None: no penalty."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute."
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="Gradient clipping norm, applied to the adapter's and the value head's gradients "
        "separately (the critic's large early gradients must not shrink the policy's)."
    )
    mixed_precision: Literal["no", "bf16"] = Field(
        "no",
        description="'bf16': forward passes under bfloat16 autocast on CUDA, weights, optimizer, log-probs and "
        "values in float32. CUDA only: refused on CPU.",
    )
    value_head_init_std: float = Field(0.0, ge=0, description="Std of the value head's initial weights.")
    seed: int = Field(0, description="Seed for sampling and initialisation.")
    checkpoint_every: int = Field(
        5, gt=0, description="Steps between checkpoints; a retried ppo_train resumes from the last one."
    )
    keep_checkpoints: int = Field(2, gt=0, description="Most recent checkpoints kept on disk.")
    num_processes: int = Field(
        0, ge=0, description="Data-parallel training processes on the worker (torchrun + accelerate), each "
        "with batch_size / num_processes prompts per step; 0: one per visible GPU, one on CPU.",
    )

    @model_validator(mode="after")
    def _check(self) -> PPOSettings:
        # With num_processes 0 the count is known on the worker only: the trainer checks it there.
        check_batch_split(self, self.num_processes or 1)
        return self


def check_batch_split(ppo: PPOSettings, processes: int) -> None:
    """The batch splits into whole mini-batches, and each mini-batch into ``processes`` equal shares of
    ``gradient_accumulation_steps`` equal micro-batches; raises :class:`ConfigError` naming the fields
    otherwise."""
    if ppo.batch_size % ppo.mini_batch_size:
        raise ConfigError(f"ppo.batch_size {ppo.batch_size} must be a multiple of ppo.mini_batch_size "
                         f"{ppo.mini_batch_size} (the optimizer steps per PPO epoch are their ratio)")
    share = processes * ppo.gradient_accumulation_steps
    if ppo.mini_batch_size % share:
        over = f"ppo.num_processes={processes} x " if processes > 1 else ""
        raise ConfigError(
            f"ppo.mini_batch_size {ppo.mini_batch_size} cannot be split into {over}"
            f"ppo.gradient_accumulation_steps={ppo.gradient_accumulation_steps} equal micro-batches: make it a "
            f"multiple of {share}" + (", or train on fewer processes" if processes > 1 else "")
        )


class EvalSettings(_Section):
    """The paired evaluation protocol: baseline, candidate and champion all go through it."""

    num_samples: int = Field(
        500, ge=0, description="Held-out prompts scored (capped at the split's size); 0 scores the whole split."
    )
    batch_size: int = Field(16, gt=0, description="Prompts per generate call.")
    seed: int = Field(1234, description="Sampling seed; identical for baseline, candidate and champion.")
    max_new_tokens: int = Field(100, gt=0, description="Summary length budget during evaluation.")
    score_prompt: bool = Field(
        False, description="Score prompt + summary with the toxicity classifier (the seeds' way), not the summary."
    )
    toxicity_threshold: float = Field(
        0.5, gt=0, lt=1, description="A summary with toxicity (or judge score) above this counts as toxic."
    )
    judge: str = Field(
        "profanity-check",
        description="Independent toxicity judge, not the reward: 'profanity-check' (the alt-profanity-check "
        "package) or a sequence classifier's hub name or local path.",
    )
    judge_toxic_label: str = Field("toxic", description="Label whose probability a classifier judge reports.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the evaluation.")
    top_k: int = Field(0, ge=0, description="Top-k filtering of the evaluation's sampling; 0 disables it.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus filtering of the evaluation sampling; 1.0: none.")
    bootstrap_resamples: int = Field(2000, ge=100, description="Paired bootstrap resamples for the intervals.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the bootstrap intervals.")


class PromotionSettings(_Section):
    """When a PPO candidate may become the champion."""

    min_toxicity_reduction: float = Field(
        0.05, ge=0, le=1, description="Required relative drop of mean toxicity (0.05 = 5%)."
    )
    max_rouge_l_drop: float = Field(
        0.05, ge=0, le=1, description="Tolerated relative drop of ROUGE-L against the references."
    )
    max_judge_increase: float = Field(
        0.01, ge=0, le=1, description="Tolerated rise of the independent judge's mean score (absolute)."
    )
    compare_with_champion: bool = Field(
        True, description="Also require the candidate to beat the registered champion on the same protocol."
    )
    require_approval: bool = Field(
        False,
        description="Before registering a promoted candidate, wait for a person to approve or reject it in "
        "Airflow (the `approval` task). Off: a promoted candidate is registered at once.",
    )
    approval_timeout_hours: float = Field(
        72.0, gt=0, description="Hours the approval waits for an answer; none by then: not registered."
    )


class _Run(_Section):
    """What every workflow run has: a profile, a run folder, an MLflow experiment and a registry entry."""

    profile: str = Field("production", description="The profile whose defaults the run started from.")
    artifact_root: str = Field(".detox/artifacts", description="Local folder under which every run keeps its files.")
    experiment_name: str = Field(description="MLflow experiment of the runs.")
    mlflow_artifact_location: str | None = Field(
        None, description="Artifact location of a newly created experiment; None uses the server's default."
    )
    registered_model_name: str = Field(description="MLflow registry entry of the trained model.")
    champion_alias: str = Field("champion", description="Registry alias moved to each registered version.")
    previous_alias: str = Field("previous", description="Registry alias kept on the champion a new version replaces.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run.")

    @classmethod
    def profiles(cls) -> dict[str, Callable[[], dict[str, Any]]]:
        """Each profile's name and the field values it sets (the rest keep the class defaults)."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _known_profile(self) -> _Run:
        if self.profile not in self.profiles():
            raise ValueError(f"unknown profile {self.profile!r}: expected one of {sorted(self.profiles())}")
        return self

    @classmethod
    def for_profile(cls, profile: str, overrides: dict[str, Any] | None = None):
        """The profile's defaults with ``overrides`` (nested dicts or dotted keys) applied."""
        profiles = cls.profiles()
        if profile not in profiles:
            raise ConfigError(f"unknown profile {profile!r}: expected one of {', '.join(repr(p) for p in profiles)}")
        base = profiles[profile]() | {"profile": profile}
        merged = _deep_merge(base, _undot(overrides or {}))
        try:
            return cls.model_validate(merged)
        except ValidationError as err:
            raise ConfigError(_describe(err)) from None

    def run_dir(self, run_id: str) -> Path:
        """The run-scoped artifact folder; runs never share files."""
        return Path(self.artifact_root).expanduser().resolve() / safe_run_id(run_id)


class RunConfig(_Run):
    """Everything one detox retraining run needs to know."""

    experiment_name: str = Field("detox-retrain", description="MLflow experiment of the retraining runs.")
    registered_model_name: str = Field("detox-summarizer", description="MLflow registry entry of the policy.")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    generation: GenerationSettings = GenerationSettings()
    ppo: PPOSettings = PPOSettings()
    eval: EvalSettings = EvalSettings()
    promotion: PromotionSettings = PromotionSettings()

    @classmethod
    def profiles(cls) -> dict[str, Callable[[], dict[str, Any]]]:
        return {"production": dict, "production-tinyllama": _tinyllama_defaults, "demo": _demo_defaults}

    @model_validator(mode="after")
    def _check_precision(self) -> RunConfig:
        if self.ppo.mixed_precision != "no" and self.device == "cpu":
            raise ValueError(f"ppo.mixed_precision '{self.ppo.mixed_precision}' needs CUDA, but device is 'cpu': "
                             "set ppo.mixed_precision to 'no'")
        return self


class PreferenceDataConfig(_Section):
    """Human preference rankings (format: :mod:`tasks.rewards.preferences`)."""

    source: str = Field(
        "s3://detox-preferences/rankings.jsonl",
        description="Local .jsonl/.csv/.parquet file or s3://bucket/key of prompt/responses/ranking records.",
    )
    test_size: float = Field(0.1, gt=0, lt=1, description="Share of records held out; a record's pairs stay together.")
    split_seed: int = Field(42, description="Seed of the deterministic train/test split of the records.")


class RewardTrainingSettings(_Section):
    """TRL RewardTrainer settings (the reward-model seed: roberta-base, lr 2e-5, batch 16 x 4, 1 epoch)."""

    base_model: str = Field(
        "roberta-base", description="Encoder to fine-tune with a one-output head: Hub name or local folder."
    )
    max_length: int = Field(512, gt=0, description="Tokens of prompt + response; longer ones lose their beginning.")
    learning_rate: float = Field(2e-5, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(16, gt=0, description="Pairs per device batch.")
    gradient_accumulation_steps: int = Field(4, gt=0, description="Batches per optimizer step.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs.")
    weight_decay: float = Field(0.001, ge=0, description="AdamW weight decay.")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Weight of the (r_chosen + r_rejected)^2 penalty that keeps rewards centred on 0."
    )
    seed: int = Field(0, description="Seed of the head's initialisation and the data order.")


class RewardGateSettings(_Section):
    """When a trained reward model is registered."""

    min_accuracy: float = Field(
        0.9, ge=0, le=1, description="Held-out pairwise accuracy (share of pairs scored chosen > rejected) required."
    )


class RewardRunConfig(_Run):
    """One run of reward_model_train: preferences in, a registered reward model out."""

    experiment_name: str = Field("reward-model-train", description="MLflow experiment of the reward-model runs.")
    registered_model_name: str = Field("detox-reward", description="MLflow registry entry of the reward model.")
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code.")
    data: PreferenceDataConfig = PreferenceDataConfig()
    training: RewardTrainingSettings = RewardTrainingSettings()
    gate: RewardGateSettings = RewardGateSettings()

    @classmethod
    def profiles(cls) -> dict[str, Callable[[], dict[str, Any]]]:
        return {"production": dict, "demo": _reward_demo_defaults}


class ConfigError(InputError, ValueError):
    """A run configuration that cannot be used, with the offending fields named."""


def detox_home() -> Path:
    """Where the embedded default lives (``DETOX_HOME``, default ``./.detox``)."""
    return Path(os.environ.get("DETOX_HOME", ".detox")).expanduser().resolve()


def _reward_demo_defaults() -> dict[str, Any]:
    """The embedded default's preference set (on the loopback S3 server) and tiny RoBERTa encoder."""
    home = detox_home()
    return {
        "profile": "demo",
        "artifact_root": str(home / "artifacts"),
        "experiment_name": "reward-model-train-demo",
        "mlflow_artifact_location": (home / "mlartifacts").as_uri(),
        "registered_model_name": "detox-reward-demo",
        "device": "cpu",
        "data": {"source": DEMO_PREFERENCES_URI},
        "training": {"base_model": str(home / "embedded-reward" / "reward-base"), "learning_rate": 1e-3,
                     "gradient_accumulation_steps": 1, "epochs": 2.0},
    }


DEMO_PREFERENCES_URI = "s3://detox-demo/preferences/rankings.jsonl"


CHATML_PROMPT_TEMPLATE = (
    "<|im_start|>user\nSummarize the following conversation.\n\n{dialogue}<|im_end|>\n<|im_start|>assistant\n"
)


def _tinyllama_defaults() -> dict[str, Any]:
    """The third seed's setup: TinyLlama-1.1B-Chat (ChatML turns) in 4-bit NF4 with float16 compute,
    LoRA r=16 / alpha 16, responses of 100-300 tokens. The seed's batch of 2 was what fitted a
    Colab T4; the GPU worker keeps the FLAN-T5 seed's batch of 16 in mini-batches of 4."""
    return {
        "experiment_name": "detox-retrain-tinyllama",
        "registered_model_name": "detox-summarizer-tinyllama",
        "data": {"prompt_template": CHATML_PROMPT_TEMPLATE},
        "model": {
            "policy_name": "PY007/TinyLlama-1.1B-Chat-v0.3",
            "policy_family": "causal",
            "load_in_4bit": True,
            "bnb_4bit_compute_dtype": "float16",
            "eos_token": "<|im_end|>",  # the seed's CHAT_EOS_TOKEN_ID 32002: the end of the assistant's turn
            "sft_adapter_uri": "s3://detox-adapters/tinyllama-chat-dialogsum-sft",
        },
        "lora": {"r": 16, "alpha": 16, "dropout": 0.05},
        "generation": {"min_new_tokens": 100, "max_new_tokens": 300},
    }


def _demo_defaults() -> dict[str, Any]:
    home = detox_home()
    embedded = home / "embedded"
    return {
        "profile": "demo",
        "artifact_root": str(home / "artifacts"),
        "experiment_name": "detox-retrain-demo",
        "mlflow_artifact_location": (home / "mlartifacts").as_uri(),
        "registered_model_name": "detox-summarizer-demo",
        "device": "cpu",
        "data": {"source": str(embedded / "dialogsum_synthetic.csv"), "max_prompt_tokens": 256},
        "model": {
            "policy_name": str(embedded / "policy-base"),
            "sft_adapter_uri": "s3://detox-demo/adapters/policy-sft",
            "reward_model_name": str(embedded / "hate-classifier"),
            # Kept explicit so that evaluation scores the same way whatever reward PPO is given.
            "toxicity_model_name": str(embedded / "hate-classifier"),
            "reward_batch_size": 64,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "generation": {"min_new_tokens": 40, "max_new_tokens": 48},
        # Tuned on the embedded default: the tiny policy needs a far larger step than FLAN-T5.
        "ppo": {
            "learning_rate": 1e-3,
            # The 128 features of the tiny policy's last state do not tell its returns (a ridge probe on
            # them explained no more than the trained head, about 0): the critic learns its own.
            "critic": "adapter",
            "value_learning_rate": 1e-3,
            "steps": 70,
            # 32 samples a step: at 16 the outcome hung on the seed (toxicity -61% to -83% over PPO
            # seeds 0-4); at 32 it is -67% to -89%, median -84% (benchmarks/demo_seeds.py).
            "batch_size": 32,
            "mini_batch_size": 16,
            "ppo_epochs": 4,
            "vf_coef": 1.0,
            "init_kl_coef": 0.2,
            "target_kl": 4.0,
            "kl_ceiling": 40.0,
        },
        "eval": {"num_samples": 0, "batch_size": 64, "max_new_tokens": 48},
    }


def safe_run_id(run_id: str) -> str:
    """A run id usable as one folder name (Airflow ids contain ':' and '+')."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_id).strip("._")
    if not cleaned:
        raise ConfigError(f"run id {run_id!r} has no usable characters")
    return cleaned


def _undot(overrides: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _deep_merge(node[leaf], value)
        else:
            node[leaf] = value
    return nested


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown field '{where}'")
        else:
            problems.append(f"{where}: {item['msg']}")
    return "invalid run config: " + "; ".join(problems)


# Fields an operator sets from the Airflow trigger form (Param name -> config field).
FORM_FIELDS: dict[str, str] = {
    "dataset_source": "data.source",
    "sft_adapter_uri": "model.sft_adapter_uri",
    "reward_model": "model.reward_model_name",
    "ppo_steps": "ppo.steps",
    "learning_rate": "ppo.learning_rate",
    "target_kl": "ppo.target_kl",
    "eval_samples": "eval.num_samples",
    "min_toxicity_reduction": "promotion.min_toxicity_reduction",
    "max_rouge_l_drop": "promotion.max_rouge_l_drop",
    "require_approval": "promotion.require_approval",
}

REWARD_FORM_FIELDS: dict[str, str] = {
    "preferences_source": "data.source",
    "base_model": "training.base_model",
    "learning_rate": "training.learning_rate",
    "epochs": "training.epochs",
    "min_accuracy": "gate.min_accuracy",
}


def form_field_schemas(config_class: type[BaseModel] = RunConfig,
                       fields: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """JSON schema of each form field, taken from the config's own types, bounds and descriptions.

    Every field may be left empty (null), meaning "the profile's default".
    """
    schemas = {}
    for name, dotted in (FORM_FIELDS if fields is None else fields).items():
        section, leaf = dotted.split(".")
        section_model = config_class.model_fields[section].annotation
        prop = dict(section_model.model_json_schema()["properties"][leaf])
        schema = {"type": ["null", prop["type"]], "description": prop.get("description", "")}
        for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if bound in prop:
                schema[bound] = prop[bound]
        schemas[name] = schema
    return schemas


def config_from_params(params: dict[str, Any], config_class=RunConfig, fields: dict[str, str] | None = None):
    """The run config described by a DAG run's Params (profile, form fields, free-form overrides)."""
    fields = FORM_FIELDS if fields is None else fields
    known = {"profile", "overrides", *fields}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown}; known: {sorted(known)}")
    overrides = {fields[name]: value for name, value in params.items() if name in fields and value is not None}
    overrides.update(params.get("overrides") or {})
    return config_class.for_profile(params.get("profile") or "production", overrides)
