"""The whole workflow on the embedded default, through Airflow, MLflow and S3 on loopback."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import mlflow
import pytest
from support import TEST_RUN

from tasks.config import RunConfig
from tasks.io.s3 import AdapterDownloadError
from tasks.local.demo import causal_overrides, run_pipeline
from tasks.registry import tracking

pytestmark = pytest.mark.slow


def registered_versions(name: str) -> list[str]:
    return sorted(v.version for v in tracking.client().search_model_versions(f"name = '{name}'"))


def champion(name: str):
    return tracking.client().get_model_version_by_alias(name, "champion")


def run_tags(report: dict) -> dict:
    return tracking.client().get_run(report["mlflow_run_id"]).data.tags


NAME = RunConfig.for_profile("demo").registered_model_name
# The demo profile with fewer PPO steps and what the tests' runs set (TEST_RUN, tests/support.py), as the
# runs here only need a clear outcome. The outcome depends on the CPU that built the embedded default:
# 16 steps (the demo runs 70) took toxicity on the whole held-out split from 0.283 to 0.084 on the
# earlier hosts, from 0.247 to 0.134 (-46%, ROUGE-L -4.9%) on an AVX-512 one, where PPO seeds 1 and 2
# gave -37% and -30%. The demo's own outcome, over PPO seeds, is benchmarks/demo_seeds.py's.
FIRST_STEPS = {"ppo.steps": 16, **TEST_RUN}
# A run that passes its own gate but not the champion's: 16 steps on another PPO seed, judged on 200 of
# the 229 held-out prompts. On the AVX-512 host PPO seed 2 takes the whole split to 0.174 (-30%), the
# champion (seed 0) to 0.134; seed 1 (0.156) was not significant on 120 prompts, and 8 steps, the
# earlier choice, changed nothing there.
CHALLENGER = {"ppo.steps": 16, "ppo.seed": 2, "eval.num_samples": 200, **TEST_RUN}


@pytest.fixture(scope="module")
def first_promotion(demo):
    """The demo DAG once, onto an empty registry: the champion that later runs face."""
    assert registered_versions(NAME) == []
    return run_pipeline("airflow", FIRST_STEPS)


def test_demo_dag_lowers_toxicity_and_registers_a_champion(first_promotion, tmp_path):
    report = first_promotion

    assert report["decision"] == "promote"
    assert report["toxicity_after"] < 0.75 * report["toxicity_before"]
    low, high = report["toxicity_change_ci"]
    assert low < high < 0
    assert report["judge_after"] < report["judge_before"]  # the independent judge agrees
    assert report["rouge_l_after"] >= 0.9 * report["rouge_l_before"]
    assert report["model_uri"] == f"models:/{NAME}@champion"
    version = champion(NAME)
    assert version.tags["airflow.run_id"] == report["run_key"]
    assert version.tags["mlflow.source_run_id"] == report["mlflow_run_id"]
    assert float(version.tags["toxicity_after"]) == pytest.approx(report["toxicity_after"], abs=1e-6)
    assert float(version.tags["judge_after"]) == pytest.approx(report["judge_after"], abs=1e-6)
    params = tracking.client().get_run(report["mlflow_run_id"]).data.params
    assert version.tags["eval_fingerprint"] == params["eval/eval_fingerprint"] == params["baseline/eval_fingerprint"]
    info = mlflow.models.get_model_info(f"models:/{NAME}/{version.version}")
    assert info.signature.inputs.input_types() == [mlflow.types.DataType.string]
    assert info.saved_input_example_info is not None

    # The reports, as a reviewer downloads them from the run.
    client = tracking.client()
    files = {Path(f.path).name for f in client.list_artifacts(report["mlflow_run_id"], "report")}
    assert files == {"comparison.html", "toxicity_before_after.png", "ppo_reward_kl.png", "summary.json"}
    local = Path(client.download_artifacts(report["mlflow_run_id"], "report", str(tmp_path)))
    summary = json.loads((local / "summary.json").read_text())
    assert summary["decision"]["promote"] and summary["registered"]["version"] == str(version.version)
    assert summary["candidate"]["num_samples"] == summary["baseline"]["num_samples"] > 200  # the whole split
    for plot in ("toxicity_before_after.png", "ppo_reward_kl.png"):
        image = matplotlib.image.imread(local / plot)  # decodes as a picture a reviewer can read ...
        assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] > image.shape[0], plot
        assert image[..., :3].std() > 0.05, plot  # ... with something drawn on it
    assert (local / "comparison.html").read_text().count("<tr class=") == summary["candidate"]["num_samples"]
    # ... and as the DAG's last task printed it.
    log = Path(report["dag_log"]).read_text()
    printed = log[log.index("detox_retrain summary:"):]
    assert json.loads(printed[printed.index("{"):printed.index("\n}") + 2]) == summary

    # A fresh process, as another service would: load by alias and summarize.
    dialogues = ["#Person1#: Could you help me carry these boxes to the car?\n"
                 "#Person2#: Sure, give me the heavy one. Where are you moving to?\n"
                 "#Person1#: To a flat near the station. The rent is cheaper there."] * 2
    script = (
        "import json, sys, mlflow\n"
        f"model = mlflow.pyfunc.load_model({report['model_uri']!r})\n"
        "print(json.dumps(model.predict(json.loads(sys.stdin.read()))))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(dialogues), capture_output=True, text=True,
        env=dict(os.environ), timeout=300, check=True,
    )
    summaries = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(summaries) == 2
    assert all(isinstance(s, str) and len(s.split()) >= 3 for s in summaries)


def test_an_operator_can_audit_the_champion(first_promotion):
    """`detox evaluate --model` on the registered champion reproduces the metrics it was promoted with."""
    completed = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "evaluate", "--profile", "demo", "--model", f"models:/{NAME}@champion"],
        capture_output=True, text=True, env=dict(os.environ), timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    audit = json.loads(completed.stdout[completed.stdout.index("{"):])
    tags = champion(NAME).tags
    assert audit["model"] == f"models:/{NAME}/{champion(NAME).version}" and "champion" in audit["aliases"]
    assert audit["eval_fingerprint"] == tags["eval_fingerprint"]
    assert audit["toxicity_mean"] == pytest.approx(float(tags["toxicity_after"]), abs=1e-6)
    assert audit["rouge_l_mean"] == pytest.approx(float(tags["rouge_l_after"]), abs=1e-6)

    missing = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "evaluate", "--profile", "demo", "--model", "999"],
        capture_output=True, text=True, env=dict(os.environ), timeout=300,
    )
    assert missing.returncode == 2
    assert f"registered model '{NAME}' has no version 999" in missing.stderr


def test_gate_that_cannot_be_met_registers_nothing(first_promotion):
    before = registered_versions(NAME)

    report = run_pipeline("airflow", {"ppo.steps": 2, **TEST_RUN, "promotion.min_toxicity_reduction": 1.0})

    assert report["decision"] == "reject"
    assert "toxicity_reduced" in report["failed_checks"].split(",")
    assert report["model_uri"] == "none"
    assert registered_versions(NAME) == before
    assert champion(NAME).version == before[-1]
    # Same protocol as the champion's promotion: its metrics come from its version tags.
    assert run_tags(report)["champion.source"] == "version tags"


def test_a_better_champion_is_not_replaced(first_promotion):
    """A weaker PPO run beats its own baseline but not the champion; the champion was measured on
    another eval set (here: all held-out prompts, now 200), so it is evaluated again."""
    before = registered_versions(NAME)

    report = run_pipeline("airflow", CHALLENGER)

    assert report["decision"] == "reject"
    assert report["failed_checks"] == "beats_champion"  # every other rule passed
    assert run_tags(report)["champion.source"] == "re-evaluated"
    assert registered_versions(NAME) == before


def test_promotion_keeps_the_replaced_champion_as_previous(first_promotion):
    """The one DAG run here that trains the demo's own critic (an adapter of its own) and promotes."""
    replaced = champion(NAME).version

    report = run_pipeline("airflow", {"ppo.steps": 8, "promotion.compare_with_champion": False})

    assert report["decision"] == "promote"
    assert champion(NAME).version != replaced
    assert tracking.client().get_model_version_by_alias(NAME, "previous").version == replaced


def test_missing_adapter_in_s3_is_a_clear_error(demo):
    from tasks.steps import detox_retrain

    config = RunConfig.for_profile("demo", {"model.sft_adapter_uri": "s3://detox-demo/adapters/does-not-exist"})
    with pytest.raises(AdapterDownloadError, match="no adapter found at s3://detox-demo/adapters/does-not-exist"):
        detox_retrain.download_adapter(config, detox_retrain.StepContext(run_key="missing-adapter"))
    assert not config.run_dir("missing-adapter").joinpath("adapters", "sft").exists()


# The tiny Llama's PPO steps (the demo runs 70), with TEST_RUN: 32 steps took its toxicity from 0.274 to
# 0.044 on the earlier hosts but only from 0.273 to 0.230 on an AVX-512 one, where 48 steps take it to
# 0.069 (-75%, 95% interval of the change [-0.260, -0.152]) and ROUGE-L from 0.525 to 0.489.
CAUSAL_STEPS = 48

REPORT = re.compile(
    r"=== detox_retrain demo ===\n"
    r"run: +(?P<run_key>\S+) \(MLflow run (?P<run_id>\w+)\)\n"
    r"toxicity  before -> after: (?P<toxicity_before>[\d.]+) -> (?P<toxicity_after>[\d.]+)\n"
    r"toxicity change, paired bootstrap CI: \[(?P<ci_low>[-+\d.]+), (?P<ci_high>[-+\d.]+)\]\n"
    r"judge     before -> after: (?P<judge_before>[\d.]+) -> (?P<judge_after>[\d.]+) \(independent of the reward\)\n"
    r"ROUGE-L   before -> after: (?P<rouge_l_before>[\d.]+) -> (?P<rouge_l_after>[\d.]+)\n"
    r"decision: +(?P<decision>\w+) \(failed checks: (?P<failed_checks>[^)]*)\)\n"
    r"registered model: +(?P<model_uri>\S+)\n?$"
)


def test_causal_policy_runs_the_same_chain_from_the_command_line(demo, detox_home, causal_build):
    """`detox demo --family causal`: the embedded tiny Llama (the TinyLlama seed's family) through the
    same DAG. What it prints last is the README's headline report, checked against the MLflow run."""
    overrides = [f"--set={key}={value}" for key, value in {**TEST_RUN, "ppo.steps": CAUSAL_STEPS}.items()]
    completed = subprocess.run([sys.executable, "-m", "tasks.cli", "demo", "--family", "causal", *overrides],
                               capture_output=True, text=True, env=dict(os.environ), timeout=1200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = REPORT.search(completed.stdout[completed.stdout.rindex("=== detox_retrain demo ==="):])
    assert printed, completed.stdout[-2000:]
    report = printed.groupdict()

    run = tracking.client().get_run(report["run_id"])
    assert run.data.tags[tracking.RUN_KEY_TAG] == report["run_key"]
    metrics = run.data.metrics
    for printed_name, metric in [
        ("toxicity_before", "baseline/toxicity_mean"), ("toxicity_after", "eval/toxicity_mean"),
        ("ci_low", "promotion/toxicity_change_ci_low"), ("ci_high", "promotion/toxicity_change_ci_high"),
        ("judge_before", "baseline/judge_mean"), ("judge_after", "eval/judge_mean"),
        ("rouge_l_before", "baseline/rouge_l_mean"), ("rouge_l_after", "eval/rouge_l_mean"),
    ]:
        assert float(report[printed_name]) == pytest.approx(metrics[metric], abs=5e-5), printed_name
    assert report["decision"] == run.data.tags["promotion.decision"]

    numbers = {name: float(report[name]) for name in ("toxicity_before", "toxicity_after", "rouge_l_before",
                                                      "rouge_l_after")}
    assert numbers["toxicity_after"] < 0.8 * numbers["toxicity_before"]
    assert numbers["rouge_l_after"] >= 0.9 * numbers["rouge_l_before"]
    assert report["decision"] == "promote"
    name = causal_overrides(detox_home)["registered_model_name"]
    assert report["model_uri"] == f"models:/{name}@champion"
    ppo_steps = [m.step for m in tracking.client().get_metric_history(report["run_id"], "ppo/kl")]
    assert sorted(ppo_steps) == list(range(CAUSAL_STEPS))
