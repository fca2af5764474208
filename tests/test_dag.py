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
    from datetime import UTC, datetime

    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("DETOX_REWARD_SCHEDULE", "@monthly")
    (tmp_path / "reward_model_train.py").write_text((DAGS / "reward_model_train.py").read_text())
    scheduled = DagBag(dag_folder=str(tmp_path)).dags["reward_model_train"]
    assert "0 0 1 * *" in repr(scheduled.timetable)
    # Unpaused on the 2nd, it waits for the 1st of next month (a plain "@monthly" ran the 1st's at once).
    now = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    assert first_scheduled_run(scheduled.timetable, None, now) == datetime(2027, 1, 1, tzinfo=UTC)


def test_without_a_named_pool_every_task_runs_in_the_default_pool_and_queue(dag, reward_dag):
    """A fresh Airflow has no `gpu` pool: a task assigned to it would wait in `scheduled` for ever."""
    assert "DETOX_GPU_POOL" not in os.environ and "DETOX_GPU_QUEUE" not in os.environ
    for task in [*dag.tasks, *reward_dag.tasks]:
        assert (task.pool, task.queue) == ("default_pool", "default"), task.task_id


def first_scheduled_run(timetable, start_date, now):
    """When the scheduler would run a catchup=False DAG with this (serialized) timetable first, at ``now``."""
    from unittest import mock

    from airflow.serialization.decoders import decode_timetable
    from airflow.serialization.encoders import encode_timetable
    from airflow.timetables.base import TimeRestriction

    core = decode_timetable(encode_timetable(timetable))  # what the scheduler holds
    restriction = TimeRestriction(earliest=start_date, latest=None, catchup=False)
    with mock.patch("airflow.timetables.trigger.utcnow", return_value=now):
        return core.next_dagrun_info_v2(last_dagrun_info=None, restriction=restriction).run_after


# Sunday 00:00:30 and 08:26 (a plain "@weekly" fired that morning's run on unpause), Sunday 16:00,
# a Wednesday and Saturday 23:59 (2026-12-06 is a Sunday).
WEEK = ["2026-12-06T00:00:30", "2026-12-06T08:26:00", "2026-12-06T16:00:00", "2026-12-09T12:00:00",
        "2026-12-12T23:59:00"]


@pytest.mark.parametrize("now", WEEK)
def test_unpausing_never_fires_a_scheduled_run_the_first_is_the_next_sunday(dag, now):
    """No start date, catchup=False: whenever the DAG is unpaused (or Airflow first starts), its first
    scheduled run is the next Sunday 00:00, not the last one; a start date would fire the last one."""
    from datetime import UTC, datetime

    from airflow.sdk import CronTriggerTimetable

    now = datetime.fromisoformat(now).replace(tzinfo=UTC)
    next_sunday = datetime(2026, 12, 13, tzinfo=UTC)
    assert dag.start_date is None and dag.catchup is False
    assert first_scheduled_run(dag.timetable, None, now) == next_sunday
    with_start = first_scheduled_run(dag.timetable, datetime(2026, 1, 1, tzinfo=UTC), now)
    assert with_start == datetime(2026, 12, 6, tzinfo=UTC)  # what a start date would do
    if now.day == 6 and now.hour < 16:  # what plain "@weekly" did: last Sunday's run at once
        plain = first_scheduled_run(CronTriggerTimetable("@weekly", timezone="UTC"), None, now)
        assert plain == datetime(2026, 12, 6, tzinfo=UTC)


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
