"""Human approval before promotion: off by default, wired between the gate and registration when
asked for, and the reviewer's answer logged to MLflow."""

import json
import os
from pathlib import Path

import pytest

from tasks.config import RunConfig, form_field_schemas
from tasks.registry import tracking
from tasks.steps.detox_retrain import StepContext, after_gate, layout, record_approval, skip_registration

DAGS = Path(__file__).resolve().parents[1] / "dags"


@pytest.fixture(scope="module")
def dag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags["detox_retrain"]


def test_approval_is_off_by_default_so_the_demo_needs_no_human():
    for profile in RunConfig.profiles():
        assert RunConfig.for_profile(profile).promotion.require_approval is False
    promoted = {"promote": True}
    assert after_gate(RunConfig.for_profile("demo"), promoted) == "register_model"


def test_the_gate_routes_as_asked():
    asked = RunConfig.for_profile("demo", {"promotion.require_approval": True})
    assert after_gate(asked, {"promote": True}) == "approval"
    assert after_gate(asked, {"promote": False}) == "skip_registration"  # nothing to approve
    assert after_gate(RunConfig.for_profile("demo"), {"promote": False}) == "skip_registration"


def test_the_trigger_form_offers_it(dag):
    assert form_field_schemas()["require_approval"]["type"] == ["null", "boolean"]
    assert "require_approval" in dag.params


def test_approval_sits_between_the_gate_and_registration(dag):
    from airflow.providers.standard.operators.hitl import HITLBranchOperator

    approval = dag.get_task("approval")
    assert isinstance(approval, HITLBranchOperator)
    assert approval.options == ["Approve", "Reject"]
    assert approval.options_mapping == {"Approve": "register_model", "Reject": "skip_registration"}
    assert approval.defaults == ["Reject"]  # the timeout promotes nothing
    assert set(approval.params) == {"comment"}
    assert approval.upstream_task_ids == {"promotion_check"}
    assert approval.downstream_task_ids == {"register_model", "skip_registration"}
    for name in ("register_model", "skip_registration"):
        task = dag.get_task(name)
        assert {"promotion_check", "approval"} <= task.upstream_task_ids
        # Runs when the gate chose it (approval skipped) or the approval did.
        assert task.trigger_rule == "none_failed_min_one_success"


@pytest.fixture
def gated_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = RunConfig.for_profile("demo", {"artifact_root": str(tmp_path / "runs"),
                                            "mlflow_artifact_location": (tmp_path / "artifacts").as_uri(),
                                            "promotion.require_approval": True})
    ctx = StepContext(run_key="manual__approval")
    decision = {"promote": True, "reasons": ["ok   toxicity 0.30 -> 0.10"]}
    paths = layout(config, ctx)
    paths.decision.parent.mkdir(parents=True)
    paths.decision.write_text(json.dumps(decision))
    return config, ctx, decision


def test_a_rejection_is_logged_with_reviewer_and_comment(gated_run):
    config, ctx, decision = gated_run
    response = {"chosen_options": ["Reject"], "params_input": {"comment": "summaries too short"},
                "responded_by_user": {"id": "7", "name": "ada"}, "responded_at": "2026-11-30T12:00:00+00:00",
                "timedout": False}
    assert record_approval(config, ctx, response)["outcome"] == "rejected"
    result = skip_registration(config, ctx, decision)
    assert result["reasons"][-1] == "FAIL approval rejected by ada: summaries too short"
    run = tracking.client().get_run(tracking.open_run(config, ctx.run_key))
    assert run.data.tags["approval.outcome"] == "rejected"
    assert run.data.tags["approval.reviewer"] == "ada"
    assert run.data.tags["approval.comment"] == "summaries too short"
    assert run.data.tags["registry.model_uri"] == "none"


def test_no_answer_before_the_timeout_is_no_promotion(gated_run):
    config, ctx, decision = gated_run
    timeout = {"chosen_options": ["Reject"], "params_input": {"comment": ""}, "responded_by_user": None,
               "responded_at": "2026-12-03T12:00:00+00:00", "timedout": True}
    assert record_approval(config, ctx, timeout) == {
        "outcome": "timed out", "reviewer": "", "comment": "", "responded_at": "2026-12-03T12:00:00+00:00"}
    assert skip_registration(config, ctx, decision)["reasons"][-1] == "FAIL approval timed out"


def test_an_approval_is_logged_too(gated_run):
    config, ctx, _ = gated_run
    response = {"chosen_options": ["Approve"], "params_input": {"comment": "looks good"},
                "responded_by_user": {"id": "7", "name": "ada"}, "responded_at": "2026-11-30T12:00:00+00:00"}
    assert record_approval(config, ctx, response)["outcome"] == "approved"
    tags = tracking.client().get_run(tracking.open_run(config, ctx.run_key)).data.tags
    assert (tags["approval.outcome"], tags["approval.reviewer"]) == ("approved", "ada")
