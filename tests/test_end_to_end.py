"""The whole workflow on the embedded default, through Airflow, MLflow and S3 on loopback."""

import json
import os
import subprocess
import sys

import pytest

from tasks import tracking
from tasks.config import RunConfig
from tasks.demo import causal_overrides, run_pipeline
from tasks.storage import AdapterDownloadError

pytestmark = pytest.mark.slow


def registered_versions(name: str) -> list[str]:
    return [v.version for v in tracking.client().search_model_versions(f"name = '{name}'")]


def test_demo_dag_lowers_toxicity_and_registers_a_champion(demo):
    report = run_pipeline("airflow")

    assert report["decision"] == "promote"
    assert report["toxicity_after"] < 0.5 * report["toxicity_before"]
    assert report["rouge_l_after"] >= 0.9 * report["rouge_l_before"]
    name = RunConfig.for_profile("demo").registered_model_name
    assert report["model_uri"] == f"models:/{name}@champion"
    version = tracking.client().get_model_version_by_alias(name, "champion")
    assert version.tags["airflow.run_id"] == report["run_key"]

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


def test_gate_that_cannot_be_met_registers_nothing(demo):
    name = RunConfig.for_profile("demo").registered_model_name
    before = registered_versions(name)

    report = run_pipeline("airflow", {"ppo.steps": 2, "promotion.min_toxicity_reduction": 1.0})

    assert report["decision"] == "reject"
    assert report["model_uri"] == "none"
    assert registered_versions(name) == before


def test_missing_adapter_in_s3_is_a_clear_error(demo):
    from tasks import pipeline

    config = RunConfig.for_profile("demo", {"model.sft_adapter_uri": "s3://detox-demo/adapters/does-not-exist"})
    with pytest.raises(AdapterDownloadError, match="no adapter found at s3://detox-demo/adapters/does-not-exist"):
        pipeline.download_adapter(config, pipeline.StepContext(run_key="missing-adapter"))
    assert not config.run_dir("missing-adapter").joinpath("adapters", "sft").exists()


def test_causal_policy_runs_the_same_chain(demo, detox_home):
    """The TinyLlama seed's family: the embedded tiny Llama through the same DAG."""
    report = run_pipeline("airflow", causal_overrides(detox_home))

    assert report["toxicity_after"] < 0.8 * report["toxicity_before"]
    assert report["rouge_l_after"] >= 0.9 * report["rouge_l_before"]
    assert report["decision"] == "promote"
    name = causal_overrides(detox_home)["registered_model_name"]
    assert report["model_uri"] == f"models:/{name}@champion"
    ppo_steps = [m.step for m in tracking.client().get_metric_history(report["mlflow_run_id"], "ppo/kl")]
    assert sorted(ppo_steps) == list(range(RunConfig.for_profile("demo").ppo.steps))
