"""Paired toxicity and ROUGE evaluation of a summarization policy.

Baseline and candidate are scored by the same function on the same held-out prompts
with the same per-batch sampling seeds, so their per-sample results pair up. Toxicity
is P(hate) of the reward classifier on the summary alone: scoring the prompt with it
lets the dialogue drown the signal.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from tasks.config import EvalSettings, GenerationSettings
from tasks.models import RewardModel, pad_prompts, sample, special_tokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSummary:
    num_samples: int
    toxicity_mean: float
    toxicity_std: float
    rouge_l_mean: float
    rouge_l_std: float
    response_length_mean: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def generate_summaries(
    model,
    tokenizer,
    input_ids: list[list[int]],
    generation: GenerationSettings,
    settings: EvalSettings,
    desc: str = "generate",
) -> list[str]:
    """Sampled summaries, one batched decoding loop per batch, batch ``b`` seeded with ``seed + b``."""
    device = next(model.parameters()).device
    tokens = special_tokens(model, tokenizer)
    summaries: list[str] = []
    starts = range(0, len(input_ids), settings.batch_size)
    for batch_index, start in enumerate(tqdm(starts, desc=desc, leave=False)):
        prompt_ids, prompt_mask = pad_prompts(input_ids[start : start + settings.batch_size], tokens, device)
        torch.manual_seed(settings.seed + batch_index)
        output = sample(model, prompt_ids, prompt_mask, generation, settings.max_new_tokens, tokens)
        summaries.extend(text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True))
    return summaries


def score_summaries(
    rows: pd.DataFrame, summaries: list[str], reward_model: RewardModel
) -> pd.DataFrame:
    """Per-sample toxicity, ROUGE-L F1 against the reference, and length in words."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scored = rows[["id", "dialogue", "summary"]].rename(columns={"summary": "reference"}).copy()
    scored["generated"] = summaries
    scored["toxicity"] = reward_model.toxicity(summaries).tolist()
    scored["rouge_l"] = [
        scorer.score(reference, generated)["rougeL"].fmeasure
        for reference, generated in zip(scored["reference"], summaries, strict=True)
    ]
    scored["response_words"] = [len(text.split()) for text in summaries]
    return scored


def summarize(scored: pd.DataFrame) -> EvalSummary:
    def _std(column: str) -> float:
        return float(scored[column].std(ddof=1)) if len(scored) > 1 else 0.0

    return EvalSummary(
        num_samples=len(scored),
        toxicity_mean=float(scored["toxicity"].mean()),
        toxicity_std=_std("toxicity"),
        rouge_l_mean=float(scored["rouge_l"].mean()),
        rouge_l_std=_std("rouge_l"),
        response_length_mean=float(scored["response_words"].mean()),
    )


def evaluate_policy(
    model,
    tokenizer,
    test_split,
    reward_model: RewardModel,
    generation: GenerationSettings,
    settings: EvalSettings,
    out_dir: Path,
    desc: str = "evaluate",
) -> EvalSummary:
    """Generate, score and save per-sample results (``samples.jsonl``) and the summary (``summary.json``)."""
    count = min(settings.num_samples, len(test_split))
    rows = test_split.select(range(count)).to_pandas()
    summaries = generate_summaries(model, tokenizer, list(rows["input_ids"]), generation, settings, desc=desc)
    scored = score_summaries(rows, summaries, reward_model)
    summary = summarize(scored)
    out_dir.mkdir(parents=True, exist_ok=True)
    scored.to_json(out_dir / "samples.jsonl", orient="records", lines=True)
    (out_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    logger.info(
        "%s: toxicity %.4f ± %.4f, ROUGE-L %.4f over %d samples",
        desc, summary.toxicity_mean, summary.toxicity_std, summary.rouge_l_mean, count,
    )
    return summary


def load_samples(eval_dir: Path) -> pd.DataFrame:
    return pd.read_json(Path(eval_dir) / "samples.jsonl", orient="records", lines=True)


def comparison_table(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Per-sample before/after table, most improved first (the seeds' qualitative table)."""
    if list(before["id"]) != list(after["id"]):
        raise ValueError("baseline and candidate were evaluated on different samples; the comparison is unpaired")
    table = pd.DataFrame(
        {
            "id": before["id"],
            "dialogue": before["dialogue"],
            "summary_before": before["generated"],
            "summary_after": after["generated"],
            "toxicity_before": before["toxicity"],
            "toxicity_after": after["toxicity"],
        }
    )
    table["toxicity_diff"] = table["toxicity_after"] - table["toxicity_before"]
    return table.sort_values("toxicity_diff").reset_index(drop=True)


def relative_change(before: float, after: float) -> float:
    """(after - before) / before; NaN when undefined."""
    if before == 0 or math.isnan(before) or math.isnan(after):
        return math.nan
    return (after - before) / before
