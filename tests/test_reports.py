"""The report files a reviewer opens: PNGs that decode to pictures, an HTML table in the right order."""

import json
from html.parser import HTMLParser

import matplotlib.image
import pandas as pd

from tasks.evaluation.reports import write_reports


def samples(toxicity, judge=None):
    return pd.DataFrame({
        "id": [f"d{i}" for i in range(len(toxicity))],
        "dialogue": [f"#Person1#: <b>hello</b> {i}" for i in range(len(toxicity))],
        "generated": [f"summary {i} t={t}" for i, t in enumerate(toxicity)],
        "toxicity": toxicity,
        "judge": judge or [0.0] * len(toxicity),
    })


class Rows(HTMLParser):
    """The table body's cells, and every tag that is closed out of order or never closed."""

    VOID = {"meta", "br", "img", "link"}

    def __init__(self):
        super().__init__()
        self.rows, self.cell, self.in_body = [], None, False
        self.open, self.misnested = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append(tag)
        if tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.rows.append([])
        elif tag == "td" and self.in_body:
            self.cell = ""

    def handle_endtag(self, tag):
        if self.open and self.open[-1] == tag:
            self.open.pop()
        else:
            self.misnested.append(tag)
        if tag == "td" and self.cell is not None:
            self.rows[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_reports_are_readable_files(tmp_path):
    before = samples([0.9, 0.1, 0.5, 0.8])
    after = samples([0.1, 0.2, 0.5, 0.05])
    history = [{"reward_mean": -1.0 + 0.1 * step, "kl": 0.05 * step} for step in range(10)]
    summary = {"run_key": "r1", "decision": {"promote": True, "reasons": ["ok   all metrics finite"],
                                             "toxicity_change_ci": {"mean": -0.3, "low": -0.6, "high": -0.05,
                                                                    "confidence": 0.95, "seed": 1}},
               "baseline": {"toxicity_mean": 0.575}, "candidate": {"toxicity_mean": 0.2125}}

    paths = write_reports(tmp_path / "report", before, after, history, summary)

    for kind in ("toxicity_plot", "training_plot"):
        image = matplotlib.image.imread(paths[kind])
        assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 600
        assert image[..., :3].std() > 0.05  # not a blank canvas
    assert json.loads(paths["summary"].read_text()) == summary

    page = paths["table"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "&lt;b&gt;hello&lt;/b&gt;" in page and "<b>hello</b>" not in page  # dialogue text is escaped
    assert "-0.3000 [-0.6000, -0.0500] (95% CI, seed 1)" in page
    parser = Rows()
    parser.feed(page)
    assert parser.open == parser.misnested == []  # well-formed: every element closed, in order
    differences = [float(row[-1]) for row in parser.rows]
    assert differences == sorted(differences) == [-0.8, -0.75, 0.0, 0.1]  # most improved first
    assert parser.rows[0][1:3] == ["summary 0 t=0.9", "summary 0 t=0.1"]
