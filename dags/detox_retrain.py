"""Weekly PPO detoxification of the dialogue summarizer, gated by a paired evaluation."""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.standard.operators.hitl import HITLBranchOperator
from airflow.sdk import CronTriggerTimetable, Param, dag, get_current_context, task

from tasks.config import RunConfig, form_field_schemas

DOC_MD = """
# detox_retrain

Makes the dialogue summarizer less toxic with reinforcement learning, and registers
the result only when it measurably is.

1. **prepare_dataset** — DialogSum-style dialogues → "Summarize the following
   conversation" prompts, length-filtered (skipped rows counted), split, tokenized.
2. **download_adapter** — the supervised LoRA adapter from S3, integrity-checked.
3. **baseline_eval** — the SFT policy on the held-out prompts: toxicity (P(hate) of
   the reward classifier on the summary), an independent judge, ROUGE-1/2/L.
4. **ppo_train** — PPO with a fresh LoRA adapter and a critic (`ppo.critic`); reward = the
   classifier's `nothate` logit; per-token KL penalty to the policy with the PPO
   adapter disabled. Resumes from its last checkpoint when retried.
5. **evaluate** — the candidate under the same prompts, sampling seeds and scorers.
6. **champion_eval** — the registered champion's metrics under this protocol: from its
   version tags, or evaluated again when it was measured under another protocol.
7. **promotion_check** — promote only if toxicity falls by the configured margin with
   the paired bootstrap interval of the change below zero, ROUGE-L stays within
   tolerance, the judge does not get worse, and the candidate beats the champion.
8. **approval** (only with `require_approval`) — a person approves or rejects the promoted
   candidate here (Airflow's required actions); no answer before
   `promotion.approval_timeout_hours`: rejected. Reviewer and comment go to MLflow.
9. **register_model** — merged model logged as an MLflow pyfunc, registered, alias
   `champion` moved (the replaced one keeps `previous`) — or **skip_registration**,
   which logs why not.
10. **report** — HTML before/after table, PNG plots and a JSON summary as MLflow
   artifacts under `report/`; the summary is printed in this task's log.

Every step logs into one MLflow run named after this DAG run. Leave a form field
empty to use the profile's default; `overrides` takes any other config field by its
dotted name, e.g. `{"ppo.batch_size": 32}`.
"""

# Training and evaluation take a slot of the pool named by DETOX_GPU_POOL and, with the Celery or
# Kubernetes executor, run on the queue named by DETOX_GPU_QUEUE. Both are opt-in: a deployment that
# names them creates them (`make up` and docker/'s airflow-init do: `airflow pools set gpu 1 ...`), and
# unset they leave the tasks in the default pool and queue, so the DAG runs on any fresh Airflow
# instead of waiting for ever on a pool that does not exist.
GPU = {key: value for key, value in (("pool", os.environ.get("DETOX_GPU_POOL")),
                                     ("queue", os.environ.get("DETOX_GPU_QUEUE"))) if value}

FORM_PARAMS = {
    name: Param(None, **schema) for name, schema in form_field_schemas().items()
}


def from_next_fire(cron: str) -> CronTriggerTimetable:
    """``cron`` in Airflow's default timezone, whose first run is its next fire time, not its last.

    The DAG has no start date, so Airflow picks its first run itself, and a plain ``"@weekly"`` picks
    last Sunday's when the DAG is unpaused (or Airflow first starts) less than 16.8 hours after it:
    Airflow 3.3's ``CronTriggerTimetable`` treats ``run_immediately=False`` as "within a tenth of the
    interval". On a Sunday morning that fired an unasked-for training run beside the user's own. A
    zero window accepts only a run that is due this instant.
    """
    from airflow import settings

    return CronTriggerTimetable(cron, timezone=settings.TIMEZONE, run_immediately=timedelta(0))


@dag(
    dag_id="detox_retrain",
    schedule=from_next_fire("@weekly"),
    catchup=False,
    max_active_runs=1,
    doc_md=DOC_MD,
    tags=["mlops", "rlhf", "detox"],
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
            enum=list(RunConfig.profiles()),
            description="production: FLAN-T5-base on GPU; production-tinyllama: TinyLlama-Chat in 4-bit "
            "(QLoRA) on GPU; demo: the embedded default on CPU.",
        ),
        **FORM_PARAMS,
        "overrides": Param(
            {}, type="object", description="Any other run-config field by dotted name, e.g. {\"ppo.seed\": 1}."
        ),
    },
)
def detox_retrain():
    @task
    def prepare_dataset() -> dict:
        return _step("prepare_dataset")

    @task
    def download_adapter() -> dict:
        return _step("download_adapter")

    @task(**GPU)
    def baseline_eval(data: dict, adapter: dict) -> dict:
        return _step("baseline_eval", data["dataset_uri"], adapter["adapter_dir"])

    @task(execution_timeout=timedelta(hours=12), **GPU)
    def ppo_train(data: dict, adapter: dict) -> dict:
        return _step("ppo_train", data["dataset_uri"], adapter["adapter_dir"])

    @task(**GPU)
    def evaluate(data: dict, adapter: dict, ppo: dict) -> dict:
        return _step("evaluate", data["dataset_uri"], adapter["adapter_dir"], ppo["ppo_adapter_dir"])

    @task(**GPU)
    def champion_eval(data: dict) -> dict:
        return _step("champion_eval", data["dataset_uri"])

    @task.branch
    def promotion_check(baseline: dict, candidate: dict, champion: dict) -> str:
        from tasks.steps.detox_retrain import after_gate

        decision = _step("promotion_check", baseline, candidate, champion)
        get_current_context()["ti"].xcom_push(key="decision", value=decision)
        config, _ = _run()
        return after_gate(config, decision)

    # Both run after the gate or after the approval, whichever chose them; the other is skipped.
    @task(trigger_rule="none_failed_min_one_success")
    def register_model(decision: dict, adapter: dict, ppo: dict) -> dict:
        return _step("register_model", decision, adapter["adapter_dir"], ppo["ppo_adapter_dir"])

    @task(trigger_rule="none_failed_min_one_success")
    def skip_registration(decision: dict) -> dict:
        return _step("skip_registration", decision)

    @task(trigger_rule="none_failed_min_one_success")
    def report() -> dict:
        return _step("report")

    data = prepare_dataset()
    adapter = download_adapter()
    baseline = baseline_eval(data, adapter)
    ppo = ppo_train(data, adapter)
    baseline >> ppo  # the baseline is measured before training, on the untouched SFT policy
    candidate = evaluate(data, adapter, ppo)
    gate = promotion_check(baseline, candidate, champion_eval(data))
    register = register_model(gate["decision"], adapter, ppo)
    skip = skip_registration(gate["decision"])
    approval = PromotionApproval(
        task_id="approval",
        subject="Register this detox_retrain candidate?",
        options=["Approve", "Reject"],
        options_mapping={"Approve": "register_model", "Reject": "skip_registration"},
        defaults=["Reject"],  # what the timeout chooses: no promotion
        params={"comment": Param("", type="string", description="Why; logged to MLflow with your name.")},
    )
    gate >> approval >> [register, skip]
    gate >> [register, skip] >> report()


class PromotionApproval(HITLBranchOperator):
    """Approve or Reject a promoted candidate, in Airflow's required actions.

    Approve: ``register_model``; Reject or no answer within ``promotion.approval_timeout_hours``:
    ``skip_registration``. The request shows the gate's summary and a link to the run report; the
    answer (reviewer, comment) is logged to the MLflow run.
    """

    def execute(self, context):
        from tasks.steps.review import approval_summary

        config, _ = _run()
        decision = context["ti"].xcom_pull(task_ids="promotion_check", key="decision")
        self.response_timeout = timedelta(hours=config.promotion.approval_timeout_hours)
        self.body = approval_summary(decision, _report_url(context["dag"].dag_id, context["run_id"]))
        return super().execute(context)

    def execute_complete(self, context, event: dict):
        if "error" not in event:
            _step("record_approval", event)
        return super().execute_complete(context, event)


def _report_url(dag_id: str, run_id: str) -> str:
    """The run report's tab on the DAG run page (the plugin's external view)."""
    from urllib.parse import quote

    from airflow.sdk import conf

    base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    return f"{base}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/plugin/detox-run-report"


def _step(name: str, *args):
    """Step ``name`` of :mod:`tasks.steps.detox_retrain` for this DAG run. Bad input (config, data,
    adapter, ...) fails the task at once: a retry could not fix it."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.errors import InputError
    from tasks.steps import detox_retrain as steps

    try:
        return getattr(steps, name)(*_run(), *args)
    except InputError as err:
        raise AirflowFailException(f"{type(err).__name__}: {err}") from err


def _run():
    """The run config from this DAG run's Params, and who is running; credentials from the connections."""
    from tasks.config import config_from_params
    from tasks.io.connections import apply_connections
    from tasks.steps.context import StepContext

    apply_connections(_connection)
    context = get_current_context()
    ti = context["ti"]
    ctx = StepContext(run_key=context["run_id"], dag_id=ti.dag_id, try_number=ti.try_number)
    return config_from_params(_params(context)), ctx


def _params(context) -> dict:
    """This run's DAG Params. Tasks see them in ``context["params"]``, except the approval, whose
    params are its own form (the reviewer's comment): there they come from the DAG and the run's conf."""
    dag_params = context["dag"].params
    params = {name: dag_params[name] for name in dag_params}
    params.update({k: v for k, v in (context["dag_run"].conf or {}).items() if k in params})
    params.update({k: v for k, v in context["params"].items() if k in params})
    return params


def _connection(conn_id: str):
    """The Airflow connection ``conn_id``, or None when it is not defined."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


detox_retrain()
