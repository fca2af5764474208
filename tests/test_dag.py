"""The DAG files as Airflow sees them: import cleanly, have the documented shape and form."""

import os
import re
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag


@pytest.fixture(scope="module")
def dag(bag):
    return bag.dags["detox_retrain"]


@pytest.fixture(scope="module")
def reward_dag(bag):
    return bag.dags["reward_model_train"]


def test_task_graph(dag):
    edges = {task.task_id: sorted(task.downstream_task_ids) for task in dag.tasks}
    assert edges["prepare_dataset"] == ["baseline_eval", "champion_eval", "evaluate", "ppo_train"]
    assert "baseline_eval" in edges["download_adapter"]
    assert "ppo_train" in edges["baseline_eval"]
    assert "evaluate" in edges["ppo_train"]
    assert edges["evaluate"] == edges["champion_eval"] == ["promotion_check"]
    assert edges["promotion_check"] == ["approval", "register_model", "skip_registration"]
    assert edges["approval"] == ["register_model", "skip_registration"]  # only with promotion.require_approval
    assert edges["register_model"] == edges["skip_registration"] == ["report"]
    # The report runs after whichever branch ran, and only if nothing failed.
    assert dag.get_task("report").trigger_rule == "none_failed_min_one_success"


def test_schedule_and_retries(dag):
    assert "0 0 * * 0" in repr(dag.timetable)  # @weekly
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    task = dag.get_task("ppo_train")
    assert task.retries >= 1 and task.retry_exponential_backoff

def test_the_dag_documentation_describes_every_task_in_order(dag):
    """The DAG's page in the UI walks through the tasks as they run."""
    described = re.findall(r"\*\*(\w+)\*\*", dag.doc_md)
    assert set(described) == {task.task_id for task in dag.tasks}
    order = [described.index(task_id) for task_id in ("prepare_dataset", "ppo_train", "evaluate", "promotion_check",
                                                      "register_model", "report")]
    assert order == sorted(order)
    assert "Summarize the following conversation" in " ".join(dag.doc_md.split())  # the prompt, across a line break


def test_trigger_form_has_typed_described_params(dag):
    params = dag.params
    assert params.get_param("profile").schema["enum"] == ["production", "production-tinyllama", "demo"]
    steps = params.get_param("ppo_steps")
    assert steps.schema["type"] == ["null", "integer"]
    assert steps.description == "Number of PPO steps (rollout + update)."
    for name in ("dataset_source", "sft_adapter_uri", "reward_model", "min_toxicity_reduction"):
        assert params.get_param(name).description


def test_out_of_range_params_are_rejected_before_any_work(dag):
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(dag.params)
    params["ppo_steps"] = 10
    params.validate()
    bad = ParamsDict(dag.params)
    with pytest.raises(Exception, match="ppo_steps"):
        bad["ppo_steps"] = 0
        bad.validate()


def test_reward_dag_shape_form_and_schedule(reward_dag):
    edges = {task.task_id: sorted(task.downstream_task_ids) for task in reward_dag.tasks}
    assert edges["load_preferences"] == ["build_pairs"]
    assert edges["build_pairs"] == ["train"]
    assert edges["train"] == ["evaluate"]
    assert edges["evaluate"] == ["registration_check"]
    assert edges["registration_check"] == ["register", "skip_registration"]
    assert type(reward_dag.timetable).__name__ == "NullTimetable"  # manual unless DETOX_REWARD_SCHEDULE is set
    params = reward_dag.params
    assert params.get_param("min_accuracy").schema["maximum"] == 1
    for name in ("preferences_source", "base_model", "learning_rate", "epochs"):
        assert params.get_param(name).description


def test_reward_dag_rejects_out_of_range_params(reward_dag):
    from airflow.sdk.definitions.param import ParamsDict

    bad = ParamsDict(reward_dag.params)
    with pytest.raises(Exception, match="min_accuracy"):
        bad["min_accuracy"] = 1.5
        bad.validate()


def test_reward_schedule_from_the_environment(tmp_path, monkeypatch):
    """DETOX_REWARD_SCHEDULE turns the manual DAG into a scheduled one."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("DETOX_REWARD_SCHEDULE", "@monthly")
    (tmp_path / "reward_model_train.py").write_text((DAGS / "reward_model_train.py").read_text())
    scheduled = DagBag(dag_folder=str(tmp_path)).dags["reward_model_train"]
    assert "0 0 1 * *" in repr(scheduled.timetable)


def test_without_a_named_pool_every_task_runs_in_the_default_pool_and_queue(dag, reward_dag):
    """A fresh Airflow has no `gpu` pool: a task assigned to it would wait in `scheduled` for ever."""
    assert "DETOX_GPU_POOL" not in os.environ and "DETOX_GPU_QUEUE" not in os.environ
    for task in [*dag.tasks, *reward_dag.tasks]:
        assert (task.pool, task.queue) == ("default_pool", "default"), task.task_id


def test_no_start_date_so_the_weekly_schedule_never_fires_on_unpause(dag):
    """With a start date and catchup=False, Airflow fires the latest past Sunday's run as soon as the
    DAG is unpaused; without one, the first scheduled run is the next Sunday."""
    from datetime import UTC, datetime

    from airflow.timetables.base import TimeRestriction
    from airflow.timetables.trigger import CronTriggerTimetable

    def first_run(start_date):
        timetable = CronTriggerTimetable(dag.timetable.expression, timezone="UTC")
        restriction = TimeRestriction(earliest=start_date, latest=None, catchup=dag.catchup)
        return timetable.next_dagrun_info_v2(last_dagrun_info=None, restriction=restriction).run_after

    now = datetime.now(UTC)
    assert first_run(datetime(2026, 1, 1, tzinfo=UTC)) <= now  # what a start date would do
    assert dag.start_date is None
    assert first_run(dag.start_date) > now


def test_gpu_pool_and_queue_from_the_environment(tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("DETOX_GPU_POOL", "a100")
    monkeypatch.setenv("DETOX_GPU_QUEUE", "cuda-workers")
    for name in ("detox_retrain.py", "reward_model_train.py"):
        (tmp_path / name).write_text((DAGS / name).read_text())
    bag = DagBag(dag_folder=str(tmp_path)).dags
    gpu_tasks = {"detox_retrain": {"baseline_eval", "ppo_train", "evaluate", "champion_eval"},
                 "reward_model_train": {"train", "evaluate"}}
    for dag_id, names in gpu_tasks.items():
        for task in bag[dag_id].tasks:
            expected = ("a100", "cuda-workers") if task.task_id in names else ("default_pool", "default")
            assert (task.pool, task.queue) == expected, (dag_id, task.task_id)
