"""The review plugin on ``make up``'s stack, driven as a person would with a headless Chromium:
read a finished run's report, rank three items and train a reward model from them, approve one
run and reject another.

Two ``detox_retrain`` runs with ``require_approval`` (8 PPO steps on 120 held-out prompts, set up
to promote on the embedded default): the first is the session's ``approved_run``
(tests/stack_fixtures.py, which tests/test_stack.py checks too), the second is rejected here; the
report and the labeling use the first. Screenshots go to ``DETOX_SCREENSHOT_DIR`` (the README's are
made this way) or the stack's home.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import boto3
import pytest
import requests
from stack_fixtures import APPROVAL_CONF, answer_approval

from tasks.io.s3_server import DUMMY_CREDENTIAL, REGION
from tasks.local.demo import DAG_ID

pytestmark = pytest.mark.slow

REWARD_DAG = "reward_model_train"
LABELS = ("detox-demo", "labels/")


def mlflow_tags(stack, run_id: str) -> dict:
    response = requests.post(f"{stack['mlflow_url']}/api/2.0/mlflow/runs/search", timeout=30, json={
        "experiment_ids": [e["experiment_id"] for e in requests.get(
            f"{stack['mlflow_url']}/api/2.0/mlflow/experiments/search", params={"max_results": 100},
            timeout=30).json()["experiments"]],
        "filter": f"tags.`detox.run_key` = '{run_id}'"})
    runs = response.json().get("runs", [])  # MLflow leaves the key out when nothing matches
    assert len(runs) == 1, f"{len(runs)} active MLflow runs tagged {run_id}: {response.text[:2000]}"
    return {tag["key"]: tag["value"] for tag in runs[0]["data"]["tags"]}


def label_records(stack) -> list[dict]:
    client = boto3.client("s3", endpoint_url=stack["s3_endpoint"], aws_access_key_id=DUMMY_CREDENTIAL,
                          aws_secret_access_key=DUMMY_CREDENTIAL, region_name=REGION)
    listed = client.list_objects_v2(Bucket=LABELS[0], Prefix=LABELS[1])
    return [json.loads(client.get_object(Bucket=LABELS[0], Key=entry["Key"])["Body"].read())
            for entry in listed.get("Contents", [])]


@pytest.fixture(scope="module")
def second_run_id(approved_run, airflow_api) -> str:
    """Triggered once the first ended (one active run at a time); rejected by the last test."""
    return airflow_api.trigger(DAG_ID, APPROVAL_CONF)


def test_the_plugin_is_listed_with_a_dag_run_view(airflow_api):
    plugin = next(p for p in airflow_api.get("/plugins")["plugins"] if p["name"] == "detox_review")
    assert any(view["destination"] == "dag_run" for view in plugin["external_views"])


def test_report_view_needs_a_token_and_shows_the_run(stack, airflow_api, approved_run, browser, shots):
    url = f"{stack['airflow_url']}/detox/runs/{DAG_ID}/{quote(approved_run, safe='')}"
    assert requests.get(url, timeout=60).status_code in (401, 403)
    page = requests.get(url, headers={"Authorization": f"Bearer {airflow_api.token}"}, timeout=120)
    assert page.status_code == 200
    assert 'id="decision">promote<' in page.text and '<tr class="sample">' in page.text
    # As a person sees it: the DAG run's "Run report" tab in the Airflow UI.
    browser.goto(f"{stack['airflow_url']}/dags/{DAG_ID}/runs/{quote(approved_run, safe='')}/plugin/detox-run-report")
    report = browser.frame_locator('iframe[title="Run report"]')
    assert report.locator("#decision").inner_text() == "promote"
    rows = report.locator("#samples tbody tr")
    assert rows.count() == APPROVAL_CONF["eval_samples"]
    assert "approved" in report.locator("#facts").inner_text()  # the reviewer's answer, from MLflow
    report.locator("#search").fill("Person1")
    for image in range(report.locator("img").count()):  # the plots come from MLflow: wait for them
        report.locator("img").nth(image).evaluate(
            "img => img.complete ? null : new Promise(done => img.addEventListener('load', done))")
    browser.screenshot(path=str(shots / "run-report.png"))
    browser.goto("about:blank")


def test_rank_three_items_and_train_a_reward_model(stack, airflow_api, approved_run, second_run_id, browser,
                                                   shots):
    before = len(label_records(stack))
    browser.goto(f"{stack['airflow_url']}/plugin/label-summaries")
    frame = browser.frame_locator('iframe[title="Label summaries"]')
    for _ in range(3):
        item = frame.locator("#ranking").get_attribute("data-item")
        frame.locator(".card").first.click()
        browser.keyboard.press("1")  # the highlighted summary is best, the next one second
        browser.keyboard.press("2")
        browser.keyboard.press("Enter")
        frame.locator(f'#ranking:not([data-item="{item}"]), #done').first.wait_for()
    browser.screenshot(path=str(shots / "label-summaries.png"))
    records = label_records(stack)
    assert len(records) == before + 3
    for record in records[-3:]:
        assert record["annotator"] == stack["username"] and record["ranking"] in ([1, 2], [2, 1])
        assert set(record) >= {"prompt", "responses", "ranking", "labeled_at", "source_run"}
    frame.locator("#train").click()
    message = frame.locator("#message")
    message.filter(has_text="Triggered").wait_for()
    reward_run = re.search(r"run (\S+) on", message.inner_text()).group(1)
    browser.goto("about:blank")
    run = airflow_api.wait_for_run(REWARD_DAG, reward_run, timeout_s=600)
    states = {ti["task_id"]: ti["state"] for ti in airflow_api.task_instances(REWARD_DAG, reward_run)}
    assert run["state"] == "success", states
    assert states["train"] == states["evaluate"] == "success"
    assert run["conf"]["preferences_source"].startswith("s3://detox-demo/snapshots/")


def test_approve_one_run_and_reject_another(stack, airflow_api, approved_run, second_run_id, browser):
    states = {ti["task_id"]: ti["state"] for ti in airflow_api.task_instances(DAG_ID, approved_run)}
    assert states["register_model"] == "success" and states["skip_registration"] == "skipped"
    tags = mlflow_tags(stack, approved_run)
    assert tags["approval.outcome"] == "approved" and tags["approval.reviewer"] == stack["username"]
    assert tags["registry.model_uri"].startswith("models:/")

    assert airflow_api.wait_for_task(DAG_ID, second_run_id, "approval", {"awaiting_input"}) == "awaiting_input"
    answer_approval(browser, stack, second_run_id, "Reject", "too terse")
    assert airflow_api.wait_for_run(DAG_ID, second_run_id)["state"] == "success"
    states = {ti["task_id"]: ti["state"] for ti in airflow_api.task_instances(DAG_ID, second_run_id)}
    assert states["skip_registration"] == "success" and states["register_model"] == "skipped"
    tags = mlflow_tags(stack, second_run_id)
    assert (tags["approval.outcome"], tags["approval.comment"]) == ("rejected", "too terse")
    assert tags["registry.model_uri"] == "none"
