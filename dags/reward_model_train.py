"""A reward model from human preference rankings, registered when it ranks held-out pairs well."""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import CronTriggerTimetable, Param, dag, get_current_context, task

from tasks.config import REWARD_FORM_FIELDS, RewardRunConfig, form_field_schemas

DOC_MD = """
# reward_model_train

Trains a reward model from human preferences and registers it for `detox_retrain`.

1. **load_preferences**: the rankings file (local, or `s3://`) copied into the run
   folder. Malformed records (rank count differs from response count, unknown rank values,
   empty text) are listed by line and skipped. A file without one usable pair fails here.
2. **build_pairs**: every ordered (chosen, rejected) pair that a ranking implies (ties
   give none). The records are split into train and held-out test, and all pairs of one
   record stay on the same side.
3. **train**: TRL's `RewardTrainer` fits a sequence classifier with one output, with
   loss -log σ(r_chosen - r_rejected).
4. **evaluate**: held-out pairwise accuracy and mean margin, scored the same way PPO
   scores (prompt + response).
5. **registration_check**: register only when the accuracy reaches `min_accuracy`.
6. **register** (the pyfunc, with alias `champion`; the replaced version keeps `previous`)
   or **skip_registration**.

Use it as the reward of `detox_retrain`: set its form field `reward_model` to
`models:/<registered name>@champion`.
"""

# Training and evaluation take the pool and queue a deployment names (opt-in; see detox_retrain.py).
GPU = {key: value for key, value in (("pool", os.environ.get("DETOX_GPU_POOL")),
                                     ("queue", os.environ.get("DETOX_GPU_QUEUE"))) if value}

FORM_PARAMS = {
    name: Param(None, **schema) for name, schema in form_field_schemas(RewardRunConfig, REWARD_FORM_FIELDS).items()
}


SCHEDULE = os.environ.get("DETOX_REWARD_SCHEDULE")


def from_next_fire(cron: str) -> CronTriggerTimetable:
    """``cron`` in Airflow's default timezone, first run at its next fire time (see detox_retrain.py)."""
    from airflow import settings

    return CronTriggerTimetable(cron, timezone=settings.TIMEZONE, run_immediately=timedelta(0))


@dag(
    dag_id="reward_model_train",
    # Manual by default; set DETOX_REWARD_SCHEDULE (a cron expression or preset such as @monthly)
    # to retrain on a schedule as new rankings arrive.
    schedule=from_next_fire(SCHEDULE) if SCHEDULE else None,
    catchup=False,
    max_active_runs=1,
    doc_md=DOC_MD,
    tags=["mlops", "rlhf", "reward-model"],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=20),
    },
    params={
        "profile": Param(
            os.environ.get("DETOX_PROFILE", "production"),
            type="string",
            enum=list(RewardRunConfig.profiles()),
            description="production: roberta-base on GPU; demo: the embedded preferences and tiny RoBERTa on CPU.",
        ),
        **FORM_PARAMS,
        "overrides": Param(
            {}, type="object", description="Any other config field by dotted name, e.g. {\"training.batch_size\": 8}."
        ),
    },
)
def reward_model_train():
    @task
    def load_preferences() -> dict:
        return _step("load_preferences")

    @task
    def build_pairs(loaded: dict) -> dict:
        return _step("build_pairs", loaded["preferences_path"])

    @task(execution_timeout=timedelta(hours=12), **GPU)
    def train() -> dict:
        return _step("train")

    @task(**GPU)
    def evaluate() -> dict:
        return _step("evaluate")

    @task.branch
    def registration_check(evaluation: dict) -> str:
        decision = _step("registration_check", evaluation)
        get_current_context()["ti"].xcom_push(key="decision", value=decision)
        return "register" if decision["register"] else "skip_registration"

    @task
    def register(decision: dict) -> dict:
        return _step("register", decision)

    @task
    def skip_registration(decision: dict) -> dict:
        return _step("skip_registration", decision)

    pairs = build_pairs(load_preferences())
    trained = train()
    pairs >> trained
    evaluation = evaluate()
    trained >> evaluation
    gate = registration_check(evaluation)
    gate >> [register(gate["decision"]), skip_registration(gate["decision"])]


def _step(name: str, *args):
    """Step ``name`` of :mod:`tasks.steps.reward_model_train` for this DAG run. Bad input (config, data,
    adapter, ...) fails the task at once: a retry could not fix it."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.errors import InputError
    from tasks.steps import reward_model_train as steps

    try:
        return getattr(steps, name)(*_run(), *args)
    except InputError as err:
        raise AirflowFailException(f"{type(err).__name__}: {err}") from err


def _run():
    """The config from this DAG run's Params, and who is running; credentials from the connections."""
    from tasks.config import config_from_params
    from tasks.io.connections import apply_connections
    from tasks.steps.context import StepContext

    apply_connections(_connection)
    context = get_current_context()
    ti = context["ti"]
    ctx = StepContext(run_key=context["run_id"], dag_id=ti.dag_id, try_number=ti.try_number)
    return config_from_params(dict(context["params"]), RewardRunConfig, REWARD_FORM_FIELDS), ctx


def _connection(conn_id: str):
    """The Airflow connection ``conn_id``, or None when it is not defined."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


reward_model_train()
