"""HTML of the plugin's pages. Every piece of text that comes from data goes through ``esc``:
dialogues and summaries are user data, and one holding ``<script>`` must stay text."""

from __future__ import annotations

import math
from html import escape
from urllib.parse import quote

from tasks.steps.review import Item, Progress, RunReport

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #1f2328; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.dialogue { white-space: pre-wrap; max-width: 36em; }
.promote { color: #1a7f37; font-weight: 600; } .reject { color: #cf222e; font-weight: 600; }
.pending { color: #9a6700; font-weight: 600; }
li.FAIL { color: #cf222e; } li.ok { color: #1a7f37; }
img { max-width: 48%; margin-right: 1%; border: 1px solid #d0d7de; }
.card { border: 1px solid #d0d7de; border-radius: 6px; padding: 0.6em 0.8em; margin: 0.5em 0; }
.card.focused { outline: 3px solid #0969da; }
.card label { margin-right: 0.8em; }
.dialogue-box { white-space: pre-wrap; background: #f6f8fa; padding: 0.8em; border-radius: 6px; }
button { padding: 0.4em 1em; margin-right: 0.5em; }
.muted { color: #656d76; font-size: 0.9em; }
#message { font-weight: 600; }
"""


def esc(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def page(title: str, body: str, script: str | None = None) -> str:
    tag = f'<script src="{esc(script)}" defer></script>' if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style>{tag}</head><body>{body}</body></html>\n")


def number(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def report_page(report: RunReport, dag_id: str, mlflow_url: str | None, plot_base: str, script: str) -> str:
    title = f"{dag_id} {report.run_key}"
    if report.mlflow_run_id is None:
        return page(title, f"<h1>Run report</h1><p>Run <code>{esc(report.run_key)}</code> has logged nothing to "
                           "MLflow yet: its first task has not started, or it ran before the tracking server "
                           "held its runs.</p>")
    decision = report.decision
    if decision is None:
        verdict = '<span class="pending" id="decision">no decision yet</span>'
    elif decision.get("promote"):
        verdict = '<span class="promote" id="decision">promote</span>'
    else:
        verdict = '<span class="reject" id="decision">reject</span>'
    links = []
    if mlflow_url:
        links.append(f'<a href="{esc(mlflow_url)}" target="_blank" rel="noopener">MLflow run</a>')
    registered = report.registered_uri
    version = report.tags.get("registry.version")
    facts = [
        ("Airflow run", f"<code>{esc(report.run_key)}</code>"),
        ("MLflow run", f"<code>{esc(report.mlflow_run_id)}</code> ({esc(report.status.lower())})"),
        ("decision", verdict),
        ("registered", f"<code>{esc(registered)}</code> (version {esc(version)})" if registered else
         esc("nothing" if "registry.model_uri" in report.tags else "not yet")),
    ]
    if "approval.outcome" in report.tags:
        answer = [report.tags.get(f"approval.{key}") for key in ("outcome", "reviewer", "responded_at", "comment")]
        outcome, reviewer, when, comment = (value or "" for value in answer)
        facts.append(("human approval", esc(f"{outcome} by {reviewer or 'nobody'} at {when}"
                                            + (f": {comment}" if comment else ""))))
    rows = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in facts)
    metrics = "".join(
        f"<tr><td>{esc(m['metric'])}</td><td class='num'>{number(m['before'])}</td>"
        f"<td class='num'>{number(m['after'])}</td><td class='num'>{number(m['change'], True)}</td>"
        f"<td class='num'>[{number(m['low'], True)}, {number(m['high'], True)}]</td></tr>"
        for m in report.before_after())
    reasons = ""
    if decision:
        checks = "".join(
            f'<li class="{"ok" if reason.startswith("ok") else "FAIL"}"><code>{esc(reason)}</code></li>'
            for reason in decision.get("reasons", []))
        reasons = f'<h2>Promotion gate: every rule</h2><ul id="reasons">{checks}</ul>'
    plots = "".join(f'<img alt="{esc(name)}" src="{esc(plot_base + quote(name.split("/")[-1]))}">'
                    for name in report.plots)
    body = (
        f"<h1>Run report: {esc(dag_id)}</h1><table id='facts'>{rows}</table>"
        f"<p>{' · '.join(links)}</p>"
        "<h2>Before (SFT) and after (PPO)</h2><table id='metrics'><thead><tr><th>metric</th><th>before</th>"
        "<th>after</th><th>change (paired)</th><th>interval</th></tr></thead>"
        f"<tbody>{metrics}</tbody></table>{reasons}"
        + (f"<h2>Plots</h2><p>{plots}</p>" if plots else "")
        + samples_table(report.table)
    )
    return page(title, body, script)


def samples_table(rows: list[dict]) -> str:
    if not rows:
        return "<h2>Held-out samples</h2><p>No per-sample results logged yet.</p>"
    body = "".join(
        f'<tr class="sample"><td class="dialogue">{esc(row["dialogue"])}</td><td>{esc(row["summary_before"])}</td>'
        f'<td>{esc(row["summary_after"])}</td><td class="num">{number(row["toxicity_before"])}</td>'
        f'<td class="num">{number(row["toxicity_after"])}</td>'
        f'<td class="num diff">{number(row["toxicity_diff"], True)}</td></tr>'
        for row in rows)
    return (f"<h2>{len(rows)} held-out samples, most improved first</h2>"
            '<p><input id="search" type="search" placeholder="Search dialogues and summaries" size="40"> '
            '<span id="shown" class="muted"></span></p>'
            "<table id='samples'><thead><tr><th>dialogue</th><th>summary before</th><th>summary after</th>"
            "<th>toxicity before</th><th>toxicity after</th><th>difference</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


def label_page(source: str, sources: list[dict], item: Item | None, order: list[str], state: Progress,
               labels_uri: str, skip: list[str], base: str, script: str) -> str:
    options = "".join(f'<option value="{esc(s["run_key"])}">{esc(s["status"].lower())}</option>' for s in sources)
    chooser = (f'<form method="get" action="{esc(base)}label"><label>Candidates from a {esc("detox_retrain")} run '
               'or a jsonl in S3: <input name="source" id="source" list="sources" size="50" '
               f'value="{esc(source)}"></label><datalist id="sources">{options}</datalist> '
               '<button type="submit">Open</button></form>')
    agreement = ("n/a (no item ranked by two annotators yet)" if state.agreement is None
                 else f"{state.agreement:.0%} of candidate pairs ordered alike over {state.shared_items} items")
    annotators = ", ".join(f"{esc(name)}: {count}" for name, count in sorted(state.per_annotator.items())) or "none"
    progress = (f'<p id="progress">Labeled <b>{state.labeled_items}</b> / {state.items} items · per annotator: '
                f'{annotators} · agreement: {esc(agreement)}</p>')
    train = (f'<p><button id="train" data-url="{esc(base)}train">Train a reward model on the labeled prefix</button>'
             f'<span class="muted">rankings are kept in <code>{esc(labels_uri)}</code></span></p>')
    if item is None:
        work = "<p id='done'>Nothing left to rank from this source for you.</p>"
    else:
        n = len(order)
        cards = "".join(
            f'<div class="card" data-candidate="{esc(label)}" tabindex="0"><p class="candidate">'
            f'{esc(item.candidates[label])}</p>'
            + "".join(f'<label><input type="radio" name="rank-{index}" value="{rank}"> {rank}</label>'
                      for rank in range(1, n + 1))
            + "</div>" for index, label in enumerate(order))
        work = (
            f'<form id="ranking" data-url="{esc(base)}label" data-source="{esc(source)}" '
            f'data-item="{esc(item.item_id)}" data-skip="{esc(",".join(skip))}">'
            f'<h2>Dialogue</h2><div class="dialogue-box" id="dialogue">{esc(item.dialogue)}</div>'
            f"<h2>Rank the {n} summaries (1 = best; equal ranks are ties)</h2>{cards}"
            '<p><button type="submit" id="submit">Submit (Enter)</button>'
            '<button type="button" id="skip">Skip (S)</button></p>'
            '<p class="muted">Keys: 1-4 rank the highlighted summary and move on; ↑/↓ or J/K move; '
            "Enter submits; S skips.</p></form>")
    body = (f"<h1>Label summaries</h1>{chooser}{progress}{train}<p id='message' role='status'></p>{work}")
    return page("Label summaries", body, script)


SCRIPT = r"""
// Behaviour of the plugin's pages. No inline scripts: the pages' Content-Security-Policy allows
// scripts from this app only. All text is set with textContent, never as HTML.
document.addEventListener("DOMContentLoaded", () => {
  const search = document.getElementById("search");
  if (search) {
    const rows = Array.from(document.querySelectorAll("#samples tbody tr"));
    const shown = document.getElementById("shown");
    const filter = () => {
      const needle = search.value.toLowerCase();
      let count = 0;
      for (const row of rows) {
        const hit = !needle || row.textContent.toLowerCase().includes(needle);
        row.hidden = !hit;
        count += hit;
      }
      shown.textContent = `${count} of ${rows.length} shown`;
    };
    search.addEventListener("input", filter);
    filter();
  }
  const message = document.getElementById("message");
  const post = async (url, body) => {
    const response = await fetch(url, {method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.detail || response.statusText);
    return data;
  };
  const train = document.getElementById("train");
  if (train) {
    train.addEventListener("click", async () => {
      train.disabled = true;
      message.textContent = "Starting reward_model_train...";
      try {
        const data = await post(train.dataset.url, {});
        message.textContent =
          `Triggered reward_model_train run ${data.dag_run_id} on ${data.records} rankings (${data.preferences}).`;
      } catch (error) {
        message.textContent = `Not triggered: ${error.message}`;
      } finally {
        train.disabled = false;
      }
    });
  }
  const form = document.getElementById("ranking");
  if (!form) return;
  const cards = Array.from(form.querySelectorAll(".card"));
  let focused = 0;
  const focus = (index) => {
    focused = Math.max(0, Math.min(cards.length - 1, index));
    cards.forEach((card, i) => card.classList.toggle("focused", i === focused));
  };
  cards.forEach((card, i) => card.addEventListener("click", () => focus(i)));
  focus(0);
  const next = (skipped) => {
    const url = new URL(window.location.href);
    url.searchParams.set("source", form.dataset.source);
    const skip = form.dataset.skip ? form.dataset.skip.split(",") : [];
    if (skipped) skip.push(form.dataset.item);
    if (skip.length) url.searchParams.set("skip", skip.join(",")); else url.searchParams.delete("skip");
    window.location.assign(url.toString());
  };
  const submit = async () => {
    const ranking = cards.map((card) => {
      const checked = card.querySelector("input:checked");
      return checked ? Number(checked.value) : null;
    });
    if (ranking.includes(null)) {
      message.textContent = "Give every summary a rank first.";
      return;
    }
    try {
      const data = await post(form.dataset.url, {source: form.dataset.source, item_id: form.dataset.item,
        candidates: cards.map((card) => card.dataset.candidate), ranking});
      message.textContent = `Saved as ${data.uri}`;
      next(false);
    } catch (error) {
      message.textContent = `Not saved: ${error.message}`;
    }
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  document.getElementById("skip").addEventListener("click", () => next(true));
  document.addEventListener("keydown", (event) => {
    if (event.target.tagName === "INPUT" && event.target.type !== "radio") return;
    const key = event.key.toLowerCase();
    if (/^[1-4]$/.test(key) && Number(key) <= cards.length) {
      const input = cards[focused].querySelector(`input[value="${key}"]`);
      if (input) input.checked = true;
      focus(focused + 1);
      event.preventDefault();
    } else if (key === "arrowdown" || key === "j") { focus(focused + 1); event.preventDefault(); }
    else if (key === "arrowup" || key === "k") { focus(focused - 1); event.preventDefault(); }
    else if (key === "enter") { submit(); event.preventDefault(); }
    else if (key === "s") { next(true); event.preventDefault(); }
  });
});
"""
