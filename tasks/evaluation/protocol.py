"""The paired evaluation protocol: toxicity, an independent judge and ROUGE of one policy.

Baseline, candidate and champion are scored by the same function on the same held-out
prompts with the same per-batch sampling seeds, so their per-sample results pair up;
:func:`eval_fingerprint` names that protocol, and results carry it so that only
results with equal fingerprints are ever compared. Toxicity is P(hate) of the reward
classifier on the summary alone (``eval.score_prompt`` scores prompt + summary, as
the seeds did, at the price of letting the dialogue drown the signal). The judge is a
second scorer that PPO never optimised against, so reward hacking shows up there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from tasks.config import EvalSettings, RunConfig
from tasks.evaluation.stats import ChangeInterval, paired_bootstrap
from tasks.io.models import RewardModel, pad_prompts, sample, special_tokens

logger = logging.getLogger(__name__)

PROFANITY_CHECK = "profanity-check"
# Per-sample columns whose paired change gets a bootstrap interval.
COMPARED_METRICS = ("toxicity", "judge", "rouge_l")


class Judge(Protocol):
    name: str

    def score(self, texts: list[str]) -> np.ndarray:
        """Probability that each text is toxic, in [0, 1]."""


class ProfanityCheckJudge:
    """The ``alt-profanity-check`` package: a linear SVM on words, nothing like the reward model."""

    name = PROFANITY_CHECK

    def __init__(self):
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def score(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return np.asarray(self._predict_prob(list(texts)), dtype=np.float64)


class ClassifierJudge:
    """Any sequence classifier: P(``toxic_label``)."""

    def __init__(self, name: str, toxic_label: str, device: torch.device, trust_remote_code: bool = False):
        self.name = name
        self._model = RewardModel(name, reward_label=toxic_label, toxic_label=toxic_label, device=device,
                                  trust_remote_code=trust_remote_code)

    def score(self, texts: list[str]) -> np.ndarray:
        return self._model.toxicity(list(texts)).numpy().astype(np.float64)


def load_judge(settings: EvalSettings, device: torch.device, trust_remote_code: bool = False) -> Judge:
    if settings.judge == PROFANITY_CHECK:
        return ProfanityCheckJudge()
    return ClassifierJudge(settings.judge, settings.judge_toxic_label, device, trust_remote_code)


@dataclass(frozen=True)
class EvalSummary:
    num_samples: int
    toxicity_mean: float
    toxicity_std: float
    toxic_share: float
    judge_mean: float
    judge_toxic_share: float
    rouge_1_mean: float
    rouge_2_mean: float
    rouge_l_mean: float
    rouge_l_std: float
    response_length_mean: float

    def to_dict(self) -> dict:
        return asdict(self)


def eval_fingerprint(config: RunConfig, dataset_fingerprint: str, num_samples: int) -> str:
    """Names the protocol: equal fingerprints mean the same prompts, seeds, settings and scorers.

    The batch size is part of it because batch ``b`` is sampled with seed ``seed + b``.
    """
    protocol = {
        "dataset": dataset_fingerprint,
        "num_samples": num_samples,
        "seed": config.eval.seed,
        "batch_size": config.eval.batch_size,
        "max_new_tokens": config.eval.max_new_tokens,
        "score_prompt": config.eval.score_prompt,
        "sampling": [config.eval.temperature, config.eval.top_k, config.eval.top_p],
        "toxicity_scorer": [config.model.toxicity_scorer, config.model.toxic_label],
        "judge": [config.eval.judge, config.eval.judge_toxic_label],
    }
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:16]


def sample_count(settings: EvalSettings, split_size: int) -> int:
    """Prompts the protocol scores: ``num_samples`` capped at the split, or the whole split for 0."""
    return split_size if settings.num_samples == 0 else min(settings.num_samples, split_size)


@torch.inference_mode()
def generate_summaries(
    model,
    tokenizer,
    input_ids: list[list[int]],
    settings: EvalSettings,
    desc: str = "generate",
) -> list[str]:
    """Sampled summaries, one batched decoding loop per batch, batch ``b`` seeded with ``seed + b``, with
    the evaluation's own sampling settings (never the rollouts')."""
    device = next(model.parameters()).device
    tokens = special_tokens(model, tokenizer)
    summaries: list[str] = []
    starts = range(0, len(input_ids), settings.batch_size)
    for batch_index, start in enumerate(tqdm(starts, desc=desc, leave=False)):
        prompt_ids, prompt_mask = pad_prompts(input_ids[start : start + settings.batch_size], tokens, device)
        torch.manual_seed(settings.seed + batch_index)
        output = sample(model, prompt_ids, prompt_mask, settings, settings.max_new_tokens, tokens)
        summaries.extend(text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True))
    return summaries


def score_summaries(
    rows: pd.DataFrame,
    summaries: list[str],
    reward_model: RewardModel,
    judge: Judge,
    settings: EvalSettings,
    prompts: list[str] | None = None,
) -> pd.DataFrame:
    """Per-sample toxicity, judge score, ROUGE-1/2/L F1 against the reference, and length in words.

    ``prompts`` are needed only with ``settings.score_prompt``.
    """
    from rouge_score import rouge_scorer  # here: it loads nltk, scipy and scikit-learn (about 1 s per task)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scored = rows[["id", "dialogue", "summary"]].rename(columns={"summary": "reference"}).copy()
    scored["generated"] = summaries
    if settings.score_prompt:
        if prompts is None:
            raise ValueError("eval.score_prompt is set but no prompts were given to score with the summaries")
        toxicity_inputs = [f"{prompt} {summary}" for prompt, summary in zip(prompts, summaries, strict=True)]
    else:
        toxicity_inputs = summaries
    scored["toxicity"] = reward_model.toxicity(toxicity_inputs).numpy().astype(np.float64)
    scored["judge"] = judge.score(summaries)
    rouge = [scorer.score(reference, generated)
             for reference, generated in zip(scored["reference"], summaries, strict=True)]
    scored["rouge_1"] = [score["rouge1"].fmeasure for score in rouge]
    scored["rouge_2"] = [score["rouge2"].fmeasure for score in rouge]
    scored["rouge_l"] = [score["rougeL"].fmeasure for score in rouge]
    scored["response_words"] = [len(text.split()) for text in summaries]
    return scored


def summarize(scored: pd.DataFrame, toxicity_threshold: float) -> EvalSummary:
    def _std(column: str) -> float:
        return float(scored[column].std(ddof=1)) if len(scored) > 1 else 0.0

    return EvalSummary(
        num_samples=len(scored),
        toxicity_mean=float(scored["toxicity"].mean()),
        toxicity_std=_std("toxicity"),
        toxic_share=float((scored["toxicity"] > toxicity_threshold).mean()),
        judge_mean=float(scored["judge"].mean()),
        judge_toxic_share=float((scored["judge"] > toxicity_threshold).mean()),
        rouge_1_mean=float(scored["rouge_1"].mean()),
        rouge_2_mean=float(scored["rouge_2"].mean()),
        rouge_l_mean=float(scored["rouge_l"].mean()),
        rouge_l_std=_std("rouge_l"),
        response_length_mean=float(scored["response_words"].mean()),
    )


def evaluate_policy(
    model,
    tokenizer,
    test_split,
    reward_model: RewardModel,
    judge: Judge,
    settings: EvalSettings,
    out_dir: Path,
    desc: str = "evaluate",
) -> EvalSummary:
    """Generate, score and save per-sample results (``samples.jsonl``) and the summary (``summary.json``)."""
    count = sample_count(settings, len(test_split))
    rows = test_split.select(range(count)).to_pandas()
    input_ids = list(rows["input_ids"])
    summaries = generate_summaries(model, tokenizer, input_ids, settings, desc=desc)
    prompts = tokenizer.batch_decode(input_ids, skip_special_tokens=True) if settings.score_prompt else None
    scored = score_summaries(rows, summaries, reward_model, judge, settings, prompts)
    summary = summarize(scored, settings.toxicity_threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    scored.to_json(out_dir / "samples.jsonl", orient="records", lines=True)
    (out_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    logger.info(
        "%s: toxicity %.4f (%.1f%% above %.2f), judge %.4f, ROUGE-1/2/L %.4f/%.4f/%.4f over %d samples",
        desc, summary.toxicity_mean, 100 * summary.toxic_share, settings.toxicity_threshold, summary.judge_mean,
        summary.rouge_1_mean, summary.rouge_2_mean, summary.rouge_l_mean, count,
    )
    return summary


def compare(before: pd.DataFrame, after: pd.DataFrame, settings: EvalSettings) -> dict[str, ChangeInterval]:
    """Paired bootstrap interval of the change in each of :data:`COMPARED_METRICS`.

    One seed (``eval.seed``) for all of them, recorded in each interval.
    """
    _check_paired(before, after)
    return {
        metric: paired_bootstrap(before[metric].to_numpy(), after[metric].to_numpy(),
                                 settings.bootstrap_resamples, settings.seed, settings.confidence)
        for metric in COMPARED_METRICS
    }


def _check_paired(before: pd.DataFrame, after: pd.DataFrame) -> None:
    if list(before["id"]) != list(after["id"]):
        raise ValueError("the two evaluations scored different samples; the comparison is unpaired")


def load_samples(eval_dir: Path) -> pd.DataFrame:
    return pd.read_json(Path(eval_dir) / "samples.jsonl", orient="records", lines=True)


def comparison_table(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Per-sample before/after table, most improved first (the seeds' qualitative table)."""
    _check_paired(before, after)
    table = pd.DataFrame(
        {
            "id": before["id"],
            "dialogue": before["dialogue"],
            "summary_before": before["generated"],
            "summary_after": after["generated"],
            "toxicity_before": before["toxicity"],
            "toxicity_after": after["toxicity"],
            "judge_before": before["judge"],
            "judge_after": after["judge"],
        }
    )
    table["toxicity_diff"] = table["toxicity_after"] - table["toxicity_before"]
    return table.sort_values("toxicity_diff").reset_index(drop=True)


def relative_change(before: float, after: float) -> float:
    """(after - before) / before; NaN when undefined."""
    if before == 0 or math.isnan(before) or math.isnan(after):
        return math.nan
    return (after - before) / before
