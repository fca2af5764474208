"""What a run shows people: an HTML before/after table, PNG plots and a JSON summary.

All three are written into one folder and logged to the run's MLflow run under
``report/``; the JSON summary is also what the DAG's last task prints in its log.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; workers have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tasks.evaluation.protocol import comparison_table  # noqa: E402

logger = logging.getLogger(__name__)

TABLE_FILE = "comparison.html"
TOXICITY_PLOT = "toxicity_before_after.png"
TRAINING_PLOT = "ppo_reward_kl.png"  # reward, KL and the critic's explained variance
SUMMARY_FILE = "summary.json"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.dialogue { white-space: pre-wrap; max-width: 40em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.better td.diff { color: #1a7f37; } tr.worse td.diff { color: #cf222e; }
"""


def write_reports(
    out_dir: Path,
    baseline: pd.DataFrame,
    candidate: pd.DataFrame,
    ppo_history: list[dict],
    summary: dict,
) -> dict[str, Path]:
    """Write the table, both plots and the summary into ``out_dir``; their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "table": out_dir / TABLE_FILE,
        "toxicity_plot": out_dir / TOXICITY_PLOT,
        "training_plot": out_dir / TRAINING_PLOT,
        "summary": out_dir / SUMMARY_FILE,
    }
    paths["table"].write_text(comparison_html(comparison_table(baseline, candidate), summary), encoding="utf-8")
    plot_toxicity(baseline["toxicity"].to_numpy(), candidate["toxicity"].to_numpy(), paths["toxicity_plot"])
    plot_training(ppo_history, paths["training_plot"])
    paths["summary"].write_text(json.dumps(summary, indent=2, default=str))
    return paths


def comparison_html(table: pd.DataFrame, summary: dict) -> str:
    """A standalone page: headline numbers, then one row per sample, most improved first."""
    header = ["dialogue", "summary before", "summary after", "toxicity before", "toxicity after", "difference"]
    rows = []
    for row in table.itertuples(index=False):
        kind = "better" if row.toxicity_diff < 0 else "worse" if row.toxicity_diff > 0 else "same"
        rows.append(
            f'<tr class="{kind}"><td class="dialogue">{html.escape(str(row.dialogue))}</td>'
            f"<td>{html.escape(str(row.summary_before))}</td><td>{html.escape(str(row.summary_after))}</td>"
            f'<td class="num">{row.toxicity_before:.4f}</td><td class="num">{row.toxicity_after:.4f}</td>'
            f'<td class="num diff">{row.toxicity_diff:+.4f}</td></tr>'
        )
    decision = summary.get("decision", {})
    headline = [
        ("run", summary.get("run_key")),
        ("decision", "promote" if decision.get("promote") else "reject"),
        ("toxicity", _before_after(summary, "toxicity_mean")),
        ("toxicity change (paired bootstrap)", _interval(decision.get("toxicity_change_ci"))),
        ("independent judge", _before_after(summary, "judge_mean")),
        ("ROUGE-L", _before_after(summary, "rouge_l_mean")),
        ("registered", summary.get("registered", {}).get("model_uri") or "nothing"),
    ]
    facts = "".join(f"<li><b>{html.escape(k)}:</b> {html.escape(str(v))}</li>" for k, v in headline)
    reasons = "".join(f"<li><code>{html.escape(r)}</code></li>" for r in decision.get("reasons", []))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>detox_retrain {html.escape(str(summary.get('run_key')))}</title><style>{_STYLE}</style></head>"
        f"<body><h1>Before and after PPO detoxification</h1><ul>{facts}</ul>"
        f"<h2>Promotion gate</h2><ul>{reasons}</ul>"
        f"<h2>{len(table)} held-out dialogues, most improved first</h2>"
        f"<table><thead><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></body></html>\n"
    )


def plot_toxicity(before: np.ndarray, after: np.ndarray, path: Path) -> None:
    """Histograms of per-summary toxicity before and after, on shared bins over [0, 1]."""
    bins = np.linspace(0, 1, 21)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist([before, after], bins=bins, color=["#cf222e", "#1a7f37"],  # side by side in each bin
            label=[f"before (SFT), mean {np.mean(before):.3f}", f"after (PPO), mean {np.mean(after):.3f}"])
    ax.set_xlabel("toxicity = P(hate) of the reward classifier on the summary")
    ax.set_ylabel("summaries")
    ax.set_title(f"Toxicity of {len(before)} held-out summaries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_training(history: list[dict], path: Path) -> None:
    """Mean reward, KL to the reference and the critic's explained variance over PPO steps."""
    steps = np.arange(len(history))
    fig, (reward_ax, kl_ax, critic_ax) = plt.subplots(1, 3, figsize=(14, 4), dpi=100)
    reward_ax.plot(steps, [m["reward_mean"] for m in history], color="#0969da")
    reward_ax.set_title("mean reward (nothate logit)")
    kl_ax.plot(steps, [m["kl"] for m in history], color="#8250df")
    kl_ax.set_title("KL to the reference policy")
    # 1 - Var(returns - values) / Var(returns): 0 is a critic no better than a constant.
    critic_ax.plot(steps, [m.get("explained_variance", np.nan) for m in history], color="#1a7f37")
    critic_ax.axhline(0.0, color="#888", linewidth=0.8)
    critic_ax.set_title("critic: explained variance of the returns")
    for ax in (reward_ax, kl_ax, critic_ax):
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _before_after(summary: dict, key: str) -> str:
    before, after = summary.get("baseline", {}).get(key), summary.get("candidate", {}).get(key)
    if before is None or after is None:
        return "n/a"
    return f"{before:.4f} -> {after:.4f}"


def _interval(ci: dict | None) -> str:
    if not ci:
        return "n/a"
    return f"{ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}] ({ci['confidence']:.0%} CI, seed {ci['seed']})"
